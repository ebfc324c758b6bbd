//! What one line of input is: a table header, a chain declaration, a rule, `COMMIT`,
//! a comment, a shell prompt or a blank.

use nom::Parser;
use nom::character::complete::char;
use nom::combinator::eof;
use nom::error::context;

use crate::error::{InputError, InputErrorKind};
use crate::model::{Counters, Jump, Policy, Rule};

use super::fast::{self, FastBufs};
use super::lex::{
    PErr, blank0, blank1, counters, fast_counters, is_blank_byte, number, skip_blanks, word,
    word_end,
};
use super::rule::{self, LineCtx, Scratch};

pub(super) const HINT_EMPTY: &str = "pipe `iptables-save` output or give a dump file";
const EXPECTED_FORMS: &str =
    "expected `*table`, `:CHAIN POLICY [p:b]`, `-A CHAIN rule`, `COMMIT` or `#comment`";

/// What one line is.
#[derive(Debug, PartialEq)]
pub(super) enum Item<'a> {
    Blank,
    Comment {
        v6: bool,
        legacy_tables: bool,
    },
    Prompt,
    Table(&'a str),
    Decl {
        name: &'a str,
        policy: Option<Policy<'a>>,
        counters: Option<Counters>,
        how: DeclHow,
    },
    Commit,
}

/// A line: a rule, or anything else. (Rules are kept out of [`Item`] so that items stay
/// small.)
#[derive(Debug, PartialEq)]
pub(super) enum Line<'a> {
    Rule {
        chain: &'a str,
        rule: Rule<'a>,
    },
    /// A rule read for its summary only (see [`parse_line`]'s `full`).
    Summary {
        chain: &'a str,
        summary: rule::Summary<'a>,
    },
    Other(Item<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeclHow {
    /// `:CHAIN POLICY [p:b]`
    Colon,
    /// `-P CHAIN POLICY`
    Policy,
    /// `-N CHAIN`
    New,
}

fn policy(word: &str) -> Option<Policy<'_>> {
    match word {
        "-" => None,
        "ACCEPT" => Some(Policy::Accept),
        "DROP" => Some(Policy::Drop),
        other => Some(Policy::Other(other)),
    }
}

/// Reads one line. A rule is read whole with `full`, else only checked and summed up.
pub(super) fn parse_line<'a>(
    ctx: &LineCtx<'a>,
    sc: &mut Scratch<'a>,
    full: bool,
) -> Result<Line<'a>, InputError> {
    let body = trim_blanks(ctx.text);
    match body.as_bytes().first() {
        Some(b'[' | b'-') => {
            // The fast path first; the nom parsers for anything it does not read.
            if full {
                if let Some((chain, rule)) = fast::rule_line(ctx, body, &mut sc.fast) {
                    return Ok(Line::Rule { chain, rule });
                }
            } else if let Some((chain, summary)) = fast::summary_line(ctx.text, body) {
                return Ok(Line::Summary { chain, summary });
            }
            command(ctx, body, sc, full)
        }
        Some(b':') => match fast_decl(body) {
            Some(item) => Ok(Line::Other(item)),
            None => other_line(ctx, body).map(Line::Other),
        },
        _ => other_line(ctx, body).map(Line::Other),
    }
}

/// A line read by the fast path alone: a rule (for its summary) or a declaration.
pub(super) enum Fast<'a> {
    Rule {
        chain: &'a str,
        summary: rule::Summary<'a>,
    },
    Item(Item<'a>),
}

/// Reads a line as [`parse_line`] does without `full`, by the fast path alone: `None`
/// when the fast path does not read it (see [`fast`]); [`parse_line_nom`] does then.
#[inline]
///
/// (The summary of a rule is made as its tokens are found.)
pub(super) fn fast_line(text: &str) -> Option<Fast<'_>> {
    let body = trim_blanks(text);
    match body.as_bytes().first()? {
        b'[' | b'-' => {
            fast::summary_line(text, body).map(|(chain, summary)| Fast::Rule { chain, summary })
        }
        b':' => fast_decl(body).map(Fast::Item),
        _ => None,
    }
}

/// [`parse_line`] without its fast path.
pub(super) fn parse_line_nom<'a>(
    ctx: &LineCtx<'a>,
    sc: &mut Scratch<'a>,
    full: bool,
) -> Result<Line<'a>, InputError> {
    let body = trim_blanks(ctx.text);
    if body.starts_with(['[', '-']) {
        return command(ctx, body, sc, full);
    }
    other_line(ctx, body).map(Line::Other)
}

/// [`parse_line`] by the nom parsers alone (what the fast path is held to in tests).
#[cfg(test)]
pub(super) fn parse_line_slow<'a>(
    ctx: &LineCtx<'a>,
    sc: &mut Scratch<'a>,
    full: bool,
) -> Result<Line<'a>, InputError> {
    let body = ctx.text.trim_matches(super::lex::is_blank);
    if body.starts_with(['[', '-']) {
        return command(ctx, body, sc, full);
    }
    other_line(ctx, body).map(Line::Other)
}

/// Reads a rule line whole by the fast path only (see [`fast`]): `None` when that
/// path does not read it (the line may still be a rule, or have an error).
pub(super) fn fast_rule_line<'a>(ctx: &LineCtx<'a>, bufs: &mut FastBufs) -> Option<Rule<'a>> {
    fast::rule_line(ctx, trim_blanks(ctx.text), bufs).map(|(_, rule)| rule)
}

/// A rule line of the simplest shape by the fast path only (see [`fast::light`]).
pub(super) fn fast_light<'a>(
    text: &'a str,
    no: u32,
    rule: &mut crate::model::LightRule<'a>,
) -> Option<()> {
    fast::light(text, trim_blanks(text), no, rule)
}

/// The comment of a rule line by the fast path only (see [`fast::comment_of`]).
pub(super) fn fast_comment(text: &str) -> Option<Option<&str>> {
    fast::comment_of(text, trim_blanks(text))
}

/// `s` without blanks at either end (blanks are ASCII: bytes and characters agree).
#[inline]
fn trim_blanks(s: &str) -> &str {
    let b = s.as_bytes();
    let mut i = 0;
    let mut j = b.len();
    while i < j && is_blank_byte(b[i]) {
        i += 1;
    }
    while j > i && is_blank_byte(b[j - 1]) {
        j -= 1;
    }
    &s[i..j]
}

/// `:CHAIN POLICY [p:b]` read as [`other_line`] reads it, without errors; `None` for
/// anything else or anything wrong.
fn fast_decl(body: &str) -> Option<Item<'_>> {
    let b = body.as_bytes();
    if b.first() != Some(&b':') {
        return None;
    }
    let name_end = word_end(b, 1);
    let pol_start = skip_blanks(b, name_end);
    let pol_end = word_end(b, pol_start);
    if name_end == 1 || pol_start == name_end || pol_end == pol_start {
        return None;
    }
    let mut i = skip_blanks(b, pol_end);
    let counters = if b.get(i) == Some(&b'[') {
        let (c, n) = fast_counters(&b[i..])?;
        i = skip_blanks(b, i + n);
        Some(c)
    } else {
        None
    };
    if i != b.len() {
        return None;
    }
    Some(Item::Decl {
        name: &body[1..name_end],
        policy: policy(&body[pol_start..pol_end]),
        counters,
        how: DeclHow::Colon,
    })
}

/// A line that is not a command.
fn other_line<'a>(ctx: &LineCtx<'a>, body: &'a str) -> Result<Item<'a>, InputError> {
    let Some(&first) = body.as_bytes().first() else {
        return Ok(Item::Blank);
    };
    let syntax = |e: nom::Err<PErr<'a>>, hint: &str| ctx.nom_err(e, hint);
    match first {
        b'#' => Ok(Item::Comment {
            v6: body.contains("ip6tables"),
            legacy_tables: body.contains("iptables-legacy tables present"),
        }),
        b'*' => {
            let (_, (_, name, _, _)) = (
                char('*'),
                context("a table name after `*`", word),
                blank0,
                context("end of line after the table name", eof),
            )
                .parse(body)
                .map_err(|e| syntax(e, "write the table header as `*nat`, `*filter`, …"))?;
            Ok(Item::Table(name))
        }
        b':' => {
            let hint = "write a chain declaration as `:CHAIN POLICY [packets:bytes]` (policy `-` for user chains)";
            let (rest, (_, name, _, pol)) = (
                char(':'),
                context("a chain name after `:`", word),
                context("a policy (ACCEPT, DROP or -)", blank1),
                context("a policy (ACCEPT, DROP or -)", word),
            )
                .parse(body)
                .map_err(|e| syntax(e, hint))?;
            let (rest, _) = blank0(rest).map_err(|e| syntax(e, hint))?;
            let (rest, counters) = if rest.starts_with('[') {
                let (rest, c) = context("counters `[packets:bytes]`", counters)
                    .parse(rest)
                    .map_err(|e| syntax(e, hint))?;
                (rest, Some(c))
            } else {
                (rest, None)
            };
            (
                blank0,
                context("end of line after the policy counters", eof),
            )
                .parse(rest)
                .map_err(|e| syntax(e, hint))?;
            Ok(Item::Decl {
                name,
                policy: policy(pol),
                counters,
                how: DeclHow::Colon,
            })
        }
        b'C' if body == "COMMIT" => Ok(Item::Commit),
        b'$' if body == "$" || body.starts_with("$ ") || body.starts_with("$\t") => {
            Ok(Item::Prompt)
        }
        _ => Err(unknown_line(ctx, body)),
    }
}

fn unknown_line(ctx: &LineCtx<'_>, body: &str) -> InputError {
    let hint = if body.starts_with("Chain ")
        || body.starts_with("target ")
        || body.starts_with("pkts ")
        || body.starts_with("num ")
    {
        "this looks like `iptables -L` output; give `iptables-save` or `iptables -S` output instead"
    } else {
        "give `iptables-save` or `iptables -S` output; use --lenient to skip lines like this one"
    };
    InputError::new(
        InputErrorKind::Syntax,
        ctx.no,
        ctx.col_of(body),
        body,
        format!("this line fits no known form: {EXPECTED_FORMS}"),
        hint,
    )
}

/// `[p:b] -A CHAIN …`, `-A CHAIN …`, `-P CHAIN POLICY [-c P B]`, `-N CHAIN`.
fn command<'a>(
    ctx: &LineCtx<'a>,
    body: &'a str,
    sc: &mut Scratch<'a>,
    full: bool,
) -> Result<Line<'a>, InputError> {
    let syntax = |e: nom::Err<PErr<'a>>, hint: &str| ctx.nom_err(e, hint);
    let hint_rule = "write a rule as `[packets:bytes] -A CHAIN options`";
    let whole = body;
    let (rest, counters) = if body.starts_with('[') {
        let (rest, (c, _)) = (
            context("counters `[packets:bytes]`", counters),
            context("a blank after the counters", blank1),
        )
            .parse(body)
            .map_err(|e| syntax(e, hint_rule))?;
        (rest, Some(c))
    } else {
        (body, None)
    };
    let (after_cmd, cmd) = word(rest).map_err(|e| syntax(e, hint_rule))?;
    match cmd {
        "-A" | "--append" => {
            let (body, (_, chain)) = (
                context("a chain name after -A", blank1),
                context("a chain name after -A", word),
            )
                .parse(after_cmd)
                .map_err(|e| syntax(e, hint_rule))?;
            if full {
                let rule = rule::rule(ctx, body, counters, sc)?;
                Ok(Line::Rule { chain, rule })
            } else {
                let mut summary = rule::summary(ctx, body, counters, sc)?;
                // The facts of a DNAT rule are those of the fast path's reading (which
                // has them for the lines it reads).
                if matches!(summary.target, Some((Jump::Jump, "DNAT", _))) {
                    summary.dnat = fast::line_dnat_facts(ctx.text, whole, &mut sc.fast);
                }
                Ok(Line::Summary { chain, summary })
            }
        }
        "-P" | "--policy" if counters.is_none() => {
            let hint = "write a policy as `-P CHAIN POLICY`";
            let (rest, (_, name, _, pol, _)) = (
                context("a chain name after -P", blank1),
                context("a chain name after -P", word),
                context("a policy after the chain name", blank1),
                context("a policy after the chain name", word),
                blank0,
            )
                .parse(after_cmd)
                .map_err(|e| syntax(e, hint))?;
            let (rest, counters) = if rest.is_empty() {
                (rest, None)
            } else {
                let (rest, (_, _, packets, _, bytes)) = (
                    context(
                        "`-c PACKETS BYTES` or end of line",
                        nom::bytes::complete::tag("-c"),
                    ),
                    context("packets after -c", blank1),
                    context("packets after -c", number),
                    context("bytes after the packets", blank1),
                    context("bytes after the packets", number),
                )
                    .parse(rest)
                    .map_err(|e| syntax(e, hint))?;
                (rest, Some(Counters { packets, bytes }))
            };
            (blank0, context("end of line after the policy", eof))
                .parse(rest)
                .map_err(|e| syntax(e, hint))?;
            Ok(Line::Other(Item::Decl {
                name,
                policy: policy(pol),
                counters,
                how: DeclHow::Policy,
            }))
        }
        "-N" | "--new-chain" | "--new" if counters.is_none() => {
            let (_, (_, name, _, _)) = (
                context("a chain name after -N", blank1),
                context("a chain name after -N", word),
                blank0,
                context("end of line after the chain name", eof),
            )
                .parse(after_cmd)
                .map_err(|e| syntax(e, "write a new chain as `-N CHAIN`"))?;
            Ok(Line::Other(Item::Decl {
                name,
                policy: None,
                counters: None,
                how: DeclHow::New,
            }))
        }
        _ => Err(unknown_line(ctx, body)),
    }
}
