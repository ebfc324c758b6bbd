//! The fast path of a rule line: the line split once into tokens by a byte scanner
//! (`lex::split`: packed byte ranges, eight bytes a step), the `[p:b] -A CHAIN` head
//! read from them, then the options found by their bytes and written, with the ranges
//! of their values, into buffers reused from line to line ([`FastBufs`]); no text is
//! copied and nothing allocated but the [`Rule`]'s own vectors.
//!
//! It reads the common case only: lines whose tokens are plain words and whole quoted
//! strings without escapes, that have no error, and whose `-m statistic` matches are
//! plainly valid (`--mode random --probability 0.…`). For any other line it gives
//! `None`, and the caller reads the line with the nom parsers (`lex`, `rule`), which
//! make the errors. What it gives is what those give (the property tests hold the two
//! to each other).

use std::borrow::Cow;

use crate::model::{Counters, DnatFacts, Jump, LightOpt, LightRule, Match, Opt, Rule, Target};

use super::lex::{T_BANG, T_OPT, T_QUOTED, fast_counters, split};
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

/// Buffers reused from line to line. They borrow nothing, so that a thread can keep
/// them between lines of any lifetime.
#[derive(Default)]
pub(crate) struct FastBufs {
    /// The tokens, as packed byte ranges (see [`split`]): the first `n_toks`.
    toks: Vec<u64>,
    n_toks: usize,
    /// The values of the options in order, as byte ranges of their text (the first
    /// `n_vals`).
    vals: Vec<(u32, u32)>,
    n_vals: usize,
    /// The options (the first `n_steps`).
    steps: Vec<FStep>,
    n_steps: usize,
}

impl FastBufs {
    /// The steps and values read last.
    #[inline]
    fn steps(&self) -> (&[FStep], &[(u32, u32)]) {
        (
            self.steps.get(..self.n_steps).unwrap_or(&[]),
            self.vals.get(..self.n_vals).unwrap_or(&[]),
        )
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

#[inline]
fn opt_class(name: &[u8]) -> OptClass {
    match name {
        b"m" | b"match" => OptClass::Match,
        b"j" | b"jump" => OptClass::Jump(Jump::Jump),
        b"g" | b"goto" => OptClass::Jump(Jump::Goto),
        b"c" | b"set-counters" => OptClass::Counters,
        b"s" | b"source" | b"src" => OptClass::Core(1),
        b"d" | b"destination" | b"dst" => OptClass::Core(2),
        b"p" | b"protocol" => OptClass::Core(3),
        b"i" | b"in-interface" => OptClass::Core(4),
        b"o" | b"out-interface" => OptClass::Core(5),
        b"f" | b"fragment" => OptClass::Core(6),
        _ => OptClass::Generic,
    }
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

    /// The first value, or "".
    #[inline]
    fn first<'a>(&self, line: &'a str, vals: &[(u32, u32)]) -> &'a str {
        if self.nv == 0 {
            ""
        } else {
            text(line, vals[self.v0 as usize])
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

/// The byte range of a token of [`split`].
#[inline(always)]
fn range_of(t: u64) -> (usize, usize) {
    (t as u32 as usize, (t >> 32) as usize & 0x3fff_ffff)
}

/// The text range of a value token of [`split`]: without its quotes when it is quoted.
#[inline(always)]
fn text_of(t: u64) -> (u32, u32) {
    let q = u32::from(t >> 62 == T_QUOTED);
    (t as u32 + q, ((t >> 32) as u32 & 0x3fff_ffff) - q)
}

/// Is a token of [`split`] a value (bare or quoted)?
#[inline(always)]
fn is_value(t: u64) -> bool {
    t >> 62 <= T_QUOTED
}

/// Reads the tokens in `bufs` from the `k0`-th on (the tokens after `-A CHAIN`, see
/// [`head`]) into options and their values (see [`FastBufs::steps`]), as
/// `rule::read_steps` does. `None` when the
/// tokens need the slow reader or the rule has an error (or uses `!` right after an
/// option's name, iptables' old placement, which the slow reader knows). Returns the
/// counters (`-c` overrides `counters`).
fn read_steps(
    line: &str,
    k0: usize,
    counters: Option<Counters>,
    bufs: &mut FastBufs,
) -> Option<Option<Counters>> {
    let b = line.as_bytes();
    bufs.n_steps = 0;
    bufs.n_vals = 0;
    let n = bufs.n_toks;
    // At most one step and one value a token: written in place, no pushes.
    if bufs.steps.len() < n {
        bufs.steps.resize(n, FStep::EMPTY);
    }
    if bufs.vals.len() < n {
        bufs.vals.resize(n, (0, 0));
    }
    let toks = &bufs.toks[..n];
    let steps = &mut bufs.steps[..n];
    let vals = &mut bufs.vals[..n];
    let mut n_steps = 0;
    let mut n_vals = 0;
    let mut k = k0;
    let mut pending = false;
    let mut sec = Sec::Implicit;
    let mut counters = counters;
    let mut has_target = false;
    while k < n {
        let t = toks[k];
        if t >> 62 != T_OPT {
            if t >> 62 != T_BANG || pending {
                // A value where an option should be, or `!` twice.
                return None;
            }
            pending = true;
            k += 1;
            continue;
        }
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
                    _ => (StepKind::Opt(sec), 0),
                };
                k += 1;
                let v0 = n_vals;
                if k < n && toks[k] >> 62 == T_BANG {
                    // `-s ! 1.2.3.4`, or a `!` for the next option.
                    return None;
                }
                while k < n && is_value(toks[k]) {
                    vals[n_vals] = text_of(toks[k]);
                    n_vals += 1;
                    k += 1;
                }
                steps[n_steps] = FStep {
                    kind,
                    core,
                    negated: pending,
                    name: (ns as u32, e as u32),
                    off: t as u32,
                    v0: v0 as u32,
                    nv: (n_vals - v0) as u32,
                };
                n_steps += 1;
                pending = false;
            }
            _ if pending => return None,
            OptClass::Match | OptClass::Jump(_) => {
                let kind = match class {
                    OptClass::Jump(jump) => {
                        if has_target {
                            return None;
                        }
                        has_target = true;
                        sec = Sec::Target;
                        StepKind::Target(jump)
                    }
                    _ => {
                        sec = Sec::Match;
                        StepKind::MatchStart
                    }
                };
                let name = *toks.get(k + 1)?;
                let r = text_of(name);
                if !is_value(name) || r.0 >= r.1 {
                    return None;
                }
                steps[n_steps] = FStep {
                    kind,
                    core: 0,
                    negated: false,
                    name: r,
                    off: t as u32,
                    v0: n_vals as u32,
                    nv: 0,
                };
                n_steps += 1;
                k += 2;
            }
            OptClass::Counters => {
                let num = |j: usize| -> Option<u64> {
                    let t = *toks.get(j)?;
                    if !is_value(t) {
                        return None;
                    }
                    let r = text_of(t);
                    line.get(r.0 as usize..r.1 as usize)?.parse().ok()
                };
                counters = Some(Counters {
                    packets: num(k + 1)?,
                    bytes: num(k + 2)?,
                });
                k += 3;
            }
        }
    }
    if pending {
        return None;
    }
    bufs.n_steps = n_steps;
    bufs.n_vals = n_vals;
    Some(counters)
}

/// Splits `body` (the line without blanks at either end, a slice of `line`) into
/// tokens (in `bufs`) and reads `[p:b] -A CHAIN` or `-A CHAIN` (or `--append`) at its
/// start as `line::command` does: the counters, the chain and the index of the first
/// token after the chain. `None` for anything else or anything the fast path does not
/// read.
#[inline]
fn head<'a>(
    line: &'a str,
    body: &str,
    bufs: &mut FastBufs,
) -> Option<(Option<Counters>, &'a str, usize)> {
    let from = (body.as_ptr() as usize).wrapping_sub(line.as_ptr() as usize);
    let to = from.checked_add(body.len())?;
    let b = line.as_bytes().get(..to)?;
    let n = split(b, from, &mut bufs.toks)?;
    bufs.n_toks = n;
    let toks = &bufs.toks[..n];
    let mut k = 0;
    let mut counters = None;
    let first = *toks.first()?;
    let (s, e) = range_of(first);
    if b[s] == b'[' {
        let (c, n) = fast_counters(&b[s..e])?;
        if n != e - s {
            return None;
        }
        counters = Some(c);
        k = 1;
    }
    let cmd = *toks.get(k)?;
    let (s, e) = range_of(cmd);
    let cmd = &b[s..e];
    if cmd != b"-A" && cmd != b"--append" {
        return None;
    }
    // The chain is a word: a quoted one is the slow path's.
    let chain = *toks.get(k + 1)?;
    if chain >> 62 == T_QUOTED {
        return None;
    }
    let (s, e) = range_of(chain);
    Some((counters, line.get(s..e)?, k + 2))
}

/// A rule line (`body`: the line without blanks at either end, a slice of `line`) for
/// its chain and [`Summary`], as `line::parse_line` reads it without `full`, or `None`
/// (see the module).
pub(super) fn summary_line<'a>(
    line: &'a str,
    body: &str,
    bufs: &mut FastBufs,
) -> Option<(&'a str, Summary<'a>)> {
    let (counters, chain, k0) = head(line, body, bufs)?;
    Some((chain, summary(line, k0, counters, bufs)?))
}

/// A rule line (`body`: the line without blanks at either end, a slice of the line)
/// for its chain and whole rule, as `line::parse_line` reads it with `full`, or `None`
/// (see the module).
pub(super) fn rule_line<'a>(
    ctx: &LineCtx<'a>,
    body: &str,
    bufs: &mut FastBufs,
) -> Option<(&'a str, Rule<'a>)> {
    let (counters, chain, k0) = head(ctx.text, body, bufs)?;
    Some((chain, rule(ctx, k0, counters, bufs)?))
}

/// A rule line (`body`: the line without blanks at either end, a slice of `line`),
/// line `no`, read into `rule` as a [`LightRule`] when it is of that shape: from the
/// same tokens and options as [`rule_line`], without allocating. `None` for any other
/// line.
pub(super) fn light<'a>(
    line: &'a str,
    body: &str,
    no: u32,
    bufs: &mut FastBufs,
    rule: &mut LightRule<'a>,
) -> Option<()> {
    let (counters, _, k0) = head(line, body, bufs)?;
    if counters.is_some() || read_steps(line, k0, None, bufs)?.is_some() {
        return None;
    }
    let (steps, vals) = bufs.steps();
    rule.clear(no);
    for st in steps {
        if st.nv > 1 {
            return None;
        }
        let opt = LightOpt {
            name: st.name(line),
            negated: st.negated,
            value: (st.nv == 1).then(|| st.first(line, vals)),
        };
        match st.kind {
            // `-s`, `-d`, `-p`, `-i`, `-o` (not `-f`) with a value.
            StepKind::Core if (1..=5).contains(&st.core) && st.nv == 1 => rule.push_core(opt)?,
            StepKind::MatchStart => rule.push_match(opt.name)?,
            StepKind::Opt(Sec::Match | Sec::Target) => rule.push_opt(opt)?,
            StepKind::Target(Jump::Jump) => rule.set_target(opt.name)?,
            // `-f`, a core option without one value, options before any `-m`, `-g`.
            _ => return None,
        }
    }
    Some(())
}

/// The comment of a rule line (as [`Rule::comment`] of [`rule_line`]'s rule), read
/// without building the rule: `None` when the fast path does not read the line,
/// `Some(None)` for a rule without a comment.
pub(super) fn comment_of<'a>(
    line: &'a str,
    body: &str,
    bufs: &mut FastBufs,
) -> Option<Option<&'a str>> {
    let (counters, _, k0) = head(line, body, bufs)?;
    read_steps(line, k0, counters, bufs)?;
    let (steps, vals) = bufs.steps();
    let mut in_comment = false;
    let mut found = None;
    for (i, st) in steps.iter().enumerate() {
        match st.kind {
            // Options before any `-m` go to a match named after the protocol, which
            // could be called `comment`: left to the whole rule.
            StepKind::Opt(Sec::Implicit) => return None,
            StepKind::MatchStart => {
                let name = st.name(line);
                // As `rule` does: a statistic match it does not read leaves the
                // line to the slow path.
                if name == "statistic" && plain_statistic(line, vals, steps, i).is_none() {
                    return None;
                }
                in_comment = name == "comment";
            }
            StepKind::Opt(Sec::Match)
                if in_comment && found.is_none() && st.name(line) == "comment" =>
            {
                found = Some(st.first(line, vals));
            }
            _ => {}
        }
    }
    Some(found)
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

/// The `-m statistic` match starting at step `i`, when it is certainly valid: what
/// `statistic::from_match` gives for it. Random mode with a plain probability only;
/// anything else (`None`) is left to the slow path.
fn plain_statistic(
    line: &str,
    vals: &[(u32, u32)],
    steps: &[FStep],
    i: usize,
) -> Option<crate::statistic::Statistic> {
    let mut mode = None;
    let mut probability = None;
    for st in steps[i + 1..]
        .iter()
        .take_while(|x| x.kind != StepKind::MatchStart)
        .filter(|x| x.kind == StepKind::Opt(Sec::Match))
    {
        let name = st.name(line);
        if mode.is_none() && name == "mode" {
            mode = Some(st);
        } else if probability.is_none() && name == "probability" {
            probability = Some(st);
        }
    }
    let p = probability?;
    if mode.is_some_and(|m| m.first(line, vals) != "random") {
        return None;
    }
    let text = p.first(line, vals);
    if !plain_probability(text.as_bytes()) {
        return None;
    }
    Some(crate::statistic::Statistic::Random {
        threshold: crate::statistic::threshold_from_text(text)?,
        inverted: p.negated,
    })
}

/// The rule's [`Summary`], as `rule::summary` reads it, or `None` (see the module).
fn summary<'a>(
    line: &'a str,
    k0: usize,
    counters: Option<Counters>,
    bufs: &mut FastBufs,
) -> Option<Summary<'a>> {
    let counters = read_steps(line, k0, counters, bufs)?;
    let (steps, vals) = bufs.steps();
    let mut out = Summary::empty(counters.is_some());
    let mut module = "";
    let mut dnat = false;
    for (i, st) in steps.iter().enumerate() {
        match st.kind {
            StepKind::Core => {
                out.condition(st.core == 1);
                if (st.core == 1 || st.core == 2) && st.first(line, vals).contains(':') {
                    out.v6 = true;
                }
            }
            StepKind::Opt(Sec::Implicit) => out.condition(false),
            StepKind::MatchStart => {
                module = st.name(line);
                if module == "statistic" {
                    out.statistic_match(plain_statistic(line, vals, steps, i)?);
                }
            }
            StepKind::Opt(Sec::Match) => out.match_option(module),
            StepKind::Target(jump) => {
                let has_options = steps[i + 1..]
                    .iter()
                    .any(|x| x.kind == StepKind::Opt(Sec::Target));
                let name = st.name(line);
                dnat = name == "DNAT";
                out.target = Some((jump, name, has_options));
            }
            StepKind::Opt(Sec::Target) => {
                let name = st.name(line);
                if (name == "to-destination" || name == "to-source")
                    && st.first(line, vals).starts_with('[')
                {
                    out.v6 = true;
                }
            }
        }
    }
    // (Only a DNAT rule has them: the others are not looked at again.)
    if dnat && counters.is_none() {
        out.dnat = dnat_facts(line, steps, vals);
    }
    Some(out)
}

/// The [`DnatFacts`] of a rule line (`body`: the line without blanks at either end, a
/// slice of `line`), as [`summary_line`] finds them: for the nom parsers' summary of a
/// line, which must say the same.
pub(super) fn line_dnat_facts(line: &str, body: &str, bufs: &mut FastBufs) -> Option<DnatFacts> {
    let (counters, _, k0) = head(line, body, bufs)?;
    if counters.is_some() || read_steps(line, k0, None, bufs)?.is_some() {
        return None;
    }
    let (steps, vals) = bufs.steps();
    dnat_facts(line, steps, vals)
}

/// The [`DnatFacts`] of a rule without counters whose options are `steps` (values
/// `vals`), as `DnatFacts::of` finds them from the rule's light reading ([`light`]),
/// without filling a [`LightRule`] (a fifth of the cost): `None` when the rule is not
/// of their shape. (Held to that reading by the property tests of `RuleLine::new` and
/// of the walk.)
fn dnat_facts(line: &str, steps: &[FStep], vals: &[(u32, u32)]) -> Option<DnatFacts> {
    use crate::model::{LIGHT_MATCHES, LIGHT_OPTS};
    // (Names compared as bytes: a fifth of the cost.)
    let b = line.as_bytes();
    let bytes = |r: (u32, u32)| b.get(r.0 as usize..r.1 as usize).unwrap_or(&[]);
    let mut proto = None;
    let mut value = None;
    let (mut n_matches, mut n_opts) = (0, 0);
    let mut comment = false;
    let mut target = false;
    for st in steps {
        // As `light`: one value at most; as `LightRule::matches_always`: options
        // of comments only; one `-p` without `!` and no other core option.
        if st.nv > 1 {
            return None;
        }
        match st.kind {
            StepKind::Core if st.core == 3 && st.nv == 1 && !st.negated && proto.is_none() => {
                proto = Some(bytes(vals[st.v0 as usize]));
            }
            StepKind::MatchStart if !target => {
                let module = bytes(st.name);
                if module == b"statistic" {
                    return None;
                }
                comment = module == b"comment";
                n_matches += 1;
            }
            StepKind::Opt(Sec::Match) if comment => n_opts += 1,
            StepKind::Target(Jump::Jump) if bytes(st.name) == b"DNAT" => target = true,
            StepKind::Opt(Sec::Target) => {
                n_opts += 1;
                if value.is_none() && DnatFacts::is_destination(bytes(st.name)) {
                    value = Some(if st.nv == 0 {
                        (0, 0)
                    } else {
                        vals[st.v0 as usize]
                    });
                }
            }
            _ => return None,
        }
    }
    if !target || n_matches > LIGHT_MATCHES || n_opts > LIGHT_OPTS {
        return None;
    }
    DnatFacts::new(proto, value.unwrap_or((0, 0)))
}

/// The whole rule, as `rule::rule` reads it, or `None` (see the module).
fn rule<'a>(
    ctx: &LineCtx<'a>,
    k0: usize,
    counters: Option<Counters>,
    bufs: &mut FastBufs,
) -> Option<Rule<'a>> {
    let line = ctx.text;
    let counters = read_steps(line, k0, counters, bufs)?;
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
