//! The fast path of a rule's body: the tokens after `-A CHAIN` read by a byte scanner
//! ([`fast_tokens`]) into spans, the options found by their bytes, no text copied.
//!
//! It reads the common case only: lines whose tokens are plain words and whole quoted
//! strings without escapes, that have no error, and whose `-m statistic` matches are
//! plainly valid (`--mode random --probability 0.…`). For any other line it gives
//! `None`, and the caller reads the line with the nom parsers (`lex`, `rule`), which
//! make the errors. What it gives is what those give (the property tests hold the two
//! to each other).

use std::borrow::Cow;

use crate::model::{Counters, Jump, Match, Opt, Rule, Target};

use super::lex::{Span, TokKind, fast_tokens};
use super::rule::{LineCtx, Sec, StepKind, Summary, core_short, implicit_module};

/// One option, `-m` or `-j` of the rule, with its values as a range of spans.
#[derive(Debug, Clone, Copy)]
pub(super) struct FStep {
    kind: StepKind,
    /// The short name of a core option; otherwise the name is `name` (a byte range).
    core: Option<&'static str>,
    name: (u32, u32),
    negated: bool,
    /// Byte offset of the option (for its column).
    off: u32,
    v0: u32,
    nv: u32,
}

/// Buffers reused from line to line. They borrow nothing, so that a thread can keep
/// them between lines of any lifetime.
#[derive(Default)]
pub(crate) struct FastBufs {
    toks: Vec<Span>,
    steps: Vec<FStep>,
}

/// What an option token is, by its name (without dashes).
#[derive(Clone, Copy)]
enum OptClass {
    Match,
    Jump(Jump),
    Counters,
    Generic,
}

#[inline]
fn opt_class(name: &[u8]) -> OptClass {
    match name {
        b"m" | b"match" => OptClass::Match,
        b"j" | b"jump" => OptClass::Jump(Jump::Jump),
        b"g" | b"goto" => OptClass::Jump(Jump::Goto),
        b"c" | b"set-counters" => OptClass::Counters,
        _ => OptClass::Generic,
    }
}

/// The text of a span of `line`.
#[inline]
fn text<'a>(line: &'a str, t: &Span) -> &'a str {
    &line[t.text_range()]
}

impl FStep {
    #[inline]
    fn name<'a>(&self, line: &'a str) -> &'a str {
        match self.core {
            Some(c) => c,
            None => &line[self.name.0 as usize..self.name.1 as usize],
        }
    }

    /// The first value, or "".
    #[inline]
    fn first<'a>(&self, line: &'a str, toks: &[Span]) -> &'a str {
        if self.nv == 0 {
            ""
        } else {
            text(line, &toks[self.v0 as usize])
        }
    }

    #[inline]
    fn values<'a>(&self, line: &'a str, toks: &[Span]) -> Vec<Cow<'a, str>> {
        toks[self.v0 as usize..(self.v0 + self.nv) as usize]
            .iter()
            .map(|t| Cow::Borrowed(text(line, t)))
            .collect()
    }
}

/// Reads the tokens of `body` (a slice of `line`) into `bufs`, and the options into
/// steps, as `rule::read_steps` does. `None` when the tokens need the slow reader or
/// the rule has an error. Returns the counters (`-c` overrides `counters`).
fn read_steps(
    line: &str,
    body: &str,
    counters: Option<Counters>,
    bufs: &mut FastBufs,
) -> Option<Option<Counters>> {
    let b = line.as_bytes();
    let from = (body.as_ptr() as usize).wrapping_sub(line.as_ptr() as usize);
    let to = from.checked_add(body.len())?;
    let b = b.get(..to)?;
    bufs.toks.clear();
    if !fast_tokens(b, from, &mut bufs.toks) {
        return None;
    }
    let toks = &bufs.toks;
    let steps = &mut bufs.steps;
    steps.clear();
    let n = toks.len();
    let mut k = 0;
    let mut pending = false;
    let mut sec = Sec::Implicit;
    let mut counters = counters;
    let mut has_target = false;
    // A value token at `k` that can serve as a name: its range.
    let name_at = |k: usize| -> Option<(u32, u32)> {
        let t = toks.get(k)?;
        let r = t.text_range();
        (t.kind == TokKind::Value && r.start < r.end).then_some((r.start as u32, r.end as u32))
    };
    while k < n {
        let t = &toks[k];
        match t.kind {
            TokKind::Bang => {
                if pending {
                    return None;
                }
                pending = true;
                k += 1;
            }
            TokKind::Value => return None,
            TokKind::Opt => {
                let (s, e) = (t.start as usize, t.end as usize);
                // An option token is `-x…` or `--…`.
                let ns = if b[s + 1] == b'-' { s + 2 } else { s + 1 };
                let name = &b[ns..e];
                match opt_class(name) {
                    OptClass::Match => {
                        if pending {
                            return None;
                        }
                        let module = name_at(k + 1)?;
                        steps.push(FStep {
                            kind: StepKind::MatchStart,
                            core: None,
                            name: module,
                            negated: false,
                            off: t.start,
                            v0: 0,
                            nv: 0,
                        });
                        sec = Sec::Match;
                        k += 2;
                    }
                    OptClass::Jump(jump) => {
                        if pending || has_target {
                            return None;
                        }
                        let target = name_at(k + 1)?;
                        has_target = true;
                        steps.push(FStep {
                            kind: StepKind::Target(jump),
                            core: None,
                            name: target,
                            negated: false,
                            off: t.start,
                            v0: 0,
                            nv: 0,
                        });
                        sec = Sec::Target;
                        k += 2;
                    }
                    OptClass::Counters => {
                        if pending {
                            return None;
                        }
                        let num = |j: usize| -> Option<u64> {
                            toks.get(j)
                                .filter(|t| t.kind == TokKind::Value)
                                .and_then(|t| text(line, t).parse().ok())
                        };
                        let packets = num(k + 1)?;
                        let bytes = num(k + 2)?;
                        counters = Some(Counters { packets, bytes });
                        k += 3;
                    }
                    OptClass::Generic => {
                        let core = core_short(&line[ns..e]);
                        let mut negated = std::mem::take(&mut pending);
                        k += 1;
                        // iptables' old placement: `-s ! 1.2.3.4`.
                        if k + 1 < n
                            && toks[k].kind == TokKind::Bang
                            && toks[k + 1].kind == TokKind::Value
                        {
                            if negated {
                                return None;
                            }
                            negated = true;
                            k += 1;
                        }
                        let v0 = k;
                        while k < n && toks[k].kind == TokKind::Value {
                            k += 1;
                        }
                        steps.push(FStep {
                            kind: match core {
                                Some(_) => StepKind::Core,
                                None => StepKind::Opt(sec),
                            },
                            core,
                            name: (ns as u32, e as u32),
                            negated,
                            off: t.start,
                            v0: v0 as u32,
                            nv: (k - v0) as u32,
                        });
                    }
                }
            }
        }
    }
    if pending {
        return None;
    }
    Some(counters)
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

/// Is the `-m statistic` match starting at step `i` certainly valid (so that
/// `statistic::from_match` would accept it)? Random mode with a plain probability
/// only; anything else is left to the slow path.
fn statistic_is_plain(line: &str, toks: &[Span], steps: &[FStep], i: usize) -> bool {
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
    let Some(p) = probability else {
        return false;
    };
    if mode.is_some_and(|m| m.first(line, toks) != "random") {
        return false;
    }
    plain_probability(p.first(line, toks).as_bytes())
}

/// The rule's [`Summary`], as `rule::summary` reads it, or `None` (see the module).
pub(super) fn summary<'a>(
    line: &'a str,
    body: &'a str,
    counters: Option<Counters>,
    bufs: &mut FastBufs,
) -> Option<Summary<'a>> {
    let counters = read_steps(line, body, counters, bufs)?;
    let toks = &bufs.toks;
    let steps = &bufs.steps;
    let mut out = Summary {
        target: None,
        statistic: false,
        counted: counters.is_some(),
        plain: true,
        v6: false,
    };
    let mut module = "";
    for (i, st) in steps.iter().enumerate() {
        match st.kind {
            StepKind::Core => {
                out.plain = false;
                if matches!(st.core, Some("s" | "d")) && st.first(line, toks).contains(':') {
                    out.v6 = true;
                }
            }
            StepKind::Opt(Sec::Implicit) => out.plain = false,
            StepKind::MatchStart => {
                module = st.name(line);
                if module == "statistic" {
                    out.statistic = true;
                    if !statistic_is_plain(line, toks, steps, i) {
                        return None;
                    }
                }
            }
            StepKind::Opt(Sec::Match) => {
                if !crate::model::is_state_module(module) {
                    out.plain = false;
                }
            }
            StepKind::Target(jump) => {
                let has_options = steps[i + 1..]
                    .iter()
                    .any(|x| x.kind == StepKind::Opt(Sec::Target));
                out.target = Some((jump, st.name(line), has_options));
            }
            StepKind::Opt(Sec::Target) => {
                let name = st.name(line);
                if (name == "to-destination" || name == "to-source")
                    && st.first(line, toks).starts_with('[')
                {
                    out.v6 = true;
                }
            }
        }
    }
    Some(out)
}

/// The whole rule, as `rule::rule` reads it, or `None` (see the module).
pub(super) fn rule<'a>(
    ctx: &LineCtx<'a>,
    body: &'a str,
    counters: Option<Counters>,
    bufs: &mut FastBufs,
) -> Option<Rule<'a>> {
    let line = ctx.text;
    let counters = read_steps(line, body, counters, bufs)?;
    let toks = &bufs.toks;
    let steps = &bufs.steps;
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
                if s.name(line) == "statistic" && !statistic_is_plain(line, toks, steps, i) {
                    return None;
                }
            }
            StepKind::Opt(Sec::Match) | StepKind::Target(_) => {}
        }
    }
    let opt = |s: &FStep| Opt {
        name: s.name(line),
        negated: s.negated,
        values: s.values(line, toks),
        col: ctx.col_off(s.off as usize),
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
                    col: ctx.col_off(s.off as usize),
                });
            }
            StepKind::Target(jump) => {
                target = Some(Target {
                    jump,
                    name: s.name(line),
                    options: Vec::with_capacity(n_target),
                    col: ctx.col_off(s.off as usize),
                });
            }
        }
    }
    if n_implicit > 0 {
        let proto = core
            .iter()
            .find(|o: &&Opt<'a>| o.name == "p")
            .and_then(|o| o.values.first());
        matches[0].module = proto.map_or("", |p| implicit_module(p));
    }
    Some(Rule {
        line: ctx.no,
        counters,
        core,
        matches,
        target,
    })
}
