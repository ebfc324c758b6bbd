//! Filing lines into tables and chains: the state machine over parsed lines.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::error::{InputError, InputErrorKind};
use crate::model::{Chain, Family, Format, Rule, RuleLine, Ruleset, Table, Warning};

use super::assumed_table;
use super::line::{DeclHow, HINT_EMPTY, Item};

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
pub(super) struct TableB<'a> {
    table: Table<'a>,
    index: ChainIndex<'a>,
    /// Line of the first rule or declaration (for tables outside headers).
    first_line: Option<u32>,
    /// Index of the chain looked up last: iptables-save prints rules chain by chain in
    /// the order of the declarations, so the next chain is usually at or just after it.
    last: usize,
}

impl<'a> TableB<'a> {
    /// A table expected to get about `chains` chains.
    fn new(name: &'a str, line: Option<u32>, chains: usize) -> Self {
        let chains = chains.min(1 << 20);
        TableB {
            table: Table {
                name,
                line,
                committed: false,
                chains: {
                    // A large dump's chain list is written once, in order: huge pages.
                    let mut v = Vec::with_capacity(chains);
                    crate::memory::advise_huge(&mut v);
                    v
                },
            },
            index: ChainIndex::with_capacity_and_hasher(chains, BuildHasherDefault::default()),
            first_line: None,
            last: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.table.chains.is_empty()
    }

    /// The chain with that name, created when new.
    fn chain_mut(&mut self, name: &'a str) -> &mut Chain<'a> {
        let chains = &self.table.chains;
        let end = chains.len().min(self.last.saturating_add(4));
        if let Some(i) = (self.last..end).find(|&i| chains[i].name == name) {
            self.last = i;
            // The next runs are most likely of the next chains: their names (in the
            // declarations, read long before) are asked for now.
            for next in chains.iter().skip(i + 1).take(2) {
                crate::memory::prefetch(next.name.as_ptr());
            }
            return &mut self.table.chains[i];
        }
        self.chain_by_index(name)
    }

    /// [`Self::chain_mut`] without first looking near the last chain: for declarations,
    /// which mostly name new chains.
    fn chain_by_index(&mut self, name: &'a str) -> &mut Chain<'a> {
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
        self.last = i;
        &mut chains[i]
    }

    /// Appends consecutive rules of one chain; the first run of a chain becomes its rule
    /// vector as it is.
    fn push_rules(&mut self, chain: &'a str, mut rules: Vec<RuleLine<'a>>) {
        let c = self.chain_mut(chain);
        if c.rules.is_empty() {
            c.rules = rules;
        } else {
            c.rules.reserve_exact(rules.len());
            c.rules.append(&mut rules);
        }
    }
}

/// Files lines into tables.
pub(super) struct Builder<'a> {
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
    /// Estimated chain counts of the tables still to come.
    sizes: std::vec::IntoIter<usize>,
    first_skip: Option<String>,
}

impl<'a> Builder<'a> {
    /// `sizes` estimates the number of chains of the content before the first header,
    /// then of each table in order.
    pub(super) fn new(lenient: bool, sizes: Vec<usize>) -> Self {
        let mut sizes = sizes.into_iter();
        Builder {
            lenient,
            tables: Vec::new(),
            open: None,
            saw_header: false,
            loose: TableB::new("", None, sizes.next().unwrap_or(0)),
            sizes,
            saw_spec: false,
            v6: false,
            warnings: Vec::new(),
            content_lines: 0,
            skipped: 0,
            first_skip: None,
        }
    }

    /// With `lenient`, turns an error into a warning; otherwise returns it.
    pub(super) fn fail(&mut self, e: InputError) -> Result<(), InputError> {
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

    pub(super) fn apply(&mut self, item: Item<'a>, line: u32) -> Result<(), InputError> {
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
                    // An excerpt that starts inside a table: the rules before this COMMIT
                    // had no header. Keep them as a table of their own (assumed name).
                    None if !self.saw_header && !self.loose.is_empty() => {
                        let mut t = std::mem::replace(&mut self.loose, TableB::new("", None, 0));
                        t.table.name = assumed_table(&t.table);
                        t.table.committed = true;
                        self.warnings.push(Warning::new(
                            line,
                            format!(
                                "the rules before this COMMIT have no `*table` header (an excerpt that starts inside a table); assumed to be table {}",
                                t.table.name
                            ),
                        ));
                        self.saw_header = true;
                        self.tables.push(t);
                    }
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
                let c = t.chain_by_index(name);
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
        }
        Ok(())
    }

    /// Files consecutive rules of one chain (each knows its line); `v6` when one of
    /// them has an IPv6 address.
    pub(super) fn rules(
        &mut self,
        chain: &'a str,
        rules: Vec<RuleLine<'a>>,
        v6: bool,
    ) -> Result<(), InputError> {
        let Some(first) = rules.first().map(|r| r.line) else {
            return Ok(());
        };
        self.content_lines = self
            .content_lines
            .saturating_add(u32::try_from(rules.len()).unwrap_or(u32::MAX));
        self.v6 |= v6;
        if self.open.is_none() && self.saw_header {
            // Every one of them is outside any table.
            for r in &rules {
                self.target_table(r.line, "rule")?;
            }
            return Ok(());
        }
        if let Some(t) = self.target_table(first, "rule")? {
            t.push_rules(chain, rules);
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
            self.loose = TableB::new("", None, 0);
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
        let size = self.sizes.next().unwrap_or(0);
        self.tables.push(TableB::new(name, Some(line), size));
        self.open = Some(self.tables.len() - 1);
        Ok(())
    }

    pub(super) fn finish(mut self, lines: u32) -> Result<Ruleset<'a>, InputError> {
        if let Some(t) = self.open {
            let t = &self.tables[t].table;
            self.warnings.push(Warning::new(
                t.line.unwrap_or(0),
                format!("table {} has no COMMIT at the end of the input: the dump may have been cut short", t.name),
            ));
        }
        let format;
        let tables: Vec<Table<'a>>;
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
pub(super) fn rule_is_v6(r: &Rule<'_>) -> bool {
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
