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
}
