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

/// Rule evaluations the report's default cross-check spreads over all balancers: chosen
/// so that the report on the benchmark's 30,000-service dump takes at most twice as long
/// with the cross-check as without (issue 4). 20,000,000 until session 9, when that ratio
/// came out at 1.86-2.02x in three benchmark runs on the project's 2-core VM; 15,000,000
/// measured 1.87x against 1.98x for the old budget (15 interleaved runs each); on that
/// dump a balancer gets 83-166 connections (median 166) instead of 95-222 (median 222),
/// the floor of [`DEFAULT_MIN_EXPECTED`] per endpoint unchanged.
pub const DEFAULT_TOTAL_EVALUATIONS: u64 = 15_000_000;

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
    /// The level the corrected p-values will be judged at (`check --alpha`): the
    /// small-count Monte-Carlo tests draw enough replicates to reach it (see
    /// [`stats::Budget::for_tests_at`]).
    pub alpha: f64,
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
            alpha: stats::MC_DESIGN_ALPHA,
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

/// Does a test have the category "unmatched" (it has probability or counts)?
fn has_unmatched_category(unmatched_p: f64, unmatched_n: u64) -> bool {
    unmatched_p > 0.0 || unmatched_n > 0
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
    if has_unmatched_category(unmatched_p, unmatched_n) {
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
    with_progress_in_passes(opts, n, &["simulating"], f)
}

/// [`with_progress`] for work that goes over the `n` balancers once per label of
/// `passes`: the counter runs from 0 to `n` times their number, and the line names the
/// pass it is in (`k / n`) and its balancers done (`k % n`).
pub fn with_progress_in_passes<T>(
    opts: &AuditOptions,
    n: usize,
    passes: &[&str],
    f: impl FnOnce(&AtomicUsize) -> T,
) -> T {
    let done = AtomicUsize::new(0);
    let finished = AtomicBool::new(false);
    std::thread::scope(|scope| {
        if opts.progress && opts.connections != Some(0) && n > 0 && !passes.is_empty() {
            scope.spawn(|| progress(&done, &finished, n, passes));
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
    let budget = stats::Budget::for_tests_at(n, opts.alpha);
    audit_all(graph, balancers, &per, opts, &budget, done)
}

/// Corrects the p-values across all the run's audits and returns the top-level
/// simulation info when a simulation ran.
pub fn finish(audits: &mut [Audit], opts: &AuditOptions) -> Option<SimulationInfo> {
    adjust(audits, opts.adjustment);
    simulation_info(
        audits.iter().map(|a| a.connections).max().unwrap_or(0),
        audits
            .iter()
            .filter_map(|a| a.simulation.as_ref())
            .map(|s| s.rule_evaluations)
            .sum(),
        opts,
    )
}

/// The top-level simulation info of a run whose audits gave the simulation at most
/// `connections` connections (0: none ran) and made `rule_evaluations` in all.
fn simulation_info(
    connections: u64,
    rule_evaluations: u64,
    opts: &AuditOptions,
) -> Option<SimulationInfo> {
    (connections > 0).then(|| SimulationInfo {
        connections,
        budget: if opts.connections.is_none() {
            "default"
        } else {
            "fixed"
        },
        seed: opts.seed,
        generator: simulate::GENERATOR,
        rule_evaluations,
        adjustment: opts.adjustment,
    })
}

/// Prints `simulating: k/n balancers` (the pass's label) on stderr once a second has
/// passed, until done.
fn progress(done: &AtomicUsize, finished: &AtomicBool, n: usize, passes: &[&str]) {
    let start = Instant::now();
    let mut shown = false;
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let k = done.load(Ordering::Relaxed);
        let pass = (k / n).min(passes.len() - 1);
        let k = (k - pass * n).min(n);
        // Cleared to the end of the line: a pass's label may be shorter than the last.
        eprint!(
            "\r{}: {k}/{n} balancers ({:.0}%)\x1b[K",
            passes[pass],
            k as f64 * 100.0 / n as f64
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

/// The smallest effect `connections` connections over `categories` categories detect
/// (see [`Simulation::detectable_w`]), and as the relative skew of one of `endpoints`
/// endpoints.
fn detectable(connections: u64, categories: usize, endpoints: usize) -> (f64, f64) {
    let df = (categories.max(2) - 1) as u32;
    let w = detectable_w(connections, df);
    (w, stats::w_to_skew(w, endpoints.max(1)))
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
    let (w, skew) = detectable(connections, o.len(), exact.len());
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
        detectable_relative_skew: skew,
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

/// A run's audits in a few dozen bytes each, kept while their balancers are dropped:
/// a report printed in two passes audits its balancers a window at a time and
/// [`push`](Self::push)es each audit here, [`finish`](Self::finish)es them (the p-values
/// corrected across all of them), then analyses the balancers again and gets each
/// audit back, corrected, from [`reader`](Self::reader).
///
/// What the balancer gives again is left out: the intended split, and the smallest
/// detectable effect (a function of the connections, the categories and the
/// endpoints); so is what equals another field (a simulation's connections are the
/// audit's, the G-test's "corrected" p-value is its p-value unless a flag says
/// otherwise). The rest is written, audit after audit, as LEB128 integers, raw floats
/// and indices into the methods seen, in blocks of whole audits (one a
/// [`seal`](Self::seal)ed window: no large buffer grows by copies); the p-values
/// corrected together are kept apart, one vector per family of tests. On the
/// 30k-service dump with the default cross-check: about 50 bytes an audit, and 16 of
/// p-values.
#[derive(Debug, Default)]
pub struct CompactAudits {
    /// Finished blocks, and the one being written.
    blocks: Vec<Box<[u8]>>,
    open: Vec<u8>,
    /// The method names seen (`&'static str`s of the statistics module), by index.
    methods: Vec<&'static str>,
    /// The p-values of each family corrected together (the simulation against the
    /// exact probabilities, against the intended split, the counters' test), in the
    /// order of the audits that have the test…
    p: [Vec<f64>; 3],
    /// …and corrected, once finished: which are 1 (most, with Holm's correction of
    /// many tests), one bit each, and the others in order.
    adjusted_one: [Vec<u64>; 3],
    adjusted: [Vec<f64>; 3],
    /// The largest `Audit::connections`, and the simulations' rule evaluations.
    connections: u64,
    rule_evaluations: u64,
}

/// The families of [`CompactAudits::p`].
const SIMULATION: usize = 0;
const EXPECTED: usize = 1;
const OBSERVED: usize = 2;

// Flags of an audit, then of its simulation and of its counters' test: what is there.
const HAS_SIMULATION: u8 = 1;
const HAS_OBSERVED: u8 = 2;
const HAS_REPLICATES: u8 = 1;
const HAS_EXPECTED_REPLICATES: u8 = 2;
const HAS_CLIENTS: u8 = 4;
const HAS_MAX_ENDPOINT_SHARE: u8 = 8;
const HAS_RETURNING: u8 = 16;
const HAS_SAME_ENDPOINT: u8 = 32;
/// The G-test's "corrected" p-value differs from its p-value (it is not corrected).
const HAS_G_ADJUSTED: u8 = 64;

impl CompactAudits {
    /// Room for the p-values of `balancers` audits.
    pub fn new(balancers: usize) -> Self {
        let room = || Vec::with_capacity(balancers);
        Self {
            p: [room(), room(), room()],
            ..Self::default()
        }
    }

    /// Keeps the next audit (of the run's balancers, in order).
    pub fn push(&mut self, a: &Audit) {
        let mut out = std::mem::take(&mut self.open);
        put_u64(&mut out, a.connections);
        self.connections = self.connections.max(a.connections);
        out.push(
            if a.simulation.is_some() {
                HAS_SIMULATION
            } else {
                0
            } | if a.observed.is_some() {
                HAS_OBSERVED
            } else {
                0
            },
        );
        if let Some(s) = &a.simulation {
            let Simulation {
                connections: _,
                statistic,
                df,
                p_value,
                p_value_adjusted: _,
                method,
                replicates,
                g_test,
                expected,
                unmatched,
                other,
                rule_evaluations,
                detectable_w: _,
                detectable_relative_skew: _,
                clients,
                max_endpoint_share,
                returning_connections,
                same_endpoint_connections,
                counts,
            } = s;
            let flag = |present: bool, f: u8| if present { f } else { 0 };
            let has_flags = flag(replicates.is_some(), HAS_REPLICATES)
                | flag(expected.replicates.is_some(), HAS_EXPECTED_REPLICATES)
                | flag(clients.is_some(), HAS_CLIENTS)
                | flag(max_endpoint_share.is_some(), HAS_MAX_ENDPOINT_SHARE)
                | flag(returning_connections.is_some(), HAS_RETURNING)
                | flag(same_endpoint_connections.is_some(), HAS_SAME_ENDPOINT)
                | flag(
                    g_test.p_value_adjusted.to_bits() != g_test.p_value.to_bits(),
                    HAS_G_ADJUSTED,
                );
            out.push(has_flags);
            put_f64(&mut out, *statistic);
            put_u64(&mut out, (*df).into());
            self.put_method(&mut out, method);
            put_present_u64(&mut out, *replicates);
            self.p[SIMULATION].push(*p_value);
            put_f64(&mut out, g_test.statistic);
            put_u64(&mut out, g_test.df.into());
            put_f64(&mut out, g_test.p_value);
            if has_flags & HAS_G_ADJUSTED != 0 {
                put_f64(&mut out, g_test.p_value_adjusted);
            }
            self.put_method(&mut out, g_test.method);
            put_f64(&mut out, expected.statistic);
            put_u64(&mut out, expected.df.into());
            self.put_method(&mut out, expected.method);
            put_present_u64(&mut out, expected.replicates);
            self.p[EXPECTED].push(expected.p_value);
            put_u64(&mut out, *unmatched);
            put_u64(&mut out, *other);
            put_u64(&mut out, *rule_evaluations);
            self.rule_evaluations += rule_evaluations;
            put_present_u64(&mut out, *clients);
            put_present_f64(&mut out, *max_endpoint_share);
            put_present_u64(&mut out, *returning_connections);
            put_present_u64(&mut out, *same_endpoint_connections);
            put_u64s(&mut out, counts);
        }
        if let Some(o) = &a.observed {
            let ObservedTest {
                connections,
                affinity_connections,
                statistic,
                df,
                p_value,
                p_value_adjusted: _,
                method,
                replicates,
                counts,
                affinity,
            } = o;
            out.push(if replicates.is_some() {
                HAS_REPLICATES
            } else {
                0
            });
            put_u64(&mut out, *connections);
            put_u64(&mut out, *affinity_connections);
            put_f64(&mut out, *statistic);
            put_u64(&mut out, (*df).into());
            self.put_method(&mut out, method);
            put_present_u64(&mut out, *replicates);
            self.p[OBSERVED].push(*p_value);
            put_u64s(&mut out, counts);
            put_u64s(&mut out, affinity);
        }
        self.open = out;
    }

    /// Ends the block being written (after a window: the next audits go into a new one).
    pub fn seal(&mut self) {
        if !self.open.is_empty() {
            let block = std::mem::take(&mut self.open).into_boxed_slice();
            self.blocks.push(block);
        }
    }

    fn put_method(&mut self, out: &mut Vec<u8>, method: &'static str) {
        let i = match self.methods.iter().position(|&m| m == method) {
            Some(i) => i,
            None => {
                self.methods.push(method);
                self.methods.len() - 1
            }
        };
        put_u64(out, i as u64);
    }

    /// Corrects the p-values across all the audits kept, as [`finish`] does, and
    /// returns the top-level simulation info when a simulation ran.
    pub fn finish(&mut self, opts: &AuditOptions) -> Option<SimulationInfo> {
        self.seal();
        for f in [SIMULATION, EXPECTED, OBSERVED] {
            let q = adjust_values(&self.p[f], opts.adjustment);
            let one = |q: f64| q.to_bits() == 1f64.to_bits();
            let mut bits = vec![0u64; q.len().div_ceil(64)];
            for (i, &q) in q.iter().enumerate() {
                bits[i / 64] |= u64::from(one(q)) << (i % 64);
            }
            self.adjusted_one[f] = bits;
            self.adjusted[f] = q.into_iter().filter(|&q| !one(q)).collect();
        }
        simulation_info(self.connections, self.rule_evaluations, opts)
    }

    /// The audits, in the order they were pushed (after [`finish`](Self::finish)).
    pub fn reader(&self) -> CompactReader<'_> {
        CompactReader {
            audits: self,
            block: 0,
            at: 0,
            next: [0; 3],
            next_adjusted: [0; 3],
        }
    }
}

/// Reads [`CompactAudits`] back, audit after audit.
pub struct CompactReader<'a> {
    audits: &'a CompactAudits,
    block: usize,
    at: usize,
    /// The next p-value of each family, and the next of its corrected ones not 1.
    next: [usize; 3],
    next_adjusted: [usize; 3],
}

impl CompactReader<'_> {
    /// The next audit, which is `b`'s (analysed again as it was for the audit; `opts`
    /// as for the audit).
    pub fn next(&mut self, b: &Balancer, opts: &AuditOptions) -> Audit {
        let expected = expected_for(b, opts.expectations.as_ref());
        let connections = self.u64();
        let flags = self.byte();
        let simulation = (flags & HAS_SIMULATION != 0).then(|| {
            let has = self.byte();
            let statistic = self.f64();
            let df = self.u32();
            let method = self.method();
            let replicates = (has & HAS_REPLICATES != 0).then(|| self.u64());
            let (p_value, p_value_adjusted) = self.p(SIMULATION);
            let (g_statistic, g_df, g_p_value) = (self.f64(), self.u32(), self.f64());
            let g_test = Test {
                statistic: g_statistic,
                df: g_df,
                p_value: g_p_value,
                p_value_adjusted: if has & HAS_G_ADJUSTED != 0 {
                    self.f64()
                } else {
                    g_p_value
                },
                method: self.method(),
            };
            let (e_statistic, e_df, e_method) = (self.f64(), self.u32(), self.method());
            let e_replicates = (has & HAS_EXPECTED_REPLICATES != 0).then(|| self.u64());
            let (e_p_value, e_p_value_adjusted) = self.p(EXPECTED);
            let expected = ExpectedTest {
                source: expected.source.clone(),
                statistic: e_statistic,
                df: e_df,
                p_value: e_p_value,
                p_value_adjusted: e_p_value_adjusted,
                method: e_method,
                replicates: e_replicates,
            };
            let unmatched = self.u64();
            let other = self.u64();
            let rule_evaluations = self.u64();
            let clients = (has & HAS_CLIENTS != 0).then(|| self.u64());
            let max_endpoint_share = (has & HAS_MAX_ENDPOINT_SHARE != 0).then(|| self.f64());
            let returning_connections = (has & HAS_RETURNING != 0).then(|| self.u64());
            let same_endpoint_connections = (has & HAS_SAME_ENDPOINT != 0).then(|| self.u64());
            let counts = self.u64s();
            debug_assert_eq!(counts.len(), b.endpoints.len(), "{}: not its audit", b.name);
            // As `summarise_simulation` has them.
            let unmatched_p = b.unmatched.to_f64();
            let categories = counts.len()
                + usize::from(has_unmatched_category(
                    unmatched_p,
                    unmatched.wrapping_add(other),
                ));
            let (detectable_w, detectable_relative_skew) =
                detectable(connections, categories, b.endpoints.len());
            Simulation {
                connections,
                statistic,
                df,
                p_value,
                p_value_adjusted,
                method,
                replicates,
                g_test,
                expected,
                unmatched,
                other,
                rule_evaluations,
                detectable_w,
                detectable_relative_skew,
                clients,
                max_endpoint_share,
                returning_connections,
                same_endpoint_connections,
                counts,
            }
        });
        let observed = (flags & HAS_OBSERVED != 0).then(|| {
            let has = self.byte();
            let connections = self.u64();
            let affinity_connections = self.u64();
            let statistic = self.f64();
            let df = self.u32();
            let method = self.method();
            let replicates = (has & HAS_REPLICATES != 0).then(|| self.u64());
            let (p_value, p_value_adjusted) = self.p(OBSERVED);
            ObservedTest {
                connections,
                affinity_connections,
                statistic,
                df,
                p_value,
                p_value_adjusted,
                method,
                replicates,
                counts: self.u64s(),
                affinity: self.u64s(),
            }
        });
        if self.at == self.bytes().len() {
            self.block += 1;
            self.at = 0;
        }
        Audit {
            expected,
            simulation,
            observed,
            connections,
        }
    }

    /// Have all the audits been read?
    pub fn is_done(&self) -> bool {
        self.block == self.audits.blocks.len()
    }

    fn bytes(&self) -> &[u8] {
        &self.audits.blocks[self.block]
    }

    fn byte(&mut self) -> u8 {
        let b = self.bytes()[self.at];
        self.at += 1;
        b
    }

    fn u64(&mut self) -> u64 {
        let (v, len) = get_u64(&self.bytes()[self.at..]);
        self.at += len;
        v
    }

    fn u32(&mut self) -> u32 {
        u32::try_from(self.u64()).expect("a u32 kept")
    }

    fn f64(&mut self) -> f64 {
        let bytes: [u8; 8] = self.bytes()[self.at..self.at + 8]
            .try_into()
            .expect("8 bytes");
        self.at += 8;
        f64::from_le_bytes(bytes)
    }

    fn method(&mut self) -> &'static str {
        let i = self.u64() as usize;
        self.audits.methods[i]
    }

    fn u64s(&mut self) -> Vec<u64> {
        let n = self.u64() as usize;
        (0..n).map(|_| self.u64()).collect()
    }

    /// The next p-value of `family`, and corrected.
    fn p(&mut self, family: usize) -> (f64, f64) {
        let i = self.next[family];
        self.next[family] += 1;
        let adjusted = if self.audits.adjusted_one[family][i / 64] >> (i % 64) & 1 != 0 {
            1.0
        } else {
            self.next_adjusted[family] += 1;
            self.audits.adjusted[family][self.next_adjusted[family] - 1]
        };
        (self.audits.p[family][i], adjusted)
    }
}

/// `v` as LEB128: seven bits a byte, low first, the high bit set on all but the last.
fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A LEB128 integer at the start of `bytes`, and its length.
fn get_u64(bytes: &[u8]) -> (u64, usize) {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate() {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return (v, i + 1);
        }
    }
    panic!("a LEB128 integer cut short");
}

/// `v` when there is one (the flags say whether).
fn put_present_u64(out: &mut Vec<u8>, v: Option<u64>) {
    if let Some(v) = v {
        put_u64(out, v);
    }
}

fn put_present_f64(out: &mut Vec<u8>, v: Option<f64>) {
    if let Some(v) = v {
        put_f64(out, v);
    }
}

fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// The length, then each.
fn put_u64s(out: &mut Vec<u8>, values: &[u64]) {
    put_u64(out, values.len() as u64);
    for &v in values {
        put_u64(out, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{self, ParseOptions};

    /// Audits kept compactly, a window at a time, come back after `finish` as
    /// [`run`] gives them (every field, the p-values corrected across all of them), with
    /// the same top-level info: on every fixture, with counters, clients, an
    /// expectations file, and either correction.
    #[test]
    fn compact_audits_come_back_as_run_gives_them() {
        let mut texts = crate::testing::fixture_texts();
        let mut counted = String::from("*nat\n");
        for i in 0..30 {
            counted.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n"));
        }
        for i in 0..30 {
            // Large counts (multi-byte integers), and a balancer without counters.
            let c = if i == 7 {
                String::new()
            } else {
                format!("[{}:0] ", 1000 + 977 * i)
            };
            counted.push_str(&format!(
                "{c}-A KUBE-SVC-{i} -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-{i} --mask 255.255.255.255 --rsource -j DNAT --to-destination 10.0.{i}.9:80\n\
                 {c}-A KUBE-SVC-{i} -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination 10.0.{i}.1:80\n\
                 {c}-A KUBE-SVC-{i} -j DNAT --to-destination 10.0.{i}.2:80\n"
            ));
        }
        counted.push_str("COMMIT\n");
        texts.push(("counted".into(), counted));
        let expectations = Expectations::parse(
            "*,10.0.0.1:80,3\n*,mark 0x10100/0x3ff00,1\n*,nowhere,1\n",
            "weights.csv",
        )
        .unwrap();
        let variants = [
            AuditOptions::default(),
            AuditOptions {
                connections: Some(0),
                ..AuditOptions::default()
            },
            AuditOptions {
                connections: Some(300),
                clients: Some(4),
                adjustment: Adjustment::Bh,
                ..AuditOptions::default()
            },
            AuditOptions {
                connections: Some(200),
                expectations: Some(expectations),
                observed: false,
                ..AuditOptions::default()
            },
        ];
        let (mut audits_seen, mut observed_seen, mut clients_seen) = (0, 0, 0);
        for (path, text) in &texts {
            let rs = parse::parse(text, &ParseOptions { lenient: true }).unwrap();
            let graph = Graph::build(&rs, true).unwrap();
            let balancers = crate::balance::find(&graph);
            for opts in &variants {
                let opts = AuditOptions {
                    balancers: Some(balancers.len()),
                    ..opts.clone()
                };
                let (audits, info) = run(&graph, &balancers, &opts);
                let mut kept = CompactAudits::new(balancers.len());
                for part in balancers.chunks(3) {
                    let done = AtomicUsize::new(0);
                    for a in audit_window(&graph, part, &opts, &done) {
                        kept.push(&a);
                    }
                    kept.seal();
                }
                let kept_info = kept.finish(&opts);
                assert_eq!(format!("{kept_info:?}"), format!("{info:?}"), "{path}");
                let mut reader = kept.reader();
                for (b, a) in balancers.iter().zip(&audits) {
                    let back = reader.next(b, &opts);
                    assert_eq!(format!("{back:?}"), format!("{a:?}"), "{path}: {}", b.name);
                    audits_seen += 1;
                    observed_seen += usize::from(a.observed.is_some());
                    clients_seen += usize::from(
                        a.simulation
                            .as_ref()
                            .is_some_and(|s| s.max_endpoint_share.is_some()),
                    );
                }
            }
        }
        assert!(audits_seen > 200, "{audits_seen} audits");
        assert!(observed_seen > 30, "{observed_seen} counter tests");
        assert!(clients_seen > 30, "{clients_seen} simulations with clients");
    }

    /// Values a run rarely or never gives come back too: non-finite and extreme floats,
    /// the largest integers, Monte-Carlo replicates, a G-test p-value "corrected" apart
    /// from its p-value, the clients' figures there and not.
    #[test]
    fn compact_audits_keep_odd_values() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/kube-affinity.txt"
        ))
        .unwrap();
        let rs = parse::parse(&text, &ParseOptions { lenient: true }).unwrap();
        let graph = Graph::build(&rs, true).unwrap();
        let balancers = crate::balance::find(&graph);
        assert!(!balancers.is_empty());
        let floats = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            5e-324,
            1e300,
            0.1,
        ];
        for how in [Adjustment::Holm, Adjustment::Bh] {
            let opts = AuditOptions {
                connections: Some(100),
                clients: Some(3),
                adjustment: how,
                ..AuditOptions::default()
            };
            let (mut audits, _) = run(&graph, &balancers, &opts);
            for (k, a) in audits.iter_mut().enumerate() {
                let f = |i: usize| floats[(k + i) % floats.len()];
                let s = a.simulation.as_mut().expect("simulated");
                (s.statistic, s.df, s.method) = (f(0), u32::MAX, "monte-carlo-multinomial");
                s.replicates = (k % 2 == 0).then_some(u64::MAX);
                s.g_test.statistic = f(1);
                s.g_test.p_value_adjusted = if k % 2 == 0 { f(2) } else { s.g_test.p_value };
                (s.expected.statistic, s.expected.df) = (f(3), 0);
                s.expected.replicates = (k % 3 == 0).then_some(1 << 63);
                s.rule_evaluations = 1 << 50;
                s.clients = (k % 2 == 1).then_some(u64::MAX);
                s.max_endpoint_share = (k % 3 != 1).then(|| f(4));
                s.returning_connections = (k % 4 != 0).then_some(u64::MAX);
                s.same_endpoint_connections = None;
                s.counts.iter_mut().for_each(|c| *c = u64::MAX - *c);
                a.observed = (k % 2 == 0).then(|| ObservedTest {
                    connections: u64::MAX,
                    affinity_connections: 0,
                    statistic: f(5),
                    df: 7,
                    p_value: 1.0 / (k + 2) as f64,
                    p_value_adjusted: 0.0,
                    method: "exact-multinomial",
                    replicates: Some(k as u64),
                    counts: vec![u64::MAX; 3],
                    affinity: Vec::new(),
                });
            }
            let mut kept = CompactAudits::new(audits.len());
            for a in &audits {
                kept.push(a);
            }
            kept.finish(&opts);
            // The p-values corrected as `finish` corrects them.
            adjust(&mut audits, how);
            let mut reader = kept.reader();
            for (b, a) in balancers.iter().zip(&audits) {
                let back = reader.next(b, &opts);
                assert_eq!(format!("{back:?}"), format!("{a:?}"), "{}", b.name);
            }
        }
    }

    #[test]
    fn leb128_round_trips() {
        let values = [
            0,
            1,
            127,
            128,
            255,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut out = Vec::new();
        for &v in &values {
            put_u64(&mut out, v);
        }
        let mut at = 0;
        for &v in &values {
            let (got, len) = get_u64(&out[at..]);
            assert_eq!(got, v);
            at += len;
        }
        assert_eq!(at, out.len());
        assert_eq!(out[..4], [0, 1, 127, 0x80]);
    }
}
