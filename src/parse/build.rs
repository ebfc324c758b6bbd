//! Filing lines into tables and chains: the state machine over parsed lines.

use crate::error::{InputError, InputErrorKind};
use crate::model::{Chain, Family, Format, Rule, RuleLine, Ruleset, Table, Warning};

use super::assumed_table;
use super::line::{DeclHow, HINT_EMPTY, Item};

/// Chain names to their places in a table's chain list: open addressing with linear
/// probing over 8-byte slots, each a 32-bit tag of the name's hash and the chain's place
/// plus one (0: empty; so at most 2^32 − 2 chains, an input of tens of gigabytes), at
/// most half full, on huge pages where the system gives them.
/// Declarations are filed one by one, each looked up at a random place: for 135,000
/// chains the table is 4 MiB (a `HashMap<&str, usize>`'s buckets take 6 MiB), and with
/// 4 KiB pages nearly every lookup missed the TLB as well as the cache (perf: a tenth
/// of the run's cycles went to filing declarations; 4.5% with huge pages in one run, a
/// wall time gain within this VM's noise). A chain's name is compared only when the
/// tags agree.
struct ChainIndex {
    slots: Vec<u64>,
    /// Chains in the index.
    len: usize,
}

impl ChainIndex {
    /// An index with room for about `chains` chains before it grows.
    fn with_capacity(chains: usize) -> Self {
        // (Written: the index is read before it is written.)
        let slots = crate::memory::written((chains.max(4) * 2).next_power_of_two(), 0);
        ChainIndex { slots, len: 0 }
    }

    /// FxHash of the name's bytes, eight at a time (the last word padded with zeros).
    fn hash(name: &str) -> u64 {
        let add = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
        let mut chunks = name.as_bytes().chunks_exact(8);
        let mut h = 0;
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            h = add(h, u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            h = add(h, u64::from_le_bytes(w));
        }
        h
    }

    /// The first slot to look at for hash `h` (its high bits, the best mixed) and the
    /// tag (its low 32 bits, shifted up).
    fn start(&self, h: u64) -> (usize, u64) {
        let bits = self.slots.len().trailing_zeros();
        ((h >> (64 - bits)) as usize, h << 32)
    }

    /// The place in `chains` (every chain of the table, each in the index) of the chain
    /// named `name`, whose [`ChainIndex::hash`] is `hash`; `None` after noting that it
    /// is `chains.len()` (the caller adds it).
    fn find_or_add(&mut self, name: &str, hash: u64, chains: &[Chain<'_>]) -> Option<usize> {
        debug_assert_eq!(hash, Self::hash(name));
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow(chains);
        }
        let (mut i, tag) = self.start(hash);
        let mask = self.slots.len() - 1;
        loop {
            let s = self.slots[i];
            if s == 0 {
                self.slots[i] = tag | (chains.len() as u64 + 1);
                self.len += 1;
                return None;
            }
            if s >> 32 == tag >> 32 {
                let c = (s as u32 - 1) as usize;
                if chains[c].name == name {
                    return Some(c);
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Asks for the slot where the lookup of a name of [`ChainIndex::hash`] `hash`
    /// starts (a hint: see [`Builder::prefetch_decl`]).
    fn prefetch(&self, hash: u64) {
        let (i, _) = self.start(hash);
        if let Some(slot) = self.slots.get(i) {
            crate::memory::prefetch(slot);
        }
    }

    /// Twice the slots, every chain placed again.
    fn grow(&mut self, chains: &[Chain<'_>]) {
        let mut bigger = ChainIndex {
            slots: crate::memory::written(self.slots.len() * 2, 0),
            len: 0,
        };
        let mask = bigger.slots.len() - 1;
        for (c, chain) in chains.iter().enumerate() {
            let (mut i, tag) = bigger.start(Self::hash(chain.name));
            while bigger.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            bigger.slots[i] = tag | (c as u64 + 1);
            bigger.len += 1;
        }
        *self = bigger;
    }
}

/// A table being built, with its chain-name index.
pub(super) struct TableB<'a> {
    table: Table<'a>,
    index: ChainIndex,
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
            index: ChainIndex::with_capacity(chains),
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
        self.chain_by_index(name, ChainIndex::hash(name))
    }

    /// [`Self::chain_mut`] without first looking near the last chain: for declarations,
    /// which mostly name new chains.
    fn chain_by_index(&mut self, name: &'a str, hash: u64) -> &mut Chain<'a> {
        let chains = &mut self.table.chains;
        let i = match self.index.find_or_add(name, hash, chains) {
            Some(i) => i,
            None => {
                chains.push(Chain::named(name));
                chains.len() - 1
            }
        };
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

    /// Files one line that is not a rule; `hash` is [`Builder::name_hash`] of a
    /// declaration's name (unused for other lines).
    pub(super) fn apply(&mut self, item: Item<'a>, line: u32, hash: u64) -> Result<(), InputError> {
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
                let c = t.chain_by_index(name, hash);
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

    /// Asks the processor for the place in the chain index where a declaration whose
    /// name has [`Builder::name_hash`] `hash` will be filed, ahead of filing it:
    /// declarations mostly name new chains, each at a random place of a table of
    /// megabytes. Only a hint.
    pub(super) fn prefetch_decl(&self, hash: u64) {
        let t = self.open.and_then(|t| self.tables.get(t));
        t.unwrap_or(&self.loose).index.prefetch(hash);
    }

    /// The hash a chain declaration of `name` is filed by (see [`Builder::apply`]).
    pub(super) fn name_hash(name: &str) -> u64 {
        ChainIndex::hash(name)
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

#[cfg(test)]
mod tests {
    use super::ChainIndex;
    use crate::model::Chain;

    #[test]
    fn chain_index_finds_each_name_once_through_growth() {
        let names: Vec<String> = (0..5_000).map(|i| format!("KUBE-SEP-{i:05}")).collect();
        // Room for 4 at first: it grows eleven times.
        let mut index = ChainIndex::with_capacity(4);
        let mut chains: Vec<Chain<'_>> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            assert_eq!(
                index.find_or_add(name, ChainIndex::hash(name), &chains),
                None,
                "{name} is new"
            );
            chains.push(Chain::named(name));
            // Every name so far is found where it was put.
            if i % 499 == 0 {
                for (j, n) in names[..=i].iter().enumerate() {
                    assert_eq!(index.find_or_add(n, ChainIndex::hash(n), &chains), Some(j));
                }
            }
        }
        assert!(index.slots.len() >= 2 * names.len());
        assert_eq!(index.len, names.len());
        // An unknown name is not found (and noted as the next chain).
        assert_eq!(
            index.find_or_add("KUBE-SEP-", ChainIndex::hash("KUBE-SEP-"), &chains),
            None
        );
        assert_eq!(index.len, names.len() + 1);
    }
}
