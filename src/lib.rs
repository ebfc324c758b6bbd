//! lbaudit: does this load balancer split traffic the way it should?
//!
//! Reads `iptables-save` output, rebuilds the chain graph, computes each endpoint's
//! exact selection probability from cascaded `-m statistic` rules, simulates
//! connections the way the kernel does, and tests the result for fairness.

pub mod audit;
pub mod balance;
pub mod check;
pub mod cli;
pub mod error;
pub mod eval;
pub mod expect;
pub mod graph;
mod memory;
pub mod model;
pub mod observed;
pub mod parse;
pub mod plot;
pub mod prob;
pub mod report;
pub mod select;
pub mod simulate;
pub mod statistic;
pub mod stats;

pub use error::{Error, InputError, InputErrorKind, Result};

/// What unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    /// Every `fixtures/*.txt` file, as (path, text), sorted by path.
    pub fn fixture_texts() -> Vec<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let mut texts: Vec<(String, String)> = std::fs::read_dir(dir)
            .expect("fixtures/")
            .map(|e| e.expect("fixtures/ entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("fixture");
                (p.display().to_string(), text)
            })
            .collect();
        texts.sort();
        assert!(texts.len() > 30, "the fixtures are there");
        texts
    }

    /// 40 two-endpoint services with `[pkts:bytes]` counters on their rules, the
    /// first endpoint's rule written with the 11-decimal form of 1/3.
    pub fn counted_dump() -> String {
        let mut text = String::from("*nat\n");
        for i in 0..40 {
            text.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n"));
        }
        for i in 0..40 {
            text.push_str(&format!(
                "[{}:0] -A KUBE-SVC-{i} -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination 10.0.{i}.1:80\n[{}:0] -A KUBE-SVC-{i} -j DNAT --to-destination 10.0.{i}.2:80\n",
                10 + i,
                20 + 2 * i
            ));
        }
        text.push_str("COMMIT\n");
        text
    }

    /// 40 generic chains whose statistic rule no traffic reaches (an `ACCEPT` first),
    /// listed first by name, then 90 two-endpoint kube-proxy services: 130 candidates,
    /// 90 balancers.
    pub fn unreached_then_services() -> String {
        let mut text = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n");
        for i in 0..40 {
            text.push_str(&format!(
                ":AAA{i:02} - [0:0]\n-A AAA{i:02} -j ACCEPT\n-A AAA{i:02} -m statistic --mode random --probability 0.5 -j ACCEPT\n"
            ));
        }
        for i in 0..90 {
            text.push_str(&format!(
                ":KUBE-SVC-{i:04} - [0:0]\n:KUBE-SEP-{i:04}A - [0:0]\n:KUBE-SEP-{i:04}B - [0:0]\n\
                 -A KUBE-SVC-{i:04} -m comment --comment \"ns/s{i:02}:p\" -m statistic --mode random --probability 0.5 -j KUBE-SEP-{i:04}A\n\
                 -A KUBE-SVC-{i:04} -m comment --comment \"ns/s{i:02}:p\" -j KUBE-SEP-{i:04}B\n\
                 -A KUBE-SEP-{i:04}A -p tcp -j DNAT --to-destination 10.0.{i}.1:80\n\
                 -A KUBE-SEP-{i:04}B -p tcp -j DNAT --to-destination 10.0.{i}.2:80\n"
            ));
        }
        text.push_str("COMMIT\n");
        text
    }
}
