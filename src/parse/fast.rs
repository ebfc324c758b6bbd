//! The fast path of a rule line: one pass of a byte scanner (`lex::scan_tokens`, SSE2,
//! 64 bytes a step) hands each token to a [`Reader`], a state machine that reads the
//! `[p:b] -A CHAIN` head and then the options, each given whole to a [`Steps`] sink as
//! it is read: the first reading's summary, the light rule and the comment are made as
//! the line is scanned ([`summary_line`], [`light`], [`comment_of`]); the whole rule
//! ([`rule_line`]) is built from the options and value ranges kept in buffers reused
//! from line to line ([`FastBufs`]). No text is copied and nothing allocated but the
//! [`Rule`]'s own vectors.
//!
//! It reads the common case only: lines whose tokens are plain words and whole quoted
//! strings without escapes, that have no error, and whose `-m statistic` matches are
//! plainly valid (`--mode random --probability 0.…`). For any other line it gives
//! `None`, and the caller reads the line with the nom parsers (`lex`, `rule`), which
//! make the errors. What it gives is what those give (the property tests hold the two
//! to each other).

use std::borrow::Cow;

use crate::model::{Counters, DnatFacts, Jump, LightOpt, LightRule, Match, Opt, Rule, Target};

use super::lex::{T_BANG, T_OPT, T_QUOTED, Tokens, fast_counters, scan_tokens};
use super::rule::{LineCtx, Sec, StepKind, Summary, name_implicit_match};

/// One option, `-m` or `-j` of the rule, with its values as a range of `vals`.
#[derive(Debug, Clone, Copy)]
pub(super) struct FStep {
    kind: StepKind,
    /// The short name of a core option (an index in [`CORE`], 0 for none); otherwise
    /// the name is `name` (a byte range).
    core: u8,
    negated: bool,
    name: (u32, u32),
    /// Byte offset of the option (for its column).
    off: u32,
    /// Its values: `vals[v0..v0 + nv]`.
    v0: u32,
    nv: u32,
}

impl FStep {
    const EMPTY: FStep = FStep {
        kind: StepKind::Core,
        core: 0,
        negated: false,
        name: (0, 0),
        off: 0,
        v0: 0,
        nv: 0,
    };
}

/// The short names of the core options.
const CORE: [&str; 7] = ["", "s", "d", "p", "i", "o", "f"];

/// Buffers reused from line to line: the options of the line read last and their
/// values. They borrow nothing, so that a thread can keep them between lines of any
/// lifetime.
#[derive(Default)]
pub(crate) struct FastBufs {
    /// The values of the options in order, as byte ranges of their text.
    vals: Vec<(u32, u32)>,
    /// The options.
    steps: Vec<FStep>,
}

impl FastBufs {
    /// The steps and values read last.
    #[inline]
    fn steps(&self) -> (&[FStep], &[(u32, u32)]) {
        (&self.steps, &self.vals)
    }
}

/// Where [`Reader`] gives the options of a line, each as soon as it is read whole.
trait Steps<'a> {
    /// A value of the option being read (given before the option itself, in order).
    fn value(&mut self, v: (u32, u32));
    /// An option (its values counted in `vals` from `st.v0`), with its first value
    /// (`(0, 0)`, the empty text, when it has none). `None` ends the reading.
    fn step(&mut self, line: &'a str, st: &FStep, first: (u32, u32)) -> Option<()>;
}

/// The buffers keep every option and value.
impl<'a> Steps<'a> for FastBufs {
    #[inline(always)]
    fn value(&mut self, v: (u32, u32)) {
        self.vals.push(v);
    }

    #[inline(always)]
    fn step(&mut self, _: &'a str, st: &FStep, _: (u32, u32)) -> Option<()> {
        // Its values are the last `nv` given.
        let v0 = u32::try_from(self.vals.len()).ok()?.checked_sub(st.nv)?;
        self.steps.push(FStep { v0, ..*st });
        Some(())
    }
}

/// What an option token is, by its name (without dashes).
#[derive(Clone, Copy)]
enum OptClass {
    Match,
    Jump(Jump),
    Counters,
    /// An index in [`CORE`].
    Core(u8),
    Generic,
}

#[inline(always)]
fn opt_class(name: &[u8]) -> OptClass {
    match name {
        // The short names first (a table of one byte).
        &[c] => match c {
            b'm' => OptClass::Match,
            b'j' => OptClass::Jump(Jump::Jump),
            b'g' => OptClass::Jump(Jump::Goto),
            b'c' => OptClass::Counters,
            b's' => OptClass::Core(1),
            b'd' => OptClass::Core(2),
            b'p' => OptClass::Core(3),
            b'i' => OptClass::Core(4),
            b'o' => OptClass::Core(5),
            b'f' => OptClass::Core(6),
            _ => OptClass::Generic,
        },
        b"match" => OptClass::Match,
        b"jump" => OptClass::Jump(Jump::Jump),
        b"goto" => OptClass::Jump(Jump::Goto),
        b"set-counters" => OptClass::Counters,
        b"source" | b"src" => OptClass::Core(1),
        b"destination" | b"dst" => OptClass::Core(2),
        b"protocol" => OptClass::Core(3),
        b"in-interface" => OptClass::Core(4),
        b"out-interface" => OptClass::Core(5),
        b"fragment" => OptClass::Core(6),
        _ => OptClass::Generic,
    }
}

/// The bytes of a name or value of `line` (none for a range out of it).
#[inline(always)]
fn bytes(line: &str, v: (u32, u32)) -> &[u8] {
    line.as_bytes()
        .get(v.0 as usize..v.1 as usize)
        .unwrap_or_default()
}

/// The text of a value of `line`.
#[inline]
fn text(line: &str, v: (u32, u32)) -> &str {
    &line[v.0 as usize..v.1 as usize]
}

impl FStep {
    #[inline]
    fn name<'a>(&self, line: &'a str) -> &'a str {
        match self.core {
            0 => text(line, self.name),
            c => CORE[usize::from(c) % CORE.len()],
        }
    }

    #[inline]
    fn values<'a>(&self, line: &'a str, vals: &[(u32, u32)]) -> Vec<Cow<'a, str>> {
        let vs = &vals[self.v0 as usize..(self.v0 + self.nv) as usize];
        let mut out = Vec::with_capacity(vs.len());
        for &v in vs {
            out.push(Cow::Borrowed(text(line, v)));
        }
        out
    }
}

/// A token of [`scan_tokens`]: its byte range (quotes included) and kind (`T_…`).
#[derive(Clone, Copy)]
struct Tok {
    s: u32,
    e: u32,
    kind: u64,
}

/// The byte range of a token.
#[inline(always)]
fn range_of(t: Tok) -> (usize, usize) {
    (t.s as usize, t.e as usize)
}

/// The text range of a value token: without its quotes when it is quoted.
#[inline(always)]
fn text_of(t: Tok) -> (u32, u32) {
    let q = u32::from(t.kind == T_QUOTED);
    (t.s + q, t.e - q)
}

/// Is a token a value (bare or quoted)?
#[inline(always)]
fn is_value(t: Tok) -> bool {
    t.kind <= T_QUOTED
}

/// What [`Reader`] expects next.
#[derive(Clone, Copy)]
enum Want {
    /// `[packets:bytes]` or the command.
    Head,
    /// `-A` or `--append`.
    Command,
    /// The chain (a word).
    Chain,
    /// An option or `!`.
    Opt,
    /// The values of the open option ([`Reader::cur`]), or what comes after them.
    Values,
    /// The name after `-m` or `-j`/`-g`: its step's kind and the option's offset.
    Name(StepKind, u32),
    /// The numbers after `-c`.
    Packets,
    Bytes(u64),
}

/// Reads a rule line token by token, as [`scan_tokens`] finds them: `[p:b] -A CHAIN`
/// or `-A CHAIN` (or `--append`) as `line::command` does, then the options and their
/// values as `rule::read_steps` does, each given to a [`Steps`] when read whole. Gives
/// up (`None`) when the tokens need the slow reader or the rule has an error (or uses
/// `!` right after an option's name, iptables' old placement, which the slow reader
/// knows).
struct Reader<'a, 's, S> {
    line: &'a str,
    /// Where the options go.
    sink: &'s mut S,
    want: Want,
    /// The counters (`-c` overrides those of the head).
    counters: Option<Counters>,
    /// The chain's byte range.
    chain: (usize, usize),
    /// A `!` for the next option.
    pending: bool,
    sec: Sec,
    has_target: bool,
    /// The option whose values are being read (in [`Want::Values`]) and its first value.
    /// (The [`Steps`] sets `v0`.)
    cur: FStep,
    first: (u32, u32),
}

impl<'a, 's, S: Steps<'a>> Reader<'a, 's, S> {
    /// Reads the rule line `line`, whose text without blanks at either end is `body` (a
    /// slice of it), giving its options to `sink`: the counters and the chain.
    #[inline(always)]
    fn read(line: &'a str, body: &str, sink: &'s mut S) -> Option<(Option<Counters>, &'a str)> {
        let from = (body.as_ptr() as usize).wrapping_sub(line.as_ptr() as usize);
        let to = from.checked_add(body.len())?;
        let b = line.as_bytes().get(..to)?;
        let mut r = Reader {
            line,
            sink,
            want: Want::Head,
            counters: None,
            chain: (0, 0),
            pending: false,
            sec: Sec::Implicit,
            has_target: false,
            cur: FStep::EMPTY,
            first: (0, 0),
        };
        scan_tokens(b, from, &mut r)?;
        match r.want {
            Want::Values => r.close()?,
            Want::Opt => {}
            _ => return None,
        }
        if r.pending {
            return None;
        }
        Some((r.counters, line.get(r.chain.0..r.chain.1)?))
    }

    /// The next token.
    #[inline(always)]
    fn next(&mut self, t: Tok) -> Option<()> {
        match self.want {
            Want::Values => {
                if is_value(t) {
                    let v = text_of(t);
                    if self.cur.nv == 0 {
                        self.first = v;
                    }
                    self.cur.nv += 1;
                    self.sink.value(v);
                    return Some(());
                }
                if self.cur.nv == 0 && t.kind == T_BANG {
                    // `-s ! 1.2.3.4`, or a `!` for the next option.
                    return None;
                }
                self.close()?;
                self.option(t)
            }
            Want::Opt => self.option(t),
            Want::Name(kind, off) => {
                let r = text_of(t);
                if !is_value(t) || r.0 >= r.1 {
                    return None;
                }
                self.want = Want::Opt;
                let st = FStep {
                    kind,
                    core: 0,
                    negated: false,
                    name: r,
                    off,
                    v0: 0,
                    nv: 0,
                };
                self.sink.step(self.line, &st, (0, 0))
            }
            Want::Packets => {
                self.want = Want::Bytes(self.number(t)?);
                Some(())
            }
            Want::Bytes(packets) => {
                self.counters = Some(Counters {
                    packets,
                    bytes: self.number(t)?,
                });
                self.want = Want::Opt;
                Some(())
            }
            Want::Head => {
                let (s, e) = range_of(t);
                let b = self.line.as_bytes();
                if b.get(s) != Some(&b'[') {
                    return self.command(t);
                }
                let (c, n) = fast_counters(b.get(s..e)?)?;
                if n != e - s {
                    return None;
                }
                self.counters = Some(c);
                self.want = Want::Command;
                Some(())
            }
            Want::Command => self.command(t),
            Want::Chain => {
                // The chain is a word: a quoted one is the slow path's.
                if t.kind == T_QUOTED {
                    return None;
                }
                self.chain = range_of(t);
                self.want = Want::Opt;
                Some(())
            }
        }
    }

    /// `-A` or `--append`.
    #[inline(always)]
    fn command(&mut self, t: Tok) -> Option<()> {
        let (s, e) = range_of(t);
        let cmd = self.line.as_bytes().get(s..e)?;
        if cmd != b"-A" && cmd != b"--append" {
            return None;
        }
        self.want = Want::Chain;
        Some(())
    }

    /// A token where an option (or `!`) should be.
    #[inline(always)]
    fn option(&mut self, t: Tok) -> Option<()> {
        if t.kind != T_OPT {
            if t.kind != T_BANG || self.pending {
                // A value where an option should be, or `!` twice.
                return None;
            }
            self.pending = true;
            return Some(());
        }
        let b = self.line.as_bytes();
        let (s, e) = range_of(t);
        // An option token is `-x…` or `--…`.
        let ns = if b.get(s + 1) == Some(&b'-') {
            s + 2
        } else {
            s + 1
        };
        let class = opt_class(b.get(ns..e)?);
        match class {
            OptClass::Core(_) | OptClass::Generic => {
                let (kind, core) = match class {
                    OptClass::Core(c) => (StepKind::Core, c),
                    _ => (StepKind::Opt(self.sec), 0),
                };
                self.cur = FStep {
                    kind,
                    core,
                    negated: self.pending,
                    name: (ns as u32, e as u32),
                    off: t.s,
                    v0: 0,
                    nv: 0,
                };
                self.first = (0, 0);
                self.pending = false;
                self.want = Want::Values;
            }
            _ if self.pending => return None,
            OptClass::Match => {
                self.sec = Sec::Match;
                self.want = Want::Name(StepKind::MatchStart, t.s);
            }
            OptClass::Jump(jump) => {
                if self.has_target {
                    return None;
                }
                self.has_target = true;
                self.sec = Sec::Target;
                self.want = Want::Name(StepKind::Target(jump), t.s);
            }
            OptClass::Counters => self.want = Want::Packets,
        }
        Some(())
    }

    /// The open option is read whole.
    #[inline(always)]
    fn close(&mut self) -> Option<()> {
        self.want = Want::Opt;
        self.sink.step(self.line, &self.cur, self.first)
    }

    /// A number of `-c`.
    #[inline(always)]
    fn number(&self, t: Tok) -> Option<u64> {
        if !is_value(t) {
            return None;
        }
        let r = text_of(t);
        self.line.get(r.0 as usize..r.1 as usize)?.parse().ok()
    }
}

impl<'a, S: Steps<'a>> Tokens for Reader<'a, '_, S> {
    #[inline(always)]
    fn token(&mut self, s: usize, e: usize, kind: u64) -> Option<()> {
        // (The scanner's tokens end before 1 GiB.)
        self.next(Tok {
            s: s as u32,
            e: e as u32,
            kind,
        })
    }
}

/// Reads a rule line (`body`: the line without blanks at either end, a slice of
/// `line`) into `bufs` (see [`FastBufs::steps`]): its counters and chain, or `None`
/// (see [`Reader`]).
#[inline]
fn read_into<'a>(
    line: &'a str,
    body: &str,
    bufs: &mut FastBufs,
) -> Option<(Option<Counters>, &'a str)> {
    bufs.steps.clear();
    bufs.vals.clear();
    Reader::read(line, body, bufs)
}

/// A rule line (`body`: the line without blanks at either end, a slice of `line`) for
/// its chain and [`Summary`], as `line::parse_line` reads it without `full`, or `None`
/// (see the module).
pub(super) fn summary_line<'a>(line: &'a str, body: &str) -> Option<(&'a str, Summary<'a>)> {
    let mut acc = SummaryAcc::new();
    let (counters, chain) = Reader::read(line, body, &mut acc)?;
    acc.finish(line, counters)?;
    Some((chain, acc.out))
}

/// A rule line (`body`: the line without blanks at either end, a slice of the line)
/// for its chain and whole rule, as `line::parse_line` reads it with `full`, or `None`
/// (see the module).
pub(super) fn rule_line<'a>(
    ctx: &LineCtx<'a>,
    body: &str,
    bufs: &mut FastBufs,
) -> Option<(&'a str, Rule<'a>)> {
    let (counters, chain) = read_into(ctx.text, body, bufs)?;
    Some((chain, rule(ctx, counters, bufs)?))
}

/// A rule line (`body`: the line without blanks at either end, a slice of `line`),
/// line `no`, read into `rule` as a [`LightRule`] when it is of that shape: from the
/// same tokens and options as [`rule_line`], without allocating. `None` for any other
/// line.
pub(super) fn light<'a>(
    line: &'a str,
    body: &str,
    no: u32,
    rule: &mut LightRule<'a>,
) -> Option<()> {
    // (Filled option by option as the `Reader` gives them; on `None` it is left part
    // filled, which callers do not look at.)
    rule.clear(no);
    if Reader::read(line, body, &mut LightAcc { rule })?
        .0
        .is_some()
    {
        return None;
    }
    Some(())
}

/// A [`LightRule`] filled option by option (see [`light`]).
struct LightAcc<'r, 'a> {
    rule: &'r mut LightRule<'a>,
}

impl<'a> Steps<'a> for LightAcc<'_, 'a> {
    #[inline(always)]
    fn value(&mut self, _: (u32, u32)) {}

    #[inline(always)]
    fn step(&mut self, line: &'a str, st: &FStep, first: (u32, u32)) -> Option<()> {
        if st.nv > 1 {
            return None;
        }
        let rule = &mut *self.rule;
        let opt = LightOpt {
            name: st.name(line),
            negated: st.negated,
            value: (st.nv == 1).then(|| text(line, first)),
        };
        match st.kind {
            // `-s`, `-d`, `-p`, `-i`, `-o` (not `-f`) with a value.
            StepKind::Core if (1..=5).contains(&st.core) && st.nv == 1 => rule.push_core(opt),
            StepKind::MatchStart => rule.push_match(opt.name),
            StepKind::Opt(Sec::Match | Sec::Target) => rule.push_opt(opt),
            StepKind::Target(Jump::Jump) => rule.set_target(opt.name),
            // `-f`, a core option without one value, options before any `-m`, `-g`.
            _ => None,
        }
    }
}

/// The comment of a rule line read before without error (as [`Rule::comment`] of
/// [`rule_line`]'s rule), read without building the rule, option by option as the
/// [`Reader`] gives them: `None` when the fast path does not read the line, `Some(None)`
/// for a rule without a comment. The reading stops at the comment: what follows cannot
/// change the first comment of a line that reads without error (kube-proxy puts it
/// first, before the statistic match and the target).
pub(super) fn comment_of<'a>(line: &'a str, body: &str) -> Option<Option<&'a str>> {
    let mut acc = CommentAcc::default();
    let read = Reader::read(line, body, &mut acc);
    if acc.found.is_some() {
        return Some(acc.found);
    }
    read?;
    acc.end_match(line)?;
    Some(acc.found)
}

/// The comment of a rule, read option by option (see [`comment_of`]).
#[derive(Default)]
struct CommentAcc<'a> {
    /// The last `-m` is a comment match.
    in_comment: bool,
    /// The `-m statistic` match being read.
    stat: Option<StatAcc>,
    found: Option<&'a str>,
}

impl CommentAcc<'_> {
    /// The end of a match: as `rule` does, a statistic match it does not read leaves
    /// the line to the slow path.
    #[inline]
    fn end_match(&mut self, line: &str) -> Option<()> {
        if let Some(acc) = self.stat.take() {
            acc.finish(line)?;
        }
        Some(())
    }
}

impl<'a> Steps<'a> for CommentAcc<'a> {
    #[inline(always)]
    fn value(&mut self, _: (u32, u32)) {}

    #[inline(always)]
    fn step(&mut self, line: &'a str, st: &FStep, first: (u32, u32)) -> Option<()> {
        match st.kind {
            // Options before any `-m` go to a match named after the protocol, which
            // could be called `comment`: left to the whole rule.
            StepKind::Opt(Sec::Implicit) => return None,
            StepKind::MatchStart => {
                self.end_match(line)?;
                let name = bytes(line, st.name);
                if name == b"statistic" {
                    self.stat = Some(StatAcc::default());
                }
                self.in_comment = name == b"comment";
            }
            StepKind::Opt(Sec::Match) => {
                if let Some(acc) = self.stat.as_mut() {
                    acc.option(line, st, first);
                }
                if self.in_comment && self.found.is_none() && bytes(line, st.name) == b"comment" {
                    self.found = Some(text(line, first));
                    // Found: the rest of the line is not read (see `comment_of`).
                    return None;
                }
            }
            _ => {}
        }
        Some(())
    }
}

/// `b.is_ascii()`, eight bytes at a time.
#[inline]
fn is_ascii(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    let mut all = 0u64;
    for w in &mut words {
        let mut x = [0u8; 8];
        x.copy_from_slice(w);
        all |= u64::from_le_bytes(x);
    }
    let tail = words.remainder().iter().fold(0u8, |a, &c| a | c);
    all & 0x8080_8080_8080_8080 == 0 && tail < 0x80
}

/// Is a `--probability` text certainly read as a number in [0, 1]: `0`, `1`, `0.` with
/// digits, `1.` with zeros?
fn plain_probability(p: &[u8]) -> bool {
    match p {
        b"0" | b"1" => true,
        [b'0', b'.', rest @ ..] => !rest.is_empty() && rest.iter().all(u8::is_ascii_digit),
        [b'1', b'.', rest @ ..] => !rest.is_empty() && rest.iter().all(|&c| c == b'0'),
        _ => false,
    }
}

/// The first value of an option of `vals`, `(0, 0)` (the empty text) when it has none.
#[inline]
fn first_of(st: &FStep, vals: &[(u32, u32)]) -> (u32, u32) {
    if st.nv == 0 {
        (0, 0)
    } else {
        vals.get(st.v0 as usize).copied().unwrap_or((0, 0))
    }
}

/// The options of a `-m statistic` match that say what it is, read one by one: the
/// first `--mode` and the first `--probability` (its first value and `!`).
#[derive(Default)]
struct StatAcc {
    mode: Option<(u32, u32)>,
    probability: Option<((u32, u32), bool)>,
}

impl StatAcc {
    /// An option of the match (first value `first`).
    #[inline]
    fn option(&mut self, line: &str, st: &FStep, first: (u32, u32)) {
        let name = bytes(line, st.name);
        if self.mode.is_none() && name == b"mode" {
            self.mode = Some(first);
        } else if self.probability.is_none() && name == b"probability" {
            self.probability = Some((first, st.negated));
        }
    }

    /// The match, when it is certainly valid: what `statistic::from_match` gives for
    /// it. Random mode with a plain probability only; anything else (`None`) is left to
    /// the slow path.
    fn finish(&self, line: &str) -> Option<crate::statistic::Statistic> {
        let (p, inverted) = self.probability?;
        if self.mode.is_some_and(|m| text(line, m) != "random") {
            return None;
        }
        let text = text(line, p);
        if !plain_probability(text.as_bytes()) {
            return None;
        }
        Some(crate::statistic::Statistic::Random {
            threshold: crate::statistic::threshold_from_text(text)?,
            inverted,
        })
    }
}

/// The `-m statistic` match starting at step `i`, when it is certainly valid (see
/// [`StatAcc::finish`]).
fn plain_statistic(
    line: &str,
    vals: &[(u32, u32)],
    steps: &[FStep],
    i: usize,
) -> Option<crate::statistic::Statistic> {
    let mut acc = StatAcc::default();
    for st in steps
        .get(i + 1..)
        .unwrap_or(&[])
        .iter()
        .take_while(|x| x.kind != StepKind::MatchStart)
        .filter(|x| x.kind == StepKind::Opt(Sec::Match))
    {
        acc.option(line, st, first_of(st, vals));
    }
    acc.finish(line)
}

/// The rule's [`Summary`], as `rule::summary` reads it, made option by option as the
/// [`Reader`] gives them (no option is kept).
struct SummaryAcc<'a> {
    out: Summary<'a>,
    /// The module of the last `-m`.
    module: &'a str,
    /// An option of that match was seen (what [`Summary::match_option`] does for
    /// one option it does for all).
    module_opts: bool,
    /// The `-m statistic` match being read.
    stat: Option<StatAcc>,
    /// The target is `DNAT`.
    dnat: bool,
    /// The facts of a DNAT rule.
    facts: DnatAcc<'a>,
}

impl<'a> SummaryAcc<'a> {
    fn new() -> Self {
        SummaryAcc {
            out: Summary::empty(false),
            module: "",
            module_opts: false,
            stat: None,
            dnat: false,
            facts: DnatAcc::new(),
        }
    }

    /// The end of a match: a statistic one is checked and counted. (The order in which
    /// [`Summary::statistic_match`] comes among the other facts does not change the
    /// summary.)
    #[inline]
    fn end_match(&mut self, line: &str) -> Option<()> {
        if let Some(acc) = self.stat.take() {
            self.out.statistic_match(acc.finish(line)?);
        }
        Some(())
    }

    /// The end of a rule with the counters `counters`: `out` is its summary, or `None`
    /// (see the module).
    #[inline(always)]
    fn finish(&mut self, line: &str, counters: Option<Counters>) -> Option<()> {
        self.end_match(line)?;
        self.out.counted = counters.is_some();
        // (Only a DNAT rule has them: the others are not looked at again.)
        if self.dnat && counters.is_none() {
            self.out.dnat = self.facts.finish();
        }
        Some(())
    }
}

impl<'a> Steps<'a> for SummaryAcc<'a> {
    #[inline(always)]
    fn value(&mut self, _: (u32, u32)) {}

    #[inline(always)]
    fn step(&mut self, line: &'a str, st: &FStep, first: (u32, u32)) -> Option<()> {
        self.facts.step(line.as_bytes(), st, first);
        let out = &mut self.out;
        match st.kind {
            StepKind::Core => {
                out.condition(st.core == 1);
                if (st.core == 1 || st.core == 2) && bytes(line, first).contains(&b':') {
                    out.v6 = true;
                }
            }
            StepKind::Opt(Sec::Implicit) => out.condition(false),
            StepKind::MatchStart => {
                self.end_match(line)?;
                self.module = st.name(line);
                self.module_opts = false;
                if self.module == "statistic" {
                    self.stat = Some(StatAcc::default());
                }
            }
            StepKind::Opt(Sec::Match) => {
                if !self.module_opts {
                    self.module_opts = true;
                    out.match_option(self.module);
                }
                if let Some(acc) = self.stat.as_mut() {
                    acc.option(line, st, first);
                }
            }
            StepKind::Target(jump) => {
                let name = st.name(line);
                self.dnat = name == "DNAT";
                // Its options (if any) come after it.
                out.target = Some((jump, name, false));
            }
            StepKind::Opt(Sec::Target) => {
                if let Some(t) = out.target.as_mut() {
                    t.2 = true;
                }
                let name = bytes(line, st.name);
                if (name == b"to-destination" || name == b"to-source")
                    && bytes(line, first).first() == Some(&b'[')
                {
                    out.v6 = true;
                }
            }
        }
        Some(())
    }
}

/// The [`DnatFacts`] of a rule line (`body`: the line without blanks at either end, a
/// slice of `line`), as [`summary_line`] finds them: for the nom parsers' summary of a
/// line, which must say the same.
pub(super) fn line_dnat_facts(line: &str, body: &str, bufs: &mut FastBufs) -> Option<DnatFacts> {
    if read_into(line, body, bufs)?.0.is_some() {
        return None;
    }
    let (steps, vals) = bufs.steps();
    let mut acc = DnatAcc::new();
    for st in steps {
        acc.step(line.as_bytes(), st, first_of(st, vals));
    }
    acc.finish()
}

/// The [`DnatFacts`] of a rule without counters, read option by option, as
/// `DnatFacts::of` finds them from the rule's light reading ([`light`]), without
/// filling a [`LightRule`]: `None` when the rule is not of their shape. (Held to that
/// reading by the property tests of `RuleLine::new` and of the walk.)
struct DnatAcc<'a> {
    /// Of their shape so far.
    ok: bool,
    proto: Option<&'a [u8]>,
    value: Option<(u32, u32)>,
    n_matches: usize,
    n_opts: usize,
    comment: bool,
    target: bool,
}

impl<'a> DnatAcc<'a> {
    fn new() -> Self {
        DnatAcc {
            ok: true,
            proto: None,
            value: None,
            n_matches: 0,
            n_opts: 0,
            comment: false,
            target: false,
        }
    }

    /// The next option of the rule (`b`: the line's bytes), with its first value.
    #[inline(always)]
    fn step(&mut self, b: &'a [u8], st: &FStep, first: (u32, u32)) {
        if !self.ok {
            return;
        }
        // (Names compared as bytes: a fifth of the cost.)
        let bytes = |r: (u32, u32)| b.get(r.0 as usize..r.1 as usize).unwrap_or(&[]);
        // As `light`: one value at most; as `LightRule::matches_always`: options
        // of comments only; one `-p` without `!` and no other core option.
        if st.nv > 1 {
            self.ok = false;
            return;
        }
        match st.kind {
            StepKind::Core if st.core == 3 && st.nv == 1 && !st.negated && self.proto.is_none() => {
                self.proto = Some(bytes(first));
            }
            StepKind::MatchStart if !self.target => {
                let module = bytes(st.name);
                if module == b"statistic" {
                    self.ok = false;
                }
                self.comment = module == b"comment";
                self.n_matches += 1;
            }
            StepKind::Opt(Sec::Match) if self.comment => self.n_opts += 1,
            StepKind::Target(Jump::Jump) if bytes(st.name) == b"DNAT" => self.target = true,
            StepKind::Opt(Sec::Target) => {
                self.n_opts += 1;
                if self.value.is_none() && DnatFacts::is_destination(bytes(st.name)) {
                    self.value = Some(first);
                }
            }
            _ => self.ok = false,
        }
    }

    /// The facts, when the rule is of their shape.
    fn finish(&self) -> Option<DnatFacts> {
        use crate::model::{LIGHT_MATCHES, LIGHT_OPTS};
        if !self.ok || !self.target || self.n_matches > LIGHT_MATCHES || self.n_opts > LIGHT_OPTS {
            return None;
        }
        DnatFacts::new(self.proto, self.value.unwrap_or((0, 0)))
    }
}

/// The whole rule, as `rule::rule` reads it, or `None` (see the module).
fn rule<'a>(ctx: &LineCtx<'a>, counters: Option<Counters>, bufs: &FastBufs) -> Option<Rule<'a>> {
    let line = ctx.text;
    let (steps, vals) = bufs.steps();
    // Sizes, so that every vector is allocated once.
    let mut n_core = 0;
    let mut n_implicit = 0;
    let mut n_matches = 0;
    let mut n_target = 0;
    for (i, s) in steps.iter().enumerate() {
        match s.kind {
            StepKind::Core => n_core += 1,
            StepKind::Opt(Sec::Implicit) => n_implicit += 1,
            StepKind::Opt(Sec::Target) => n_target += 1,
            StepKind::MatchStart => {
                n_matches += 1;
                if s.name(line) == "statistic" && plain_statistic(line, vals, steps, i).is_none() {
                    return None;
                }
            }
            StepKind::Opt(Sec::Match) | StepKind::Target(_) => {}
        }
    }
    // Columns are byte offsets in an ASCII line.
    let ascii = is_ascii(line.as_bytes());
    let col = |off: u32| {
        if ascii && off < u32::MAX - 1 {
            off + 1
        } else {
            ctx.col_off(off as usize)
        }
    };
    let opt = |s: &FStep| Opt {
        name: s.name(line),
        negated: s.negated,
        values: s.values(line, vals),
        col: col(s.off),
    };
    let mut core = Vec::with_capacity(n_core);
    let mut matches: Vec<Match<'a>> = Vec::with_capacity(n_matches + usize::from(n_implicit > 0));
    let mut target: Option<Target<'a>> = None;
    for (idx, s) in steps.iter().enumerate() {
        match s.kind {
            StepKind::Core => core.push(opt(s)),
            StepKind::Opt(Sec::Implicit) => {
                let o = opt(s);
                if matches.is_empty() {
                    matches.push(Match {
                        module: "",
                        implicit: true,
                        options: Vec::with_capacity(n_implicit),
                        col: o.col,
                    });
                }
                matches[0].options.push(o);
            }
            StepKind::Opt(Sec::Match) => {
                if let Some(m) = matches.last_mut() {
                    m.options.push(opt(s));
                }
            }
            StepKind::Opt(Sec::Target) => {
                if let Some(t) = target.as_mut() {
                    t.options.push(opt(s));
                }
            }
            StepKind::MatchStart => {
                let n_opts = steps[idx + 1..]
                    .iter()
                    .take_while(|s| s.kind != StepKind::MatchStart)
                    .filter(|s| s.kind == StepKind::Opt(Sec::Match))
                    .count();
                matches.push(Match {
                    module: s.name(line),
                    implicit: false,
                    options: Vec::with_capacity(n_opts),
                    col: col(s.off),
                });
            }
            StepKind::Target(jump) => {
                target = Some(Target {
                    jump,
                    name: s.name(line),
                    options: Vec::with_capacity(n_target),
                    col: col(s.off),
                });
            }
        }
    }
    if n_implicit > 0 {
        name_implicit_match(&core, &mut matches[0]);
    }
    Some(Rule {
        line: ctx.no,
        counters,
        core,
        matches,
        target,
    })
}
