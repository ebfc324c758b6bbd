//! Real counters: how a live node split its connections (`iptables-save -c`).
//!
//! In the nat table only the first packet of a connection is seen, so a rule's packet
//! counter counts connections. A balancer's endpoint was chosen by the rules of the
//! balancer chain that lead to it (`Endpoint::via`); their counters are the observed
//! choices. Rules that send a client back to the endpoint it had before (session
//! affinity, `-m recent --rcheck`) are not choices of the split and are counted apart.

use crate::balance::Balancer;
use crate::graph::Graph;

/// Observed connection counts of one balancer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Observed {
    /// Per endpoint (same order as the balancer's endpoints): connections the split sent there.
    pub counts: Vec<u64>,
    /// Per endpoint: connections sent there by session affinity rules.
    pub affinity: Vec<u64>,
    /// All connections counted: chosen by the split plus sent by affinity.
    pub total: u64,
}

/// The observed counts of a balancer, or `None` when the input has no counters on the
/// rules that choose its endpoints.
pub fn observed(graph: &Graph<'_, '_>, b: &Balancer) -> Option<Observed> {
    let chain = graph.chain(b.table_index, b.chain_index);
    if b.endpoints.is_empty() || chain.rules.iter().all(|r| !r.counted()) {
        return None;
    }
    let counter_of = |line: u32| -> Option<(u64, bool)> {
        let i = chain.rules.binary_search_by_key(&line, |r| r.line).ok()?;
        if !chain.rules[i].counted() {
            return None;
        }
        let rule = chain.rules[i].parse();
        let c = rule.counters?;
        let affinity = rule
            .find_match("recent")
            .is_some_and(|m| m.opt("rcheck").is_some() || m.opt("update").is_some());
        Some((c.packets, affinity))
    };
    let mut counts = Vec::with_capacity(b.endpoints.len());
    let mut affinity = Vec::with_capacity(b.endpoints.len());
    for e in &b.endpoints {
        let mut chosen = 0u64;
        let mut sticky = 0u64;
        let mut any = false;
        for &line in &e.via {
            if let Some((n, is_affinity)) = counter_of(line) {
                any = true;
                if is_affinity {
                    sticky = sticky.saturating_add(n);
                } else {
                    chosen = chosen.saturating_add(n);
                }
            }
        }
        if !any {
            return None;
        }
        counts.push(chosen);
        affinity.push(sticky);
    }
    let total = counts
        .iter()
        .chain(&affinity)
        .fold(0u64, |a, &b| a.saturating_add(b));
    Some(Observed {
        counts,
        affinity,
        total,
    })
}
