//! Parser for `iptables-save` / `ip6tables-save` output (legacy and nft, with or
//! without `-c`), `iptables -S` output (with or without `-v`) and grep fragments.
//!
//! The parser works line by line. Each line is read with nom parsers ([`lex`]) into a
//! table header, a chain declaration, a rule ([`rule`]), `COMMIT`, a comment or a blank;
//! a small state machine then files it into tables and chains. Strings borrow from the
//! input; only quoted strings with escapes are copied.
//!
//! Forms recognised:
//! - `*table` … `COMMIT` blocks with `:CHAIN POLICY [p:b]` declarations ([`Format::Save`]);
//! - `-P CHAIN POLICY`, `-N CHAIN`, `-A CHAIN …` lines without a table ([`Format::Spec`]);
//! - bare `-A` lines ([`Format::Fragment`]). Without a table header the rules are put in
//!   one assumed table, `nat` or `filter` (see [`assumed_table`]), with a warning.

mod decode;
mod lex;
mod rule;
mod save;

#[cfg(test)]
mod proptests;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use nom::Parser;
use nom::character::complete::char;
use nom::combinator::eof;
use nom::error::context;

use crate::error::{InputError, InputErrorKind};
use crate::model::{Chain, Counters, Family, Format, Policy, Rule, Ruleset, Table, Warning};

pub use decode::decode;
pub use save::to_save;

use lex::{PErr, blank0, blank1, counters, is_blank, number, word};
use rule::{LineCtx, Scratch};

/// Options for [`parse`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseOptions {
    /// Skip lines that cannot be parsed, with a warning for each, instead of failing.
    pub lenient: bool,
}

const HINT_EMPTY: &str = "pipe `iptables-save` output or give a dump file";
const EXPECTED_FORMS: &str =
    "expected `*table`, `:CHAIN POLICY [p:b]`, `-A CHAIN rule`, `COMMIT` or `#comment`";

/// What one line is.
enum Item<'a> {
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
    Rule {
        chain: &'a str,
        rule: Rule<'a>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeclHow {
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

/// Reads one line.
fn parse_line<'a>(ctx: &LineCtx<'a>, sc: &mut Scratch<'a>) -> Result<Item<'a>, InputError> {
    let body = ctx.text.trim_matches(is_blank);
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
        b'[' | b'-' => command(ctx, body, sc),
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
) -> Result<Item<'a>, InputError> {
    let syntax = |e: nom::Err<PErr<'a>>, hint: &str| ctx.nom_err(e, hint);
    let hint_rule = "write a rule as `[packets:bytes] -A CHAIN options`";
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
            let rule = rule::rule(ctx, body, counters, sc)?;
            Ok(Item::Rule { chain, rule })
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
            Ok(Item::Decl {
                name,
                policy: policy(pol),
                counters,
                how: DeclHow::Policy,
            })
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
            Ok(Item::Decl {
                name,
                policy: None,
                counters: None,
                how: DeclHow::New,
            })
        }
        _ => Err(unknown_line(ctx, body)),
    }
}

/// A fast, non-cryptographic hasher (FxHash) for the chain-name index.
#[derive(Default, Clone, Copy)]
struct FxHasher {
    hash: u64,
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

type ChainIndex<'a> = HashMap<&'a str, usize, BuildHasherDefault<FxHasher>>;

/// A table being built, with its chain-name index.
struct TableB<'a> {
    table: Table<'a>,
    index: ChainIndex<'a>,
    /// Line of the first rule or declaration (for tables outside headers).
    first_line: Option<u32>,
    /// Index of the chain the last rule went to (rules come in runs).
    last: Option<usize>,
}

impl<'a> TableB<'a> {
    fn new(name: &'a str, line: Option<u32>) -> Self {
        TableB {
            table: Table {
                name,
                line,
                committed: false,
                chains: Vec::new(),
            },
            index: ChainIndex::default(),
            first_line: None,
            last: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.table.chains.is_empty()
    }

    fn chain_mut(&mut self, name: &'a str) -> &mut Chain<'a> {
        if let Some(i) = self.last
            && self.table.chains[i].name == name
        {
            return &mut self.table.chains[i];
        }
        let chains = &mut self.table.chains;
        let i = *self.index.entry(name).or_insert_with(|| {
            chains.push(Chain {
                name,
                policy: None,
                policy_counters: None,
                declared_line: None,
                rules: Vec::new(),
            });
            chains.len() - 1
        });
        self.last = Some(i);
        &mut self.table.chains[i]
    }
}

/// Files lines into tables.
struct Builder<'a> {
    lenient: bool,
    tables: Vec<TableB<'a>>,
    /// The table between `*name` and `COMMIT`.
    open: Option<usize>,
    /// A `*table` header has been seen: this is a full dump.
    saw_header: bool,
    /// Content before any header (`-S` output, fragments).
    loose: TableB<'a>,
    saw_spec: bool,
    v6: bool,
    warnings: Vec<Warning>,
    /// Lines that were something other than blank or comment.
    content_lines: u32,
    /// Lines skipped with `lenient`.
    skipped: u32,
    first_skip: Option<String>,
}

impl<'a> Builder<'a> {
    fn new(lenient: bool) -> Self {
        Builder {
            lenient,
            tables: Vec::new(),
            open: None,
            saw_header: false,
            loose: TableB::new("", None),
            saw_spec: false,
            v6: false,
            warnings: Vec::new(),
            content_lines: 0,
            skipped: 0,
            first_skip: None,
        }
    }

    /// With `lenient`, turns an error into a warning; otherwise returns it.
    fn fail(&mut self, e: InputError) -> Result<(), InputError> {
        if !self.lenient {
            return Err(e);
        }
        let mut msg = format!("line skipped: {}", e.message);
        if !e.text.is_empty() {
            if e.col > 0 {
                let _ = std::fmt::Write::write_fmt(
                    &mut msg,
                    format_args!(" (column {}, at `{}`)", e.col, e.text),
                );
            } else {
                let _ = std::fmt::Write::write_fmt(&mut msg, format_args!(" (at `{}`)", e.text));
            }
        }
        self.skipped += 1;
        if self.first_skip.is_none() {
            self.first_skip = Some(format!("line {}: {}", e.line, e.message));
        }
        self.warnings.push(Warning::new(e.line, msg));
        Ok(())
    }

    fn structure(
        &mut self,
        line: u32,
        text: &str,
        message: String,
        hint: &str,
    ) -> Result<(), InputError> {
        self.fail(InputError::new(
            InputErrorKind::Structure,
            line,
            1,
            text,
            message,
            hint,
        ))
    }

    /// The table that a declaration or rule on `line` goes to.
    fn target_table(
        &mut self,
        line: u32,
        what: &str,
    ) -> Result<Option<&mut TableB<'a>>, InputError> {
        if let Some(t) = self.open {
            return Ok(Some(&mut self.tables[t]));
        }
        if self.saw_header {
            let after = self
                .tables
                .last()
                .map(|t| format!(" (after COMMIT of table {})", t.table.name))
                .unwrap_or_default();
            self.structure(
                line,
                what,
                format!("{what} outside any table{after}"),
                "put rules between a `*table` line and its `COMMIT`",
            )?;
            return Ok(None);
        }
        if self.loose.first_line.is_none() {
            self.loose.first_line = Some(line);
        }
        Ok(Some(&mut self.loose))
    }

    fn apply(&mut self, item: Item<'a>, line: u32) -> Result<(), InputError> {
        match item {
            Item::Blank => {}
            Item::Comment { v6, legacy_tables } => {
                self.v6 |= v6;
                if legacy_tables {
                    self.warnings.push(Warning::new(
                        line,
                        "the dump says iptables-legacy tables are also present; they are not in this input (see iptables-legacy-save)",
                    ));
                }
            }
            Item::Prompt => {
                self.warnings
                    .push(Warning::new(line, "skipped a shell prompt line (`$ …`)"));
            }
            Item::Table(name) => {
                self.content_lines += 1;
                self.table(name, line)?;
            }
            Item::Commit => {
                self.content_lines += 1;
                match self.open.take() {
                    Some(t) => self.tables[t].table.committed = true,
                    None => self.structure(
                        line,
                        "COMMIT",
                        "COMMIT without a table to commit".into(),
                        "every `COMMIT` closes a `*table` block; is this an excerpt that starts mid-table?",
                    )?,
                }
            }
            Item::Decl {
                name,
                policy,
                counters,
                how,
            } => {
                self.content_lines += 1;
                if how != DeclHow::Colon && !self.saw_header {
                    self.saw_spec = true;
                }
                let Some(t) = self.target_table(line, "chain declaration")? else {
                    return Ok(());
                };
                let c = t.chain_mut(name);
                if let Some(first) = c.declared_line {
                    let table = t.table.name;
                    let message = if table.is_empty() {
                        format!("chain {name} declared twice (first on line {first})")
                    } else {
                        format!(
                            "chain {name} declared twice in table {table} (first on line {first})"
                        )
                    };
                    return self.structure(
                        line,
                        name,
                        message,
                        "declare each chain once per table; concatenated `iptables -S` outputs of several tables must be given one at a time",
                    );
                }
                c.declared_line = Some(line);
                c.policy = policy;
                c.policy_counters = counters;
            }
            Item::Rule { chain, rule } => {
                self.content_lines += 1;
                if !self.v6 && rule_is_v6(&rule) {
                    self.v6 = true;
                }
                let Some(t) = self.target_table(line, "rule")? else {
                    return Ok(());
                };
                t.chain_mut(chain).rules.push(rule);
            }
        }
        Ok(())
    }

    fn table(&mut self, name: &'a str, line: u32) -> Result<(), InputError> {
        if let Some(t) = self.open.take() {
            let prev = &self.tables[t].table;
            let message = format!(
                "table {} (line {}) has no COMMIT before `*{name}`",
                prev.name,
                prev.line.unwrap_or(0)
            );
            self.structure(line, name, message, "end each table with a `COMMIT` line")?;
        }
        if !self.saw_header && !self.loose.is_empty() {
            let first = self.loose.first_line.unwrap_or(line);
            if self.lenient {
                let mut lines: Vec<u32> = self
                    .loose
                    .table
                    .chains
                    .iter()
                    .flat_map(|c| {
                        c.declared_line
                            .into_iter()
                            .chain(c.rules.iter().map(|r| r.line))
                    })
                    .collect();
                lines.sort_unstable();
                for l in lines {
                    self.warnings.push(Warning::new(
                        l,
                        format!(
                            "line skipped: outside any table (before `*{name}` on line {line})"
                        ),
                    ));
                }
                self.skipped += 1;
            } else {
                return Err(InputError::new(
                    InputErrorKind::Structure,
                    first,
                    1,
                    "",
                    format!(
                        "rule outside any table: the input has a `*{name}` header on line {line}, but this line comes before any header"
                    ),
                    "this looks like an excerpt that starts mid-table; remove the lines before the first `*table`, or use --lenient",
                ));
            }
            self.loose = TableB::new("", None);
        }
        self.saw_header = true;
        if let Some(old) = self.tables.iter().position(|t| t.table.name == name) {
            let old_line = self.tables[old].table.line.unwrap_or(0);
            self.warnings.push(Warning::new(
                line,
                format!("table {name} appears again (first on line {old_line}); the later one replaces it, as iptables-restore would"),
            ));
            self.tables.remove(old);
        }
        self.tables.push(TableB::new(name, Some(line)));
        self.open = Some(self.tables.len() - 1);
        Ok(())
    }

    fn finish(mut self, lines: u32) -> Result<Ruleset<'a>, InputError> {
        if let Some(t) = self.open {
            let t = &self.tables[t].table;
            self.warnings.push(Warning::new(
                t.line.unwrap_or(0),
                format!("table {} has no COMMIT at the end of the input: the dump may have been cut short", t.name),
            ));
        }
        let format;
        let mut tables: Vec<Table<'a>>;
        if self.saw_header {
            format = Format::Save;
            tables = self.tables.into_iter().map(|t| t.table).collect();
        } else if !self.loose.is_empty() {
            format = if self.saw_spec {
                Format::Spec
            } else {
                Format::Fragment
            };
            let mut t = self.loose.table;
            t.name = assumed_table(&t);
            self.warnings.push(Warning::new(
                0,
                format!("no table header: rules assumed to be in table {}", t.name),
            ));
            tables = vec![t];
        } else {
            let (message, hint) = if self.skipped > 0 {
                (
                    format!(
                        "nothing could be read: {} line(s) skipped, the first at {}",
                        self.skipped,
                        self.first_skip.unwrap_or_default()
                    ),
                    "check that this is `iptables-save` or `iptables -S` output",
                )
            } else if self.content_lines > 0 {
                ("the input has no rules".to_string(), HINT_EMPTY)
            } else {
                (
                    "the input is empty: no rules, only blank lines or comments".to_string(),
                    HINT_EMPTY,
                )
            };
            return Err(InputError::new(
                InputErrorKind::Empty,
                1,
                0,
                "",
                message,
                hint,
            ));
        };
        for t in &mut tables {
            for c in &mut t.chains {
                c.rules.shrink_to_fit();
            }
        }
        self.warnings.sort_by_key(|w| w.line);
        Ok(Ruleset {
            format,
            family: if self.v6 { Family::Ipv6 } else { Family::Ipv4 },
            tables,
            warnings: self.warnings,
            lines,
        })
    }
}

/// Does the rule carry an IPv6 address (`-s fd00::1`, `--to-destination [fd00::5]:80`)?
fn rule_is_v6(r: &Rule<'_>) -> bool {
    r.core
        .iter()
        .filter(|o| o.name == "s" || o.name == "d")
        .any(|o| o.value().contains(':'))
        || r.target.as_ref().is_some_and(|t| {
            t.options
                .iter()
                .filter(|o| o.name == "to-destination" || o.name == "to-source")
                .any(|o| o.value().starts_with('['))
        })
}

/// The table that rules without a header are assumed to be in: `nat` when any rule
/// has a NAT target, jumps to a kube-proxy service, endpoint or masquerade-mark chain,
/// or uses `-m statistic`; `filter` otherwise.
pub fn assumed_table(t: &Table<'_>) -> &'static str {
    let nat = t.chains.iter().flat_map(|c| &c.rules).any(|r| {
        r.matches.iter().any(|m| m.module == "statistic")
            || r.target.as_ref().is_some_and(|t| {
                matches!(t.name, "DNAT" | "SNAT" | "MASQUERADE" | "REDIRECT")
                    || t.name.starts_with("KUBE-SVC-")
                    || t.name.starts_with("KUBE-SVL-")
                    || t.name.starts_with("KUBE-SEP-")
                    || t.name.starts_with("KUBE-MARK-MASQ")
            })
    });
    if nat { "nat" } else { "filter" }
}

/// Parses iptables-save / `iptables -S` / fragment text into a [`Ruleset`].
///
/// Errors carry the line and column of the problem. With `opts.lenient`, lines that
/// cannot be read are skipped with a warning each; an input with nothing to read is an
/// error in both modes.
pub fn parse<'a>(text: &'a str, opts: &ParseOptions) -> Result<Ruleset<'a>, InputError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut b = Builder::new(opts.lenient);
    let mut sc = Scratch::default();
    let mut no: u32 = 0;
    for line in text.lines() {
        no = no.saturating_add(1);
        let ctx = LineCtx::new(line, no);
        match parse_line(&ctx, &mut sc) {
            Ok(item) => b.apply(item, no)?,
            Err(e) => b.fail(e)?,
        }
    }
    b.finish(no)
}

/// Do two rulesets have the same tables, chains and rules, ignoring line and column
/// numbers (declared or not still counts), the input format and the warnings?
pub fn same_rules(a: &Ruleset<'_>, b: &Ruleset<'_>) -> bool {
    fn opts_eq(a: &[crate::model::Opt<'_>], b: &[crate::model::Opt<'_>]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.name == y.name && x.negated == y.negated && x.values == y.values)
    }
    fn rule_eq(a: &Rule<'_>, b: &Rule<'_>) -> bool {
        a.counters == b.counters
            && opts_eq(&a.core, &b.core)
            && a.matches.len() == b.matches.len()
            && a.matches.iter().zip(&b.matches).all(|(x, y)| {
                x.module == y.module && x.implicit == y.implicit && opts_eq(&x.options, &y.options)
            })
            && match (&a.target, &b.target) {
                (None, None) => true,
                (Some(x), Some(y)) => {
                    x.jump == y.jump && x.name == y.name && opts_eq(&x.options, &y.options)
                }
                _ => false,
            }
    }
    a.tables.len() == b.tables.len()
        && a.tables.iter().zip(&b.tables).all(|(x, y)| {
            x.name == y.name
                && (x.line.is_none() || y.line.is_none() || x.committed == y.committed)
                && x.chains.len() == y.chains.len()
                && x.chains.iter().zip(&y.chains).all(|(c, d)| {
                    c.name == d.name
                        && c.policy == d.policy
                        && c.policy_counters == d.policy_counters
                        && c.declared_line.is_some() == d.declared_line.is_some()
                        && c.rules.len() == d.rules.len()
                        && c.rules.iter().zip(&d.rules).all(|(r, s)| rule_eq(r, s))
                })
        })
}

#[cfg(test)]
mod tests;
