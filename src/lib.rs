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
