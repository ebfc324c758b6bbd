//! The report: what `lbaudit report` prints, as a terminal table, JSON, CSV or Markdown.
//!
//! The JSON form is a contract with users' scripts: fields may be added, never renamed
//! or dropped.

use crate::audit::{self, Audit, AuditOptions, ObservedTest, Simulation, SimulationInfo};
use crate::balance::{Affinity, Balancer, Candidate, Entry, Kind};
use crate::graph::Graph;
use crate::model::{Family, Format, Ruleset, Warning};
use crate::prob::CompactProb;
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::atomic::AtomicUsize;

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

fn exact_text(p: &CompactProb) -> Option<String> {
    let p = p.exact()?;
    if p.bits() > (EXACT_MAX_CHARS as u64) * 3 {
        return None;
    }
    let s = p.to_string();
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
    fn header(
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
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record([
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
        ]);
        for b in &self.balancers {
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
        String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| balancer | endpoint | probability | ideal | relative deviation |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|");
        for b in &self.balancers {
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
        if !self.warnings.is_empty() {
            let _ = writeln!(s, "\n**Warnings**\n");
            for w in &self.warnings {
                let _ = writeln!(s, "- line {}: {}", w.line, md_escape(&w.message));
            }
        }
        s
    }

    /// The human table. `color` adds ANSI colours (terminal only, never with NO_COLOR).
    pub fn to_table(&self, color: bool) -> String {
        let paint = |code: &str, text: &str| {
            if color {
                format!("\x1b[{code}m{text}\x1b[0m")
            } else {
                text.to_string()
            }
        };
        let mut s = String::new();
        if self.balancers.is_empty() {
            let _ = writeln!(
                s,
                "no load balancers found ({} rules in {} table(s))",
                self.input.rules,
                self.input.tables.len()
            );
        }
        for b in &self.balancers {
            let entries: Vec<&str> = b.entries.iter().map(|e| e.text.as_str()).collect();
            let _ = writeln!(s, "{}", paint("1", &b.name));
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
            let _ = writeln!(s, "{}", paint("2", &meta));
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
                    paint("31", &format!("{dev:>14}"))
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
                        paint("31", &line)
                    } else {
                        line
                    }
                );
            }
            s.push('\n');
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(s, "{}", paint("33", "warnings:"));
            for w in &self.warnings {
                if w.line > 0 {
                    let _ = writeln!(s, "  line {}: {}", w.line, w.message);
                } else {
                    let _ = writeln!(s, "  {}", w.message);
                }
            }
        }
        s
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
/// or counters to test), all balancers are analysed and audited before printing; only
/// a report without them is analysed a window at a time.
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
    let counters = rs
        .tables
        .iter()
        .flat_map(|t| &t.chains)
        .any(|c| c.rules.iter().any(|r| r.counted()));
    if opts.connections != Some(0) || (opts.observed && counters) {
        // p-values are corrected across all balancers: analyse and audit them all, then
        // print them (analysing twice to hold less would cost more time than the
        // cross-check may take).
        let balancers = crate::balance::analyse_all(graph, candidates);
        let mut audits = audit::with_progress(&opts, candidates.len(), |done| {
            audit::audit_window(graph, &balancers, &opts, done)
        });
        let info = audit::finish(&mut audits, &opts);
        let mut out = JsonStream::begin(w, source, rs, info, warnings)?;
        out.balancers(&balancers, Some(&audits))?;
        // The process ends soon: leave these to the OS instead of freeing them.
        std::mem::forget(balancers);
        std::mem::forget(audits);
        return out.finish();
    }
    // Nothing ties balancers together: analyse, audit and print a window at a time.
    let mut out = JsonStream::begin(w, source, rs, None, warnings)?;
    for part in candidates.chunks(window) {
        let balancers = crate::balance::analyse_all(graph, part);
        let audits = audit::audit_window(graph, &balancers, &opts, &AtomicUsize::new(0));
        out.balancers(&balancers, Some(&audits))?;
    }
    out.finish()
}

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

    /// Writes the next balancers (with their audits, index for index).
    pub fn balancers(
        &mut self,
        balancers: &[Balancer],
        audits: Option<&[Audit]>,
    ) -> std::io::Result<()> {
        use rayon::prelude::*;
        // Each balancer, pretty-printed on its own and indented two levels: what the
        // pretty printer writes for it as an element of `balancers`.
        let first = self.written;
        let render = |i: usize, out: &mut Vec<u8>| {
            let b = BalancerReport::from_balancer(&balancers[i], audits.and_then(|a| a.get(i)));
            let mut one = Vec::with_capacity(1024);
            serde_json::to_writer_pretty(&mut one, &b).expect("balancer serialises");
            out.extend_from_slice(if first + i == 0 {
                b"\n    "
            } else {
                b",\n    "
            });
            for line in one.split_inclusive(|&c| c == b'\n') {
                out.extend_from_slice(line);
                if line.ends_with(b"\n") {
                    out.extend_from_slice(b"    ");
                }
            }
        };
        const BATCH: usize = 64;
        let window = BATCH * 4 * rayon::current_num_threads().max(1);
        let mut start = 0;
        while start < balancers.len() {
            let end = (start + window).min(balancers.len());
            let parts: Vec<Vec<u8>> = (start..end)
                .step_by(BATCH)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|from| {
                    let mut out = Vec::new();
                    for i in from..(from + BATCH).min(end) {
                        render(i, &mut out);
                    }
                    out
                })
                .collect();
            for p in parts {
                self.w.write_all(&p)?;
            }
            start = end;
        }
        for b in balancers {
            self.head.warnings.extend(b.warnings.iter().cloned());
        }
        self.written += balancers.len();
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

    /// `report --format json`'s way (windows of balancers analysed, audited and printed
    /// in two passes) writes the JSON of the report built in one piece.
    #[test]
    fn windowed_json_is_the_built_reports_json() {
        let mut texts = crate::testing::fixture_texts();
        let mut synthetic = String::from("*nat\n");
        for i in 0..40 {
            synthetic.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n"));
        }
        for i in 0..40 {
            synthetic.push_str(&format!(
                "[{}:0] -A KUBE-SVC-{i} -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination 10.0.{i}.1:80\n[{}:0] -A KUBE-SVC-{i} -j DNAT --to-destination 10.0.{i}.2:80\n",
                10 + i,
                20 + 2 * i
            ));
        }
        synthetic.push_str("COMMIT\n");
        texts.push(("synthetic".into(), synthetic));
        for (name, text) in &texts {
            let rs = parse::parse(text, &ParseOptions { lenient: true }).unwrap();
            let graph = Graph::build(&rs, true).unwrap();
            let candidates = crate::balance::candidates(&graph);
            let balancers: Vec<Balancer> = candidates
                .iter()
                .filter_map(|c| crate::balance::analyse(&graph, c))
                .collect();
            for connections in [Some(0), Some(300), None] {
                let opts = AuditOptions {
                    connections,
                    ..AuditOptions::default()
                };
                let whole = AuditOptions {
                    balancers: Some(candidates.len()),
                    ..opts.clone()
                };
                let (audits, info) = audit::run(&graph, &balancers, &whole);
                let warnings = vec![Warning::new(1, "given")];
                let built =
                    Report::new("x", &rs, &balancers, Some(&audits), info, warnings.clone())
                        .to_json();
                for window in [1, 3, 1000] {
                    let mut out = Vec::new();
                    write_json_windowed(
                        &mut out,
                        "x",
                        &rs,
                        &graph,
                        &candidates,
                        &opts,
                        warnings.clone(),
                        window,
                    )
                    .unwrap();
                    assert_eq!(
                        String::from_utf8(out).unwrap(),
                        built,
                        "{name}, {connections:?} connections, window {window}"
                    );
                }
            }
        }
    }
}
