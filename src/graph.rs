//! The chain graph: every rule's target resolved to a chain index, a verdict or an
//! extension; loops and jumps to undeclared chains found here.

use crate::error::{InputError, InputErrorKind};
use crate::memory::{prefetch, prefetch_text};
use crate::model::{Chain, Format, Jump, Ruleset, Table, TargetHead, Warning};
use rayon::prelude::*;
use rustc_hash::FxHashMap as HashMap;

/// What a rule's target does to traversal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRef {
    /// No `-j`: the rule only counts packets.
    None,
    /// A user chain of the same table.
    Chain { chain: usize, goto: bool },
    /// A jump to a chain the input does not contain (fragments): assumed to return
    /// without a verdict.
    Missing,
    /// `RETURN`.
    Return,
    /// A target that ends traversal of the table (ACCEPT, DROP, DNAT, REJECT, …).
    Terminal,
    /// `MARK` / `CONNMARK`: changes marks and goes on.
    Mark,
    /// Any other target that goes on with the next rule (LOG, NFLOG, CT, …).
    Continue,
}

/// Targets that end traversal of the table for the packet.
const TERMINAL: &[&str] = &[
    "ACCEPT",
    "DROP",
    "QUEUE",
    "REJECT",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "REDIRECT",
    "NETMAP",
    "TPROXY",
    "NFQUEUE",
    "MIRROR",
    "SAME",
    "SYNPROXY",
    "TARPIT",
    "DELUDE",
    "CHAOS",
];

/// Target extensions that go on with the next rule.
const CONTINUE: &[&str] = &[
    "LOG",
    "NFLOG",
    "ULOG",
    "AUDIT",
    "CHECKSUM",
    "CLASSIFY",
    "CLUSTERIP",
    "CONNSECMARK",
    "CT",
    "DNPT",
    "SNPT",
    "DSCP",
    "ECN",
    "HL",
    "HMARK",
    "IDLETIMER",
    "LED",
    "NOTRACK",
    "RATEEST",
    "SECMARK",
    "SET",
    "TCPMSS",
    "TCPOPTSTRIP",
    "TEE",
    "TOS",
    "TRACE",
    "TTL",
];

/// Does this target name end traversal when it is not a chain?
pub fn is_terminal_name(name: &str) -> bool {
    TERMINAL.contains(&name)
}

/// One table's resolved graph.
#[derive(Debug, Clone)]
pub struct TableGraph {
    /// The resolved targets of all rules, chain after chain; chain `c`'s are
    /// `target_list[target_start[c]..target_start[c + 1]]`.
    target_start: Vec<u32>,
    target_list: Vec<Packed>,
    /// The `(chain, rule)` positions that jump or go to each chain, likewise.
    caller_start: Vec<u32>,
    caller_list: Vec<(u32, u32)>,
    /// Per chain: can traversal end with a verdict inside it (directly or below)?
    pub may_terminate: Vec<bool>,
    /// Per chain: does it (or anything below it) change marks?
    pub may_mark: Vec<bool>,
    /// Per chain: its first rule with a `statistic` match ([`NO_STATISTIC`]: none),
    /// with [`NOT_PLAIN`] set unless every such rule is plain
    /// ([`crate::model::RuleLine::plain`]).
    statistic: Vec<u32>,
}

/// [`TableGraph::statistic`] of a chain without statistic rules.
const NO_STATISTIC: u32 = u32::MAX >> 1;
/// The bit of [`TableGraph::statistic`] set when a statistic rule is not plain.
const NOT_PLAIN: u32 = 1 << 31;

impl TableGraph {
    /// Number of chains.
    pub fn chains(&self) -> usize {
        self.target_start.len() - 1
    }

    /// Number of rules of chain `c`.
    pub fn rules(&self, c: usize) -> usize {
        (self.target_start[c + 1] - self.target_start[c]) as usize
    }

    /// The resolved target of rule `r` of chain `c`.
    pub fn target(&self, c: usize, r: usize) -> TargetRef {
        let i = self.target_start[c] as usize + r;
        debug_assert!(i < self.target_start[c + 1] as usize);
        self.target_list[i].unpack()
    }

    /// The `(chain, rule)` positions that jump or go to each chain, in input order:
    /// [`TableGraph::caller_start`] and [`TableGraph::caller_list`] (a counting sort by
    /// callee).
    fn file_callers(&self) -> (Vec<u32>, Vec<(u32, u32)>) {
        let n = self.chains();
        // (Written: counted up, so read before it is written.)
        let mut caller_start = crate::memory::written(n + 1, 0u32);
        for p in &self.target_list {
            if let TargetRef::Chain { chain: callee, .. } = p.unpack() {
                caller_start[callee + 1] += 1;
            }
        }
        for c in 0..n {
            caller_start[c + 1] += caller_start[c];
        }
        let mut next = caller_start.clone();
        let mut caller_list = vec![(0u32, 0u32); caller_start[n] as usize];
        for c in 0..n {
            for r in 0..self.rules(c) {
                if let TargetRef::Chain { chain: callee, .. } = self.target(c, r) {
                    caller_list[next[callee] as usize] = (c as u32, r as u32);
                    next[callee] += 1;
                }
            }
        }
        (caller_start, caller_list)
    }

    /// Chain `c`'s first rule with a `statistic` match, if any, and whether every such
    /// rule of the chain is plain (no core option, only options about state). Found
    /// while resolving, so that what looks for balancers need not read every chain's
    /// rules again.
    pub fn statistic_rules(&self, c: usize) -> Option<(usize, bool)> {
        let s = *self.statistic.get(c)?;
        let first = s & !NOT_PLAIN;
        (first != NO_STATISTIC).then_some((first as usize, s & NOT_PLAIN == 0))
    }

    /// The `(chain, rule)` positions that jump or go to chain `c`, in input order.
    pub fn callers(&self, c: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.caller_list[self.caller_start[c] as usize..self.caller_start[c + 1] as usize]
            .iter()
            .map(|&(pc, pr)| (pc as usize, pr as usize))
    }
}

/// The rules of a chain that [`Graph::warm`] looks at.
const WARM_RULES: usize = 64;

/// A [`TargetRef`] in 4 bytes: the kind in the top 3 bits, a chain index below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed(u32);

const CHAIN_BITS: u32 = 29;

/// Chains per thread's run when resolving targets.
const RESOLVE_RUN: usize = 2048;

/// What resolving a run of chains gives (see `build_table`).
struct Resolved {
    /// The targets of the run's rules, chain after chain.
    targets: Vec<Packed>,
    /// The (chain, rule) places that need a word.
    noted: Vec<(usize, usize)>,
    /// Per chain: has it a policy?
    policies: Vec<bool>,
    /// Per chain: its [`TableGraph::statistic`].
    statistic: Vec<u32>,
    /// Per chain: its number of rules.
    rules: Vec<u32>,
}

impl Packed {
    fn pack(t: TargetRef) -> Packed {
        let (kind, chain) = match t {
            TargetRef::None => (0, 0),
            TargetRef::Missing => (1, 0),
            TargetRef::Return => (2, 0),
            TargetRef::Terminal => (3, 0),
            TargetRef::Mark => (4, 0),
            TargetRef::Continue => (5, 0),
            TargetRef::Chain { chain, goto } => (6 + u32::from(goto), chain as u32),
        };
        Packed(kind << CHAIN_BITS | chain)
    }

    fn unpack(self) -> TargetRef {
        let chain = (self.0 & ((1 << CHAIN_BITS) - 1)) as usize;
        match self.0 >> CHAIN_BITS {
            0 => TargetRef::None,
            1 => TargetRef::Missing,
            2 => TargetRef::Return,
            3 => TargetRef::Terminal,
            4 => TargetRef::Mark,
            5 => TargetRef::Continue,
            k => TargetRef::Chain {
                chain,
                goto: k == 7,
            },
        }
    }
}

/// The resolved graph of a whole ruleset.
#[derive(Debug, Clone)]
pub struct Graph<'r, 'a> {
    pub rs: &'r Ruleset<'a>,
    pub tables: Vec<TableGraph>,
    /// Assumptions made while resolving (undeclared chains in fragments, …).
    pub warnings: Vec<Warning>,
}

impl<'r, 'a> Graph<'r, 'a> {
    /// Resolves every target. In a full dump (`Format::Save`) a jump to an undeclared
    /// chain is an error unless `lenient`; in fragments and `-S` output it is assumed to
    /// return, with a warning. A loop is always an error.
    pub fn build(rs: &'r Ruleset<'a>, lenient: bool) -> Result<Self, InputError> {
        Self::build_with(rs, lenient, |_| ()).map(|(graph, ())| graph)
    }

    /// [`Self::build`], and `f` run on the graph at the same time as the search for
    /// loops and the flags: `f` sees every target and caller, but not yet
    /// [`TableGraph::may_terminate`] and [`TableGraph::may_mark`] (empty until then: a
    /// walk would fail on them), so it must not walk the graph. (What lists the
    /// balancers, which only looks at chains, rules and callers, runs so.) Its result is
    /// dropped when the graph has a loop.
    pub fn build_with<T: Send>(
        rs: &'r Ruleset<'a>,
        lenient: bool,
        f: impl FnOnce(&Self) -> T + Send,
    ) -> Result<(Self, T), InputError> {
        let mut warnings = Vec::new();
        let mut tables = Vec::with_capacity(rs.tables.len());
        // Per table, whether each chain has a policy (for the flags).
        let mut policies = Vec::with_capacity(rs.tables.len());
        for table in &rs.tables {
            let (tg, p) = build_table(rs.format, table, lenient, &mut warnings)?;
            tables.push(tg);
            policies.push(p);
        }
        for tg in &mut tables {
            (tg.caller_start, tg.caller_list) = tg.file_callers();
        }
        let mut graph = Graph {
            rs,
            tables,
            warnings,
        };
        let g = &graph;
        let (flags, out) = rayon::join(
            || {
                (rs.tables.iter().zip(policies).enumerate())
                    .map(|(t, (table, policies))| {
                        g.checked_order(t, table)
                            .map(|order| g.compute_flags(t, order, policies))
                    })
                    .collect::<Result<Vec<_>, _>>()
            },
            || f(g),
        );
        for (tg, (may_terminate, may_mark)) in graph.tables.iter_mut().zip(flags?) {
            (tg.may_terminate, tg.may_mark) = (may_terminate, may_mark);
        }
        Ok((graph, out))
    }

    /// Asks the processor to bring into its caches what walks from `roots` (table,
    /// chain) and their entry searches read first, all at once, so that the memory
    /// latencies overlap instead of adding up one dependent load after another: the
    /// roots' rules and their text, the chains they jump to with their flags, names,
    /// rules, text and first targets, and the rules that jump to the roots or to the
    /// chains that jump to those, with their chains' names. Only a hint: nothing
    /// computed depends on it.
    pub fn warm(&self, roots: &[(usize, usize)]) {
        let mut below: Vec<(usize, usize)> = Vec::with_capacity(roots.len() * 8);
        let mut above: Vec<(usize, usize, usize)> = Vec::with_capacity(roots.len() * 4);
        for &(t, c) in roots {
            let tg = &self.tables[t];
            let chain = &self.rs.tables[t].chains[c];
            for line in chain.rules.iter().take(WARM_RULES) {
                prefetch_text(line.text);
            }
            let n = tg.rules(c).min(WARM_RULES);
            let start = tg.target_start[c] as usize;
            for &p in &tg.target_list[start..start + n] {
                if let TargetRef::Chain { chain, .. } = p.unpack() {
                    below.push((t, chain));
                }
            }
            above.extend(tg.callers(c).take(WARM_RULES).map(|(pc, pr)| (t, pc, pr)));
        }
        for &(t, c) in &below {
            let tg = &self.tables[t];
            prefetch(&tg.target_start[c]);
            prefetch(&tg.may_terminate[c]);
            prefetch(&tg.may_mark[c]);
            let chain = &self.rs.tables[t].chains[c];
            // (Its name: an endpoint keeps the name of the chain that holds it.)
            prefetch(chain.name.as_ptr());
            for line in chain.rules.iter().take(WARM_RULES) {
                prefetch_text(line.text);
            }
        }
        // Their targets, now that where they start is on its way.
        for &(t, c) in &below {
            let tg = &self.tables[t];
            if let Some(p) = tg.target_list.get(tg.target_start[c] as usize) {
                prefetch(p);
            }
        }
        // The calling rules, then the rules that call their chains.
        let mut next: Vec<(usize, usize, usize)> = Vec::with_capacity(above.len());
        for level in 0..2 {
            for &(t, c, r) in &above {
                let chain = &self.rs.tables[t].chains[c];
                prefetch(chain.name.as_ptr());
                if let Some(line) = chain.rules.get(r) {
                    prefetch_text(line.text);
                }
                if level == 0 {
                    let callers = self.tables[t].callers(c).take(WARM_RULES);
                    next.extend(callers.map(|(pc, pr)| (t, pc, pr)));
                }
            }
            std::mem::swap(&mut above, &mut next);
        }
    }

    /// The index of the chain of table `t` with that name. (A linear search: the
    /// graph keeps no name index, to stay small; its users look up a chain or two.)
    pub fn chain_index(&self, t: usize, name: &str) -> Option<usize> {
        self.rs.tables[t].chains.iter().position(|c| c.name == name)
    }

    pub fn table(&self, t: usize) -> &'r Table<'a> {
        &self.rs.tables[t]
    }

    pub fn chain(&self, t: usize, c: usize) -> &'r Chain<'a> {
        &self.rs.tables[t].chains[c]
    }

    /// Chains in an order where every chain comes after all chains it jumps to.
    pub fn callee_first_order(&self, t: usize) -> Vec<usize> {
        // A built graph has no loop.
        self.checked_order(t, &self.rs.tables[t])
            .unwrap_or_default()
    }

    /// Per chain of table `t` (visited in `order`, callee first): may traversal end
    /// with a verdict inside it, may it change marks ([`TableGraph::may_terminate`],
    /// [`TableGraph::may_mark`]). `policies`: whether each chain has a policy, which is
    /// a verdict too (read in order while resolving, rather than each chain looked up
    /// here in callee-first order).
    fn compute_flags(
        &self,
        t: usize,
        order: Vec<usize>,
        policies: Vec<bool>,
    ) -> (Vec<bool>, Vec<bool>) {
        let tg = &self.tables[t];
        let n = tg.chains();
        let (mut may_terminate, mut may_mark) = (policies, vec![false; n]);
        for c in order {
            let mut term = may_terminate[c];
            let mut mark = false;
            for i in tg.target_start[c]..tg.target_start[c + 1] {
                match tg.target_list[i as usize].unpack() {
                    TargetRef::Terminal => term = true,
                    TargetRef::Mark => mark = true,
                    TargetRef::Chain { chain, .. } => {
                        term |= may_terminate[chain];
                        mark |= may_mark[chain];
                    }
                    _ => {}
                }
            }
            may_terminate[c] = term;
            may_mark[c] = mark;
        }
        (may_terminate, may_mark)
    }

    /// One depth-first walk over the jumps of table `t`: the first loop found is an
    /// error; without one, the chains in callee-first order.
    fn checked_order(&self, t: usize, table: &Table<'a>) -> Result<Vec<usize>, InputError> {
        let tg = &self.tables[t];
        let n = table.chains.len();
        let mut order = Vec::with_capacity(n);
        // 0 new, 1 on stack, 2 done. (Written: read before it is written.)
        let mut state = crate::memory::written(n, 0u8);
        // (chain, next rule index)
        let mut stack: Vec<(usize, usize)> = Vec::new();
        for root in 0..n {
            if state[root] != 0 {
                continue;
            }
            stack.push((root, 0));
            state[root] = 1;
            while let Some(top) = stack.last_mut() {
                let (c, r) = *top;
                if r >= tg.rules(c) {
                    state[c] = 2;
                    order.push(c);
                    stack.pop();
                    continue;
                }
                top.1 += 1;
                if let TargetRef::Chain { chain, .. } = tg.target(c, r) {
                    match state[chain] {
                        0 => {
                            state[chain] = 1;
                            stack.push((chain, 0));
                        }
                        1 => return Err(loop_error(table, &stack, chain)),
                        _ => {}
                    }
                }
            }
        }
        Ok(order)
    }
}

fn loop_error(table: &Table<'_>, stack: &[(usize, usize)], back_to: usize) -> InputError {
    let start = stack.iter().position(|&(c, _)| c == back_to).unwrap_or(0);
    let mut names = Vec::new();
    let mut lines = Vec::new();
    for &(c, next) in &stack[start..] {
        names.push(table.chains[c].name.to_string());
        let rule = &table.chains[c].rules[next - 1];
        lines.push(rule.line.to_string());
    }
    names.push(table.chains[back_to].name.to_string());
    let (c, next) = stack[stack.len() - 1];
    let rule = &table.chains[c].rules[next - 1];
    InputError::new(
        InputErrorKind::Loop,
        rule.line,
        rule.parse().target.as_ref().map_or(0, |t| t.col),
        names.join(" -> "),
        format!(
            "chain loop in table {}: {} (rules on lines {})",
            table.name,
            names.join(" -> "),
            lines.join(", ")
        ),
        "iptables-restore rejects loops; remove one of these jumps",
    )
}

fn build_table<'a>(
    format: Format,
    table: &Table<'a>,
    lenient: bool,
    warnings: &mut Vec<Warning>,
) -> Result<(TableGraph, Vec<bool>), InputError> {
    let index = NameIndex::new(&table.chains);
    let n = table.chains.len();
    if n >= 1 << CHAIN_BITS {
        return Err(InputError::new(
            InputErrorKind::Structure,
            table.line.unwrap_or(0),
            0,
            table.name,
            format!(
                "table {} has {n} chains, more than lbaudit handles",
                table.name
            ),
            format!("analyse fewer than {} chains at a time", 1u32 << CHAIN_BITS),
        ));
    }
    // Targets are resolved on several threads, a run of chains each; what needs a word
    // (a missing chain, an unknown target) is noted and handled in order afterwards.
    let runs: Vec<&[Chain<'a>]> = table.chains.chunks(RESOLVE_RUN).collect();
    let resolved: Vec<Resolved> = runs
        .par_iter()
        .enumerate()
        .map(|(k, run)| {
            let mut targets = Vec::with_capacity(run.iter().map(|c| c.rules.len()).sum());
            let mut noted = Vec::new();
            let policies = run.iter().map(|c| c.policy.is_some()).collect();
            let mut statistic = Vec::with_capacity(run.len());
            let mut rules = Vec::with_capacity(run.len());
            for (i, chain) in run.iter().enumerate() {
                rules.push(chain.rules.len() as u32);
                let (mut first_statistic, mut plain) = (NO_STATISTIC, true);
                for (r, rule) in chain.rules.iter().enumerate() {
                    if rule.statistic() {
                        if first_statistic == NO_STATISTIC {
                            // (A chain of 2^31 rules would be 64 GiB of them.)
                            first_statistic = (r as u32).min(NO_STATISTIC - 1);
                        }
                        plain &= rule.plain();
                    }
                    let t = match &rule.target() {
                        None => TargetRef::None,
                        Some(target) => resolve(target, &index),
                    };
                    if matches!(t, TargetRef::Missing | TargetRef::Continue) {
                        noted.push((k * RESOLVE_RUN + i, r));
                    }
                    targets.push(Packed::pack(t));
                }
                statistic.push(first_statistic | if plain { 0 } else { NOT_PLAIN });
            }
            Resolved {
                targets,
                noted,
                policies,
                statistic,
                rules,
            }
        })
        .collect();
    // (From the runs' rule counts: the chains themselves, 96 bytes each, are not read
    // again.)
    let rules: usize = resolved.iter().map(|r| r.targets.len()).sum();
    let mut target_start = Vec::with_capacity(n + 1);
    let mut target_list = Vec::with_capacity(rules);
    for r in &resolved {
        target_list.extend_from_slice(&r.targets);
    }
    let mut at = 0u32;
    for &count in resolved.iter().flat_map(|r| &r.rules) {
        target_start.push(at);
        at += count;
    }
    let mut missing_warned: HashMap<&str, ()> = HashMap::default();
    for &(c, r) in resolved.iter().flat_map(|r| &r.noted) {
        let rule = &table.chains[c].rules[r];
        let target = rule.target().expect("noted rules have a target");
        if target_list[target_start[c] as usize + r].unpack() == TargetRef::Missing {
            // Tables without a `*table` header (excerpts) may name chains they do not
            // contain; a full table may not.
            if format == Format::Save && table.line.is_some() && !lenient {
                return Err(InputError::new(
                    InputErrorKind::UndeclaredChain,
                    rule.line,
                    rule.parse().target.as_ref().map_or(0, |t| t.col),
                    target.name,
                    format!(
                        "jump to chain {} which table {} does not declare",
                        target.name, table.name
                    ),
                    format!(
                        "add `:{} - [0:0]` to the table, or analyse a fragment without `*{}` header lines",
                        target.name, table.name
                    ),
                ));
            }
            if missing_warned.insert(target.name, ()).is_none() {
                warnings.push(Warning::new(
                    rule.line,
                    format!(
                        "chain {} is not in the input; assumed to return without a verdict (the usual case for KUBE-MARK-MASQ, which only sets a mark)",
                        target.name
                    ),
                ));
            }
        } else {
            let name = target.name;
            if !CONTINUE.contains(&name) && missing_warned.insert(name, ()).is_none() {
                warnings.push(Warning::new(
                    rule.line,
                    format!("unknown target {name}: assumed to go on with the next rule"),
                ));
            }
        }
    }
    target_start.push(target_list.len() as u32);
    // Callers and flags are filled in by `Graph::build`.
    let policies = resolved.iter().flat_map(|r| &r.policies).copied().collect();
    let tg = TableGraph {
        target_start,
        target_list,
        caller_start: Vec::new(),
        caller_list: Vec::new(),
        may_terminate: Vec::new(),
        may_mark: Vec::new(),
        statistic: resolved.into_iter().flat_map(|r| r.statistic).collect(),
    };
    Ok((tg, policies))
}

/// Chain names to their places in the table, in two halves (by [`NameIndex::half`])
/// built at the same time on two threads: building one index of 135,000 names took a
/// single thread 5 ms.
struct NameIndex<'a> {
    halves: [HashMap<&'a str, usize>; 2],
}

impl<'a> NameIndex<'a> {
    fn new(chains: &[Chain<'a>]) -> Self {
        let half = |k: usize| {
            let mut index =
                HashMap::with_capacity_and_hasher(chains.len() / 2 + 16, Default::default());
            for (i, c) in chains.iter().enumerate() {
                if Self::half(c.name) == k {
                    index.entry(c.name).or_insert(i);
                }
            }
            index
        };
        let (a, b) = rayon::join(|| half(0), || half(1));
        NameIndex { halves: [a, b] }
    }

    /// Which half holds `name`: the low bit of its last byte.
    fn half(name: &str) -> usize {
        name.as_bytes().last().map_or(0, |&b| usize::from(b & 1))
    }

    fn get(&self, name: &str) -> Option<usize> {
        self.halves[Self::half(name)].get(name).copied()
    }
}

fn resolve(target: &TargetHead<'_>, index: &NameIndex<'_>) -> TargetRef {
    let name = target.name;
    if let Some(chain) = index.get(name) {
        return TargetRef::Chain {
            chain,
            goto: target.jump == Jump::Goto,
        };
    }
    if target.jump == Jump::Goto {
        return TargetRef::Missing;
    }
    match name {
        "RETURN" => TargetRef::Return,
        "MARK" | "CONNMARK" => TargetRef::Mark,
        _ if is_terminal_name(name) => TargetRef::Terminal,
        _ if CONTINUE.contains(&name) => TargetRef::Continue,
        // An unknown name with options is a target extension we do not know; without
        // options it is a chain the input does not contain.
        _ if target.has_options => TargetRef::Continue,
        _ => TargetRef::Missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{ParseOptions, parse};

    fn graph_of(text: &str) -> Result<(), InputError> {
        let rs = parse(text, &ParseOptions::default()).expect("parses");
        Graph::build(&rs, false).map(|_| ())
    }

    #[test]
    fn warming_any_chains_never_panics() {
        // Chains longer than `WARM_RULES`, jumps to chains with no rules, to a missing
        // chain (a fragment), gotos, callers of callers, and a chain named twice.
        let mut text = String::from("-A PREROUTING -j KUBE-SERVICES\n");
        for i in 0..(WARM_RULES + 5) {
            text.push_str(&format!(
                "-A KUBE-SERVICES -d 10.0.0.{}/32 -j KUBE-SVC-{i}\n",
                i % 250
            ));
            text.push_str(&format!(
                "-A KUBE-SVC-{i} -m statistic --mode random --probability 0.5 -g KUBE-SEP-{i}\n"
            ));
            text.push_str(&format!("-A KUBE-SVC-{i} -j KUBE-MARK-MASQ\n"));
        }
        text.push_str("-A KUBE-SEP-0 -p tcp -j DNAT --to-destination 10.1.0.1:80\n");
        let rs = parse(&text, &ParseOptions::default()).expect("parses");
        let g = Graph::build(&rs, false).expect("builds");
        let all: Vec<(usize, usize)> = (0..g.tables[0].chains()).map(|c| (0, c)).collect();
        g.warm(&all);
        g.warm(&[]);
        g.warm(&[(0, 0), (0, 0)]);
    }

    #[test]
    fn packed_targets_unpack_to_themselves() {
        let mut all = vec![
            TargetRef::None,
            TargetRef::Missing,
            TargetRef::Return,
            TargetRef::Terminal,
            TargetRef::Mark,
            TargetRef::Continue,
        ];
        for chain in [0, 1, 200_000, (1 << CHAIN_BITS) - 1] {
            for goto in [false, true] {
                all.push(TargetRef::Chain { chain, goto });
            }
        }
        for t in all {
            assert_eq!(Packed::pack(t).unpack(), t);
        }
    }

    #[test]
    fn loops_are_errors_that_name_the_path() {
        let text = "*filter\n:INPUT ACCEPT [0:0]\n:A - [0:0]\n:B - [0:0]\n-A INPUT -j A\n-A A -j B\n-A B -g A\nCOMMIT\n";
        let e = graph_of(text).unwrap_err();
        assert_eq!(e.kind, InputErrorKind::Loop);
        assert_eq!(e.line, 7);
        assert!(e.message.contains("A -> B -> A"), "{e}");
        assert!(e.message.contains("lines 6, 7"), "{e}");
    }

    #[test]
    fn undeclared_chains_are_errors_in_full_dumps_only() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n";
        let e = graph_of(text).unwrap_err();
        assert_eq!((e.kind, e.line), (InputErrorKind::UndeclaredChain, 3));
        // Known target extensions are not chains.
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j MASQUERADE\n-A PREROUTING -j LOG --log-prefix x\n-A PREROUTING -j TPROXY2 --on-port 1\nCOMMIT\n";
        assert!(graph_of(text).is_ok());
        // A fragment assumes the chain returns, with a warning.
        let rs = parse("-A KUBE-SVC-X -j KUBE-SEP-Y\n", &ParseOptions::default()).unwrap();
        let g = Graph::build(&rs, false).unwrap();
        assert_eq!(g.tables[0].target(0, 0), TargetRef::Missing);
        assert!(g.warnings.iter().any(|w| w.message.contains("KUBE-SEP-Y")));
    }

    #[test]
    fn a_chain_of_100000_jumps_does_not_overflow_the_stack() {
        let n = 100_000;
        let mut text = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n");
        for i in 0..n {
            text.push_str(&format!(":C{i} - [0:0]\n"));
        }
        text.push_str("-A PREROUTING -j C0\n");
        for i in 0..n - 1 {
            text.push_str(&format!("-A C{i} -j C{}\n", i + 1));
        }
        text.push_str(&format!(
            "-A C{} -j DNAT --to-destination 10.0.0.1:80\nCOMMIT\n",
            n - 1
        ));
        let rs = parse(&text, &ParseOptions::default()).unwrap();
        let g = Graph::build(&rs, false).unwrap();
        assert_eq!(g.callee_first_order(0).len(), n + 1);
        let d = crate::eval::evaluate(
            &g,
            0,
            0,
            crate::eval::Packet::default(),
            crate::eval::Mode::Trace,
            false,
        )
        .unwrap();
        assert_eq!(d.outcomes.len(), 1);
        assert!(d.outcomes[0].prob.is_one());
        // And a loop closed at the bottom of that chain is found without recursion.
        let looped = text.replace(
            &format!("-A C{} -j DNAT --to-destination 10.0.0.1:80", n - 1),
            &format!("-A C{} -j C0", n - 1),
        );
        let rs = parse(&looped, &ParseOptions::default()).unwrap();
        assert_eq!(
            Graph::build(&rs, false).unwrap_err().kind,
            InputErrorKind::Loop
        );
    }

    #[test]
    fn callers_are_every_jump_to_a_chain_in_input_order() {
        // 40 chains, each jumping to a few later ones, some twice.
        let n = 40;
        let mut text = String::from("*filter\n");
        for c in 0..n {
            text.push_str(&format!(":C{c} - [0:0]\n"));
        }
        for c in 0..n {
            for k in [1, 3, 7, 3] {
                if c + k < n {
                    text.push_str(&format!("-A C{c} -p tcp -j C{}\n", c + k));
                }
            }
            text.push_str(&format!("-A C{c} -j ACCEPT\n"));
        }
        text.push_str("COMMIT\n");
        let rs = parse(&text, &ParseOptions::default()).unwrap();
        let g = Graph::build(&rs, false).unwrap();
        let tg = &g.tables[0];
        for callee in 0..tg.chains() {
            let want: Vec<(usize, usize)> = (0..tg.chains())
                .flat_map(|c| (0..tg.rules(c)).map(move |r| (c, r)))
                .filter(|&(c, r)| {
                    matches!(tg.target(c, r), TargetRef::Chain { chain, .. } if chain == callee)
                })
                .collect();
            assert_eq!(
                tg.callers(callee).collect::<Vec<_>>(),
                want,
                "callers of {callee}"
            );
        }
    }
}
