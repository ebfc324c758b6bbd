//! The body of an `-A CHAIN …` line: core options, `-m` matches, the target.
//!
//! Every option is kept generically: `[!] -x|--name` takes the following tokens up to
//! the next `!` or option token as its values. Short options and their long forms
//! (`-s/--source/--src`, `-d/--destination/--dst`, `-p/--protocol`,
//! `-i/--in-interface`, `-o/--out-interface`, `-f/--fragment`) are core options
//! wherever they appear; `-m/--match` starts a match, `-j/--jump` and `-g/--goto` the
//! target, `-c/--set-counters P B` sets counters. Other options belong to the latest
//! `-m`, to the target after `-j`, or, before any `-m`, to an implicit match named
//! after the rule's protocol (`-p tcp --dport 80`).

use std::borrow::Cow;
use std::cell::Cell;

use crate::error::{InputError, InputErrorKind};
use crate::model::{Counters, Jump, Match, Opt, Rule, Target};
use crate::statistic;

use super::fast::FastBufs;
use super::lex::{PErr, Tok, TokKind, is_blank, tokens};

/// A line being parsed: its text, number and a fast path for columns.
pub(crate) struct LineCtx<'a> {
    pub text: &'a str,
    pub no: u32,
    /// Whether the line is ASCII (columns are byte offsets then), found out on the
    /// first column asked for: 0 not yet, 1 yes, 2 no.
    ascii: Cell<u8>,
}

impl<'a> LineCtx<'a> {
    #[inline]
    pub fn new(text: &'a str, no: u32) -> Self {
        LineCtx {
            text,
            no,
            ascii: Cell::new(0),
        }
    }

    #[inline]
    fn is_ascii(&self) -> bool {
        match self.ascii.get() {
            0 => {
                let ascii = self.text.is_ascii();
                self.ascii.set(if ascii { 1 } else { 2 });
                ascii
            }
            a => a == 1,
        }
    }

    /// 1-based character column of a byte offset.
    pub fn col_off(&self, off: usize) -> u32 {
        let chars = if self.is_ascii() {
            off
        } else {
            self.text.get(..off).map_or(off, |p| p.chars().count())
        };
        u32::try_from(chars).unwrap_or(u32::MAX - 1) + 1
    }

    /// Byte offset of `part` (a slice of the line) in the line; the line's length for
    /// anything else.
    pub fn off_of(&self, part: &str) -> usize {
        let off = (part.as_ptr() as usize).wrapping_sub(self.text.as_ptr() as usize);
        off.min(self.text.len())
    }

    /// 1-based column where `rest` (a slice of the line) starts.
    pub fn col_of(&self, rest: &str) -> u32 {
        self.col_off(self.off_of(rest))
    }

    /// An error at the start of `rest` (a slice of the line), showing the word there.
    pub fn err_at(
        &self,
        kind: InputErrorKind,
        rest: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> InputError {
        let word: &str = rest.split(is_blank).next().unwrap_or("");
        let text = if rest.is_empty() { "end of line" } else { word };
        InputError::new(kind, self.no, self.col_of(rest), text, message, hint)
    }

    /// An error at a byte offset, showing `text`.
    pub fn err_off(
        &self,
        kind: InputErrorKind,
        off: usize,
        text: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> InputError {
        InputError::new(kind, self.no, self.col_off(off), text, message, hint)
    }

    /// Maps a nom error to a syntax error at its position.
    pub fn nom_err(&self, e: nom::Err<PErr<'_>>, hint: &str) -> InputError {
        match e {
            nom::Err::Error(p) | nom::Err::Failure(p) => self.err_at(
                InputErrorKind::Syntax,
                p.input,
                format!("expected {}", p.expected),
                hint,
            ),
            nom::Err::Incomplete(_) => {
                self.err_at(InputErrorKind::Syntax, "", "unexpected end of line", hint)
            }
        }
    }
}

/// Which part of the rule an option belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sec {
    Implicit,
    Match,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StepKind {
    Core,
    Opt(Sec),
    MatchStart,
    Target(Jump),
}

/// One option, `-m` or `-j` of the rule, with its values as a token range.
#[derive(Debug, Clone, Copy)]
struct Step<'a> {
    kind: StepKind,
    name: &'a str,
    negated: bool,
    col: u32,
    v0: usize,
    nv: usize,
}

/// Buffers reused from line to line, so that a rule costs only the allocations of its
/// own vectors (each allocated once, at its final size).
#[derive(Default)]
pub(crate) struct Scratch<'a> {
    toks: Vec<Tok<'a>>,
    steps: Vec<Step<'a>>,
    /// The fast path's buffers.
    pub fast: FastBufs,
}

/// Empty buffers kept between lines read one at a time on a thread (a rule read again
/// for a walk), so that reading one does not allocate them afresh.
type Spare = (Vec<Tok<'static>>, Vec<Step<'static>>);

thread_local! {
    static SPARE: std::cell::Cell<Option<Spare>> = const { std::cell::Cell::new(None) };
}

/// The same allocation as a vector of another lifetime (or an empty one).
fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    // In-place collection reuses the allocation when the element layouts agree (they
    // do: only the lifetime differs); nothing is ever produced from an empty vector.
    v.into_iter().filter_map(|_| None).collect()
}

impl<'a> Scratch<'a> {
    /// This thread's spare buffers, or new ones.
    pub fn take() -> Self {
        let (toks, steps) = SPARE.with(|s| s.take()).unwrap_or_default();
        Scratch {
            toks: recycle(toks),
            steps: recycle(steps),
            fast: FastBufs::default(),
        }
    }

    /// Keeps the buffers for the thread's next [`Scratch::take`].
    pub fn give_back(self) {
        let spare = (recycle(self.toks), recycle(self.steps));
        SPARE.with(|s| s.set(Some(spare)));
    }
}

/// The short name of a core option, if `name` is one.
pub(super) fn core_short(name: &str) -> Option<&'static str> {
    Some(match name {
        "s" | "source" | "src" => "s",
        "d" | "destination" | "dst" => "d",
        "p" | "protocol" => "p",
        "i" | "in-interface" => "i",
        "o" | "out-interface" => "o",
        "f" | "fragment" => "f",
        _ => return None,
    })
}

/// Names the implicit match (the options before any `-m`) after the rule's `-p` among
/// its `core` options (see [`implicit_module`]).
pub(super) fn name_implicit_match<'a>(core: &[Opt<'a>], implicit: &mut Match<'a>) {
    let proto = core
        .iter()
        .find(|o| o.name == "p")
        .and_then(|o| o.values.first());
    implicit.module = proto.map_or("", |p| implicit_module(p));
}

/// The match module that iptables loads for options given after `-p PROTOCOL` without
/// `-m`: the protocol's name (numbers and capitals as iptables accepts them), or "" for
/// a protocol without such a module. Decided by the text alone, so that a quoted or
/// escaped protocol reads back the same.
pub(super) fn implicit_module(protocol: &str) -> &'static str {
    const PROTOCOLS: &[(&str, &str)] = &[
        ("tcp", "tcp"),
        ("6", "tcp"),
        ("udp", "udp"),
        ("17", "udp"),
        ("icmp", "icmp"),
        ("1", "icmp"),
        ("icmpv6", "icmp6"),
        ("ipv6-icmp", "icmp6"),
        ("icmp6", "icmp6"),
        ("58", "icmp6"),
        ("sctp", "sctp"),
        ("132", "sctp"),
        ("dccp", "dccp"),
        ("33", "dccp"),
        ("udplite", "udplite"),
        ("136", "udplite"),
        ("esp", "esp"),
        ("50", "esp"),
        ("ah", "ah"),
        ("51", "ah"),
        ("mh", "mh"),
        ("ipv6-mh", "mh"),
        ("135", "mh"),
    ];
    PROTOCOLS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(protocol))
        .map_or("", |(_, module)| module)
}

const HINT_VALUE: &str =
    "values follow their option; quote values that contain spaces (`--comment \"a b\"`)";

/// Parses the tokens after `-A CHAIN` into a rule.
pub(crate) fn rule<'a>(
    ctx: &LineCtx<'a>,
    body: &'a str,
    counters: Option<Counters>,
    sc: &mut Scratch<'a>,
) -> Result<Rule<'a>, InputError> {
    let counters = read_steps(ctx, body, counters, sc)?;
    build(ctx, counters, sc)
}

/// What the ruleset keeps of a rule line besides its text (see `RuleLine`).
#[derive(Debug, PartialEq)]
pub(crate) struct Summary<'a> {
    /// `-j`/`-g`, the target's name (a slice of the line) and whether it has options.
    pub target: Option<(Jump, &'a str, bool)>,
    pub statistic: bool,
    pub counted: bool,
    /// No core option and no option of a match that is not about state.
    pub plain: bool,
    /// An IPv6 address in `-s`/`-d` or `--to-destination`/`--to-source`.
    pub v6: bool,
    /// What decides whether the rule applies when chance alone does (see
    /// [`crate::model::fixed_decision`]).
    pub fixed: Option<Option<crate::statistic::Statistic>>,
    /// A `-s` option.
    pub tests_source: bool,
    /// What decides a `-j DNAT` rule of the simplest shape and what it gives (only the
    /// fast path reads lines of that shape).
    pub dnat: Option<crate::model::DnatFacts>,
}

impl<'a> Summary<'a> {
    /// The summary of a rule with nothing read yet but whether it has counters.
    pub(crate) fn empty(counted: bool) -> Self {
        Summary {
            target: None,
            statistic: false,
            counted,
            plain: true,
            v6: false,
            fixed: Some(None),
            tests_source: false,
            dnat: None,
        }
    }

    /// A core option (`source`: it is `-s`) or an option of an implicit match: the rule
    /// is not plain, and not decided by chance alone.
    pub(crate) fn condition(&mut self, source: bool) {
        self.plain = false;
        self.fixed = None;
        self.tests_source |= source;
    }

    /// An option of a `-m module` match.
    pub(crate) fn match_option(&mut self, module: &str) {
        if !crate::model::is_state_module(module) {
            self.plain = false;
        }
        if module != "comment" && module != "statistic" {
            self.fixed = None;
        }
    }

    /// A valid `-m statistic` match: one decides by chance; with two, the options are
    /// read again.
    pub(crate) fn statistic_match(&mut self, s: crate::statistic::Statistic) {
        self.fixed = match self.fixed {
            Some(None) if !self.statistic => Some(Some(s)),
            _ => None,
        };
        self.statistic = true;
    }

    /// The ruleset's record of line `no`, whose text is `text` and whose summary this is
    /// (the one place that turns a summary into a [`RuleLine`]).
    #[inline]
    pub(crate) fn rule_line(&self, no: u32, text: &'a str) -> crate::model::RuleLine<'a> {
        crate::model::RuleLine::from_parts(
            no,
            text,
            self.target,
            self.statistic,
            self.counted,
            self.plain,
        )
        .with_facts(self.fixed, self.tests_source, self.dnat)
    }
}

/// Checks the tokens after `-A CHAIN` as [`rule`] does (the same errors), but keeps only
/// the rule's [`Summary`]: no vectors are built, except for `-m statistic` matches,
/// whose values are checked.
pub(crate) fn summary<'a>(
    ctx: &LineCtx<'a>,
    body: &'a str,
    counters: Option<Counters>,
    sc: &mut Scratch<'a>,
) -> Result<Summary<'a>, InputError> {
    let counters = read_steps(ctx, body, counters, sc)?;
    let toks = &sc.toks;
    let steps = &sc.steps;
    let first = |st: &Step<'a>| -> &str {
        if st.nv == 0 {
            ""
        } else {
            toks[st.v0].text.as_ref()
        }
    };
    let mut out = Summary::empty(counters.is_some());
    let mut module = "";
    for (i, st) in steps.iter().enumerate() {
        match st.kind {
            StepKind::Core | StepKind::Opt(Sec::Implicit) => {
                out.condition(st.kind == StepKind::Core && st.name == "s");
            }
            StepKind::MatchStart => module = st.name,
            StepKind::Opt(Sec::Match) => out.match_option(module),
            _ => {}
        }
        match st.kind {
            StepKind::Core if (st.name == "s" || st.name == "d") && first(st).contains(':') => {
                out.v6 = true;
            }
            StepKind::Target(jump) => {
                let has_options = steps[i + 1..]
                    .iter()
                    .any(|x| x.kind == StepKind::Opt(Sec::Target));
                out.target = Some((jump, st.name, has_options));
            }
            StepKind::Opt(Sec::Target)
                if (st.name == "to-destination" || st.name == "to-source")
                    && first(st).starts_with('[') =>
            {
                out.v6 = true;
            }
            StepKind::MatchStart if st.name == "statistic" => {
                let options = steps[i + 1..]
                    .iter()
                    .take_while(|x| x.kind != StepKind::MatchStart)
                    .filter(|x| x.kind == StepKind::Opt(Sec::Match))
                    .map(|x| Opt {
                        name: x.name,
                        negated: x.negated,
                        values: toks[x.v0..x.v0 + x.nv]
                            .iter()
                            .map(|t| t.text.clone())
                            .collect(),
                        col: x.col,
                    })
                    .collect();
                let m = Match {
                    module: st.name,
                    implicit: false,
                    options,
                    col: st.col,
                };
                out.statistic_match(check_statistic(ctx, &m)?);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `-m statistic` must make sense to the kernel.
fn check_statistic(ctx: &LineCtx<'_>, m: &Match<'_>) -> Result<statistic::Statistic, InputError> {
    statistic::from_match(m).map_err(|e| {
        InputError::new(
            InputErrorKind::Value,
            ctx.no,
            e.col,
            e.text,
            e.message,
            e.hint,
        )
    })
}

/// Reads the tokens after `-A CHAIN` into `sc.steps` (what each option is and which
/// tokens are its values), checking the rule's structure. Returns the counters.
fn read_steps<'a>(
    ctx: &LineCtx<'a>,
    body: &'a str,
    counters: Option<Counters>,
    sc: &mut Scratch<'a>,
) -> Result<Option<Counters>, InputError> {
    use InputErrorKind::Syntax;

    // Tokens.
    sc.toks.clear();
    tokens(ctx.text, body, &mut sc.toks).map_err(|e| {
        ctx.nom_err(
            e,
            "close the quote; inside quotes write `\\\"` for a quote and `\\\\` for a backslash",
        )
    })?;

    // Steps: what each option is and which tokens are its values.
    let toks = &sc.toks;
    let steps = &mut sc.steps;
    steps.clear();
    let n = toks.len();
    let mut k = 0;
    let mut pending: Option<usize> = None;
    let mut sec = Sec::Implicit;
    let mut counters = counters;
    let mut has_target = false;
    let col = |k: usize| ctx.col_off(toks[k].off);
    // A value token at `k` that can serve as a name (borrowed from the input).
    let name_at = |k: usize| -> Option<&'a str> {
        match toks.get(k) {
            Some(Tok {
                kind: TokKind::Value,
                text: Cow::Borrowed(s),
                ..
            }) if !s.is_empty() => Some(*s),
            _ => None,
        }
    };
    while k < n {
        let t = &toks[k];
        match t.kind {
            TokKind::Bang => {
                if pending.is_some() {
                    return Err(ctx.err_off(
                        Syntax,
                        t.off,
                        "!",
                        "`!` given twice",
                        "one `!` negates the option that follows it",
                    ));
                }
                pending = Some(k);
                k += 1;
            }
            TokKind::Value => {
                return Err(ctx.err_off(
                    Syntax,
                    t.off,
                    t.raw,
                    format!("unexpected value `{}`: no option takes it", t.raw),
                    HINT_VALUE,
                ));
            }
            TokKind::Opt => {
                let raw = t.raw;
                let name = raw
                    .strip_prefix("--")
                    .unwrap_or_else(|| raw.strip_prefix('-').unwrap_or(raw));
                let structural = matches!(
                    name,
                    "m" | "match" | "j" | "jump" | "g" | "goto" | "c" | "set-counters"
                );
                if structural && let Some(b) = pending {
                    return Err(ctx.err_off(
                        Syntax,
                        toks[b].off,
                        "!",
                        format!("`!` cannot negate `{raw}`"),
                        "put `!` before the option it negates (`-m mark ! --mark 0x1`)",
                    ));
                }
                match name {
                    "m" | "match" => {
                        let Some(module) = name_at(k + 1) else {
                            return Err(ctx.err_off(
                                Syntax,
                                t.off,
                                raw,
                                format!("`{raw}` needs a module name"),
                                "write `-m MODULE [options]`, e.g. `-m tcp --dport 80`",
                            ));
                        };
                        steps.push(Step {
                            kind: StepKind::MatchStart,
                            name: module,
                            negated: false,
                            col: col(k),
                            v0: 0,
                            nv: 0,
                        });
                        sec = Sec::Match;
                        k += 2;
                    }
                    "j" | "jump" | "g" | "goto" => {
                        let Some(target) = name_at(k + 1) else {
                            return Err(ctx.err_off(
                                Syntax,
                                t.off,
                                raw,
                                format!("`{raw}` needs a target name"),
                                "write `-j TARGET` (ACCEPT, DROP, DNAT, a chain name, …)",
                            ));
                        };
                        if has_target {
                            return Err(ctx.err_off(
                                Syntax,
                                t.off,
                                raw,
                                "a rule has at most one `-j` or `-g`",
                                "remove the second target",
                            ));
                        }
                        has_target = true;
                        let jump = if matches!(name, "j" | "jump") {
                            Jump::Jump
                        } else {
                            Jump::Goto
                        };
                        steps.push(Step {
                            kind: StepKind::Target(jump),
                            name: target,
                            negated: false,
                            col: col(k),
                            v0: 0,
                            nv: 0,
                        });
                        sec = Sec::Target;
                        k += 2;
                    }
                    "c" | "set-counters" => {
                        let num = |j: usize| -> Option<u64> {
                            toks.get(j)
                                .filter(|t| t.kind == TokKind::Value)
                                .and_then(|t| t.text.parse().ok())
                        };
                        let (Some(packets), Some(bytes)) = (num(k + 1), num(k + 2)) else {
                            return Err(ctx.err_off(
                                Syntax,
                                t.off,
                                raw,
                                format!("`{raw}` needs two numbers: packets and bytes"),
                                "write `-c PACKETS BYTES`",
                            ));
                        };
                        counters = Some(Counters { packets, bytes });
                        k += 3;
                    }
                    _ => {
                        let core = core_short(name);
                        let opt_col = col(k);
                        let mut negated = pending.take().is_some();
                        k += 1;
                        // iptables' old placement: `-s ! 1.2.3.4`.
                        if k + 1 < n
                            && toks[k].kind == TokKind::Bang
                            && toks[k + 1].kind == TokKind::Value
                        {
                            if negated {
                                return Err(ctx.err_off(
                                    Syntax,
                                    toks[k].off,
                                    "!",
                                    "`!` given twice",
                                    "one `!` negates the option",
                                ));
                            }
                            negated = true;
                            k += 1;
                        }
                        let v0 = k;
                        while k < n && toks[k].kind == TokKind::Value {
                            k += 1;
                        }
                        steps.push(Step {
                            kind: match core {
                                Some(_) => StepKind::Core,
                                None => StepKind::Opt(sec),
                            },
                            name: core.unwrap_or(name),
                            negated,
                            col: opt_col,
                            v0,
                            nv: k - v0,
                        });
                    }
                }
            }
        }
    }
    if let Some(b) = pending {
        return Err(ctx.err_off(
            Syntax,
            toks[b].off,
            "!",
            "`!` at the end of the rule negates nothing",
            "put `!` before the option it negates",
        ));
    }
    Ok(counters)
}

/// Builds the rule from the steps [`read_steps`] read.
fn build<'a>(
    ctx: &LineCtx<'a>,
    counters: Option<Counters>,
    sc: &mut Scratch<'a>,
) -> Result<Rule<'a>, InputError> {
    let steps = &sc.steps;
    // Sizes, so that every vector is allocated once.
    let mut n_core = 0;
    let mut n_implicit = 0;
    let mut n_matches = 0;
    let mut n_target = 0;
    for s in steps.iter() {
        match s.kind {
            StepKind::Core => n_core += 1,
            StepKind::Opt(Sec::Implicit) => n_implicit += 1,
            StepKind::Opt(Sec::Target) => n_target += 1,
            StepKind::MatchStart => n_matches += 1,
            StepKind::Opt(Sec::Match) | StepKind::Target(_) => {}
        }
    }
    let toks = &mut sc.toks;
    let mut values = |s: &Step<'a>| -> Vec<Cow<'a, str>> {
        toks[s.v0..s.v0 + s.nv]
            .iter_mut()
            .map(|t| std::mem::take(&mut t.text))
            .collect()
    };
    let mut core = Vec::with_capacity(n_core);
    let mut matches: Vec<Match<'a>> = Vec::with_capacity(n_matches + usize::from(n_implicit > 0));
    let mut target: Option<Target<'a>> = None;
    for (idx, s) in steps.iter().enumerate() {
        match s.kind {
            StepKind::Core => core.push(Opt {
                name: s.name,
                negated: s.negated,
                values: values(s),
                col: s.col,
            }),
            StepKind::Opt(sec) => {
                let opt = Opt {
                    name: s.name,
                    negated: s.negated,
                    values: values(s),
                    col: s.col,
                };
                match sec {
                    Sec::Implicit => {
                        if matches.is_empty() {
                            matches.push(Match {
                                module: "",
                                implicit: true,
                                options: Vec::with_capacity(n_implicit),
                                col: s.col,
                            });
                        }
                        matches[0].options.push(opt);
                    }
                    Sec::Match => {
                        if let Some(m) = matches.last_mut() {
                            m.options.push(opt);
                        }
                    }
                    Sec::Target => {
                        if let Some(t) = target.as_mut() {
                            t.options.push(opt);
                        }
                    }
                }
            }
            StepKind::MatchStart => {
                let n_opts = steps[idx + 1..]
                    .iter()
                    .take_while(|s| !matches!(s.kind, StepKind::MatchStart))
                    .filter(|s| s.kind == StepKind::Opt(Sec::Match))
                    .count();
                matches.push(Match {
                    module: s.name,
                    implicit: false,
                    options: Vec::with_capacity(n_opts),
                    col: s.col,
                });
            }
            StepKind::Target(jump) => {
                target = Some(Target {
                    jump,
                    name: s.name,
                    options: Vec::with_capacity(n_target),
                    col: s.col,
                });
            }
        }
    }
    if n_implicit > 0 {
        name_implicit_match(&core, &mut matches[0]);
    }

    // `-m statistic` must make sense to the kernel.
    for m in matches.iter().filter(|m| m.module == "statistic") {
        check_statistic(ctx, m)?;
    }

    Ok(Rule {
        line: ctx.no,
        counters,
        core,
        matches,
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Rule<'_>, InputError> {
        let ctx = LineCtx::new(body, 1);
        let mut sc = Scratch::default();
        rule(&ctx, body, None, &mut sc)
    }

    fn vals<'a>(o: &'a Opt<'_>) -> Vec<&'a str> {
        o.values.iter().map(|v| v.as_ref()).collect()
    }

    #[test]
    fn kube_service_rule() {
        let r = parse(
            "-d 10.96.0.10/32 -p tcp -m comment --comment \"kube-system/kube-dns:dns-tcp cluster IP\" -m tcp --dport 53 -j KUBE-SVC-ERIFXISQEP7F7OF4 ",
        )
        .unwrap();
        assert_eq!(r.core.len(), 2);
        assert_eq!(r.core[0].name, "d");
        assert_eq!(r.core[0].value(), "10.96.0.10/32");
        assert_eq!(r.core[0].col, 1);
        assert_eq!(r.core("p").unwrap().value(), "tcp");
        assert_eq!(r.comment(), Some("kube-system/kube-dns:dns-tcp cluster IP"));
        let tcp = r.find_match("tcp").unwrap();
        assert!(!tcp.implicit);
        assert_eq!(tcp.opt("dport").unwrap().value(), "53");
        let t = r.target.unwrap();
        assert_eq!(t.jump, Jump::Jump);
        assert_eq!(t.name, "KUBE-SVC-ERIFXISQEP7F7OF4");
        assert!(t.options.is_empty());
    }

    #[test]
    fn negations() {
        let r = parse("! -s 10.0.0.0/8 -m statistic --mode random ! --probability 0.25 -m mark ! --mark 0x1 -p tcp -m tcp ! --tcp-flags SYN,ACK SYN -j ACCEPT").unwrap();
        assert!(r.core("s").unwrap().negated);
        assert_eq!(r.core("s").unwrap().col, 3);
        assert!(
            r.find_match("statistic")
                .unwrap()
                .opt("probability")
                .unwrap()
                .negated
        );
        assert!(
            !r.find_match("statistic")
                .unwrap()
                .opt("mode")
                .unwrap()
                .negated
        );
        assert!(r.find_match("mark").unwrap().opt("mark").unwrap().negated);
        // -p after -m modules is still core.
        assert_eq!(r.core("p").unwrap().value(), "tcp");
        let f = r.find_match("tcp").unwrap().opt("tcp-flags").unwrap();
        assert!(f.negated);
        assert_eq!(vals(f), ["SYN,ACK", "SYN"]);
        let r = parse("-m statistic --mode nth ! --every 3 --packet 0").unwrap();
        assert!(
            r.find_match("statistic")
                .unwrap()
                .opt("every")
                .unwrap()
                .negated
        );
    }

    #[test]
    fn legacy_negation_after_option_name() {
        let r = parse("-s ! 1.2.3.4 -p ! udp -j DROP").unwrap();
        assert!(r.core("s").unwrap().negated);
        assert_eq!(r.core("s").unwrap().value(), "1.2.3.4");
        assert!(r.core("p").unwrap().negated);
        // `! --seconds` after a valueless option negates the next option instead.
        let r = parse("-m recent --rcheck ! --seconds 60 --name x").unwrap();
        let m = r.find_match("recent").unwrap();
        assert!(!m.opt("rcheck").unwrap().negated);
        assert!(m.opt("rcheck").unwrap().values.is_empty());
        assert!(m.opt("seconds").unwrap().negated);
    }

    #[test]
    fn implicit_match_and_long_names() {
        let r = parse("--dport 80 --source 1.2.3.4 --protocol tcp --syn -j ACCEPT").unwrap();
        let m = &r.matches[0];
        assert!(m.implicit);
        assert_eq!(m.module, "tcp");
        assert_eq!(m.col, 1);
        assert_eq!(m.options.len(), 2);
        assert_eq!(r.core("s").unwrap().value(), "1.2.3.4");
        assert_eq!(r.core.len(), 2);
    }

    #[test]
    fn implicit_module_follows_the_protocol_text() {
        for (body, module) in [
            ("-p TCP --dport 80", "tcp"),
            ("-p 17 --dport 53", "udp"),
            ("-p \"t\\cp\" --dport 1", "tcp"),
            ("-p ipv6-icmp --icmpv6-type 1", "icmp6"),
            ("-p gre --key 1", ""),
            ("--dport 80", ""),
        ] {
            let r = parse(body).unwrap();
            assert_eq!(r.matches[0].module, module, "{body}");
            assert!(r.matches[0].implicit);
        }
    }

    #[test]
    fn generic_values() {
        let r = parse(
            "-m set ! --match-set KR src -m set --match-set weave-k?Z;25^M}|1s7P3|H9i;*;MhG dst -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-X --mask 255.255.255.255 --rsource -m foo --delta -5 -j LOG --log-prefix \"!#*~%&/()=?\" --log-level 4",
        )
        .unwrap();
        assert_eq!(r.matches.len(), 4);
        assert!(r.matches[0].options[0].negated);
        assert_eq!(vals(&r.matches[0].options[0]), ["KR", "src"]);
        assert_eq!(
            vals(&r.matches[1].options[0])[0],
            "weave-k?Z;25^M}|1s7P3|H9i;*;MhG"
        );
        let recent = &r.matches[2];
        assert_eq!(recent.options.len(), 6);
        assert!(recent.opt("reap").unwrap().values.is_empty());
        assert_eq!(r.matches[3].opt("delta").unwrap().value(), "-5");
        let t = r.target.unwrap();
        assert_eq!(t.opt("log-prefix").unwrap().value(), "!#*~%&/()=?");
        assert_eq!(t.opt("log-level").unwrap().value(), "4");
    }

    #[test]
    fn unquoted_bang_values() {
        let r = parse("-m set --match-set !x$|;]^~!?#} src -j ACCEPT").unwrap();
        assert_eq!(vals(&r.matches[0].options[0]), ["!x$|;]^~!?#}", "src"]);
    }

    #[test]
    fn match_after_target_and_inline_counters() {
        let r = parse("-p tcp -c 10 2000 -j DNAT --to-destination 10.0.0.1:80 -m comment --comment x -s 1.1.1.1").unwrap();
        assert_eq!(
            r.counters,
            Some(Counters {
                packets: 10,
                bytes: 2000
            })
        );
        let t = r.target.as_ref().unwrap();
        assert_eq!(t.options.len(), 1);
        assert_eq!(r.comment(), Some("x"));
        assert_eq!(r.core.len(), 2);
    }

    #[test]
    fn empty_rule_and_goto() {
        let r = parse("").unwrap();
        assert!(r.core.is_empty() && r.matches.is_empty() && r.target.is_none());
        let r = parse("-g DOS~Pro-t_ect").unwrap();
        let t = r.target.unwrap();
        assert_eq!(t.jump, Jump::Goto);
        assert_eq!(t.name, "DOS~Pro-t_ect");
    }

    #[test]
    fn errors() {
        let e = parse("-s 1.2.3.4 -j").unwrap_err();
        assert_eq!(e.kind, InputErrorKind::Syntax);
        assert_eq!(e.col, 12);
        assert!(e.message.contains("target name"), "{e}");
        let e = parse("-j --foo").unwrap_err();
        assert_eq!(e.col, 1);
        let e = parse("-m comment --comment \"abc -j X").unwrap_err();
        assert_eq!(e.kind, InputErrorKind::Syntax);
        assert_eq!(e.col, 22);
        let e = parse("-s 1.1.1.1 -j A -j B").unwrap_err();
        assert_eq!(e.col, 17);
        assert_eq!(parse("-m").unwrap_err().col, 1);
        assert_eq!(parse("! ! -s x").unwrap_err().col, 3);
        assert_eq!(parse("-s x !").unwrap_err().col, 6);
        assert_eq!(parse("! -j X").unwrap_err().col, 1);
        assert_eq!(parse("-j X Y").unwrap_err().col, 6);
        assert_eq!(parse("-c 1 -j X").unwrap_err().col, 1);
    }

    #[test]
    fn statistic_values_are_checked() {
        let e = parse("-m statistic --mode random --probability 1.5 -j X").unwrap_err();
        assert_eq!(e.kind, InputErrorKind::Value);
        assert_eq!(e.col, 28);
        let e = parse("-m statistic --mode nth --every 0 --packet 0").unwrap_err();
        assert_eq!(e.kind, InputErrorKind::Value);
        assert_eq!(e.col, 25);
        let e = parse("-m statistic --mode nth --every 3 --packet 3").unwrap_err();
        assert_eq!(e.col, 35);
        let e = parse("-m statistic --every 3").unwrap_err();
        assert_eq!(e.col, 1);
        assert!(parse("-m statistic --mode nth --every 3 --packet 2").is_ok());
    }

    #[test]
    fn columns_count_characters() {
        let body = "-m comment --comment \"é ü\" -j";
        let e = parse(body).unwrap_err();
        assert_eq!(e.col, 28);
    }
}
