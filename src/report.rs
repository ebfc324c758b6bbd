//! The report: what `lbaudit report` prints, as a terminal table, JSON, CSV or Markdown.
//!
//! The JSON form is a contract with users' scripts: fields may be added, never renamed
//! or dropped.

use crate::audit::{
    self, Audit, AuditOptions, ExpectedTest, ObservedTest, Simulation, SimulationInfo, Test,
};
use crate::balance::{Affinity, Balancer, Candidate, Entry, Kind};
use crate::eval::Outcome;
use crate::graph::Graph;
use crate::model::{Family, Format, Ruleset, Warning};
use crate::prob::CompactProb;
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Exact fractions longer than this many characters are left out of the JSON.
const EXACT_MAX_CHARS: usize = 400;

/// What was read.
#[derive(Debug, Clone, Serialize)]
pub struct InputInfo {
    /// The file name, or `-` for standard input.
    pub source: String,
    pub format: Format,
    pub family: Family,
    pub lines: u32,
    pub rules: usize,
    pub tables: Vec<String>,
}

/// One endpoint in the report.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointReport {
    pub endpoint: String,
    /// The probability, as the nearest f64 (see [`CompactProb::to_f64`]).
    pub probability: f64,
    /// 1/n for n endpoints.
    pub ideal: f64,
    /// n·p − 1 as the nearest f64, computed exactly (or, for a probability whose exact form
    /// is long, from its 128-bit approximation: correctly rounded whenever the proven
    /// bound decides it).
    pub relative_deviation: f64,
    /// Line of the rule that sends traffic to it (the DNAT).
    pub line: u32,
    /// The chain that holds that rule.
    pub chain: String,
    /// Lines of the balancer chain's rules that lead to it.
    pub via: Vec<u32>,
    /// Number of distinct branches that reach it (2 or more: double weight).
    pub paths: u32,
    /// The exact probability as `num/den`, when short enough to print.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The intended probability (`ideal` unless an expectations file gives weights).
    pub expected: f64,
    /// Simulated connections that reached this endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulated: Option<u64>,
    /// Their share of the simulated connections, with a 95% Wilson interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulated_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulated_interval: Option<[f64; 2]>,
    /// Connections the node's counters show the split sent here (affinity excluded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed: Option<u64>,
    /// Connections the node's affinity rules sent here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_affinity: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_interval: Option<[f64; 2]>,
}

/// One balancer in the report.
#[derive(Debug, Clone, Serialize)]
pub struct BalancerReport {
    pub name: String,
    pub table: String,
    pub chain: String,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub line: u32,
    pub entries: Vec<Entry>,
    pub affinity: Option<Affinity>,
    pub endpoints: Vec<EndpointReport>,
    /// Probability that a new connection reaches no endpoint.
    pub unmatched: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unmatched_exact: Option<String>,
    /// Largest |relative_deviation| over the endpoints.
    pub max_relative_skew: f64,
    /// The exact probabilities plus `unmatched` sum to exactly 1 (summed exactly during the
    /// walk, also for endpoints whose exact form is not kept).
    pub exact_sum_is_one: bool,
    /// Where the intended split comes from: `uniform` or an expectations file.
    pub expected_split: String,
    /// The Monte-Carlo cross-check, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulation: Option<Simulation>,
    /// The test of the node's counters, when the input has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed: Option<ObservedTest>,
    /// Endpoints an expectations file names that the rules never choose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing_endpoints: Option<Vec<String>>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub lbaudit: &'static str,
    pub input: InputInfo,
    /// The Monte-Carlo run, when one was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulation: Option<SimulationInfo>,
    pub balancers: Vec<BalancerReport>,
    pub warnings: Vec<Warning>,
}

/// The exact form of `p` when it may be short enough to print (at most 3 bits a
/// character); the text itself must still be at most [`EXACT_MAX_CHARS`] long.
fn short_exact(p: &CompactProb) -> Option<&crate::prob::Prob> {
    p.exact()
        .filter(|p| p.bits() <= (EXACT_MAX_CHARS as u64) * 3)
}

fn exact_text(p: &CompactProb) -> Option<String> {
    let s = short_exact(p)?.to_string();
    (s.len() <= EXACT_MAX_CHARS).then_some(s)
}

impl BalancerReport {
    pub fn from_balancer(b: &Balancer, audit: Option<&Audit>) -> Self {
        let n = b.endpoints.len() as u64;
        let ideal = if n == 0 { 0.0 } else { 1.0 / n as f64 };
        let sim = audit.and_then(|a| a.simulation.as_ref());
        let obs = audit.and_then(|a| a.observed.as_ref());
        let endpoints = b
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let simulated = sim.and_then(|s| s.counts.get(i).copied());
                let observed = obs.and_then(|o| o.counts.get(i).copied());
                let share = |k: u64, of: u64| if of == 0 { 0.0 } else { k as f64 / of as f64 };
                let interval = |k: u64, of: u64| {
                    let (lo, hi) = crate::stats::wilson(k, of, 0.95);
                    [lo, hi]
                };
                EndpointReport {
                    expected: audit
                        .and_then(|a| a.expected.probs.get(i).copied())
                        .unwrap_or(ideal),
                    simulated,
                    simulated_share: sim.zip(simulated).map(|(s, k)| share(k, s.connections)),
                    simulated_interval: sim.zip(simulated).map(|(s, k)| interval(k, s.connections)),
                    observed,
                    observed_affinity: obs.and_then(|o| o.affinity.get(i).copied()),
                    observed_share: obs.zip(observed).map(|(o, k)| share(k, o.connections)),
                    observed_interval: obs.zip(observed).map(|(o, k)| interval(k, o.connections)),
                    endpoint: e.outcome.label(),
                    probability: e.prob.to_f64(),
                    ideal,
                    relative_deviation: e.prob.relative_deviation(n),
                    line: e.line,
                    chain: e.chain.clone(),
                    via: e.via.clone(),
                    paths: e.paths,
                    exact: exact_text(&e.prob),
                }
            })
            .collect();
        BalancerReport {
            name: b.name.clone(),
            table: b.table.clone(),
            chain: b.chain.clone(),
            kind: b.kind,
            selector: b.selector.clone(),
            namespace: b.namespace().map(str::to_string),
            line: b.line,
            entries: b.entries.clone(),
            affinity: b.affinity.clone(),
            endpoints,
            unmatched: b.unmatched.to_f64(),
            unmatched_exact: exact_text(&b.unmatched),
            max_relative_skew: b.max_relative_skew(),
            exact_sum_is_one: b.exact_total.is_one(),
            expected_split: audit
                .map_or_else(|| "uniform".to_string(), |a| a.expected.source.clone()),
            simulation: sim.cloned(),
            observed: obs.cloned(),
            missing_endpoints: audit
                .map(|a| a.expected.missing.clone())
                .filter(|m| !m.is_empty()),
        }
    }
}

impl Report {
    pub fn new(
        source: &str,
        rs: &Ruleset<'_>,
        balancers: &[Balancer],
        audits: Option<&[Audit]>,
        simulation: Option<SimulationInfo>,
        warnings: Vec<Warning>,
    ) -> Self {
        let mut report = Report::header(source, rs, balancers, simulation, warnings);
        report.balancers = balancers
            .iter()
            .enumerate()
            .map(|(i, b)| BalancerReport::from_balancer(b, audits.and_then(|a| a.get(i))))
            .collect();
        report
    }

    /// The report without its balancers (their warnings are in).
    pub(crate) fn header(
        source: &str,
        rs: &Ruleset<'_>,
        balancers: &[Balancer],
        simulation: Option<SimulationInfo>,
        mut warnings: Vec<Warning>,
    ) -> Self {
        for b in balancers {
            warnings.extend(b.warnings.iter().cloned());
        }
        warnings.sort();
        warnings.dedup();
        Report {
            lbaudit: env!("CARGO_PKG_VERSION"),
            input: InputInfo {
                source: source.to_string(),
                format: rs.format,
                family: rs.family,
                lines: rs.lines,
                rules: rs.rule_count(),
                tables: rs.tables.iter().map(|t| t.name.to_string()).collect(),
            },
            simulation,
            balancers: Vec::new(),
            warnings,
        }
    }

    /// Writes the pretty JSON (the same text as [`Report::to_json`]).
    pub fn write_json(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut *w, self).map_err(std::io::Error::other)?;
        w.write_all(b"\n")
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("report serialises");
        s.push('\n');
        s
    }

    pub fn to_csv(&self) -> String {
        let mut w = csv_writer();
        let _ = w.write_record(CSV_HEAD);
        for b in &self.balancers {
            csv_rows(&mut w, b);
        }
        String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::from(MARKDOWN_HEAD);
        for b in &self.balancers {
            markdown_rows(&mut s, b);
        }
        markdown_warnings(&mut s, &self.warnings);
        s
    }

    /// The human table. `color` adds ANSI colours (terminal only, never with NO_COLOR).
    pub fn to_table(&self, color: bool) -> String {
        let mut s = String::new();
        if self.balancers.is_empty() {
            table_none(&mut s, &self.input);
        }
        for b in &self.balancers {
            table_block(&mut s, b, color);
        }
        table_warnings(&mut s, &self.warnings, color);
        s
    }
}

/// The CSV's columns: a row per endpoint.
const CSV_HEAD: [&str; 10] = [
    "balancer",
    "table",
    "chain",
    "endpoint",
    "probability",
    "ideal",
    "relative_deviation",
    "line",
    "unmatched",
    "max_relative_skew",
];

/// A CSV writer to memory. (A writer keeps nothing from one record to the next, so
/// batches written apart and joined are the text one writer makes.)
fn csv_writer() -> csv::Writer<Vec<u8>> {
    csv::Writer::from_writer(Vec::new())
}

/// A balancer's CSV rows.
fn csv_rows(w: &mut csv::Writer<Vec<u8>>, b: &BalancerReport) {
    for e in &b.endpoints {
        let _ = w.write_record([
            b.name.as_str(),
            &b.table,
            &b.chain,
            &e.endpoint,
            &e.probability.to_string(),
            &e.ideal.to_string(),
            &e.relative_deviation.to_string(),
            &e.line.to_string(),
            &b.unmatched.to_string(),
            &b.max_relative_skew.to_string(),
        ]);
    }
}

/// The Markdown table's head.
const MARKDOWN_HEAD: &str = "| balancer | endpoint | probability | ideal | relative deviation |\n|---|---|---:|---:|---:|\n";

/// A balancer's Markdown rows: its endpoints, and the traffic that reaches none.
fn markdown_rows(s: &mut String, b: &BalancerReport) {
    for e in &b.endpoints {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            md_escape(&b.name),
            md_escape(&e.endpoint),
            fmt_prob(e.probability),
            fmt_prob(e.ideal),
            fmt_dev(e.relative_deviation)
        );
    }
    if b.unmatched > 0.0 {
        let _ = writeln!(
            s,
            "| {} | *unmatched* | {} | 0 | |",
            md_escape(&b.name),
            fmt_prob(b.unmatched)
        );
    }
}

/// The Markdown report's warnings, after its table.
fn markdown_warnings(s: &mut String, warnings: &[Warning]) {
    if !warnings.is_empty() {
        let _ = writeln!(s, "\n**Warnings**\n");
        for w in warnings {
            let _ = writeln!(s, "- line {}: {}", w.line, md_escape(&w.message));
        }
    }
}

/// `text` in the colour of the SGR `code` when `color`.
pub(crate) fn paint(color: bool, code: &str, text: &str) -> String {
    if color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// The human table's line for an input without balancers.
fn table_none(s: &mut String, input: &InputInfo) {
    let _ = writeln!(
        s,
        "no load balancers found ({} rules in {} table(s))",
        input.rules,
        input.tables.len()
    );
}

/// A balancer in the human table: its name, chain and entries, endpoints, and tests.
fn table_block(s: &mut String, b: &BalancerReport, color: bool) {
    let entries: Vec<&str> = b.entries.iter().map(|e| e.text.as_str()).collect();
    let _ = writeln!(s, "{}", paint(color, "1", &b.name));
    let mut meta = format!("  {} chain {}", b.table, b.chain);
    if !entries.is_empty() {
        let shown: Vec<&str> = entries.iter().take(4).copied().collect();
        let _ = write!(meta, ", entries {}", shown.join(", "));
        if entries.len() > 4 {
            let _ = write!(meta, " (+{} more)", entries.len() - 4);
        }
    }
    if let Some(a) = &b.affinity {
        let _ = write!(meta, ", session affinity {}", a.kind);
        if let Some(sec) = a.seconds {
            let _ = write!(meta, " {sec}s");
        }
    }
    let _ = writeln!(s, "{}", paint(color, "2", &meta));
    let width = b
        .endpoints
        .iter()
        .map(|e| e.endpoint.chars().count())
        .max()
        .unwrap_or(8)
        .max(8);
    let sim = b.simulation.is_some();
    let obs = b.observed.is_some();
    let mut head = format!(
        "  {:<width$}  {:>16}  {:>16}  {:>14}",
        "endpoint", "probability", "ideal", "deviation"
    );
    if sim {
        let _ = write!(head, "  {:>30}", "simulated share [95% CI]");
    }
    if obs {
        let _ = write!(head, "  {:>10}  {:>8}", "observed", "share");
    }
    let _ = writeln!(s, "{head}");
    for e in &b.endpoints {
        let dev = fmt_dev(e.relative_deviation);
        let dev = if e.relative_deviation.abs() >= 1e-3 {
            paint(color, "31", &format!("{dev:>14}"))
        } else {
            format!("{dev:>14}")
        };
        let mut row = format!(
            "  {:<width$}  {:>16}  {:>16}  {}",
            e.endpoint,
            fmt_prob(e.probability),
            fmt_prob(e.ideal),
            dev
        );
        if let (Some(share), Some([lo, hi])) = (e.simulated_share, e.simulated_interval) {
            let _ = write!(row, "  {:>30}", format!("{share:.5} [{lo:.5}, {hi:.5}]"));
        }
        if let (Some(n), Some(share)) = (e.observed, e.observed_share) {
            let _ = write!(row, "  {n:>10}  {share:>8.4}");
        }
        let _ = writeln!(s, "{row}");
    }
    if b.unmatched > 0.0 {
        let _ = writeln!(
            s,
            "  {}",
            paint(
                color,
                "31",
                &format!("{:<width$}  {:>16}", "(no endpoint)", fmt_prob(b.unmatched))
            )
        );
    }
    let _ = writeln!(
        s,
        "  n = {}, largest relative skew {}",
        b.endpoints.len(),
        fmt_dev(b.max_relative_skew)
    );
    if let Some(x) = &b.simulation {
        let _ = writeln!(
            s,
            "  simulated {} connections: fits the exact probabilities p = {:.3} (adjusted {:.3}); against the {} split p = {:.3} (adjusted {:.3}){}",
            x.connections,
            x.p_value,
            x.p_value_adjusted,
            x.expected.source,
            x.expected.p_value,
            x.expected.p_value_adjusted,
            if x.detectable_relative_skew.is_finite() {
                format!(
                    "; detects a skew of {:.2e} (w = {:.2e}) at 5%/80% power",
                    x.detectable_relative_skew, x.detectable_w
                )
            } else {
                String::new()
            }
        );
        if let (Some(k), Some(share)) = (x.clients, x.max_endpoint_share) {
            let _ = writeln!(
                s,
                "  with {k} clients one endpoint got {:.1}% of connections; {} of {} returning connections went back to the same endpoint",
                share * 100.0,
                x.same_endpoint_connections.unwrap_or(0),
                x.returning_connections.unwrap_or(0)
            );
        }
    }
    if let Some(o) = &b.observed {
        let line = format!(
            "  the node's counters: {} connections chosen by the split ({} by affinity); fit the exact probabilities p = {:.3e} (adjusted {:.3e})",
            o.connections, o.affinity_connections, o.p_value, o.p_value_adjusted
        );
        let _ = writeln!(
            s,
            "{}",
            if o.p_value_adjusted < 1e-3 {
                paint(color, "31", &line)
            } else {
                line
            }
        );
    }
    s.push('\n');
}

/// The human table's warnings, at its end.
fn table_warnings(s: &mut String, warnings: &[Warning], color: bool) {
    if !warnings.is_empty() {
        let _ = writeln!(s, "{}", paint(color, "33", "warnings:"));
        for w in warnings {
            if w.line > 0 {
                let _ = writeln!(s, "  line {}: {}", w.line, w.message);
            } else {
                let _ = writeln!(s, "  {}", w.message);
            }
        }
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// A probability with 12 significant digits (enough to show 5-decimal-era skews).
pub fn fmt_prob(p: f64) -> String {
    if p == 0.0 || p == 1.0 {
        return format!("{p}");
    }
    format!("{p:.12}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string()
}

/// A relative deviation: `0`, or with 6 significant digits in scientific notation.
pub fn fmt_dev(d: f64) -> String {
    if d == 0.0 {
        "0".to_string()
    } else {
        format!("{d:+.5e}")
    }
}

/// Analyses the candidates and writes the report's JSON a window of `window`
/// balancers at a time (see [`JsonStream`]): the same text as [`Report::to_json`] of
/// the report built from all of them, with `opts.balancers` set to their number.
///
/// p-values are corrected across all balancers, so when there are any (a simulation,
/// or counters to test) the report is made in the two passes of [`audited_windows`]
/// (its peak is that of the run without p-values, 1.9x the input, instead of 3.2x for
/// every balancer and its audit held). A report without p-values is analysed, audited
/// and printed in one pass, each batch by one task from analysis to text.
#[allow(clippy::too_many_arguments)]
pub fn write_json_windowed(
    w: &mut dyn std::io::Write,
    source: &str,
    rs: &Ruleset<'_>,
    graph: &Graph<'_, '_>,
    candidates: &[Candidate],
    opts: &AuditOptions,
    warnings: Vec<Warning>,
    window: usize,
) -> std::io::Result<()> {
    let opts = AuditOptions {
        balancers: Some(candidates.len()),
        ..opts.clone()
    };
    let window = window.max(1);
    if corrects_across(rs, &opts) {
        let out = audited_windows(
            graph,
            candidates,
            &opts,
            window,
            "writing",
            |info| JsonStream::begin(w, source, rs, info, warnings),
            |out, batches| {
                out.write_batches(batches, |(some, audits), buffer| {
                    render_batch(buffer, &some, Some(&audits))
                })
            },
        )?;
        return out.finish();
    }
    // Nothing ties balancers together: analyse, audit and print a window at a time.
    let mut out = JsonStream::begin(w, source, rs, None, warnings)?;
    for part in candidates.chunks(window) {
        out.analyse_and_write(graph, part, &opts)?;
    }
    out.finish()
}

/// Whether the run's p-values are corrected across its balancers (with `opts`, on the
/// input `rs`): when there is a simulation, or counters to test.
pub fn corrects_across(rs: &Ruleset<'_>, opts: &AuditOptions) -> bool {
    let counters = || {
        rs.tables
            .iter()
            .flat_map(|t| &t.chains)
            .any(|c| c.rules.iter().any(|r| r.counted()))
    };
    opts.connections != Some(0) || (opts.observed && counters())
}

/// How many balancers the commands that print as they go ([`write_json_windowed`],
/// [`write_text_windowed`], `lbaudit check`, the plot overview) analyse at a time:
/// 256 per thread, so that each thread has batches to take while memory stays bounded.
pub fn default_window() -> usize {
    256 * rayon::current_num_threads().max(1)
}

/// The candidates analysed and audited `window` at a time, each window handed in order
/// to `each` as batches of up to [`BATCH`] balancers with their audits; `begin` makes
/// its state from the run's simulation info first. The run's size (`opts.balancers`,
/// set here) is the number of candidates.
///
/// When p-values are corrected across balancers ([`corrects_across`]), in two passes:
/// the first analyses and audits a window at a time and keeps only the audits,
/// compactly ([`audit::CompactAudits`]); once they are corrected, the second analyses
/// each window again and hands it over with its audits. (Analysing twice costs about
/// a seventh more instructions on the 30k-service dump, and holds about 70 bytes a
/// balancer instead of every balancer and its audit.) Otherwise in one pass, with no
/// simulation info. `second` names the second pass in the progress line.
#[allow(clippy::too_many_arguments)]
pub fn audited_windows<S>(
    graph: &Graph<'_, '_>,
    candidates: &[Candidate],
    opts: &AuditOptions,
    window: usize,
    second: &str,
    begin: impl FnOnce(Option<SimulationInfo>) -> std::io::Result<S>,
    mut each: impl FnMut(&mut S, Vec<(Vec<Balancer>, Vec<Audit>)>) -> std::io::Result<()>,
) -> std::io::Result<S> {
    use rayon::prelude::*;
    let window = window.max(1);
    let n = candidates.len();
    let opts = &AuditOptions {
        balancers: Some(n),
        ..opts.clone()
    };
    if !corrects_across(graph.rs, opts) {
        let mut state = begin(None)?;
        let done = AtomicUsize::new(0);
        for part in candidates.chunks(window) {
            let batches = part
                .par_chunks(BATCH)
                .map(|some| {
                    let balancers = crate::balance::analyse_all(graph, some);
                    let audits = audit::audit_window(graph, &balancers, opts, &done);
                    (balancers, audits)
                })
                .collect();
            each(&mut state, batches)?;
        }
        return Ok(state);
    }
    audit::with_progress_in_passes(opts, n, &["simulating", second], |done| {
        // Pass 1: the audits, a window of balancers at a time (a balancer's audit does
        // not depend on its window).
        let mut kept = audit::CompactAudits::new(n);
        for part in candidates.chunks(window) {
            // Each batch analysed and audited by one task.
            let audits: Vec<Vec<Audit>> = part
                .par_chunks(BATCH)
                .map(|some| {
                    // (Only what the audits read: handed over, they are analysed again.)
                    let balancers =
                        crate::balance::analyse_all_to(graph, some, crate::balance::Depth::Audit);
                    audit::audit_window(graph, &balancers, opts, done)
                })
                .collect();
            for a in audits.iter().flatten() {
                kept.push(a);
            }
            kept.seal();
        }
        let info = kept.finish(opts);
        // Pass 2: the same balancers again, with their audits.
        done.store(n, Ordering::Relaxed);
        let mut audits = kept.reader();
        let mut state = begin(info)?;
        for part in candidates.chunks(window) {
            let balancers: Vec<Vec<Balancer>> = part
                .par_chunks(BATCH)
                .map(|some| crate::balance::analyse_all(graph, some))
                .collect();
            // Their audits read back in order.
            let batches = balancers
                .into_iter()
                .map(|some| {
                    let some_audits = some.iter().map(|b| audits.next(b, opts)).collect();
                    (some, some_audits)
                })
                .collect();
            each(&mut state, batches)?;
            done.fetch_add(part.len(), Ordering::Relaxed);
        }
        debug_assert!(audits.is_done(), "as many balancers as in pass 1");
        Ok(state)
    })
}

/// The report's formats other than JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFormat {
    /// The human table, in colour or not.
    Table {
        color: bool,
    },
    Csv,
    Markdown,
}

/// Analyses the candidates and writes the report in `format` a window of `window`
/// balancers at a time ([`audited_windows`]; each batch converted and printed by one
/// task): the same text as [`Report::to_table`], [`Report::to_csv`] or
/// [`Report::to_markdown`] of the report built from all of them.
#[allow(clippy::too_many_arguments)]
pub fn write_text_windowed(
    w: &mut dyn std::io::Write,
    format: TextFormat,
    source: &str,
    rs: &Ruleset<'_>,
    graph: &Graph<'_, '_>,
    candidates: &[Candidate],
    opts: &AuditOptions,
    mut warnings: Vec<Warning>,
    window: usize,
) -> std::io::Result<()> {
    use rayon::prelude::*;
    match format {
        TextFormat::Table { .. } => {}
        TextFormat::Csv => {
            let mut csv = csv_writer();
            let _ = csv.write_record(CSV_HEAD);
            w.write_all(&csv.into_inner().unwrap_or_default())?;
        }
        TextFormat::Markdown => w.write_all(MARKDOWN_HEAD.as_bytes())?,
    }
    let mut written = 0;
    audited_windows(
        graph,
        candidates,
        opts,
        window,
        "writing",
        |_| Ok(()),
        |(), batches| {
            let texts: Vec<(Vec<u8>, usize, Vec<Warning>)> = batches
                .into_par_iter()
                .map(|(balancers, audits)| {
                    let mut text = String::new();
                    let mut csv = csv_writer();
                    for (b, a) in balancers.iter().zip(&audits) {
                        let r = BalancerReport::from_balancer(b, Some(a));
                        match format {
                            TextFormat::Table { color } => table_block(&mut text, &r, color),
                            TextFormat::Csv => csv_rows(&mut csv, &r),
                            TextFormat::Markdown => markdown_rows(&mut text, &r),
                        }
                    }
                    let mut bytes = text.into_bytes();
                    bytes.extend_from_slice(&csv.into_inner().unwrap_or_default());
                    let some = balancers.iter().flat_map(|b| b.warnings.iter().cloned());
                    (bytes, balancers.len(), some.collect())
                })
                .collect();
            for (bytes, count, some) in texts {
                w.write_all(&bytes)?;
                written += count;
                warnings.extend(some);
            }
            Ok(())
        },
    )?;
    // The warnings, sorted, each once (as the built report has them).
    let head = Report::header(source, rs, &[], None, warnings);
    let mut s = String::new();
    match format {
        TextFormat::Table { color } => {
            if written == 0 {
                table_none(&mut s, &head.input);
            }
            table_warnings(&mut s, &head.warnings, color);
        }
        TextFormat::Csv => {}
        TextFormat::Markdown => markdown_warnings(&mut s, &head.warnings),
    }
    w.write_all(s.as_bytes())
}

/// Balancers a thread writes at a time: about 70 kB of JSON with the cross-check.
const BATCH: usize = 32;

/// A report's JSON written while its balancers are analysed: the head first, then the
/// balancers a window at a time (each converted and printed in batches on several
/// threads, written in order), then the warnings, which come last in the report. A
/// report of tens of thousands of balancers never exists in memory as a whole; the text
/// is the same as [`Report::to_json`] of the built report.
pub struct JsonStream<'w> {
    w: &'w mut dyn std::io::Write,
    /// The report without balancers, and where its `balancers` array opens.
    head: Report,
    open: usize,
    written: usize,
    /// The batches' buffers, reused.
    buffers: Vec<Vec<u8>>,
}

impl<'w> JsonStream<'w> {
    /// Writes everything up to the first balancer.
    pub fn begin(
        w: &'w mut dyn std::io::Write,
        source: &str,
        rs: &Ruleset<'_>,
        simulation: Option<SimulationInfo>,
        warnings: Vec<Warning>,
    ) -> std::io::Result<Self> {
        let head = Report::header(source, rs, &[], simulation, warnings);
        let text = head.to_json();
        let open = Self::opening(&text)?;
        w.write_all(&text.as_bytes()[..open])?;
        Ok(JsonStream {
            w,
            head,
            open,
            written: 0,
            buffers: Vec::new(),
        })
    }

    /// Where the text after `"balancers": [` starts. Keys are printed in order and a
    /// string value cannot hold an unescaped quote, so the first such line is the key.
    fn opening(text: &str) -> std::io::Result<usize> {
        const EMPTY: &str = "\n  \"balancers\": []";
        text.find(EMPTY)
            .map(|at| at + EMPTY.len() - 1)
            .ok_or_else(|| std::io::Error::other("report JSON without balancers"))
    }

    /// Balancers written at a time (in batches of 32 balancers, four a thread).
    pub fn chunk() -> usize {
        BATCH * 4 * rayon::current_num_threads().max(1)
    }

    /// Writes the next balancers (with their audits, index for index).
    pub fn balancers(
        &mut self,
        balancers: &[Balancer],
        audits: Option<&[Audit]>,
    ) -> std::io::Result<()> {
        // A window at a time, so that the batches' buffers stay few.
        let window = Self::chunk();
        for (k, part) in balancers.chunks(window).enumerate() {
            let batches: Vec<(usize, &[Balancer])> = part
                .chunks(BATCH)
                .enumerate()
                .map(|(j, some)| (k * window + j * BATCH, some))
                .collect();
            self.write_batches(batches, |(from, some), buffer| {
                let audits = audits.map(|a| a.get(from..).unwrap_or_default());
                render_batch(buffer, some, audits)
            })?;
        }
        Ok(())
    }

    /// The balancers of `candidates`, each batch analysed, audited on its own (nothing
    /// ties balancers together: no p-values corrected across them), converted and
    /// dropped by one task, and written in order: what [`Self::balancers`] writes for
    /// the analysed window, without waiting for the slowest balancer of the window
    /// between the three steps.
    pub fn analyse_and_write(
        &mut self,
        graph: &Graph<'_, '_>,
        candidates: &[Candidate],
        opts: &crate::audit::AuditOptions,
    ) -> std::io::Result<()> {
        let done = AtomicUsize::new(0);
        let batches: Vec<&[Candidate]> = candidates.chunks(BATCH).collect();
        self.write_batches(batches, |part, buffer| {
            let balancers = crate::balance::analyse_all(graph, part);
            let audits = audit::audit_window(graph, &balancers, opts, &done);
            render_batch(buffer, &balancers, Some(&audits))
        })
    }

    /// Writes what `render` puts in a buffer for each of `batches` (a batch: up to
    /// [`BATCH`] balancers; it returns the text's length, how many and their warnings),
    /// each batch made and
    /// converted by one task on several threads into a buffer kept from one call to the
    /// next (the same memory again for each window, not new buffers freed by another
    /// thread than theirs), then written in order.
    fn write_batches<T: Send>(
        &mut self,
        batches: Vec<T>,
        render: impl Fn(T, &mut Vec<u8>) -> Rendered + Sync,
    ) -> std::io::Result<()> {
        use rayon::prelude::*;
        let n = batches.len();
        if self.buffers.len() < n {
            self.buffers.resize_with(n, Vec::new);
        }
        let written: Vec<Rendered> = self.buffers[..n]
            .par_iter_mut()
            .zip(batches)
            .map(|(buffer, batch)| render(batch, buffer))
            .collect();
        for (buffer, done) in self.buffers.iter().zip(written) {
            let Rendered {
                len,
                count,
                warnings,
            } = done;
            let text = buffer.get(..len).unwrap_or_default();
            // Each batch is written as if after another balancer: the comma before the
            // report's first balancer is left out here.
            let text = match text.strip_prefix(b",") {
                Some(rest) if self.written == 0 => rest,
                _ => text,
            };
            self.w.write_all(text)?;
            self.written += count;
            self.head.warnings.extend(warnings);
        }
        Ok(())
    }

    /// Closes the balancers and writes the rest: the warnings, sorted, each once.
    pub fn finish(mut self) -> std::io::Result<()> {
        if self.written > 0 {
            self.w.write_all(b"\n  ")?;
        }
        self.head.warnings.sort();
        self.head.warnings.dedup();
        let text = self.head.to_json();
        let open = Self::opening(&text)?;
        debug_assert_eq!(open, self.open);
        self.w.write_all(&text.as_bytes()[open..])
    }
}

/// Starts the member `$key` of the object `$o` (a [`json::Obj`]): its name quoted, a
/// colon and a space, written with one copy of known size.
macro_rules! key {
    ($o:expr, $out:expr, $key:literal) => {
        $o.key($out, concat!("\"", $key, "\": ").as_bytes())
    };
}

/// The fields a simulated and a counter test share: statistic, degrees of freedom,
/// p-value (raw and adjusted), method and the Monte-Carlo replicates.
#[inline(always)]
fn test_fields(
    o: &mut json::Obj,
    out: &mut json::Out,
    (statistic, df): (f64, u32),
    (p_value, p_value_adjusted): (f64, f64),
    method: &str,
    replicates: Option<u64>,
) {
    key!(o, out, "statistic");
    json::f64(out, statistic);
    key!(o, out, "df");
    json::u64(out, df.into());
    key!(o, out, "p_value");
    json::f64(out, p_value);
    key!(o, out, "p_value_adjusted");
    json::f64(out, p_value_adjusted);
    key!(o, out, "method");
    json::str(out, method);
    if let Some(r) = replicates {
        key!(o, out, "replicates");
        json::u64(out, r);
    }
}

/// The JSON of consecutive balancers as elements of the report's `balancers` array,
/// none of them the first: each after its separator (`,` and a new line),
/// pretty-printed at its depth in the document. Returns how many, and their warnings.
#[inline(never)]
fn render_batch(
    buffer: &mut Vec<u8>,
    balancers: &[Balancer],
    audits: Option<&[Audit]>,
) -> Rendered {
    // About 0.5 kB a balancer and 0.6 kB an endpoint (the 30k dump: 2.2 kB a balancer).
    let size: usize = balancers
        .iter()
        .map(|b| 512 + 640 * b.endpoints.len())
        .sum();
    let mut out = json::Out::new(std::mem::take(buffer), 0);
    out.ensure(size);
    KEPT_TEXTS.with_borrow_mut(|texts| {
        for (i, b) in balancers.iter().enumerate() {
            out.put(b",\n    ");
            write_balancer(&mut out, 2, b, audits.and_then(|a| a.get(i)), texts);
        }
    });
    let len;
    (*buffer, len) = out.finish();
    let warnings = balancers
        .iter()
        .flat_map(|b| b.warnings.iter().cloned())
        .collect();
    Rendered {
        len,
        count: balancers.len(),
        warnings,
    }
}

/// The texts of the numbers a thread wrote last: floats (see [`json::FloatTexts`]) and
/// exact fractions (see [`crate::prob::DyadicTexts`]).
#[derive(Default)]
struct KeptTexts {
    floats: json::FloatTexts,
    fractions: crate::prob::DyadicTexts,
    values: EndpointValues,
}

/// An endpoint's probability and relative deviation (see [`CompactProb::to_f64`] and
/// [`CompactProb::relative_deviation`]) as computed last for the same exact value and
/// endpoint count: a table of 1,024 slots by value and count, each in the slot they hash
/// to, replacing the one there (balancers with as many endpoints have the same
/// probabilities).
struct EndpointValues {
    slots: Box<[EndpointSlot]>,
}

/// `num / 2^shift` among `n` endpoints: its probability and relative deviation.
#[derive(Clone, Copy)]
struct EndpointSlot {
    num: u128,
    shift: u64,
    n: u64,
    probability: f64,
    deviation: f64,
}

impl Default for EndpointValues {
    fn default() -> Self {
        let empty = EndpointSlot {
            num: 0,
            // Never a key's.
            shift: u64::MAX,
            n: 0,
            probability: 0.0,
            deviation: 0.0,
        };
        EndpointValues {
            slots: vec![empty; 1 << crate::prob::KEPT_SLOTS_LOG2].into_boxed_slice(),
        }
    }
}

impl EndpointValues {
    /// `(p.to_f64(), p.relative_deviation(n))`.
    #[inline(always)]
    fn get(&mut self, p: &CompactProb, n: u64) -> (f64, f64) {
        let Some((num, shift)) = p.dyadic_key() else {
            return (p.to_f64(), p.relative_deviation(n));
        };
        let at = crate::prob::kept_slot(crate::prob::dyadic_hash(num, shift) ^ n.rotate_left(40));
        match self.slots.get_mut(at) {
            Some(s) if s.num == num && s.shift == shift && s.n == n => (s.probability, s.deviation),
            slot => {
                let (probability, deviation) = (p.to_f64(), p.relative_deviation(n));
                if let Some(s) = slot {
                    *s = EndpointSlot {
                        num,
                        shift,
                        n,
                        probability,
                        deviation,
                    };
                }
                (probability, deviation)
            }
        }
    }
}

thread_local! {
    static KEPT_TEXTS: std::cell::RefCell<KeptTexts> = std::cell::RefCell::default();
}

/// What [`render_batch`] wrote: the length of the text at the start of its buffer (the
/// bytes after it are left over from before), how many balancers, and their warnings.
struct Rendered {
    len: usize,
    count: usize,
    warnings: Vec<Warning>,
}

/// Appends the JSON of [`BalancerReport::from_balancer`]`(b, audit)` to `out`: the bytes
/// `serde_json`'s pretty printer writes for it as a value inside `depth` open objects
/// and arrays (the same keys in the same order, the same optional keys left out, the
/// same numbers and escapes), without building the report first.
///
/// Structs of other modules are taken apart field by field without `..`, so a field added
/// to one of them stops the build here instead of going missing from the JSON.
#[cfg(test)]
pub(crate) fn write_balancer_json(
    out: &mut Vec<u8>,
    depth: usize,
    b: &Balancer,
    audit: Option<&Audit>,
) {
    let start = out.len();
    let mut o = json::Out::new(std::mem::take(out), start);
    write_balancer(&mut o, depth, b, audit, &mut KeptTexts::default());
    let len;
    (*out, len) = o.finish();
    out.truncate(len);
}

/// [`write_balancer_json`] at the cursor of `out`.
fn write_balancer(
    dest: &mut json::Out,
    depth: usize,
    b: &Balancer,
    audit: Option<&Audit>,
    kept: &mut KeptTexts,
) {
    let KeptTexts {
        floats,
        fractions,
        values,
    } = kept;
    // A local cursor, every use of it inlined (others are handed room or the cursor by
    // value): its fields stay in registers.
    let mut local = std::mem::take(dest);
    let out = &mut local;
    let n = b.endpoints.len() as u64;
    let ideal = if n == 0 { 0.0 } else { 1.0 / n as f64 };
    // The same for every endpoint (and usually their `expected`): formatted once.
    let ideal_text = json::F64Text::new(ideal);
    let sim = audit.and_then(|a| a.simulation.as_ref());
    let obs = audit.and_then(|a| a.observed.as_ref());
    let mut o = json::Obj::open(out, depth);
    key!(o, out, "name");
    json::str(out, &b.name);
    key!(o, out, "table");
    json::str(out, &b.table);
    key!(o, out, "chain");
    json::str(out, &b.chain);
    key!(o, out, "kind");
    // Quoted names that need no escape.
    out.put(match b.kind {
        Kind::KubeProxy => b"\"kube-proxy\"",
        Kind::Generic => b"\"generic\"",
    });
    if let Some(s) = &b.selector {
        key!(o, out, "selector");
        json::str(out, s);
    }
    if let Some(ns) = b.namespace() {
        key!(o, out, "namespace");
        json::str(out, ns);
    }
    key!(o, out, "line");
    json::u64(out, b.line.into());
    key!(o, out, "entries");
    let mut a = json::Arr::open(out, o.depth());
    for e in &b.entries {
        a.item(out);
        write_entry_json(out, a.depth(), e);
    }
    a.close(out);
    key!(o, out, "affinity");
    match &b.affinity {
        None => out.put(b"null"),
        Some(Affinity {
            kind,
            seconds,
            lines,
        }) => {
            let mut x = json::Obj::open(out, o.depth());
            key!(x, out, "kind");
            json::str(out, kind);
            key!(x, out, "seconds");
            json::opt_u64(out, *seconds);
            key!(x, out, "lines");
            json::u32s(out, x.depth(), lines);
            x.close(out);
        }
    }
    key!(o, out, "endpoints");
    // The largest |relative_deviation| as `Balancer::max_relative_skew` folds it, from
    // the deviations written (each an exact computation: once is enough).
    let mut skew = 0.0;
    // Its text: that of the deviation it comes from, without the sign.
    let mut skew_text = json::F64Text::new(skew);
    let mut a = json::Arr::open(out, o.depth());
    for (i, e) in b.endpoints.iter().enumerate() {
        a.item(out);
        let mut x = json::Obj::open(out, a.depth());
        key!(x, out, "endpoint");
        match &e.outcome {
            // What `Outcome::label` returns for these, without the copy.
            Outcome::Dnat(d) | Outcome::Verdict(d) => json::str(out, d),
            other => json::str(out, &other.label()),
        }
        let (probability, deviation) = values.get(&e.prob, n);
        key!(x, out, "probability");
        floats.write(out, probability);
        key!(x, out, "ideal");
        ideal_text.write(out);
        key!(x, out, "relative_deviation");
        let at = out.pos();
        floats.write(out, deviation);
        // `f64::max(skew, |deviation|)` (a NaN is passed over), with its text.
        if deviation.abs() > skew {
            skew = deviation.abs();
            skew_text = json::F64Text::magnitude(out.written_since(at));
        }
        key!(x, out, "line");
        json::u64(out, e.line.into());
        key!(x, out, "chain");
        json::str(out, &e.chain);
        key!(x, out, "via");
        json::u32s(out, x.depth(), &e.via);
        key!(x, out, "paths");
        json::u64(out, e.paths.into());
        write_exact_json(out, &mut x, b"\"exact\": ", &e.prob, fractions);
        key!(x, out, "expected");
        match audit.and_then(|a| a.expected.probs.get(i).copied()) {
            Some(p) if p.to_bits() != ideal.to_bits() => json::f64(out, p),
            _ => ideal_text.write(out),
        }
        let simulated = sim.and_then(|s| s.counts.get(i).copied());
        if let Some(k) = simulated {
            key!(x, out, "simulated");
            json::u64(out, k);
        }
        if let Some((s, k)) = sim.zip(simulated) {
            key!(x, out, "simulated_share");
            json::f64(out, share(k, s.connections));
            key!(x, out, "simulated_interval");
            json::f64_pair(out, x.depth(), crate::stats::wilson(k, s.connections, 0.95));
        }
        let observed = obs.and_then(|o| o.counts.get(i).copied());
        if let Some(k) = observed {
            key!(x, out, "observed");
            json::u64(out, k);
        }
        if let Some(k) = obs.and_then(|o| o.affinity.get(i).copied()) {
            key!(x, out, "observed_affinity");
            json::u64(out, k);
        }
        if let Some((o, k)) = obs.zip(observed) {
            key!(x, out, "observed_share");
            json::f64(out, share(k, o.connections));
            key!(x, out, "observed_interval");
            json::f64_pair(out, x.depth(), crate::stats::wilson(k, o.connections, 0.95));
        }
        x.close(out);
    }
    a.close(out);
    key!(o, out, "unmatched");
    match b.unmatched.to_f64() {
        // Most balancers: the text of 0 without a conversion (not -0, which has a sign).
        u if u.to_bits() == 0 => out.put(json::F64Text::ZERO),
        u => json::f64(out, u),
    }
    write_exact_json(
        out,
        &mut o,
        b"\"unmatched_exact\": ",
        &b.unmatched,
        fractions,
    );
    key!(o, out, "max_relative_skew");
    skew_text.write(out);
    key!(o, out, "exact_sum_is_one");
    out.put(if b.exact_total.is_one() {
        b"true"
    } else {
        b"false"
    });
    key!(o, out, "expected_split");
    json::str(out, audit.map_or("uniform", |a| &a.expected.source));
    if let Some(s) = sim {
        key!(o, out, "simulation");
        *out = write_simulation_json(std::mem::take(out), o.depth(), s);
    }
    if let Some(t) = obs {
        key!(o, out, "observed");
        *out = write_observed_json(std::mem::take(out), o.depth(), t);
    }
    if let Some(missing) = audit.map(|a| &a.expected.missing).filter(|m| !m.is_empty()) {
        key!(o, out, "missing_endpoints");
        let mut a = json::Arr::open(out, o.depth());
        for m in missing {
            a.item(out);
            json::str(out, m);
        }
        a.close(out);
    }
    o.close(out);
    *dest = local;
}

/// A [`Simulation`] as serde writes it, as a value inside `depth` open objects and
/// arrays (with the default cross-check every balancer has one).
#[inline(never)]
fn write_simulation_json(mut local: json::Out, depth: usize, s: &Simulation) -> json::Out {
    let out = &mut local;
    let Simulation {
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
        counts: _,
    } = s;
    let mut o = json::Obj::open(out, depth);
    key!(o, out, "connections");
    json::u64(out, *connections);
    test_fields(
        &mut o,
        out,
        (*statistic, *df),
        (*p_value, *p_value_adjusted),
        method,
        *replicates,
    );
    key!(o, out, "g_test");
    {
        let Test {
            statistic,
            df,
            p_value,
            p_value_adjusted,
            method,
        } = g_test;
        let mut x = json::Obj::open(out, o.depth());
        key!(x, out, "statistic");
        json::f64(out, *statistic);
        key!(x, out, "df");
        json::u64(out, (*df).into());
        key!(x, out, "p_value");
        json::f64(out, *p_value);
        key!(x, out, "p_value_adjusted");
        json::f64(out, *p_value_adjusted);
        key!(x, out, "method");
        json::str(out, method);
        x.close(out);
    }
    key!(o, out, "expected");
    {
        let ExpectedTest {
            source,
            statistic,
            df,
            p_value,
            p_value_adjusted,
            method,
            replicates,
        } = expected;
        let mut x = json::Obj::open(out, o.depth());
        key!(x, out, "source");
        json::str(out, source);
        key!(x, out, "statistic");
        json::f64(out, *statistic);
        key!(x, out, "df");
        json::u64(out, (*df).into());
        key!(x, out, "p_value");
        json::f64(out, *p_value);
        key!(x, out, "p_value_adjusted");
        json::f64(out, *p_value_adjusted);
        key!(x, out, "method");
        json::str(out, method);
        if let Some(r) = replicates {
            key!(x, out, "replicates");
            json::u64(out, *r);
        }
        x.close(out);
    }
    key!(o, out, "unmatched");
    json::u64(out, *unmatched);
    key!(o, out, "other");
    json::u64(out, *other);
    key!(o, out, "rule_evaluations");
    json::u64(out, *rule_evaluations);
    key!(o, out, "detectable_w");
    json::f64(out, *detectable_w);
    key!(o, out, "detectable_relative_skew");
    json::f64(out, *detectable_relative_skew);
    if let Some(c) = clients {
        key!(o, out, "clients");
        json::u64(out, *c);
    }
    if let Some(m) = max_endpoint_share {
        key!(o, out, "max_endpoint_share");
        json::f64(out, *m);
    }
    if let Some(r) = returning_connections {
        key!(o, out, "returning_connections");
        json::u64(out, *r);
    }
    if let Some(c) = same_endpoint_connections {
        key!(o, out, "same_endpoint_connections");
        json::u64(out, *c);
    }
    o.close(out);
    local
}

/// An [`ObservedTest`] as serde writes it, as a value inside `depth` open objects and
/// arrays.
#[inline(never)]
fn write_observed_json(mut local: json::Out, depth: usize, t: &ObservedTest) -> json::Out {
    let out = &mut local;
    let ObservedTest {
        connections,
        affinity_connections,
        statistic,
        df,
        p_value,
        p_value_adjusted,
        method,
        replicates,
        counts: _,
        affinity: _,
    } = t;
    let mut o = json::Obj::open(out, depth);
    key!(o, out, "connections");
    json::u64(out, *connections);
    key!(o, out, "affinity_connections");
    json::u64(out, *affinity_connections);
    test_fields(
        &mut o,
        out,
        (*statistic, *df),
        (*p_value, *p_value_adjusted),
        method,
        *replicates,
    );
    o.close(out);
    local
}

/// `k` of `of` as a share (0 of none), as the report gives it.
fn share(k: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { k as f64 / of as f64 }
}

#[inline(always)]
fn write_entry_json(out: &mut json::Out, depth: usize, e: &Entry) {
    let Entry {
        kind,
        text,
        address,
        port,
        protocol,
        chain,
        line,
        comment,
    } = e;
    let mut o = json::Obj::open(out, depth);
    key!(o, out, "kind");
    json::str(out, kind);
    key!(o, out, "text");
    json::str(out, text);
    key!(o, out, "address");
    json::opt_str(out, address.as_deref());
    key!(o, out, "port");
    json::opt_u64(out, port.map(u64::from));
    key!(o, out, "protocol");
    json::opt_str(out, protocol.as_deref());
    key!(o, out, "chain");
    json::str(out, chain);
    key!(o, out, "line");
    json::u64(out, (*line).into());
    if let Some(c) = comment {
        key!(o, out, "comment");
        json::str(out, c);
    }
    o.close(out);
}

/// The member `key` (quoted, with its colon) with `exact_text(p)`, or nothing when that
/// is `None` (an approximation, or a fraction too long to print). Inlined, so that the
/// key is copied as a literal.
#[inline(always)]
fn write_exact_json(
    out: &mut json::Out,
    o: &mut json::Obj,
    key: &[u8],
    p: &CompactProb,
    kept: &mut crate::prob::DyadicTexts,
) {
    let Some(p) = short_exact(p) else { return };
    let (mark, first) = (out.pos(), o.is_first());
    o.key(out, key);
    out.put(b"\"");
    let at = out.pos();
    // Digits and a slash: nothing to escape.
    match p.write_text_dyadic_kept(out.room(crate::prob::DYADIC_TEXT_ROOM), kept) {
        Some(len) => out.advance(len),
        None => {
            let mut text = Vec::new();
            p.write_text(&mut text);
            out.put(&text);
        }
    }
    // `exact_text`'s second limit. (With at most 1,200 bits a fraction has at most 364
    // characters: kept as the definition, never taken back today.)
    if out.pos() - at <= EXACT_MAX_CHARS {
        out.put(b"\"");
    } else {
        out.set_pos(mark);
        o.reset_first(first);
    }
}

/// Writing JSON the way `serde_json`'s `PrettyFormatter` (two-space indentation) does,
/// straight into a byte vector.
mod json {
    use serde_json::ser::{CompactFormatter, Formatter};
    use std::io;

    /// A text being written into a buffer at a cursor: the bytes before `pos` are the
    /// text; the buffer's whole length is initialized room (bytes left from earlier
    /// texts, overwritten), grown (rarely) when a piece does not fit. Each piece is a
    /// check of the room and a copy, without a vector's length kept in memory; the
    /// buffer and its room are kept across batches, so it is filled once.
    #[derive(Default)]
    pub struct Out {
        buf: Vec<u8>,
        pos: usize,
    }

    impl Out {
        /// Writing into `buf` from `pos` (at most its length).
        pub fn new(buf: Vec<u8>, pos: usize) -> Self {
            let pos = pos.min(buf.len());
            Out { buf, pos }
        }

        /// The buffer and the length of the text at its start.
        pub fn finish(self) -> (Vec<u8>, usize) {
            (self.buf, self.pos)
        }

        /// The length of the text.
        #[inline(always)]
        pub fn pos(&self) -> usize {
            self.pos
        }

        /// The text written since it was `at` long.
        pub fn written_since(&self, at: usize) -> &[u8] {
            &self.buf[at.min(self.pos)..self.pos]
        }

        /// Takes the text back to its first `pos` bytes.
        pub fn set_pos(&mut self, pos: usize) {
            self.pos = pos.min(self.pos);
        }

        /// Makes sure `n` bytes of room follow the text.
        #[inline(always)]
        pub fn ensure(&mut self, n: usize) {
            if n > self.buf.len() - self.pos {
                self.buf = grown(std::mem::take(&mut self.buf), self.pos + n);
            }
        }

        /// The `n` bytes of room after the text (to be written, then [`Out::advance`]d).
        #[inline(always)]
        pub fn room(&mut self, n: usize) -> &mut [u8] {
            self.ensure(n);
            &mut self.buf[self.pos..self.pos + n]
        }

        /// [`Out::room`] of a known size.
        #[inline(always)]
        pub fn room_array<const N: usize>(&mut self) -> &mut [u8; N] {
            self.ensure(N);
            let at = self.pos;
            (&mut self.buf[at..at + N]).try_into().expect("N bytes")
        }

        /// Adds the next `n` bytes of room (written through [`Out::room`]) to the text.
        #[inline(always)]
        pub fn advance(&mut self, n: usize) {
            self.pos = (self.pos + n).min(self.buf.len());
        }

        /// Appends `bytes`.
        #[inline(always)]
        pub fn put(&mut self, bytes: &[u8]) {
            let n = bytes.len();
            self.room(n).copy_from_slice(bytes);
            self.pos += n;
        }

        /// Appends the first `len` bytes of `bytes` (all copied, a copy of known size).
        #[inline(always)]
        pub fn put_prefix<const N: usize>(&mut self, bytes: &[u8; N], len: usize) {
            *self.room_array::<N>() = *bytes;
            self.advance(len.min(N));
        }
    }

    /// `buf` grown to at least `len` bytes (and at least twice as long), the new bytes 0.
    /// (By value: the cursor's address is never taken, so that it stays in registers.)
    #[cold]
    #[inline(never)]
    fn grown(mut buf: Vec<u8>, len: usize) -> Vec<u8> {
        let want = len.max(2 * buf.len()).max(4096);
        buf.resize(want, 0);
        buf
    }

    /// Deepest level indented with one fixed-size copy (deeper ones are padded after it).
    const MAX_DEPTH: usize = 15;

    /// `,\n` and the indentation of [`MAX_DEPTH`] levels; [`NEWLINE`] without the comma
    /// (one space more at the end, never used).
    const BREAK: [u8; 2 + 2 * MAX_DEPTH] = indentation(b",\n");
    const NEWLINE: [u8; 2 + 2 * MAX_DEPTH] = indentation(b"\n");

    const fn indentation(head: &[u8]) -> [u8; 2 + 2 * MAX_DEPTH] {
        let mut b = [b' '; 2 + 2 * MAX_DEPTH];
        let mut i = 0;
        while i < head.len() {
            b[i] = head[i];
            i += 1;
        }
        b
    }

    /// A line break (after a comma unless `first`) and the indentation of `depth` levels.
    #[inline(always)]
    fn newline(out: &mut Out, first: bool, depth: usize) {
        let want = 2 + 2 * depth - usize::from(first);
        if depth <= MAX_DEPTH {
            // Always the whole array (a copy of known size, no call), then the part needed.
            out.put_prefix(if first { &NEWLINE } else { &BREAK }, want);
        } else {
            *out = deep_newline(std::mem::take(out), first, depth);
        }
    }

    /// [`newline`] deeper than [`MAX_DEPTH`].
    #[cold]
    #[inline(never)]
    fn deep_newline(mut out: Out, first: bool, depth: usize) -> Out {
        out.put(if first { b"\n" } else { b",\n" });
        for _ in 0..depth {
            out.put(b"  ");
        }
        out
    }

    /// An object being written; its members are at `depth`.
    pub struct Obj {
        depth: usize,
        first: bool,
    }

    impl Obj {
        /// Opens an object that is a value inside `depth` open objects and arrays.
        #[inline(always)]
        pub fn open(out: &mut Out, depth: usize) -> Self {
            out.put(b"{");
            Obj {
                depth: depth + 1,
                first: true,
            }
        }

        /// Where this object's values are (for values that open objects or arrays).
        pub fn depth(&self) -> usize {
            self.depth
        }

        /// Starts a member: `key` is its name quoted, a colon and a space (see `key!`);
        /// its value follows.
        #[inline(always)]
        pub fn key(&mut self, out: &mut Out, key: &[u8]) {
            let (first, depth) = (self.first, self.depth);
            self.first = false;
            if depth <= MAX_DEPTH {
                // The line break, the indentation and the key with one check of the room:
                // the whole break (a copy of known size), the key after the part needed.
                let want = 2 + 2 * depth - usize::from(first);
                let room = out.room(BREAK.len() + key.len());
                room[..BREAK.len()].copy_from_slice(if first { &NEWLINE } else { &BREAK });
                // `want` is at most the break's length: the key fits in the room.
                room[want..want + key.len()].copy_from_slice(key);
                out.advance(want + key.len());
            } else {
                newline(out, first, depth);
                out.put(key);
            }
        }

        pub fn is_first(&self) -> bool {
            self.first
        }

        /// After a member was taken back: whether the next one is the first.
        pub fn reset_first(&mut self, first: bool) {
            self.first = first;
        }

        /// `{}` when empty, else the closing brace on its own line.
        #[inline(always)]
        pub fn close(self, out: &mut Out) {
            if !self.first {
                newline(out, true, self.depth - 1);
            }
            out.put(b"}");
        }
    }

    /// An array being written; its elements are at `depth`.
    pub struct Arr {
        depth: usize,
        first: bool,
    }

    impl Arr {
        /// Opens an array that is a value inside `depth` open objects and arrays.
        #[inline(always)]
        pub fn open(out: &mut Out, depth: usize) -> Self {
            out.put(b"[");
            Arr {
                depth: depth + 1,
                first: true,
            }
        }

        pub fn depth(&self) -> usize {
            self.depth
        }

        /// Starts the next element; it follows.
        #[inline(always)]
        pub fn item(&mut self, out: &mut Out) {
            newline(out, self.first, self.depth);
            self.first = false;
        }

        /// `[]` when empty, else the closing bracket on its own line.
        #[inline(always)]
        pub fn close(self, out: &mut Out) {
            if !self.first {
                newline(out, true, self.depth - 1);
            }
            out.put(b"]");
        }
    }

    /// How `serde_json` escapes each byte of a string: 0 for none, `u` for `\u00XX`, else
    /// the letter after the backslash.
    static ESCAPE: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut i = 0;
        while i < 0x20 {
            t[i] = b'u';
            i += 1;
        }
        t[0x08] = b'b';
        t[0x09] = b't';
        t[0x0a] = b'n';
        t[0x0c] = b'f';
        t[0x0d] = b'r';
        t[b'"' as usize] = b'"';
        t[b'\\' as usize] = b'\\';
        t
    };

    /// A string, quoted and escaped as `serde_json` does. (Inlined: a call saved and
    /// restored six registers around a few dozen instructions.)
    #[inline(always)]
    pub fn str(out: &mut Out, s: &str) {
        let bytes = s.as_bytes();
        let n = bytes.len();
        // 8 to 32 bytes (most names): checked and copied as two overlapping pieces of
        // fixed size, without a call.
        if let (Some(first), Some(last)) = (bytes.first_chunk::<16>(), bytes.last_chunk::<16>()) {
            if n <= 32 && !flagged_block(first) && !flagged_block(last) {
                return quoted_ends::<16, 34>(out, first, last, n);
            }
        } else if let (Some(first), Some(last)) =
            (bytes.first_chunk::<8>(), bytes.last_chunk::<8>())
        {
            let word = |w: &[u8; 8]| u64::from_ne_bytes(*w);
            if !flagged_word(word(first)) && !flagged_word(word(last)) {
                return quoted_ends::<8, 18>(out, first, last, n);
            }
        }
        if needs_escape(bytes) {
            *out = escaped(std::mem::take(out), bytes);
        } else {
            let n = bytes.len();
            let room = out.room(n + 2);
            room[0] = b'"';
            room[1..=n].copy_from_slice(bytes);
            room[n + 1] = b'"';
            out.advance(n + 2);
        }
    }

    /// A plain string of `n` bytes (`N <= n <= 2N`) quoted, from its first and last `N`
    /// bytes (overlapping when `n < 2N`): two copies of fixed size. `R` is `2N + 2`.
    #[inline(always)]
    fn quoted_ends<const N: usize, const R: usize>(
        out: &mut Out,
        first: &[u8; N],
        last: &[u8; N],
        n: usize,
    ) {
        const { assert!(R == 2 * N + 2) };
        let room = out.room_array::<R>();
        room[0] = b'"';
        room[1..=N].copy_from_slice(first);
        room[n + 1 - N..=n].copy_from_slice(last);
        room[n + 1] = b'"';
        out.advance(n + 2);
    }

    /// Does a byte of the word need an escape (a control character, `"` or `\\`)? Eight
    /// bytes at a time.
    #[inline(always)]
    fn flagged_word(x: u64) -> bool {
        const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
        const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
        // A byte of `x` is below `n` (n <= 0x80), or is 0: exact for the word as a whole.
        let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
        let zero = |x: u64| below(x, 1);
        below(x, 0x20) | zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\')))
            != 0
    }

    /// Does a byte of the block need an escape? Sixteen bytes in a few vector
    /// instructions (no early exit).
    #[inline(always)]
    fn flagged_block(block: &[u8; 16]) -> bool {
        block
            .iter()
            .fold(false, |a, &c| a | (c < 0x20) | (c == b'"') | (c == b'\\'))
    }

    /// Does a byte of `bytes` need an escape (a control character, `"` or `\\`)? Sixteen
    /// bytes at a time, the last ones in a block that overlaps the one before; eight (or
    /// four) at a time in two overlapping words when shorter.
    #[inline]
    pub fn needs_escape(bytes: &[u8]) -> bool {
        let n = bytes.len();
        if let Some(last) = bytes.last_chunk::<16>() {
            let mut blocks = bytes.chunks_exact(16);
            return blocks.any(|b| flagged_block(b.try_into().expect("16 bytes")))
                || (!n.is_multiple_of(16) && flagged_block(last));
        }
        if let (Some(first), Some(last)) = (bytes.first_chunk::<8>(), bytes.last_chunk::<8>()) {
            let word = |w: &[u8; 8]| u64::from_ne_bytes(*w);
            return flagged_word(word(first)) || flagged_word(word(last));
        }
        if let (Some(first), Some(last)) = (bytes.first_chunk::<4>(), bytes.last_chunk::<4>()) {
            // Four bytes and four letters that need no escape.
            let word = |w: &[u8; 4]| u64::from(u32::from_ne_bytes(*w)) | (0x6161_6161 << 32);
            return flagged_word(word(first)) || flagged_word(word(last));
        }
        bytes.iter().any(|&c| ESCAPE[c as usize] != 0)
    }

    /// `bytes` quoted and escaped.
    #[cold]
    #[inline(never)]
    fn escaped(mut out: Out, bytes: &[u8]) -> Out {
        out.put(b"\"");
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut start = 0;
        for (i, &c) in bytes.iter().enumerate() {
            let e = ESCAPE[c as usize];
            if e == 0 {
                continue;
            }
            out.put(&bytes[start..i]);
            start = i + 1;
            if e == b'u' {
                out.put(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(c >> 4)],
                    HEX[usize::from(c & 0xf)],
                ]);
            } else {
                out.put(&[b'\\', e]);
            }
        }
        out.put(&bytes[start..]);
        out.put(b"\"");
        out
    }

    #[inline(always)]
    pub fn opt_str(out: &mut Out, s: Option<&str>) {
        match s {
            Some(s) => str(out, s),
            None => out.put(b"null"),
        }
    }

    /// A float as `serde_json` writes it: its own shortest form, `null` when not finite.
    #[inline(always)]
    pub fn f64(out: &mut Out, v: f64) {
        if v.is_finite() {
            // At most 24 bytes (`-1.2345678901234567e-308`): it fits.
            let mut rest: &mut [u8] = out.room(32);
            let _ = CompactFormatter.write_f64(&mut rest, v);
            let len = 32 - rest.len();
            out.advance(len);
        } else {
            out.put(b"null");
        }
    }

    /// The texts of recently written floats, by their bits: a table of 1,024 slots,
    /// each float in the slot its bits hash to, replacing the one there. Balancers with
    /// as many endpoints have the same probabilities (kube-proxy writes the same rule
    /// probabilities) and deviations: most floats of a report are copied from here
    /// instead of converted again.
    pub struct FloatTexts {
        slots: Box<[(u64, F64Text)]>,
    }

    impl Default for FloatTexts {
        fn default() -> Self {
            Self::new()
        }
    }

    impl FloatTexts {
        /// Every slot holds 0 (its bits are 0), whose text is `0.0`.
        pub fn new() -> Self {
            let zero = (0.0f64.to_bits(), F64Text::new(0.0));
            FloatTexts {
                slots: vec![zero; 1 << crate::prob::KEPT_SLOTS_LOG2].into_boxed_slice(),
            }
        }

        /// Writes `v` as [`f64`] does.
        #[inline(always)]
        pub fn write(&mut self, out: &mut Out, v: f64) {
            let bits = v.to_bits();
            let at = crate::prob::kept_slot(bits);
            match self.slots.get(at) {
                Some((held, text)) if *held == bits => text.write(out),
                _ => self.convert(at, v).write(out),
            }
        }

        /// The text of `v`, kept in slot `at`. (Handed back, not written: the cursor is
        /// never handed to a call.)
        #[inline(never)]
        fn convert(&mut self, at: usize, v: f64) -> F64Text {
            let text = F64Text::new(v);
            if let Some(slot) = self.slots.get_mut(at) {
                *slot = (v.to_bits(), text.clone());
            }
            text
        }
    }

    /// A float's text as [`f64`] writes it, kept to be written several times.
    #[derive(Clone)]
    pub struct F64Text {
        bytes: [u8; 32],
        len: usize,
    }

    impl F64Text {
        pub fn new(v: f64) -> Self {
            let mut bytes = [0u8; 32];
            let mut rest: &mut [u8] = &mut bytes;
            if v.is_finite() {
                // At most 24 bytes (`-1.2345678901234567e-308`): it fits.
                CompactFormatter
                    .write_f64(&mut rest, v)
                    .expect("a float's text fits in 32 bytes");
            } else {
                io::Write::write_all(&mut rest, b"null").expect("fits");
            }
            let len = 32 - rest.len();
            Self { bytes, len }
        }

        /// The text of 0 (and of -0 without its sign).
        pub const ZERO: &[u8] = b"0.0";

        /// The text of `|v|` from the text of `v` as [`f64`] wrote it (its sign dropped:
        /// the digits of a float do not depend on its sign).
        pub fn magnitude(text: &[u8]) -> Self {
            let text = text.strip_prefix(b"-").unwrap_or(text);
            let mut bytes = [0u8; 32];
            let len = text.len().min(32);
            bytes[..len].copy_from_slice(&text[..len]);
            Self { bytes, len }
        }

        #[cfg(test)]
        pub fn as_bytes(&self) -> &[u8] {
            &self.bytes[..self.len]
        }

        /// Appends the text: all 32 bytes (a copy of fixed size), then the length set.
        #[inline(always)]
        pub fn write(&self, out: &mut Out) {
            out.put_prefix(&self.bytes, self.len);
        }
    }

    #[inline(always)]
    pub fn u64(out: &mut Out, v: u64) {
        let len = crate::prob::write_u64(out.room_array(), v);
        out.advance(len);
    }

    #[inline(always)]
    pub fn opt_u64(out: &mut Out, v: Option<u64>) {
        match v {
            Some(v) => u64(out, v),
            None => out.put(b"null"),
        }
    }

    /// An array of integers, as a value inside `depth` open objects and arrays.
    #[inline(always)]
    pub fn u32s(out: &mut Out, depth: usize, values: &[u32]) {
        let mut a = Arr::open(out, depth);
        for &v in values {
            a.item(out);
            u64(out, v.into());
        }
        a.close(out);
    }

    /// `[lo, hi]`, as a value inside `depth` open objects and arrays.
    #[inline(always)]
    pub fn f64_pair(out: &mut Out, depth: usize, (lo, hi): (f64, f64)) {
        let mut a = Arr::open(out, depth);
        a.item(out);
        f64(out, lo);
        a.item(out);
        f64(out, hi);
        a.close(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, AuditOptions};
    use crate::graph::Graph;
    use crate::parse::{self, ParseOptions};

    /// The streamed JSON is the built report's JSON, byte for byte, on every fixture
    /// (none, one and many balancers; with and without a simulation and counters).
    #[test]
    fn streamed_json_is_the_built_reports_json() {
        let mut texts = crate::testing::fixture_texts();
        // And 150 balancers: more than one batch.
        let mut synthetic = String::from("*nat\n");
        for i in 0..150 {
            synthetic.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n"));
        }
        for i in 0..150 {
            synthetic.push_str(&format!(
                "-A KUBE-SVC-{i} -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination 10.0.{i}.1:80\n-A KUBE-SVC-{i} -j DNAT --to-destination 10.0.{i}.2:80\n"
            ));
        }
        synthetic.push_str("COMMIT\n");
        texts.push(("synthetic".into(), synthetic));
        let mut many = false;
        for (path, text) in &texts {
            let rs = parse::parse(text, &ParseOptions { lenient: true }).unwrap();
            let graph = Graph::build(&rs, true).unwrap();
            let balancers = crate::balance::find(&graph);
            many |= balancers.len() > 64;
            for connections in [0, 500] {
                let opts = AuditOptions {
                    connections: Some(connections),
                    ..AuditOptions::default()
                };
                let (audits, info) = audit::run(&graph, &balancers, &opts);
                let warnings = vec![Warning::new(0, "a \"quoted\" warning\nover two lines")];
                let built = Report::new(
                    "x \"balancers\": []",
                    &rs,
                    &balancers,
                    Some(&audits),
                    info.clone(),
                    warnings.clone(),
                )
                .to_json();
                let mut streamed = Vec::new();
                {
                    let mut out = JsonStream::begin(
                        &mut streamed,
                        "x \"balancers\": []",
                        &rs,
                        info.clone(),
                        warnings,
                    )
                    .unwrap();
                    out.balancers(&balancers, Some(&audits)).unwrap();
                    out.finish().unwrap();
                }
                assert_eq!(String::from_utf8(streamed).unwrap(), built, "{path}");
                // The same, handed over in windows of 7 balancers.
                let mut windowed = Vec::new();
                let mut out = JsonStream::begin(
                    &mut windowed,
                    "x \"balancers\": []",
                    &rs,
                    info,
                    vec![Warning::new(0, "a \"quoted\" warning\nover two lines")],
                )
                .unwrap();
                for (bs, au) in balancers.chunks(7).zip(audits.chunks(7)) {
                    out.balancers(bs, Some(au)).unwrap();
                }
                out.finish().unwrap();
                assert_eq!(String::from_utf8(windowed).unwrap(), built, "{path}");
            }
        }
        assert!(many, "a fixture with more balancers than one batch");
    }

    /// A balancer's JSON the way the streamed report wrote it before the direct writer:
    /// serde's pretty printer on [`BalancerReport::from_balancer`], each line after the
    /// first indented `depth` levels more.
    fn serde_balancer_json(b: &Balancer, audit: Option<&Audit>, depth: usize) -> String {
        let one = serde_json::to_string_pretty(&BalancerReport::from_balancer(b, audit)).unwrap();
        one.replace('\n', &format!("\n{}", "  ".repeat(depth)))
    }

    /// What `write` puts after `prefix` (written first) through a cursor.
    fn written(prefix: &[u8], write: impl FnOnce(&mut json::Out)) -> String {
        let mut out = json::Out::new(prefix.to_vec(), prefix.len());
        write(&mut out);
        let (mut buf, len) = out.finish();
        buf.truncate(len);
        String::from_utf8(buf.split_off(prefix.len())).expect("UTF-8")
    }

    /// [`write_balancer_json`]'s bytes (appended to a non-empty buffer).
    fn direct_balancer_json(b: &Balancer, audit: Option<&Audit>, depth: usize) -> String {
        let mut out = b"[".to_vec();
        write_balancer_json(&mut out, depth, b, audit);
        String::from_utf8(out.split_off(1)).expect("UTF-8")
    }

    /// The direct writer and serde agree at the report's depth (2), at the top, and deeper
    /// than the fixed-size indentation reaches.
    fn assert_direct_is_serde(b: &Balancer, audit: Option<&Audit>, what: &str) {
        for depth in [2, 0, 5, 13, 16] {
            assert_eq!(
                direct_balancer_json(b, audit, depth),
                serde_balancer_json(b, audit, depth),
                "{what}, depth {depth}"
            );
        }
    }

    /// Each balancer's directly written JSON is serde's, byte for byte, on every fixture:
    /// without an audit, without and with a simulation (and `--clients`), counters
    /// tested, and an expectations file with an endpoint the rules never choose.
    #[test]
    fn direct_balancer_json_is_serdes_on_every_fixture() {
        let mut texts = crate::testing::fixture_texts();
        let mut counted = String::from("*nat\n:KUBE-SVC-A - [0:0]\n");
        counted.push_str(
            "[7:0] -A KUBE-SVC-A -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination 10.0.0.1:80\n\
             [9:0] -A KUBE-SVC-A -j DNAT --to-destination 10.0.0.2:80\nCOMMIT\n",
        );
        texts.push(("counted".into(), counted));
        let expectations = crate::expect::Expectations::parse(
            "*,10.0.0.1:80,3\n*,mark 0x10100/0x3ff00,1\n*,nowhere \"q\"\\,1\n",
            "weights \"w\".csv",
        )
        .unwrap();
        let (mut balancers_seen, mut exact_dropped, mut approximated) = (0, 0, 0);
        for (path, text) in &texts {
            let rs = parse::parse(text, &ParseOptions { lenient: true }).unwrap();
            let graph = Graph::build(&rs, true).unwrap();
            let balancers = crate::balance::find(&graph);
            for b in &balancers {
                assert_direct_is_serde(b, None, &format!("{path}: {}, no audit", b.name));
                balancers_seen += 1;
                for e in &b.endpoints {
                    match e.prob.exact() {
                        None => approximated += 1,
                        Some(_) if exact_text(&e.prob).is_none() => exact_dropped += 1,
                        Some(_) => {}
                    }
                }
            }
            let variants = [
                (Some(0), None, None),
                (Some(200), None, None),
                (Some(200), Some(3), Some(expectations.clone())),
            ];
            for (connections, clients, expectations) in variants {
                let opts = AuditOptions {
                    connections,
                    clients,
                    expectations,
                    ..AuditOptions::default()
                };
                let (audits, _) = audit::run(&graph, &balancers, &opts);
                for (b, a) in balancers.iter().zip(&audits) {
                    assert_direct_is_serde(
                        b,
                        Some(a),
                        &format!("{path}: {}, {connections:?} connections", b.name),
                    );
                }
            }
        }
        assert!(
            balancers_seen > 50,
            "{balancers_seen} balancers in the fixtures"
        );
        assert!(
            exact_dropped > 0,
            "a fixture with exact forms too long to print"
        );
        assert!(
            approximated > 0,
            "a fixture with approximated probabilities"
        );
    }

    /// Strings with quotes, backslashes, control characters and non-ASCII text, absent
    /// and present optional fields, and non-finite or extreme numbers are written as serde
    /// writes them.
    #[test]
    fn direct_balancer_json_escapes_and_odd_values_as_serde_does() {
        let odd = [
            "",
            "plain",
            "a \"quoted\" name",
            "back\\slash\\",
            "nl\n tab\t cr\r bs\u{8} ff\u{c}",
            "ctl \u{0}\u{1}\u{b}\u{e}\u{1f}\u{7f} del",
            "é ünïcödé 名前 🎉",
            "\"\\\"",
            "1234567\"",
            "12345678\u{1}",
            "123456789abcdef\\",
            "ns \"q\"\u{1}/svc:port",
        ];
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/kube-affinity.txt"
        ))
        .unwrap();
        let rs = parse::parse(&text, &ParseOptions { lenient: true }).unwrap();
        let graph = Graph::build(&rs, true).unwrap();
        let balancers = crate::balance::find(&graph);
        let opts = AuditOptions {
            connections: Some(100),
            ..AuditOptions::default()
        };
        let (audits, _) = audit::run(&graph, &balancers, &opts);
        let floats = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            0.0,
            1.0,
            5e-324,
            f64::MIN_POSITIVE,
            1e300,
            0.1 + 0.2,
            1.0 / 3.0,
        ];
        let mut round = 0;
        for (template, base) in balancers.iter().zip(&audits) {
            for (k, s) in odd.iter().enumerate() {
                round += 1;
                let t = |i: usize| odd[(k + i) % odd.len()].to_string();
                let mut b = template.clone();
                b.name = s.to_string();
                b.table = t(1);
                b.chain = t(2);
                b.kind = if round % 2 == 0 {
                    Kind::KubeProxy
                } else {
                    Kind::Generic
                };
                b.selector = (round % 3 != 0).then(|| t(3));
                b.affinity = match round % 3 {
                    0 => None,
                    1 => Some(Affinity {
                        kind: "client-ip",
                        seconds: None,
                        lines: Vec::new(),
                    }),
                    _ => Some(Affinity {
                        kind: "client-ip",
                        seconds: Some(10800),
                        lines: vec![1, u32::MAX],
                    }),
                };
                b.entries.push(Entry {
                    kind: "jump",
                    text: t(4),
                    address: None,
                    port: None,
                    protocol: None,
                    chain: t(5),
                    line: 0,
                    comment: None,
                });
                b.entries.push(Entry {
                    kind: "cluster-ip",
                    text: t(6),
                    address: Some(t(7)),
                    port: Some(u16::MAX),
                    protocol: Some(t(8)),
                    chain: t(9),
                    line: u32::MAX,
                    comment: Some(t(10)),
                });
                let outcomes = [
                    Outcome::Dnat(t(11)),
                    Outcome::Verdict(t(12)),
                    Outcome::Mark {
                        value: 0x10100,
                        mask: 0x3ff00,
                    },
                    Outcome::Unmatched,
                    Outcome::Policy {
                        policy: t(13),
                        mark: Some((1, 0xff)),
                    },
                    Outcome::Policy {
                        policy: t(14),
                        mark: None,
                    },
                ];
                for (i, e) in b.endpoints.iter_mut().enumerate() {
                    e.outcome = outcomes[(k + i) % outcomes.len()].clone();
                    e.chain = t(15 + i);
                    if (k + i) % 2 == 0 {
                        e.via.clear();
                    }
                }
                let mut a = base.clone();
                a.expected.source = t(16);
                a.expected.probs = (0..b.endpoints.len())
                    .map(|i| floats[(k + i) % floats.len()])
                    .collect();
                a.expected.missing = (0..k % 3).map(|i| t(17 + i)).collect();
                // The simulation's and the counters' tests with odd numbers and names,
                // and their optional members there and not.
                let f = |i: usize| floats[(k + i) % floats.len()];
                let name = |i: usize| odd[(k + i) % odd.len()];
                let s = a.simulation.as_mut().expect("kube-affinity.txt simulated");
                (s.statistic, s.p_value, s.p_value_adjusted) = (f(0), f(1), f(2));
                (s.detectable_w, s.detectable_relative_skew) = (f(3), f(4));
                s.method = name(0);
                s.replicates = (round % 2 == 0).then_some(u64::MAX);
                (s.unmatched, s.other, s.rule_evaluations) = (u64::MAX, 1, 0);
                s.g_test = audit::Test {
                    statistic: f(5),
                    df: u32::MAX,
                    p_value: f(6),
                    p_value_adjusted: f(7),
                    method: name(1),
                };
                s.expected.source = t(18);
                (s.expected.statistic, s.expected.p_value) = (f(8), f(9));
                s.expected.p_value_adjusted = f(10);
                s.expected.method = name(2);
                s.expected.replicates = (round % 3 == 0).then_some(7);
                s.clients = (round % 2 == 1).then_some(u64::MAX);
                s.max_endpoint_share = (round % 4 != 0).then(|| f(11));
                s.returning_connections = (round % 3 != 1).then_some(0);
                s.same_endpoint_connections = (round % 5 != 0).then_some(12);
                a.observed = (round % 4 != 3).then(|| ObservedTest {
                    connections: u64::MAX,
                    affinity_connections: round as u64,
                    statistic: f(12),
                    df: 0,
                    p_value: f(13),
                    p_value_adjusted: f(14),
                    method: name(3),
                    replicates: (round % 2 == 1).then_some(1 << 40),
                    counts: (0..b.endpoints.len() as u64).collect(),
                    affinity: vec![3; b.endpoints.len()],
                });
                assert_direct_is_serde(&b, Some(&a), &format!("odd strings, round {round}"));
                // Fewer expected probabilities than endpoints (ideal for the rest), and
                // no endpoints at all.
                a.expected.probs.truncate(1);
                assert_direct_is_serde(&b, Some(&a), &format!("short expected, round {round}"));
                b.endpoints.clear();
                assert_direct_is_serde(&b, None, &format!("no endpoints, round {round}"));
            }
        }
        assert!(round > 0, "kube-affinity.txt has balancers");
    }

    /// Strings are escaped as serde escapes them, and the eight-bytes-at-a-time test for
    /// an escape agrees with a byte by byte one for every position of every byte value.
    #[test]
    fn strings_are_escaped_as_serde_escapes_them() {
        let naive = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        for len in 0..=25 {
            for at in 0..len {
                for c in 0..=255u8 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = c;
                    assert_eq!(json::needs_escape(&bytes), naive(&bytes), "{bytes:?}");
                    // A byte above 0x7f next to one that needs an escape.
                    if at + 1 < len {
                        bytes[at + 1] = 0xff;
                        assert_eq!(json::needs_escape(&bytes), naive(&bytes), "{bytes:?}");
                    }
                }
            }
        }
        let mut all = String::new();
        for c in (0..0x250u32).chain([0x2028, 0x2029, 0xfeff, 0x1f389]) {
            all.push(char::from_u32(c).unwrap());
        }
        for s in [all.as_str(), "", "\"", "\\", "\u{0}", "abc\u{7f}"] {
            assert_eq!(
                written(b"", |out| json::str(out, s)),
                serde_json::to_string(s).unwrap()
            );
        }
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        #[test]
        fn any_string_is_escaped_as_serde_escapes_it(s in ".*", bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            proptest::prop_assert_eq!(written(b"", |out| json::str(out, &s)), serde_json::to_string(&s).unwrap());
            let naive = bytes.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
            proptest::prop_assert_eq!(json::needs_escape(&bytes), naive);
        }

        /// Strings of every length up to several blocks, made of plain runs and the
        /// characters that need an escape or look like they might (quotes, backslashes,
        /// control characters, DEL, non-ASCII text, U+2028): escaped as serde escapes
        /// them, and the block test agrees with a byte by byte one.
        #[test]
        fn odd_strings_are_escaped_as_serde_escapes_them(
            pieces in proptest::collection::vec(
                proptest::prop_oneof![
                    8 => "[a-zA-Z0-9 .:/-]{0,20}",
                    1 => proptest::prelude::Just("\"".to_string()),
                    1 => proptest::prelude::Just("\\".to_string()),
                    1 => (0u32..0x20).prop_map(|c| char::from_u32(c).unwrap().to_string()),
                    1 => proptest::prelude::Just("\u{7f}".to_string()),
                    1 => proptest::prelude::Just("\u{e9}\u{540d}".to_string()),
                    1 => proptest::prelude::Just("\u{2028}\u{2029}".to_string()),
                    1 => proptest::prelude::any::<char>().prop_map(|c| c.to_string()),
                ],
                0..12,
            ),
        ) {
            let s: String = pieces.concat();
            proptest::prop_assert_eq!(written(b"x", |out| json::str(out, &s)), serde_json::to_string(&s).unwrap());
            let naive = s.bytes().any(|c| c < 0x20 || c == b'"' || c == b'\\');
            proptest::prop_assert_eq!(json::needs_escape(s.as_bytes()), naive);
        }

        #[test]
        fn kept_endpoint_values_are_the_computed_ones(
            picks in proptest::collection::vec((1u64..(1 << 31), 0u32..40, 1u64..12, 0u32..3), 0..300),
        ) {
            // Values and counts seen again and again (slots reused and replaced), over
            // powers of two (kept) and not, exact and approximated.
            let mut values = EndpointValues::default();
            for (q, shift, n, kind) in picks {
                let p = match kind {
                    0 => CompactProb::new(crate::prob::Prob::ratio(q % 64, 1 << (shift % 8))),
                    1 => CompactProb::new(crate::prob::Prob::ratio(q, 1 << shift)),
                    _ => CompactProb::with_limit(crate::prob::Prob::ratio(q, 3 << shift), 8),
                };
                let got = values.get(&p, n);
                let want = (p.to_f64(), p.relative_deviation(n));
                proptest::prop_assert_eq!(got.0.to_bits(), want.0.to_bits());
                proptest::prop_assert_eq!(got.1.to_bits(), want.1.to_bits());
            }
        }

        #[test]
        fn kept_float_texts_are_the_floats_texts(
            values in proptest::collection::vec(proptest::prelude::any::<f64>(), 0..200),
            picks in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..400),
        ) {
            // Floats written again and again (slots reused and replaced): each time the
            // text `json::f64` writes.
            let mut texts = json::FloatTexts::new();
            for i in &picks {
                let x = if values.is_empty() { 0.0 } else { values[i.index(values.len())] };
                let kept = written(b"x", |out| texts.write(out, x));
                proptest::prop_assert_eq!(kept, written(b"x", |out| json::f64(out, x)));
            }
            for &x in &values {
                let kept = written(b"", |out| texts.write(out, x));
                proptest::prop_assert_eq!(kept, written(b"", |out| json::f64(out, x)));
            }
        }

        #[test]
        fn any_float_is_written_as_serde_writes_it(bits in proptest::prelude::any::<u64>(), v in proptest::prelude::any::<f64>()) {
            for x in [f64::from_bits(bits), v] {
                let out = written(b"x", |out| json::f64(out, x));
                let kept = json::F64Text::new(x);
                proptest::prop_assert_eq!(out.as_bytes(), kept.as_bytes());
                proptest::prop_assert_eq!(&out, &serde_json::to_string(&x).unwrap());
                // The magnitude's text is the text without its sign.
                let abs = json::F64Text::magnitude(out.as_bytes());
                let want = json::F64Text::new(x.abs());
                proptest::prop_assert_eq!(abs.as_bytes(), want.as_bytes());
                if x == 0.0 {
                    proptest::prop_assert_eq!(json::F64Text::ZERO, abs.as_bytes());
                }
            }
        }
    }

    /// `report --format json`'s way (windows of balancers analysed, audited and printed
    /// in one pass, or, with p-values to correct, audited in a first pass and printed in
    /// a second) writes the JSON of the report built in one piece, and the other
    /// formats' way their text: every fixture and
    /// balancers with counters, with and without a simulation, its default budget,
    /// clients, Benjamini–Hochberg, counters left untested, expectations.
    #[test]
    fn windowed_json_is_the_built_reports_json() {
        let mut texts = crate::testing::fixture_texts();
        texts.push(("synthetic".into(), crate::testing::counted_dump()));
        let expectations =
            crate::expect::Expectations::parse("*,10.0.0.1:80,3\n*,nowhere,1\n", "weights.csv")
                .unwrap();
        let variants = [
            AuditOptions {
                connections: Some(0),
                ..AuditOptions::default()
            },
            AuditOptions {
                connections: Some(300),
                ..AuditOptions::default()
            },
            AuditOptions::default(),
            AuditOptions {
                connections: Some(500),
                clients: Some(4),
                ..AuditOptions::default()
            },
            AuditOptions {
                connections: Some(300),
                adjustment: audit::Adjustment::Bh,
                ..AuditOptions::default()
            },
            AuditOptions {
                connections: Some(300),
                observed: false,
                ..AuditOptions::default()
            },
            AuditOptions {
                connections: Some(0),
                observed: false,
                ..AuditOptions::default()
            },
            AuditOptions {
                connections: Some(300),
                expectations: Some(expectations),
                ..AuditOptions::default()
            },
        ];
        let mut corrected = 0;
        for (name, text) in &texts {
            let rs = parse::parse(text, &ParseOptions { lenient: true }).unwrap();
            let graph = Graph::build(&rs, true).unwrap();
            let candidates = crate::balance::candidates(&graph);
            let balancers: Vec<Balancer> = candidates
                .iter()
                .filter_map(|c| crate::balance::analyse(&graph, c))
                .collect();
            for opts in &variants {
                let whole = AuditOptions {
                    balancers: Some(candidates.len()),
                    ..opts.clone()
                };
                let (audits, info) = audit::run(&graph, &balancers, &whole);
                corrected += audits
                    .iter()
                    .filter(|a| a.simulation.is_some() || a.observed.is_some())
                    .count();
                let warnings = vec![Warning::new(1, "given")];
                let report =
                    Report::new("x", &rs, &balancers, Some(&audits), info, warnings.clone());
                let stream = |format, window| {
                    streamed(format, &rs, &graph, &candidates, opts, &warnings, window)
                };
                let built = report.to_json();
                for window in [1, 3, 7, 1000] {
                    let what = format!("{name}, {opts:?}, window {window}");
                    assert_eq!(stream(None, window), built, "{what}");
                }
                // The other formats, a window at a time too.
                for (format, built) in [
                    (TextFormat::Table { color: true }, report.to_table(true)),
                    (TextFormat::Table { color: false }, report.to_table(false)),
                    (TextFormat::Csv, report.to_csv()),
                    (TextFormat::Markdown, report.to_markdown()),
                ] {
                    for window in [1, 7] {
                        let what = format!("{name}, {opts:?}, {format:?}, window {window}");
                        assert_eq!(stream(Some(format), window), built, "{what}");
                    }
                }
            }
        }
        assert!(corrected > 500, "{corrected} audits with p-values");
    }

    /// Windows of many batches, the first batches without a balancer (generic chains
    /// whose statistic rules no traffic reaches, listed first by name): the streamed
    /// JSON is still the built report's.
    #[test]
    fn streamed_json_over_many_batches() {
        let text = crate::testing::unreached_then_services();
        let rs = parse::parse(&text, &ParseOptions::default()).unwrap();
        let graph = Graph::build(&rs, false).unwrap();
        let candidates = crate::balance::candidates(&graph);
        assert_eq!(candidates.len(), 130);
        let balancers: Vec<Balancer> = candidates
            .iter()
            .filter_map(|c| crate::balance::analyse(&graph, c))
            .collect();
        assert_eq!(balancers.len(), 90);
        // Without a cross-check (one pass), and with one (two passes: p-values corrected
        // across balancers).
        for connections in [0, 200] {
            let opts = AuditOptions {
                connections: Some(connections),
                balancers: Some(candidates.len()),
                ..AuditOptions::default()
            };
            streamed_is_built(&rs, &graph, &candidates, &balancers, &opts);
        }
    }

    fn streamed_is_built(
        rs: &Ruleset<'_>,
        graph: &Graph<'_, '_>,
        candidates: &[Candidate],
        balancers: &[Balancer],
        opts: &AuditOptions,
    ) {
        let (audits, info) = audit::run(graph, balancers, opts);
        let report = Report::new("x", rs, balancers, Some(&audits), info, Vec::new());
        for (format, built) in [
            (TextFormat::Table { color: false }, report.to_table(false)),
            (TextFormat::Csv, report.to_csv()),
            (TextFormat::Markdown, report.to_markdown()),
        ] {
            for window in [1, 33] {
                let got = streamed(Some(format), rs, graph, candidates, opts, &[], window);
                assert_eq!(got, built, "{format:?}");
            }
        }
        let built = report.to_json();
        for window in [1, 33, 64, 1000] {
            let got = streamed(None, rs, graph, candidates, opts, &[], window);
            let connections = opts.connections;
            assert_eq!(got, built, "window {window}, {connections:?} connections");
        }
    }

    /// The report of `candidates` streamed a window of `window` at a time, in `format`
    /// (`None`: JSON).
    fn streamed(
        format: Option<TextFormat>,
        rs: &Ruleset<'_>,
        graph: &Graph<'_, '_>,
        candidates: &[Candidate],
        opts: &AuditOptions,
        warnings: &[Warning],
        window: usize,
    ) -> String {
        let mut out = Vec::new();
        let warnings = warnings.to_vec();
        match format {
            None => {
                write_json_windowed(&mut out, "x", rs, graph, candidates, opts, warnings, window)
            }
            Some(format) => write_text_windowed(
                &mut out, format, "x", rs, graph, candidates, opts, warnings, window,
            ),
        }
        .unwrap();
        String::from_utf8(out).unwrap()
    }
}
