//! Balancer discovery: every place where traffic is split by statistic rules, and every
//! kube-proxy service chain, with names, entries, endpoints and exact probabilities.

use std::borrow::Cow;

use crate::eval::{self, Distribution, Mode, Outcome, OutcomeInfo, Packet};
use crate::graph::Graph;
use crate::model::{Chain, Rule, RuleLine, Warning, is_state_module};
use crate::prob::{CompactProb, Prob, push_u64};
use rayon::prelude::*;
use rustc_hash::FxHashSet as HashSet;

/// Where a balancer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A kube-proxy `KUBE-SVC-`/`KUBE-SVL-`/`KUBE-XLB-` chain.
    KubeProxy,
    /// Any other chain (or part of a built-in chain) with statistic rules.
    Generic,
}

/// A way traffic reaches a balancer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// `cluster-ip`, `node-port`, `external-ip`, `load-balancer` or `jump`.
    pub kind: &'static str,
    /// `172.30.40.155:80/tcp`, `node port 30080/tcp`, or the jumping chain and line.
    pub text: String,
    pub address: Option<String>,
    pub port: Option<u16>,
    pub protocol: Option<String>,
    /// The chain holding the entry rule and its line.
    pub chain: String,
    pub line: u32,
    /// The entry rule's comment, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// Session affinity found in a balancer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Affinity {
    /// `client-ip` for kube-proxy's `-m recent --rcheck … --rsource`.
    pub kind: &'static str,
    pub seconds: Option<u64>,
    /// Lines of the affinity rules.
    pub lines: Vec<u32>,
}

/// One endpoint of a balancer, with its probability.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub outcome: Outcome,
    /// Exact, or a 128-bit approximation with a proven bound when the exact form is long.
    pub prob: CompactProb,
    /// Line of the rule that produced it (the DNAT).
    pub line: u32,
    /// The chain holding that rule.
    pub chain: String,
    /// Lines of the balancer chain's rules that lead to it.
    pub via: Vec<u32>,
    /// Distinct branches that reach it (more than 1 means double weight).
    pub paths: u32,
}

/// A balancer and its analysis.
#[derive(Debug, Clone)]
pub struct Balancer {
    pub name: String,
    pub table: String,
    pub table_index: usize,
    pub chain: String,
    pub chain_index: usize,
    pub kind: Kind,
    /// For a part of a chain: the conditions its statistic rules share.
    pub selector: Option<String>,
    /// Line of the first rule (or of the chain's declaration).
    pub line: u32,
    pub entries: Vec<Entry>,
    pub affinity: Option<Affinity>,
    pub endpoints: Vec<Endpoint>,
    pub unmatched: CompactProb,
    /// The exact sum of the endpoints' and `unmatched` probabilities (1 for a complete
    /// walk, 0 when the walk gave up).
    pub exact_total: Prob,
    /// The packet the walk was made for.
    pub packet: Packet,
    pub warnings: Vec<Warning>,
    /// Rules evaluated by the walk.
    pub steps: u64,
}

impl Balancer {
    /// `namespace` of a kube-proxy name `ns/name:port`.
    pub fn namespace(&self) -> Option<&str> {
        namespace_of(self.kind, &self.name)
    }

    /// Largest |n·p − 1| over endpoints.
    pub fn max_relative_skew(&self) -> f64 {
        let n = self.endpoints.len() as u64;
        self.endpoints
            .iter()
            .map(|e| e.prob.relative_deviation(n).abs())
            .fold(0.0, f64::max)
    }
}

fn is_kube_balancer_chain(name: &str) -> bool {
    name.starts_with("KUBE-SVC-") || name.starts_with("KUBE-SVL-") || name.starts_with("KUBE-XLB-")
}

/// The conditions of a rule that select traffic, as text (`-d 10.0.0.1/32 -p tcp --dport 80`).
fn selector(rule: &Rule<'_>) -> String {
    let mut parts = Vec::new();
    for o in &rule.core {
        parts.push(format!(
            "{}-{} {}",
            if o.negated { "! " } else { "" },
            o.name,
            o.value()
        ));
    }
    for m in &rule.matches {
        if is_state_module(m.module) {
            continue;
        }
        for o in &m.options {
            let vals: Vec<&str> = o.values.iter().map(|v| v.as_ref()).collect();
            parts.push(format!(
                "{}--{} {}",
                if o.negated { "! " } else { "" },
                o.name,
                vals.join(" ")
            ));
        }
    }
    parts.join(" ")
}

/// A place that may be a balancer, with the name and line it will be listed under.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub table: usize,
    pub chain: usize,
    pub kind: Kind,
    /// The selector that tells this group of statistic rules from others in the chain.
    pub selector: Option<String>,
    first_rule: Option<usize>,
    /// The balancer's name: the kube-proxy service, or the chain (and selector). (Text
    /// of the input when it is a comment or chain name as written.)
    pub name: Cow<'a, str>,
    /// The chain's name.
    pub chain_name: &'a str,
    /// Line of the first statistic rule of the group, or of the chain.
    pub line: u32,
}

impl Candidate<'_> {
    /// The namespace of a kube-proxy service (`ns` of `ns/name:port`).
    pub fn namespace(&self) -> Option<&str> {
        namespace_of(self.kind, &self.name)
    }
}

/// `ns` of a kube-proxy balancer's name `ns/name:port`.
fn namespace_of(kind: Kind, name: &str) -> Option<&str> {
    (kind == Kind::KubeProxy)
        .then(|| name.split_once('/').map(|(ns, _)| ns))
        .flatten()
}

/// Finds and analyses every balancer. Balancers are sorted by (name, chain, line).
pub fn find(graph: &Graph<'_, '_>) -> Vec<Balancer> {
    analyse_all(graph, &candidates(graph))
}

/// How much of a balancer [`analyse_to`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Everything a report prints.
    Full,
    /// What an audit reads (`audit::audit_window`): the names of the table and chain,
    /// the packet walked and what the walk gave (each endpoint's outcome, probability,
    /// line, `via` and paths, and `unmatched`). No entries, no endpoint chain names, no
    /// affinity and no warnings: the first pass of a cross-checked report, whose
    /// balancers are analysed again to be printed.
    Audit,
}

/// [`analyse`] of each candidate, on several threads, in the candidates' order.
pub fn analyse_all(graph: &Graph<'_, '_>, candidates: &[Candidate]) -> Vec<Balancer> {
    analyse_all_to(graph, candidates, Depth::Full)
}

/// [`analyse_to`] of each candidate, on several threads, in the candidates' order.
pub fn analyse_all_to(
    graph: &Graph<'_, '_>,
    candidates: &[Candidate],
    depth: Depth,
) -> Vec<Balancer> {
    // A few candidates a task: what their walks read is asked for first, all at once
    // (`Graph::warm`), so that its memory latencies overlap.
    candidates
        .par_chunks(WARM_CANDIDATES)
        .flat_map_iter(|part| {
            let roots: Vec<(usize, usize)> = part.iter().map(|c| (c.table, c.chain)).collect();
            graph.warm(&roots);
            part.iter()
                .filter_map(move |cand| analyse_to(graph, cand, depth))
        })
        .collect()
}

/// Candidates analysed by one task of [`analyse_all`], after one [`Graph::warm`].
const WARM_CANDIDATES: usize = 16;

/// Every place that may be a balancer: each group of statistic rules of a chain (rules
/// with the same selector), and every kube-proxy service chain. Sorted by (name, chain,
/// line), the order of [`find`]'s balancers. (A generic candidate whose statistic rules
/// no traffic reaches is no balancer: [`analyse`] gives `None` for it.) Walks nothing:
/// [`Graph::build_with`] runs it before the graph's walk flags are set.
pub fn candidates<'a>(graph: &Graph<'_, 'a>) -> Vec<Candidate<'a>> {
    struct Found {
        table: usize,
        chain: usize,
        selector: Option<String>,
        first_rule: Option<usize>,
    }
    // A chain's candidates: one per distinct selector of its statistic rules (a kube
    // service chain without any is still one).
    let per_chain = |t: usize, c: usize, chain: &Chain<'_>| -> Vec<Found> {
        let mut groups: Vec<(String, usize)> = Vec::new();
        match graph.tables[t].statistic_rules(c) {
            // Plain rules' selectors are empty: one group, from the first.
            Some((first, true)) => groups.push((String::new(), first)),
            Some((first, false)) => {
                for (r, line) in chain.rules.iter().enumerate().skip(first) {
                    if !line.statistic() {
                        continue;
                    }
                    // A plain rule's selector is empty: no need to read it again.
                    let key = if line.plain() {
                        String::new()
                    } else {
                        selector(&line.parse())
                    };
                    if !groups.iter().any(|(k, _)| *k == key) {
                        groups.push((key, r));
                    }
                }
            }
            None => {}
        }
        if groups.is_empty() {
            return if is_kube_balancer_chain(chain.name) {
                vec![Found {
                    table: t,
                    chain: c,
                    selector: None,
                    first_rule: None,
                }]
            } else {
                Vec::new()
            };
        }
        let split = groups.len() > 1 || chain.policy.is_some();
        groups
            .into_iter()
            .map(|(key, r)| Found {
                table: t,
                chain: c,
                selector: (split && !key.is_empty()).then_some(key),
                first_rule: Some(r),
            })
            .collect()
    };
    // (Collected at their exact sizes: rayon collects what a filter or a flat map gives
    // into a vector a thread, grown as it goes, then copies those together; on the 30k
    // dump that faulted in about 2,000 pages.)
    let mut found: Vec<Found> = Vec::new();
    for (t, table) in graph.rs.tables.iter().enumerate() {
        // Only the rules of chains with statistic rules are looked at; the others may
        // still be kube service chains.
        let tg = &graph.tables[t];
        let chains: Vec<usize> = (0..table.chains.len())
            .into_par_iter()
            .filter(|&c| {
                tg.statistic_rules(c).is_some() || is_kube_balancer_chain(table.chains[c].name)
            })
            .collect();
        let per: Vec<Vec<Found>> = chains
            .par_iter()
            .map(|&c| per_chain(t, c, &table.chains[c]))
            .collect();
        found.reserve(per.iter().map(Vec::len).sum());
        found.extend(per.into_iter().flatten());
    }
    // A candidate.
    let candidate = |f: &Found| -> Candidate<'a> {
        let chain = graph.chain(f.table, f.chain);
        let kind = if is_kube_balancer_chain(chain.name) {
            Kind::KubeProxy
        } else {
            Kind::Generic
        };
        let name = match kind {
            Kind::KubeProxy => kube_name(chain, || {
                entries_and_packet(graph, f.table, f.chain, f.first_rule, true)
                    .0
                    .into_iter()
                    .find_map(|e| e.comment)
            })
            .unwrap_or(Cow::Borrowed(chain.name)),
            Kind::Generic => match &f.selector {
                Some(s) => Cow::Owned(format!("{} {s}", chain.name)),
                None => Cow::Borrowed(chain.name),
            },
        };
        Candidate {
            table: f.table,
            chain: f.chain,
            kind,
            selector: f.selector.clone(),
            first_rule: f.first_rule,
            name,
            chain_name: chain.name,
            line: f
                .first_rule
                .map_or_else(|| first_line(chain), |r| chain.rules[r].line),
        }
    };
    let out: Vec<Candidate> = (0..found.len())
        .into_par_iter()
        .map(|i| {
            // A kube service's name is in its chain's first rule: those lines are asked
            // for a group at a time, so that their cache misses overlap.
            if i % WARM_CANDIDATES == 0 {
                for f in found.iter().skip(i).take(WARM_CANDIDATES) {
                    if let Some(line) = graph.chain(f.table, f.chain).rules.first() {
                        crate::memory::prefetch_text(line.text);
                    }
                }
            }
            candidate(&found[i])
        })
        .collect();
    sort_candidates(out)
}

/// `found` sorted by (name, chain, line), equal keys in the order found (a stable sort).
/// The names of a namespace's services share long beginnings, and comparing strings
/// on the heap misses the caches: the sort compares the names' first 32 bytes as two
/// numbers first, and the whole keys only where those agree.
fn sort_candidates(found: Vec<Candidate<'_>>) -> Vec<Candidate<'_>> {
    let mut order: Vec<((u128, u128), u32)> = found
        .par_iter()
        .enumerate()
        .map(|(i, c)| (name_prefix(&c.name), i as u32))
        .collect();
    order.par_sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| {
                let (x, y) = (&found[a.1 as usize], &found[b.1 as usize]);
                (&x.name, &x.chain_name, x.line).cmp(&(&y.name, &y.chain_name, y.line))
            })
            .then(a.1.cmp(&b.1))
    });
    // Put in place, a cycle of the permutation at a time (no second list: the sort
    // happens at the run's peak of memory): place k takes the candidate at `order[k]`.
    let mut found = found;
    let mut perm: Vec<u32> = order.into_iter().map(|(_, i)| i).collect();
    for start in 0..perm.len() {
        let mut cur = start;
        while perm[cur] != u32::MAX {
            let next = perm[cur] as usize;
            perm[cur] = u32::MAX;
            if next == start {
                break;
            }
            found.swap(cur, next);
            cur = next;
        }
    }
    found
}

/// The first 32 bytes of `name` as two big-endian numbers, zeros after a shorter
/// name: when two names' prefixes differ, the names compare as their prefixes do.
fn name_prefix(name: &str) -> (u128, u128) {
    let mut b = [0u8; 32];
    let n = name.len().min(32);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    let (hi, lo) = b.split_at(16);
    let word = |h: &[u8]| h.try_into().map_or(0, u128::from_be_bytes);
    (word(hi), word(lo))
}

/// Analyses one candidate: its entries, exact endpoint probabilities and affinity.
/// `None` for a generic candidate whose statistic rules no traffic reaches.
pub fn analyse(graph: &Graph<'_, '_>, cand: &Candidate) -> Option<Balancer> {
    analyse_to(graph, cand, Depth::Full)
}

/// [`analyse`], building what `depth` asks for.
pub fn analyse_to(graph: &Graph<'_, '_>, cand: &Candidate, depth: Depth) -> Option<Balancer> {
    let table = graph.table(cand.table);
    let chain = &table.chains[cand.chain];
    let kind = cand.kind;
    let full = depth == Depth::Full;
    // A generic candidate's walk is made for its first statistic rule's conditions;
    // the others' for their entries'.
    let own_rule = match (cand.first_rule, kind) {
        (Some(r), Kind::Generic) => Some(&chain.rules[r]),
        _ => None,
    };
    let (entries, entry_packet) = if full || own_rule.is_none() {
        entries_and_packet(graph, cand.table, cand.chain, cand.first_rule, full)
    } else {
        (Vec::new(), Packet::default())
    };
    let packet = match own_rule {
        Some(line) => match line.light() {
            Some(rule) => Packet::from_light(&rule),
            None => Packet::from_rule(&line.parse()),
        },
        None => entry_packet,
    };
    let mut warnings = Vec::new();
    let dist = match eval::evaluate(
        graph,
        cand.table,
        cand.chain,
        packet.clone(),
        Mode::Balancer,
        false,
    ) {
        Ok(d) => d,
        Err(e) => {
            warnings.push(Warning::new(
                chain.rules.first().map_or(0, |r| r.line),
                format!("{}: {e}", chain.name),
            ));
            return Some(Balancer {
                name: cand.name.as_ref().to_owned(),
                table: table.name.to_string(),
                table_index: cand.table,
                chain: chain.name.to_string(),
                chain_index: cand.chain,
                kind,
                selector: cand.selector.clone(),
                line: cand.line,
                entries,
                affinity: None,
                endpoints: Vec::new(),
                unmatched: CompactProb::zero(),
                exact_total: Prob::zero(),
                packet,
                warnings,
                steps: 0,
            });
        }
    };
    // A generic candidate whose walk never reached a statistic rule (an earlier rule took
    // all its traffic) is not a balancer for that traffic.
    if kind == Kind::Generic && dist.statistic_rules == 0 {
        return None;
    }
    let Distribution {
        outcomes,
        warnings: walk_warnings,
        steps,
        total: exact_total,
        ..
    } = dist;
    warnings.extend(walk_warnings);
    let mut endpoints = Vec::with_capacity(outcomes.len());
    let mut unmatched = CompactProb::zero();
    for OutcomeInfo {
        outcome,
        prob,
        paths,
        via,
        line,
        chain: holder,
        ..
    } in outcomes
    {
        if matches!(outcome, Outcome::Unmatched) {
            unmatched = prob;
            continue;
        }
        endpoints.push(Endpoint {
            outcome,
            prob,
            line,
            chain: if full {
                table.chains[holder].name.to_string()
            } else {
                String::new()
            },
            via,
            paths,
        });
    }
    let name = cand.name.as_ref().to_owned();
    if full {
        balancer_warnings(chain, kind, &name, &endpoints, &unmatched, &mut warnings);
    }
    Some(Balancer {
        name,
        table: table.name.to_string(),
        table_index: cand.table,
        chain: chain.name.to_string(),
        chain_index: cand.chain,
        kind,
        selector: if full { cand.selector.clone() } else { None },
        line: cand.line,
        entries,
        affinity: if full { affinity(chain) } else { None },
        endpoints,
        unmatched,
        exact_total,
        packet,
        warnings,
        steps,
    })
}

/// The warnings of a balancer's analysis about its chain and its result: a kube-proxy
/// cascade without a fallback rule, probabilities kept as approximations whose printed
/// last bit is uncertain, and traffic that reaches no endpoint.
fn balancer_warnings(
    chain: &Chain<'_>,
    kind: Kind,
    name: &str,
    endpoints: &[Endpoint],
    unmatched: &CompactProb,
    warnings: &mut Vec<Warning>,
) {
    if kind == Kind::KubeProxy
        && let Some(last) = chain.rules.last()
        && last.statistic()
    {
        warnings.push(Warning::new(
            last.line,
            format!(
                "{}: the chain ends with a statistic rule; the cascade has no fallback rule (cut excerpt?), so some traffic reaches no endpoint",
                chain.name
            ),
        ));
    }
    // Approximated probabilities: say where the proven bound cannot decide the last bit of
    // a printed double (about one value in 2^70, so practically never).
    let n = endpoints.len() as u64;
    for e in endpoints {
        if let CompactProb::Approx(a) = &e.prob
            && !(a.to_f64_checked().1 && a.relative_deviation_checked(n).1)
        {
            warnings.push(Warning::new(
                e.line,
                format!(
                    "{name}: {}: the probability is kept as a 128-bit approximation (its exact form is too long) whose error bound cannot decide the last bit of the printed probability or deviation; they may be one unit in the last place off",
                    e.outcome.label()
                ),
            ));
        }
    }
    if !unmatched.is_zero() {
        warnings.push(Warning::new(
            first_line(chain),
            format!(
                "{name}: {:.6}% of new connections reach no endpoint",
                unmatched.to_f64() * 100.0
            ),
        ));
    }
}

fn first_line(chain: &Chain<'_>) -> u32 {
    chain
        .declared_line
        .or_else(|| chain.rules.first().map(|r| r.line))
        .unwrap_or(0)
}

/// The kube-proxy service name `ns/name:port` from the comments.
/// `entry_comment` gives the first comment of the entries, asked only when no rule of
/// the chain has one.
fn kube_name<'a>(
    chain: &Chain<'a>,
    entry_comment: impl FnOnce() -> Option<String>,
) -> Option<Cow<'a, str>> {
    fn strip(c: &str) -> &str {
        let c = before_arrow(c);
        let c = [
            " cluster IP",
            " external IP",
            " loadbalancer IP",
            " health check node port",
        ]
        .iter()
        .fold(c, |acc, s| acc.strip_suffix(s).unwrap_or(acc));
        c.trim()
    }
    let stripped = |c: Cow<'a, str>| match c {
        Cow::Borrowed(c) => Cow::Borrowed(strip(c)),
        Cow::Owned(c) => Cow::Owned(strip(&c).to_string()),
    };
    chain
        .rules
        .iter()
        // (`RuleLine::comment` reads the comment without building the rule.)
        .find_map(|r| r.comment().map(stripped))
        .or_else(|| entry_comment().map(|c| stripped(Cow::Owned(c))))
        .filter(|n| !n.is_empty())
}

/// `c` up to its first ` -> ` (all of it when it has none): what
/// `c.split(" -> ").next()` gives, found from the `>`s (memchr) rather than by a
/// substring search, whose setting up cost more than the search on a short comment
/// (kube_name reads 30,000 of them on the 30k dump).
fn before_arrow(c: &str) -> &str {
    let b = c.as_bytes();
    let mut from = 0;
    while let Some(p) = memchr::memchr(b'>', &b[from..]) {
        let i = from + p;
        if i >= 2 && &b[i - 2..i] == b" -" && b.get(i + 1) == Some(&b' ') {
            // (Cut before an ASCII space: a character boundary.)
            return &c[..i - 2];
        }
        from = i + 1;
    }
    c
}

fn affinity(chain: &Chain<'_>) -> Option<Affinity> {
    let mut lines = Vec::new();
    let mut seconds = None;
    // A module name is never escaped (the parser takes it as written), so a rule with
    // `-m recent` has "recent" in its text: the others need not be read again. Nor need
    // the rules that only chance decides (see `RuleLine::fixed_share`) be searched: their
    // matches other than comments and statistics have no options, so no `--rcheck`.
    let affinity_rule = |l: &&RuleLine<'_>| l.fixed_share().is_none() && l.text.contains("recent");
    for line in chain.rules.iter().filter(affinity_rule) {
        let rule = line.parse();
        if let Some(m) = rule.find_match("recent")
            && m.opt("rcheck").is_some()
        {
            lines.push(rule.line);
            if seconds.is_none() {
                seconds = m.opt("seconds").and_then(|o| o.value().parse().ok());
            }
        }
    }
    (!lines.is_empty()).then_some(Affinity {
        kind: "client-ip",
        seconds,
        lines,
    })
}

/// Rules from which traffic reaches the chain: for kube-proxy chains, the
/// KUBE-SERVICES / KUBE-NODEPORTS rules (through KUBE-EXT-/KUBE-FW- chains); otherwise
/// the jumps into the chain, or for a part of a chain its own first rule. Built only
/// when `build`; with the packet a balancer's walk from the chain is made for (see
/// [`WalkPacket`]), found either way.
fn entries_and_packet(
    graph: &Graph<'_, '_>,
    t: usize,
    c: usize,
    first_rule: Option<usize>,
    build: bool,
) -> (Vec<Entry>, Packet) {
    // (A kube-proxy service has one to four entries.)
    let mut out = Vec::with_capacity(if build { 4 } else { 0 });
    let mut packet = WalkPacket::default();
    visit_entries(graph, t, c, |parent, p, comment, line| {
        let kind = entry_kind(parent, &p, comment);
        packet.offer(kind, line, &p);
        if build {
            out.push(entry_from(parent, kind, p, comment, line));
        }
    });
    let chain = &graph.table(t).chains[c];
    if packet.is_none()
        && let Some(r) = first_rule
        && chain.policy.is_some()
    {
        let rule = chain.rules[r].parse();
        let (p, comment) = (Packet::from_rule(&rule), rule.comment());
        packet.offer("rule", rule.line, &p);
        if build {
            // (Its text is its conditions, not what `entry_from` writes for a kind.)
            let mut e = entry_from(chain, "rule", p, comment, rule.line);
            e.text = selector(&rule);
            out.push(e);
        }
    }
    out.sort_by_key(|e| e.line);
    out.dedup();
    (out, packet.packet())
}

/// The packet a balancer's walk is made for, picked among its entry rules as they are
/// visited: that of its first cluster-IP entry (by line), or else of its first entry;
/// only its destination, port and protocol.
#[derive(Default)]
struct WalkPacket(Option<(bool, u32, Packet)>);

impl WalkPacket {
    /// An entry of kind `kind` (see [`Entry::kind`]) on line `line`, with packet `p`.
    /// (Each entry rule is offered once: lines do not tie.)
    fn offer(&mut self, kind: &str, line: u32, p: &Packet) {
        let cluster = kind == "cluster-ip";
        let better = self.0.as_ref().is_none_or(|&(c, l, _)| {
            (cluster, std::cmp::Reverse(line)) > (c, std::cmp::Reverse(l))
        });
        if better {
            let kept = Packet {
                dst: p.dst,
                dport: p.dport,
                proto: p.proto.clone(),
                ..Packet::default()
            };
            self.0 = Some((cluster, line, kept));
        }
    }

    fn is_none(&self) -> bool {
        self.0.is_none()
    }

    fn packet(self) -> Packet {
        self.0.map(|(.., p)| p).unwrap_or_default()
    }
}

/// Calls `visit` with each entry rule of chain `c` of table `t` (the chain holding it,
/// the packet its conditions describe, its comment and its line): the rules of the
/// dispatching chains (`KUBE-SERVICES`, `KUBE-NODEPORTS`, built-in chains) that jump
/// to `c` or to a kube-proxy chain that passes traffic on to it.
fn visit_entries(
    graph: &Graph<'_, '_>,
    t: usize,
    c: usize,
    mut visit: impl FnMut(&Chain<'_>, Packet, Option<&str>, u32),
) {
    let table = graph.table(t);
    let tg = &graph.tables[t];
    let mut visited = 0usize;
    // The pass-through chains found besides `c`, and those whose callers are still to see.
    let mut seen = HashSet::default();
    let mut stack = Vec::new();
    let mut next = Some(c);
    // Each entry rule read lightly, in place.
    let mut light = crate::model::LightRule::empty(0);
    while let Some(cur) = next.take().or_else(|| stack.pop()) {
        for (pc, pr) in tg.callers(cur) {
            let parent = &table.chains[pc];
            let dispatch = parent.name == "KUBE-SERVICES"
                || parent.name == "KUBE-NODEPORTS"
                || parent.policy.is_some()
                || Chain::is_builtin_name(parent.name);
            let pass_through = parent.name.starts_with("KUBE-EXT-")
                || parent.name.starts_with("KUBE-FW-")
                || parent.name.starts_with("KUBE-XLB-")
                || parent.name.starts_with("KUBE-SVL-")
                || parent.name.starts_with("KUBE-SVC-");
            if !dispatch && pass_through && visited < 1000 {
                if pc != c && seen.insert(pc) {
                    stack.push(pc);
                }
                continue;
            }
            // Only an entry rule is read again (without building it when it is of the
            // simplest shape, as kube-proxy's are): a pass-through jump needs no more
            // than its chain's name.
            let line = &parent.rules[pr];
            visited += 1;
            if line.light_into(&mut light) {
                visit(
                    parent,
                    Packet::from_light(&light),
                    light.comment(),
                    light.line,
                );
            } else {
                let rule = line.parse();
                visit(parent, Packet::from_rule(&rule), rule.comment(), rule.line);
            }
        }
    }
}

/// The entry of kind `kind` ([`entry_kind`]) of the rule of line `line` in `chain`,
/// with the packet its conditions describe and its comment.
fn entry_from(
    chain: &Chain<'_>,
    kind: &'static str,
    p: Packet,
    comment: Option<&str>,
    line: u32,
) -> Entry {
    let proto = p.proto;
    let address = p.dst.map(ip_text);
    let text = match (kind, &address, p.dst, p.dport, &proto) {
        ("node-port", _, _, Some(port), pr) => {
            format!("node port {port}/{}", pr.as_deref().unwrap_or("tcp"))
        }
        ("jump", _, _, _, _) => format!("{} line {line}", chain.name),
        (_, Some(a), Some(d), Some(port), pr) => {
            let mut t = Vec::with_capacity(a.len() + 16);
            if d.is_ipv6() {
                t.push(b'[');
                t.extend_from_slice(a.as_bytes());
                t.push(b']');
            } else {
                t.extend_from_slice(a.as_bytes());
            }
            t.push(b':');
            push_u64(&mut t, port.into());
            if let Some(pr) = pr {
                t.push(b'/');
                t.extend_from_slice(pr.as_bytes());
            }
            String::from_utf8(t).expect("text and digits")
        }
        (_, Some(a), _, None, _) => a.clone(),
        _ => format!("{} line {line}", chain.name),
    };
    Entry {
        kind,
        text,
        address,
        port: p.dport,
        protocol: proto,
        chain: chain.name.to_string(),
        line,
        comment: comment.map(str::to_string),
    }
}

/// The kind of an entry rule of `chain` with packet `p` and that comment (see [`Entry::kind`]).
fn entry_kind(chain: &Chain<'_>, p: &Packet, comment: Option<&str>) -> &'static str {
    if chain.name == "KUBE-NODEPORTS" {
        "node-port"
    } else if comment.is_some_and(|c| c.ends_with("external IP")) {
        "external-ip"
    } else if comment.is_some_and(|c| c.ends_with("loadbalancer IP")) {
        "load-balancer"
    } else if chain.name == "KUBE-SERVICES" && p.dst.is_some() {
        "cluster-ip"
    } else {
        "jump"
    }
}

/// An address as `Display` writes it; IPv4 without the formatting machinery (a
/// report has one or two per balancer).
fn ip_text(a: std::net::IpAddr) -> String {
    match a {
        std::net::IpAddr::V4(v4) => {
            let mut s = Vec::with_capacity(15);
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push(b'.');
                }
                push_u64(&mut s, o.into());
            }
            String::from_utf8(s).expect("digits and dots")
        }
        v6 => v6.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{ParseOptions, parse};

    proptest::proptest! {
        /// `before_arrow` is `split(" -> ").next()`.
        #[test]
        fn before_arrow_is_the_first_split(c in "( -> | ->|-> |[a/ >é:-]){0,12}") {
            proptest::prop_assert_eq!(before_arrow(&c), c.split(" -> ").next().unwrap_or(&c));
        }
    }

    proptest::proptest! {
        /// The prefix-first sort gives what a stable sort on the whole keys gives,
        /// for names that share long beginnings, are short, or hold NUL and non-ASCII
        /// characters, with repeated keys.
        #[test]
        fn candidates_sort_as_their_whole_keys(
            keys in proptest::collection::vec(
                ("(team-01[0-9]/app-0[0-9]{2}|a|ab|a\\x00|é|team-0148/app-024076-api:https|team-0148/app-024076-api:https-long-port-name)[a-z:]{0,3}",
                 "KUBE-SVC-[AB]{1,2}", 0u32..3),
                0..60,
            )
        ) {
            let found: Vec<Candidate> = keys
                .iter()
                .enumerate()
                .map(|(i, (name, chain, line))| Candidate {
                    table: 0,
                    chain: i,
                    kind: Kind::KubeProxy,
                    selector: None,
                    first_rule: None,
                    name: Cow::Borrowed(name.as_str()),
                    chain_name: chain.as_str(),
                    line: *line,
                })
                .collect();
            let mut expected: Vec<usize> = (0..found.len()).collect();
            expected.sort_by(|&a, &b| {
                let (x, y) = (&found[a], &found[b]);
                (&x.name, &x.chain_name, x.line).cmp(&(&y.name, &y.chain_name, y.line))
            });
            let sorted: Vec<usize> = sort_candidates(found).iter().map(|c| c.chain).collect();
            proptest::prop_assert_eq!(sorted, expected);
        }
    }

    #[test]
    fn addresses_read_as_display_writes_them() {
        for a in [
            "0.0.0.0",
            "10.96.0.1",
            "255.255.255.255",
            "1.20.255.9",
            "fd00::5",
            "::1",
        ] {
            let ip: std::net::IpAddr = a.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    /// Every fixture's text, and `extra`.
    fn fixtures_and(extra: &str) -> Vec<String> {
        let mut texts: Vec<String> = crate::testing::fixture_texts()
            .into_iter()
            .map(|(_, text)| text)
            .collect();
        texts.push(extra.to_string());
        texts
    }

    /// What an audit reads of a balancer (see [`Depth::Audit`]), as text.
    fn audit_key(b: &Balancer) -> String {
        let endpoints: Vec<_> = (b.endpoints.iter())
            .map(|e| (&e.outcome, &e.prob, e.line, &e.via, e.paths))
            .collect();
        format!(
            "{} {} {} {} {} {} {:?} {:?} {:?} {:?} {}",
            b.name,
            b.table,
            b.table_index,
            b.chain,
            b.chain_index,
            b.line,
            b.packet,
            endpoints,
            b.unmatched,
            b.exact_total,
            b.steps
        )
    }

    /// A kube-proxy-like dump: per service, `endpoints` endpoints and the entries `entries`
    /// lists as (service, kind, address byte), written in that order. Kinds: a cluster IP,
    /// an external IP and a load-balancer IP (through `KUBE-EXT-`), a node port through
    /// `KUBE-EXT-` or straight to the service, a `KUBE-SERVICES` rule not of kube-proxy's
    /// shape (its comment has escaped quotes), and a jump from `PREROUTING`.
    fn entries_dump(endpoints: &[usize], entries: &[(usize, u8, u8)]) -> String {
        let mut decls = String::from(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n",
        );
        let mut rules = String::new();
        for (&(s, kind, k), i) in entries.iter().zip(0u32..) {
            let (svc, ext) = (format!("KUBE-SVC-S{s}"), format!("KUBE-EXT-S{s}"));
            rules.push_str(&match kind % 7 {
                0 => format!(
                    "-A KUBE-SERVICES -d 10.0.{s}.{k}/32 -p tcp -m comment --comment \"ns/s{s}:p cluster IP\" -m tcp --dport {i} -j {svc}\n"
                ),
                1 => format!(
                    "-A KUBE-SERVICES -d 1.2.{s}.{k}/32 -p tcp -m comment --comment \"ns/s{s}:p external IP\" -m tcp --dport 80 -j {ext}\n"
                ),
                2 => format!(
                    "-A KUBE-SERVICES -d 5.6.{s}.{k}/32 -p tcp -m comment --comment \"ns/s{s}:p loadbalancer IP\" -m tcp --dport 80 -j {ext}\n"
                ),
                3 => format!(
                    "-A KUBE-NODEPORTS -p udp -m comment --comment \"ns/s{s}:p\" -m udp --dport {} -j {ext}\n",
                    30000 + u32::from(k)
                ),
                4 => format!(
                    "-A KUBE-NODEPORTS -p tcp -m tcp --dport {} -j {svc}\n",
                    31000 + u32::from(k)
                ),
                5 => format!(
                    "-A KUBE-SERVICES -m comment --comment \"a \\\"b\\\" c\" -d 10.9.{s}.{k}/32 -p udp --dport 53 -j {svc}\n"
                ),
                _ => format!("-A PREROUTING -d 10.8.{s}.{k}/32 -j {svc}\n"),
            });
        }
        for (s, &n) in endpoints.iter().enumerate() {
            decls.push_str(&format!(":KUBE-SVC-S{s} - [0:0]\n:KUBE-EXT-S{s} - [0:0]\n"));
            rules.push_str(&format!("-A KUBE-EXT-S{s} -j KUBE-SVC-S{s}\n"));
            for e in 0..n {
                let sep = format!("KUBE-SEP-S{s}E{e}");
                decls.push_str(&format!(":{sep} - [0:0]\n"));
                let share = if e + 1 < n {
                    format!(
                        "-m statistic --mode random --probability {:.11} ",
                        1.0 / (n - e) as f64
                    )
                } else {
                    String::new()
                };
                rules.push_str(&format!("-A KUBE-SVC-S{s} {share}-j {sep}\n"));
                rules.push_str(&format!(
                    "-A {sep} -p tcp -j DNAT --to-destination 10.1.{s}.{e}:80\n"
                ));
            }
        }
        decls + &rules + "COMMIT\n"
    }

    proptest::proptest! {
        /// [`an_audits_analysis_keeps_what_audits_read`] on random entry layouts.
        #[test]
        fn an_audits_analysis_keeps_what_audits_read_anywhere(
            endpoints in proptest::collection::vec(1usize..4, 1..5),
            entries in proptest::collection::vec((0usize..4, 0u8..7, 1u8..250), 0..16),
        ) {
            let entries: Vec<_> = entries
                .into_iter()
                .map(|(s, kind, k)| (s % endpoints.len(), kind, k))
                .collect();
            let text = entries_dump(&endpoints, &entries);
            let rs = parse(&text, &ParseOptions::default()).unwrap();
            let graph = Graph::build(&rs, false).unwrap();
            let candidates = candidates(&graph);
            let full = analyse_all_to(&graph, &candidates, Depth::Full);
            let light = analyse_all_to(&graph, &candidates, Depth::Audit);
            proptest::prop_assert_eq!(full.len(), endpoints.len());
            proptest::prop_assert_eq!(light.len(), endpoints.len());
            for (f, l) in full.iter().zip(&light) {
                proptest::prop_assert_eq!(audit_key(l), audit_key(f));
                // The packet, worked out from the layout: the first cluster IP (a
                // `KUBE-SERVICES` rule with a destination and no external or load-balancer
                // comment), or else the first entry, in the order written.
                let s: usize = l.chain["KUBE-SVC-S".len()..].parse().unwrap();
                let mine = entries.iter().zip(0u16..).filter(|((e, ..), _)| *e == s);
                let pick = mine
                    .clone()
                    .find(|((_, kind, _), _)| matches!(kind, 0 | 5))
                    .or(mine.clone().next());
                let want = pick.map(|(&(_, kind, k), i)| {
                    let ip = |a: u8, b: u8| std::net::IpAddr::from([a, b, s as u8, k]);
                    match kind {
                        0 => (Some(ip(10, 0)), Some(i), Some("tcp")),
                        1 => (Some(ip(1, 2)), Some(80), Some("tcp")),
                        2 => (Some(ip(5, 6)), Some(80), Some("tcp")),
                        3 => (None, Some(30000 + u16::from(k)), Some("udp")),
                        4 => (None, Some(31000 + u16::from(k)), Some("tcp")),
                        5 => (Some(ip(10, 9)), Some(53), Some("udp")),
                        _ => (Some(ip(10, 8)), None, None),
                    }
                });
                let p = &l.packet;
                proptest::prop_assert_eq!(
                    want.unwrap_or((None, None, None)),
                    (p.dst, p.dport, p.proto.as_deref()),
                    "{}", l.chain
                );
            }
        }
    }

    /// An audit's analysis ([`Depth::Audit`]) walks the same packet as the full one and
    /// keeps everything an audit reads, on every balancer of every fixture and of an
    /// entry layout made for it: several entries of each kind, cluster IPs out of line
    /// order, an entry that is not of kube-proxy's shape, and a service without a
    /// cluster-IP entry.
    #[test]
    fn an_audits_analysis_keeps_what_audits_read() {
        let texts = fixtures_and(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
             :KUBE-SVC-A - [0:0]\n:KUBE-EXT-A - [0:0]\n:KUBE-SVC-B - [0:0]\n:KUBE-SVC-C - [0:0]\n:LB - [0:0]\n\
             -A PREROUTING -j KUBE-SERVICES\n\
             -A PREROUTING -p udp -m statistic --mode random --probability 0.5 -j DNAT --to-destination 10.9.0.1:53\n\
             -A PREROUTING -p udp -j DNAT --to-destination 10.9.0.2:53\n\
             -A KUBE-NODEPORTS -p tcp -m comment --comment \"a/a:x\" -m tcp --dport 30001 -j KUBE-EXT-A\n\
             -A KUBE-SERVICES -d 1.2.3.4/32 -p tcp -m comment --comment \"a/a:x external IP\" -m tcp --dport 80 -j KUBE-EXT-A\n\
             -A KUBE-SERVICES -d 10.0.0.2/32 -p tcp -m comment --comment \"a/a:x cluster IP\" -m tcp --dport 81 -j KUBE-SVC-A\n\
             -A KUBE-SERVICES -d 10.0.0.1/32 -p tcp -m comment --comment \"a/a:x cluster IP\" -m tcp --dport 80 -j KUBE-SVC-A\n\
             -A KUBE-SERVICES -m comment --comment \"b/b:y\" -d 10.0.0.3/32 -p udp --dport 53 -m addrtype --dst-type LOCAL -j KUBE-SVC-B\n\
             -A KUBE-SERVICES -d 10.0.0.4/32 -p udp -j KUBE-SVC-B\n\
             -A KUBE-EXT-A -j KUBE-SVC-A\n\
             -A KUBE-SVC-A -m statistic --mode random --probability 0.5 -j DNAT --to-destination 10.1.0.1:80\n\
             -A KUBE-SVC-A -p tcp -j DNAT --to-destination 10.1.0.2:80\n\
             -A KUBE-SVC-B -m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 10.2.0.1:53\n\
             -A KUBE-SVC-B -p udp -j DNAT --to-destination 10.2.0.2:53\n\
             -A KUBE-NODEPORTS -p udp -m comment --comment \"c/c:z\" -m udp --dport 30002 -j KUBE-SVC-C\n\
             -A KUBE-SVC-C -m statistic --mode random --probability 0.5 -j DNAT --to-destination 10.4.0.1:5\n\
             -A KUBE-SVC-C -j DNAT --to-destination 10.4.0.2:5\n\
             -A LB -m statistic --mode random --probability 0.25 -j DNAT --to-destination 10.3.0.1:1\n\
             COMMIT\n",
        );
        let mut compared = 0;
        for text in &texts {
            let rs = parse(text, &ParseOptions { lenient: true }).unwrap();
            let graph = Graph::build(&rs, true).unwrap();
            let candidates = candidates(&graph);
            let full = analyse_all_to(&graph, &candidates, Depth::Full);
            let light = analyse_all_to(&graph, &candidates, Depth::Audit);
            assert_eq!(full.len(), light.len());
            for (f, l) in full.iter().zip(&light) {
                assert_eq!(audit_key(l), audit_key(f));
                compared += 1;
            }
        }
        assert!(compared > 60, "{compared} balancers");
        // The layout made for it: its balancers, and the first cluster-IP entry's packet.
        let rs = parse(texts.last().unwrap(), &ParseOptions::default()).unwrap();
        let graph = Graph::build(&rs, false).unwrap();
        let light = analyse_all_to(&graph, &candidates(&graph), Depth::Audit);
        let chains: Vec<&str> = light.iter().map(|b| b.chain.as_str()).collect();
        assert_eq!(chains, ["LB", "KUBE-SVC-A", "KUBE-SVC-B", "KUBE-SVC-C"]);
        assert_eq!(light[1].packet.dst, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(light[1].packet.dport, Some(81));
        assert_eq!(light[2].packet.dst, Some("10.0.0.3".parse().unwrap()));
        let c = &light[3].packet;
        assert_eq!(
            (c.dst, c.dport, c.proto.as_deref()),
            (None, Some(30002), Some("udp"))
        );
    }

    /// `RuleLine::plain` (from the first reading) says exactly when a rule's selector
    /// is empty, on every rule of every fixture and on a few made for it.
    #[test]
    fn plain_rules_are_those_with_an_empty_selector() {
        let texts = fixtures_and(
            "-A A -m statistic --mode nth --every 2 --packet 0 -j B\n\
             -A A -p tcp -m statistic --mode nth --every 2 --packet 0 -j B\n\
             -A A -p tcp --dport 80 -m comment --comment x -j B\n\
             -A A -m mark --mark 0x1 -m comment --comment \"a b\" -j B\n\
             -A A -m tcp -m statistic --mode random --probability 0.5 -j B\n\
             -A A -m tcp --dport 1 -j B\n\
             -A A ! -s 10.0.0.0/8 -j B\n",
        );
        let mut plain = 0;
        let mut not = 0;
        for text in &texts {
            let rs = parse(text, &ParseOptions { lenient: true }).unwrap();
            for line in rs
                .tables
                .iter()
                .flat_map(|t| &t.chains)
                .flat_map(|c| &c.rules)
            {
                let empty = selector(&line.parse()).is_empty();
                assert_eq!(line.plain(), empty, "{}", line.text);
                if empty {
                    plain += 1;
                } else {
                    not += 1;
                }
            }
        }
        assert!(plain > 100 && not > 100, "{plain} plain, {not} not");
    }

    /// `affinity` need not search the rules that only chance decides: on every rule of
    /// every fixture, such a rule has no `-m recent … --rcheck`, and the affinity found
    /// is the one found by reading every rule.
    #[test]
    fn rules_only_chance_decides_have_no_affinity() {
        let texts = fixtures_and(
            "-A A -m recent --name x --rcheck --seconds 5 -j B\n\
             -A A -m recent -m statistic --mode random --probability 0.5 -j B\n\
             -A A -m comment --comment recent -m statistic --mode random --probability 0.5 -j B\n\
             -A A -m recent --name y --rcheck -m statistic --mode random --probability 0.5 -j B\n",
        );
        let mut fixed = 0;
        let mut found = 0;
        for text in &texts {
            let rs = parse(text, &ParseOptions { lenient: true }).unwrap();
            for chain in rs.tables.iter().flat_map(|t| &t.chains) {
                let mut lines = Vec::new();
                for line in &chain.rules {
                    let rule = line.parse();
                    let rcheck = rule
                        .find_match("recent")
                        .is_some_and(|m| m.opt("rcheck").is_some());
                    if line.fixed_share().is_some() {
                        fixed += 1;
                        assert!(!rcheck, "{}", line.text);
                    }
                    if rcheck {
                        lines.push(rule.line);
                    }
                }
                assert_eq!(
                    affinity(chain).map(|a| a.lines),
                    (!lines.is_empty()).then_some(lines)
                );
                found += usize::from(affinity(chain).is_some());
            }
        }
        assert!(
            fixed > 100 && found > 2,
            "{fixed} fixed rules, {found} affinities"
        );
    }
}
