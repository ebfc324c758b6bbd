//! Evidence beyond the exact numbers: the Monte-Carlo cross-check and real counters,
//! each tested with goodness-of-fit statistics and corrected for multiple balancers.

use crate::balance::Balancer;
use crate::expect::{self, Expectations, Expected};
use crate::graph::Graph;
use crate::observed::{self, Observed};
use crate::simulate::{self, SimOptions, SimResult};
use crate::stats::{self, TestResult};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The default seed ("lbaudit!" in ASCII).
pub const DEFAULT_SEED: u64 = 0x6c62_6175_6469_7421;

/// Rule evaluations the report's default cross-check spreads over all balancers.
pub const DEFAULT_TOTAL_EVALUATIONS: u64 = 20_000_000;

/// Fewest expected connections per endpoint the default budget aims for, so that the
/// chi-square approximation holds (expected counts of at least 5) with room to spare.
pub const DEFAULT_MIN_EXPECTED: f64 = 10.0;

/// Most connections per balancer the default budget gives.
pub const DEFAULT_MAX_PER_BALANCER: u64 = 1_000_000;

/// How p-values are corrected across balancers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Adjustment {
    /// Holm's step-down: controls the family-wise error rate (for pass/fail gates).
    Holm,
    /// Benjamini–Hochberg: controls the false discovery rate (for exploration).
    Bh,
}

/// What to compute.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Connections per balancer: `None` for the default budget, `Some(0)` for none.
    pub connections: Option<u64>,
    pub seed: u64,
    pub clients: Option<u64>,
    pub adjustment: Adjustment,
    /// Test real counters when the input has them.
    pub observed: bool,
    pub expectations: Option<Expectations>,
    /// Show progress on stderr when the simulation takes longer than a second (the CLI
    /// sets this only when stderr is a terminal).
    pub progress: bool,
    /// Balancers in the whole run, when they are audited a window at a time (the
    /// default budget and the small-count tests' budget are spread over them); `None`:
    /// the balancers given.
    pub balancers: Option<usize>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            connections: None,
            seed: DEFAULT_SEED,
            clients: None,
            adjustment: Adjustment::Holm,
            observed: true,
            expectations: None,
            progress: false,
            balancers: None,
        }
    }
}

/// A goodness-of-fit test with its corrected p-value.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Test {
    pub statistic: f64,
    pub df: u32,
    pub p_value: f64,
    /// Corrected across the balancers tested in this run (Holm unless asked otherwise).
    pub p_value_adjusted: f64,
    pub method: &'static str,
}

impl Test {
    fn new(r: &TestResult) -> Self {
        Self {
            statistic: r.statistic,
            df: r.df,
            p_value: r.p_value,
            p_value_adjusted: r.p_value,
            method: r.method,
        }
    }
}

/// The Monte-Carlo cross-check of one balancer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Simulation {
    pub connections: u64,
    /// The simulated counts against the exact probabilities (validates the analysis).
    pub statistic: f64,
    pub df: u32,
    pub p_value: f64,
    pub p_value_adjusted: f64,
    pub method: &'static str,
    /// Replicates drawn, when `method` is a Monte-Carlo test.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicates: Option<u64>,
    /// The G-test of the same counts against the exact probabilities.
    pub g_test: Test,
    /// The simulated counts against the intended split (uniform unless weights are given).
    pub expected: ExpectedTest,
    /// Connections that reached no endpoint.
    pub unmatched: u64,
    /// Connections whose outcome the exact analysis does not know (always 0 unless the
    /// simulator and the evaluator disagree).
    pub other: u64,
    pub rule_evaluations: u64,
    /// Smallest effect this many connections detect at α = 0.05 with power 0.8: Cohen's w…
    pub detectable_w: f64,
    /// …and as the relative skew of one endpoint (the others compensating).
    pub detectable_relative_skew: f64,
    /// With `--clients`: how session affinity concentrates load (see `simulate::SimResult`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_endpoint_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub returning_connections: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_endpoint_connections: Option<u64>,
    /// Per endpoint counts (also in each endpoint's `simulated`).
    #[serde(skip)]
    pub counts: Vec<u64>,
}

/// A test against the intended split.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExpectedTest {
    /// `uniform`, or the expectations file.
    pub source: String,
    pub statistic: f64,
    pub df: u32,
    pub p_value: f64,
    pub p_value_adjusted: f64,
    pub method: &'static str,
    /// Replicates drawn, when `method` is a Monte-Carlo test.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicates: Option<u64>,
}

/// The test of real counters against the exact probabilities.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObservedTest {
    /// Connections chosen by the split (affinity excluded).
    pub connections: u64,
    /// Connections sent by session affinity rules.
    pub affinity_connections: u64,
    pub statistic: f64,
    pub df: u32,
    pub p_value: f64,
    pub p_value_adjusted: f64,
    pub method: &'static str,
    /// Replicates drawn, when `method` is a Monte-Carlo test.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicates: Option<u64>,
    #[serde(skip)]
    pub counts: Vec<u64>,
    #[serde(skip)]
    pub affinity: Vec<u64>,
}

/// Everything measured about one balancer beyond its exact numbers.
#[derive(Debug, Clone)]
pub struct Audit {
    pub expected: Expected,
    pub simulation: Option<Simulation>,
    pub observed: Option<ObservedTest>,
    /// Connections the simulation was given (0: none).
    pub connections: u64,
}

/// What a run of the simulation was, for the report's top level.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimulationInfo {
    /// Connections per balancer (the largest, when the default budget varies it).
    pub connections: u64,
    /// `default` (a budget spread over the balancers) or `fixed`.
    pub budget: &'static str,
    pub seed: u64,
    pub generator: &'static str,
    pub rule_evaluations: u64,
    pub adjustment: Adjustment,
}

/// A stable per-balancer stream index: FNV-1a of table, chain and line, so that a
/// balancer's simulated counts do not depend on which other balancers were selected.
pub fn stream_index(b: &Balancer) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b
        .table
        .bytes()
        .chain([0])
        .chain(b.chain.bytes())
        .chain([0])
        .chain(b.line.to_le_bytes())
    {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Connections for one balancer under the default budget: an equal share of the
/// evaluation budget (a connection costs about half the balancer chain's rules plus the
/// endpoint chain's), but at least enough for 10 expected connections per endpoint.
pub fn default_connections(graph: &Graph<'_, '_>, b: &Balancer, balancers: usize) -> u64 {
    let rules = graph.chain(b.table_index, b.chain_index).rules.len() as u64;
    let cost = 2 + rules / 2;
    let share = DEFAULT_TOTAL_EVALUATIONS / balancers.max(1) as u64 / cost;
    let min_p = b
        .endpoints
        .iter()
        .map(|e| e.prob.to_f64())
        .filter(|&p| p > 0.0)
        .fold(1.0, f64::min);
    let floor = (DEFAULT_MIN_EXPECTED / min_p).ceil() as u64;
    share.max(floor).min(DEFAULT_MAX_PER_BALANCER)
}

/// Endpoint labels of a balancer.
pub fn labels(b: &Balancer) -> Vec<String> {
    b.endpoints.iter().map(|e| e.outcome.label()).collect()
}

/// The intended split of a balancer.
pub fn expected_for(b: &Balancer, exp: Option<&Expectations>) -> Expected {
    exp.and_then(|e| e.for_balancer(&b.name, &b.chain, &labels(b)))
        .unwrap_or_else(|| expect::uniform(b.endpoints.len()))
}

/// Categories for a test: the endpoints, plus "unmatched" when it has probability or counts.
fn categories(
    probs: &[f64],
    counts: &[u64],
    unmatched_p: f64,
    unmatched_n: u64,
) -> (Vec<u64>, Vec<f64>) {
    let mut o = counts.to_vec();
    let mut p = probs.to_vec();
    if unmatched_p > 0.0 || unmatched_n > 0 {
        o.push(unmatched_n);
        p.push(unmatched_p);
    }
    (o, p)
}

/// Runs the cross-check and the counter tests for the balancers; also returns the
/// top-level simulation info when a simulation ran.
pub fn run(
    graph: &Graph<'_, '_>,
    balancers: &[Balancer],
    opts: &AuditOptions,
) -> (Vec<Audit>, Option<SimulationInfo>) {
    let n = opts.balancers.unwrap_or(balancers.len());
    let mut audits = with_progress(opts, n, |done| audit_window(graph, balancers, opts, done));
    let info = finish(&mut audits, opts);
    (audits, info)
}

/// Runs `f` with a counter of balancers done, shown on stderr as progress when
/// `opts.progress` asks for it and a simulation runs.
pub fn with_progress<T>(opts: &AuditOptions, n: usize, f: impl FnOnce(&AtomicUsize) -> T) -> T {
    let done = AtomicUsize::new(0);
    let finished = AtomicBool::new(false);
    std::thread::scope(|scope| {
        if opts.progress && opts.connections != Some(0) && n > 0 {
            scope.spawn(|| progress(&done, &finished, n));
        }
        let out = f(&done);
        finished.store(true, Ordering::Relaxed);
        out
    })
}

/// The audits of some of the run's balancers (a window of them; the whole run has
/// `opts.balancers`, or these), not yet corrected across balancers: see [`finish`].
/// A balancer's audit depends only on it, the options and the run's size, not on the
/// window it comes in.
pub fn audit_window(
    graph: &Graph<'_, '_>,
    balancers: &[Balancer],
    opts: &AuditOptions,
    done: &AtomicUsize,
) -> Vec<Audit> {
    let n = opts.balancers.unwrap_or(balancers.len());
    let per: Vec<u64> = balancers
        .iter()
        .map(|b| match opts.connections {
            None => default_connections(graph, b, n),
            Some(c) => c,
        })
        .collect();
    // Each family of tests corrected together has at most one test per balancer.
    let budget = stats::Budget::for_tests(n);
    audit_all(graph, balancers, &per, opts, &budget, done)
}

/// Corrects the p-values across all the run's audits and returns the top-level
/// simulation info when a simulation ran.
pub fn finish(audits: &mut [Audit], opts: &AuditOptions) -> Option<SimulationInfo> {
    adjust(audits, opts.adjustment);
    let simulate = audits.iter().any(|a| a.connections > 0);
    simulate.then(|| SimulationInfo {
        connections: audits.iter().map(|a| a.connections).max().unwrap_or(0),
        budget: if opts.connections.is_none() {
            "default"
        } else {
            "fixed"
        },
        seed: opts.seed,
        generator: simulate::GENERATOR,
        rule_evaluations: audits
            .iter()
            .filter_map(|a| a.simulation.as_ref())
            .map(|s| s.rule_evaluations)
            .sum(),
        adjustment: opts.adjustment,
    })
}

/// Prints `simulating: k/n balancers` on stderr once a second has passed, until done.
fn progress(done: &AtomicUsize, finished: &AtomicBool, n: usize) {
    let start = Instant::now();
    let mut shown = false;
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let k = done.load(Ordering::Relaxed);
        eprint!(
            "\rsimulating: {k}/{n} balancers ({:.0}%)",
            k as f64 * 100.0 / n.max(1) as f64
        );
        shown = true;
    }
    if shown {
        eprint!("\r\x1b[K");
    }
}

fn audit_all(
    graph: &Graph<'_, '_>,
    balancers: &[Balancer],
    per: &[u64],
    opts: &AuditOptions,
    budget: &stats::Budget,
    done: &AtomicUsize,
) -> Vec<Audit> {
    balancers
        .par_iter()
        .zip(per.par_iter())
        .map(|(b, &connections)| {
            let expected = expected_for(b, opts.expectations.as_ref());
            let exact: Vec<f64> = b.endpoints.iter().map(|e| e.prob.to_f64()).collect();
            let unmatched_p = b.unmatched.to_f64();
            let simulation = (connections > 0 && !b.endpoints.is_empty()).then(|| {
                let sim_opts = SimOptions {
                    connections,
                    seed: opts.seed,
                    clients: opts.clients,
                };
                let r = simulate::simulate(graph, b, stream_index(b), &sim_opts);
                summarise_simulation(
                    &r,
                    connections,
                    &exact,
                    unmatched_p,
                    &expected,
                    opts.seed,
                    budget,
                )
            });
            let observed = if opts.observed {
                observed::observed(graph, b)
                    .map(|o| summarise_observed(&o, &exact, unmatched_p, opts.seed, budget))
            } else {
                None
            };
            done.fetch_add(1, Ordering::Relaxed);
            Audit {
                expected,
                simulation,
                observed,
                connections,
            }
        })
        .collect()
}

/// `stats::min_detectable_w` at α = 0.05 and power 0.8, remembered per (connections, df):
/// a large cluster has thousands of balancers with the same few pairs, and each value
/// costs a root search over the noncentral chi-square distribution.
fn detectable_w(connections: u64, df: u32) -> f64 {
    static CACHE: OnceLock<Mutex<HashMap<(u64, u32), f64>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&w) = cache
        .lock()
        .ok()
        .and_then(|c| c.get(&(connections, df)).copied())
        .as_ref()
    {
        return w;
    }
    let w = stats::min_detectable_w(connections as f64, df, 0.05, 0.8);
    if let Ok(mut c) = cache.lock() {
        c.insert((connections, df), w);
    }
    w
}

fn summarise_simulation(
    r: &SimResult,
    connections: u64,
    exact: &[f64],
    unmatched_p: f64,
    expected: &Expected,
    seed: u64,
    budget: &stats::Budget,
) -> Simulation {
    let (o, p) = categories(exact, &r.counts, unmatched_p, r.unmatched + r.other);
    let fit = stats::goodness_of_fit_with(&o, &p, seed, budget);
    let g = stats::g_test(&o, &p);
    let (oe, pe) = categories(&expected.probs, &r.counts, 0.0, r.unmatched + r.other);
    let fit_e = stats::goodness_of_fit_with(&oe, &pe, seed, budget);
    let k = exact.len().max(1);
    let df = (o.len().max(2) - 1) as u32;
    let w = detectable_w(connections, df);
    Simulation {
        connections,
        statistic: fit.statistic,
        df: fit.df,
        p_value: fit.p_value,
        p_value_adjusted: fit.p_value,
        method: fit.method,
        replicates: fit.replicates,
        g_test: Test::new(&g),
        expected: ExpectedTest {
            source: expected.source.clone(),
            statistic: fit_e.statistic,
            df: fit_e.df,
            p_value: fit_e.p_value,
            p_value_adjusted: fit_e.p_value,
            method: fit_e.method,
            replicates: fit_e.replicates,
        },
        unmatched: r.unmatched,
        other: r.other,
        rule_evaluations: r.rule_evaluations,
        detectable_w: w,
        detectable_relative_skew: stats::w_to_skew(w, k),
        clients: r.clients,
        max_endpoint_share: r.per_client_max_share,
        returning_connections: r.returning_connections,
        same_endpoint_connections: r.same_outcome_connections,
        counts: r.counts.clone(),
    }
}

fn summarise_observed(
    o: &Observed,
    exact: &[f64],
    unmatched_p: f64,
    seed: u64,
    budget: &stats::Budget,
) -> ObservedTest {
    // Counters only show connections that reached an endpoint; compare the split among
    // endpoints (renormalised) when some traffic is unmatched.
    let total_p: f64 = exact.iter().sum();
    let probs: Vec<f64> = if unmatched_p > 0.0 && total_p > 0.0 {
        exact.iter().map(|p| p / total_p).collect()
    } else {
        exact.to_vec()
    };
    let fit = stats::goodness_of_fit_with(&o.counts, &probs, seed, budget);
    ObservedTest {
        connections: o.counts.iter().sum(),
        affinity_connections: o.affinity.iter().sum(),
        statistic: fit.statistic,
        df: fit.df,
        p_value: fit.p_value,
        p_value_adjusted: fit.p_value,
        method: fit.method,
        replicates: fit.replicates,
        counts: o.counts.clone(),
        affinity: o.affinity.clone(),
    }
}

fn adjust_values(p: &[f64], how: Adjustment) -> Vec<f64> {
    match how {
        Adjustment::Holm => stats::holm(p),
        Adjustment::Bh => stats::benjamini_hochberg(p),
    }
}

/// Corrects each family of p-values (simulation vs exact, simulation vs intended,
/// observed) across the balancers.
fn adjust(audits: &mut [Audit], how: Adjustment) {
    let sims: Vec<usize> = (0..audits.len())
        .filter(|&i| audits[i].simulation.is_some())
        .collect();
    let p: Vec<f64> = sims
        .iter()
        .map(|&i| audits[i].simulation.as_ref().map_or(1.0, |s| s.p_value))
        .collect();
    for (&i, q) in sims.iter().zip(adjust_values(&p, how)) {
        if let Some(s) = audits[i].simulation.as_mut() {
            s.p_value_adjusted = q;
        }
    }
    let p: Vec<f64> = sims
        .iter()
        .map(|&i| {
            audits[i]
                .simulation
                .as_ref()
                .map_or(1.0, |s| s.expected.p_value)
        })
        .collect();
    for (&i, q) in sims.iter().zip(adjust_values(&p, how)) {
        if let Some(s) = audits[i].simulation.as_mut() {
            s.expected.p_value_adjusted = q;
        }
    }
    let obs: Vec<usize> = (0..audits.len())
        .filter(|&i| audits[i].observed.is_some())
        .collect();
    let p: Vec<f64> = obs
        .iter()
        .map(|&i| audits[i].observed.as_ref().map_or(1.0, |o| o.p_value))
        .collect();
    for (&i, q) in obs.iter().zip(adjust_values(&p, how)) {
        if let Some(o) = audits[i].observed.as_mut() {
            o.p_value_adjusted = q;
        }
    }
}
