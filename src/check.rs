//! `lbaudit check`: a fairness gate with verdicts, for people and for CI systems.

use crate::audit::{Audit, SimulationInfo};
use crate::balance::Balancer;
use crate::model::{Ruleset, Warning};
use crate::report::{BalancerReport, Report, fmt_dev, fmt_prob, paint};
use serde::Serialize;
use std::fmt::Write as _;

/// What fails a balancer.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOptions {
    /// Largest allowed relative deviation of an endpoint's exact probability from the
    /// intended one.
    pub max_skew: f64,
    /// Traffic that reaches no endpoint is allowed.
    pub allow_unmatched: bool,
    /// Significance level of the Monte-Carlo and counter tests (after Holm).
    pub alpha: f64,
    /// Fewest endpoints a balancer must have.
    pub min_endpoints: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            max_skew: 1e-3,
            allow_unmatched: false,
            alpha: 1e-3,
            min_endpoints: 0,
        }
    }
}

/// One reason a balancer fails.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    /// `skew`, `unmatched`, `zero-probability`, `double-weight`, `missing-endpoint`,
    /// `unexpected-endpoint`, `min-endpoints`, `simulation`, `observed`, `no-endpoints`.
    pub reason: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The measured value (probability, share, p-value, count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deviation: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
}

impl Failure {
    fn new(reason: &'static str, message: String) -> Self {
        Self {
            reason,
            message,
            endpoint: None,
            value: None,
            expected: None,
            deviation: None,
            threshold: None,
        }
    }
}

/// The verdict on one balancer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub pass: bool,
    pub failures: Vec<Failure>,
}

/// What a failure means and how to fix it (for the human output and the README).
pub fn advice(reason: &str) -> &'static str {
    match reason {
        "skew" => {
            "the rules' probabilities do not give the intended split (in a cascade of n rules, rule i needs 1/(n-i)); kube-proxy before 1.17 rounded them to 5 decimals: upgrade it so it rewrites the rules with 10; for a deliberately weighted setup pass --expect FILE"
        }
        "unmatched" => {
            "some new connections fall off the end of the balancer without a destination: add an unconditional last rule (the fallback), or pass --allow-unmatched if that is intended"
        }
        "zero-probability" => {
            "an endpoint can never be chosen: an earlier rule takes all traffic or its probability is 0; fix the rule order or the probabilities"
        }
        "double-weight" => {
            "one destination is reached through several branches, so it gets their combined share: remove the duplicate rules"
        }
        "missing-endpoint" => {
            "the expectations name an endpoint that the rules never send traffic to: the endpoint is gone from the rules, or the expectations are stale"
        }
        "unexpected-endpoint" => {
            "the rules send traffic to an endpoint the expectations do not name: add it to the expectations file or remove it from the rules"
        }
        "min-endpoints" => {
            "fewer endpoints than required: scale the service up or lower --min-endpoints"
        }
        "simulation" => {
            "simulated connections do not fit the intended split at the chosen alpha: the skew is large enough to show in traffic"
        }
        "observed" => {
            "the node's own counters do not fit the rules' probabilities: connections were not split as the rules say (session affinity, long-lived connections, or counters reset mid-way)"
        }
        "no-endpoints" => "the balancer has no endpoint at all",
        _ => "",
    }
}

/// Judges one balancer.
pub fn judge(b: &BalancerReport, opts: &CheckOptions) -> Verdict {
    let mut failures = Vec::new();
    let n = b.endpoints.len();
    if n == 0 {
        failures.push(Failure::new(
            "no-endpoints",
            "no endpoint is reachable".to_string(),
        ));
    }
    if n < opts.min_endpoints {
        let mut f = Failure::new(
            "min-endpoints",
            format!(
                "{n} endpoint(s), fewer than the {} required",
                opts.min_endpoints
            ),
        );
        f.value = Some(n as f64);
        f.threshold = Some(opts.min_endpoints as f64);
        failures.push(f);
    }
    // Skew against the intended split: the exact n·p − 1 for uniform, p/e − 1 otherwise.
    let uniform = b.expected_split == "uniform";
    let mut worst: Option<(f64, usize)> = None;
    for (i, e) in b.endpoints.iter().enumerate() {
        if !uniform && e.expected == 0.0 {
            if e.probability > 0.0 {
                let mut f = Failure::new(
                    "unexpected-endpoint",
                    format!(
                        "{} gets {} of new connections but the expectations give it none",
                        e.endpoint,
                        fmt_prob(e.probability)
                    ),
                );
                f.endpoint = Some(e.endpoint.clone());
                f.value = Some(e.probability);
                f.expected = Some(0.0);
                failures.push(f);
            }
            continue;
        }
        let dev = if uniform {
            e.relative_deviation
        } else {
            e.probability / e.expected - 1.0
        };
        if worst.is_none_or(|(w, _)| dev.abs() > w.abs()) {
            worst = Some((dev, i));
        }
    }
    if let Some((dev, i)) = worst
        && dev.abs() > opts.max_skew
    {
        let e = &b.endpoints[i];
        let mut f = Failure::new(
            "skew",
            format!(
                "{} has probability {} where {} is expected: relative deviation {} exceeds {}",
                e.endpoint,
                fmt_prob(e.probability),
                fmt_prob(e.expected),
                fmt_dev(dev),
                opts.max_skew
            ),
        );
        f.endpoint = Some(e.endpoint.clone());
        f.value = Some(e.probability);
        f.expected = Some(e.expected);
        f.deviation = Some(dev);
        f.threshold = Some(opts.max_skew);
        failures.push(f);
    }
    if b.unmatched > 0.0 && !opts.allow_unmatched {
        let mut f = Failure::new(
            "unmatched",
            format!(
                "{} of new connections reach no endpoint",
                fmt_prob(b.unmatched)
            ),
        );
        f.value = Some(b.unmatched);
        f.expected = Some(0.0);
        failures.push(f);
    }
    for e in &b.endpoints {
        if e.probability == 0.0 {
            let mut f = Failure::new(
                "zero-probability",
                format!("{} can never be chosen (line {})", e.endpoint, e.line),
            );
            f.endpoint = Some(e.endpoint.clone());
            f.value = Some(0.0);
            failures.push(f);
        }
        if e.paths > 1 {
            let lines: Vec<String> = e.via.iter().map(u32::to_string).collect();
            let mut f = Failure::new(
                "double-weight",
                format!(
                    "{} is reached through {} branches (rules on lines {})",
                    e.endpoint,
                    e.paths,
                    lines.join(", ")
                ),
            );
            f.endpoint = Some(e.endpoint.clone());
            f.value = Some(f64::from(e.paths));
            failures.push(f);
        }
    }
    if let Some(s) = &b.simulation
        && s.expected.p_value_adjusted < opts.alpha
    {
        let mut f = Failure::new(
            "simulation",
            format!(
                "{} simulated connections reject the {} split: {} = {:.4}, df {}, p = {:.3e}, adjusted p = {:.3e} < alpha {}",
                s.connections,
                s.expected.source,
                s.expected.method,
                s.expected.statistic,
                s.expected.df,
                s.expected.p_value,
                s.expected.p_value_adjusted,
                opts.alpha
            ),
        );
        f.value = Some(s.expected.p_value_adjusted);
        f.threshold = Some(opts.alpha);
        failures.push(f);
    }
    if let Some(o) = &b.observed
        && o.p_value_adjusted < opts.alpha
    {
        let mut f = Failure::new(
            "observed",
            format!(
                "the node's counters ({} connections) reject the rules' probabilities: {} = {:.4}, df {}, p = {:.3e}, adjusted p = {:.3e} < alpha {}",
                o.connections,
                o.method,
                o.statistic,
                o.df,
                o.p_value,
                o.p_value_adjusted,
                opts.alpha
            ),
        );
        f.value = Some(o.p_value_adjusted);
        f.threshold = Some(opts.alpha);
        failures.push(f);
    }
    if let Some(missing) = b.missing_endpoints.as_ref() {
        for m in missing {
            let mut f = Failure::new(
                "missing-endpoint",
                format!("the expectations name {m}, which the rules never choose"),
            );
            f.endpoint = Some(m.clone());
            failures.push(f);
        }
    }
    Verdict {
        pass: failures.is_empty(),
        failures,
    }
}

/// Verdicts on a whole report.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub verdicts: Vec<Verdict>,
}

impl Outcome {
    pub fn new(report: &Report, opts: &CheckOptions) -> Self {
        Self {
            verdicts: report.balancers.iter().map(|b| judge(b, opts)).collect(),
        }
    }

    pub fn failed(&self) -> usize {
        self.verdicts.iter().filter(|v| !v.pass).count()
    }

    pub fn pass(&self) -> bool {
        self.failed() == 0
    }

    /// `checked N balancers: M failed`
    pub fn summary_line(&self) -> String {
        summary_line(self.verdicts.len(), self.failed())
    }

    /// The human output: each failing balancer with its reasons, then the summary line.
    pub fn to_text(&self, report: &Report, color: bool) -> String {
        let mut s = String::new();
        for (b, v) in report.balancers.iter().zip(&self.verdicts) {
            text_block(&mut s, b, v, color);
        }
        text_end(&mut s, self.verdicts.len(), self.failed(), color);
        s
    }

    /// The report JSON with a `verdict` per balancer and overall (its keys sorted).
    pub fn to_json(&self, report: &Report, opts: &CheckOptions) -> String {
        let mut s = String::new();
        for (b, v) in report.balancers.iter().zip(&self.verdicts) {
            json_balancer(&mut s, b, v);
        }
        let head = Report {
            lbaudit: report.lbaudit,
            input: report.input.clone(),
            simulation: report.simulation.clone(),
            balancers: Vec::new(),
            warnings: report.warnings.clone(),
        };
        let end = json_end(&head, self.verdicts.len(), self.failed(), opts);
        json_document(&s, &end)
    }

    /// JUnit XML: one testsuite, one testcase per balancer.
    pub fn to_junit(&self, report: &Report) -> String {
        let mut cases = String::new();
        for (b, v) in report.balancers.iter().zip(&self.verdicts) {
            junit_case(&mut cases, b, v);
        }
        junit_document(
            &report.input.source,
            self.verdicts.len(),
            self.failed(),
            &cases,
        )
    }

    /// A Markdown summary for a pipeline's summary page.
    pub fn to_markdown(&self, report: &Report) -> String {
        let mut rows = String::new();
        for (b, v) in report.balancers.iter().zip(&self.verdicts) {
            markdown_row(&mut rows, b, v);
        }
        markdown_document(self.verdicts.len(), self.failed(), &rows)
    }
}

/// `checked N balancers: M failed`
fn summary_line(checked: usize, failed: usize) -> String {
    format!(
        "checked {checked} balancer{}: {failed} failed",
        if checked == 1 { "" } else { "s" },
    )
}

/// The human output's lines for a balancer: its reasons when it fails, nothing else.
fn text_block(s: &mut String, b: &BalancerReport, v: &Verdict, color: bool) {
    if v.pass {
        return;
    }
    let _ = writeln!(
        s,
        "{} {} ({} chain {}, {} endpoint{})",
        paint(color, "31;1", "FAIL"),
        b.name,
        b.table,
        b.chain,
        b.endpoints.len(),
        if b.endpoints.len() == 1 { "" } else { "s" }
    );
    for f in &v.failures {
        let _ = writeln!(s, "  {}: {}", f.reason, f.message);
        let _ = writeln!(
            s,
            "    {}",
            paint(color, "2", &format!("fix: {}", advice(f.reason)))
        );
    }
}

/// The human output's summary line, green when nothing failed.
fn text_end(s: &mut String, checked: usize, failed: usize, color: bool) {
    let line = summary_line(checked, failed);
    let code = if failed == 0 { "32" } else { "31" };
    let _ = writeln!(s, "{}", paint(color, code, &line));
}

/// A balancer of the JSON's `balancers` array, with its `verdict`, after a separator
/// (`,` and a new line; the first balancer's comma is left out by the writer): serde's
/// pretty printing of its value, keys sorted, at the array's depth.
fn json_balancer(s: &mut String, b: &BalancerReport, v: &Verdict) {
    let mut value = serde_json::to_value(b).expect("balancer serialises");
    if let Some(obj) = value.as_object_mut() {
        obj.insert(
            "verdict".into(),
            serde_json::to_value(v).expect("verdict serialises"),
        );
    }
    let text = serde_json::to_string_pretty(&value).expect("serialises");
    s.push_str(",\n    ");
    // (A JSON string holds no line break: every one is between tokens.)
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            s.push_str("\n    ");
        }
        s.push_str(line);
    }
}

/// The JSON document with no balancers: the report's `head` (whose `balancers` are
/// left out) and the overall verdict.
fn json_end(head: &Report, checked: usize, failed: usize, opts: &CheckOptions) -> String {
    let mut v = serde_json::to_value(head).expect("report serialises");
    if let Some(obj) = v.as_object_mut() {
        obj.insert(
            "verdict".into(),
            serde_json::json!({
                "pass": failed == 0,
                "checked": checked,
                "failed": failed,
                "max_skew": opts.max_skew,
                "alpha": opts.alpha,
                "allow_unmatched": opts.allow_unmatched,
                "min_endpoints": opts.min_endpoints,
            }),
        );
    }
    serde_json::to_string_pretty(&v).expect("serialises") + "\n"
}

/// What comes before the first balancer of the JSON (keys sorted: `balancers` first).
const JSON_OPEN: &str = "{\n  \"balancers\": [";

/// The JSON document from its balancers (as [`json_balancer`] printed them) and the
/// document without them ([`json_end`]).
fn json_document(balancers: &str, end: &str) -> String {
    if balancers.is_empty() {
        return end.to_string();
    }
    let mut s = String::with_capacity(balancers.len() + end.len() + 16);
    s.push_str(JSON_OPEN);
    s.push_str(balancers.strip_prefix(',').unwrap_or(balancers));
    s.push_str(&json_close(end));
    s
}

/// What follows the last balancer of the JSON, from the document without balancers:
/// the array closed on a line of its own, then the other keys.
fn json_close(end: &str) -> String {
    let rest = end
        .strip_prefix(JSON_OPEN)
        .and_then(|r| r.strip_prefix(']'))
        .expect("the report's first key is `balancers`");
    format!("\n  ]{rest}")
}

/// A balancer's JUnit testcase.
fn junit_case(s: &mut String, b: &BalancerReport, v: &Verdict) {
    let _ = write!(
        s,
        "    <testcase classname=\"lbaudit.{}.{}\" name=\"{}\" time=\"0\"",
        xml_escape(&b.table),
        xml_escape(&b.chain),
        xml_escape(&b.name)
    );
    if v.pass {
        s.push_str("/>\n");
        return;
    }
    s.push_str(">\n");
    for f in &v.failures {
        let _ = writeln!(
            s,
            "      <failure type=\"{}\" message=\"{}\">{}\n{}</failure>",
            f.reason,
            xml_escape(&f.message),
            xml_escape(&f.message),
            xml_escape(advice(f.reason))
        );
    }
    s.push_str("    </testcase>\n");
}

/// The JUnit document around its testcases.
fn junit_document(source: &str, checked: usize, failed: usize, cases: &str) -> String {
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let n = checked;
    let _ = writeln!(
        s,
        "<testsuites name=\"lbaudit\" tests=\"{n}\" failures=\"{failed}\" errors=\"0\" time=\"0\">"
    );
    let _ = writeln!(
        s,
        "  <testsuite name=\"lbaudit check {}\" tests=\"{n}\" failures=\"{failed}\" errors=\"0\" skipped=\"0\" time=\"0\">",
        xml_escape(source)
    );
    s.push_str(cases);
    s.push_str("  </testsuite>\n</testsuites>\n");
    s
}

/// A balancer's row of the Markdown table.
fn markdown_row(s: &mut String, b: &BalancerReport, v: &Verdict) {
    let reasons: Vec<&str> = v.failures.iter().map(|f| f.reason).collect();
    let _ = writeln!(
        s,
        "| {} | `{}` | {} | {} | {} | {} |",
        if v.pass { "✅" } else { "❌" },
        b.name.replace('|', "\\|"),
        b.endpoints.len(),
        fmt_dev(b.max_relative_skew),
        fmt_prob(b.unmatched),
        reasons.join(", ")
    );
}

/// The Markdown summary around its rows.
fn markdown_document(checked: usize, failed: usize, rows: &str) -> String {
    format!(
        "### lbaudit: {}\n\n| | balancer | endpoints | largest skew | unmatched | reason |\n|---|---|---:|---:|---:|---|\n{rows}",
        summary_line(checked, failed)
    )
}

/// What `lbaudit check` prints besides its human lines (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Only the human lines.
    Text,
    Junit,
    Markdown,
    /// The report JSON with the verdicts ([`Outcome::to_json`]).
    Json,
}

/// Whether a balancer's tests took Monte-Carlo p-values (whose smallest value is
/// bounded by the number of samples).
pub fn uses_monte_carlo(b: &BalancerReport) -> bool {
    b.observed.as_ref().is_some_and(|o| o.replicates.is_some())
        || (b.simulation.as_ref())
            .is_some_and(|s| s.replicates.is_some() || s.expected.replicates.is_some())
}

/// A check made a window of balancers at a time ([`crate::report::audited_windows`]):
/// each balancer converted, judged and printed as it comes, then dropped, so that a
/// check of tens of thousands of balancers never holds them all. The JSON is written as
/// it is made (nothing before the first balancer: a check that finds none can still
/// fail without output); the human lines (of failing balancers) and the JUnit or
/// Markdown text, a line or two a balancer, wait for the end, whose counts they start
/// with. The text is the same as [`Outcome`]'s of the report built whole.
pub struct Stream<'w> {
    opts: CheckOptions,
    format: Format,
    color: bool,
    /// Where the JSON goes (with [`Format::Json`]).
    json: Option<&'w mut dyn std::io::Write>,
    simulation: Option<SimulationInfo>,
    /// The balancers so far, but for the JSON written.
    so_far: Piece,
}

/// Balancers judged and printed: a batch of them ([`Stream::window`]) or all so far.
#[derive(Default)]
struct Piece {
    checked: usize,
    failed: usize,
    monte_carlo: bool,
    /// The human lines.
    text: String,
    /// The JUnit testcases, Markdown rows or JSON (each balancer after a separator).
    body: String,
    /// The balancers' warnings (for the JSON, which lists them).
    warnings: Vec<Warning>,
}

/// The end of a [`Stream`].
#[derive(Debug)]
pub struct Checked {
    pub checked: usize,
    pub failed: usize,
    /// Some balancer's tests took Monte-Carlo p-values.
    pub monte_carlo: bool,
    /// The human output: failing balancers, then the summary line.
    pub text: String,
    /// The output in the asked format, where it was not written as it was made: JUnit,
    /// Markdown, or the JSON of a check without balancers. (`None` for text: it is
    /// [`Checked::text`].)
    pub formatted: Option<String>,
}

impl<'w> Stream<'w> {
    /// A check with `opts`, printing `format` (the JSON to `json`), with the run's
    /// simulation info.
    pub fn new(
        opts: CheckOptions,
        format: Format,
        color: bool,
        json: Option<&'w mut dyn std::io::Write>,
        simulation: Option<SimulationInfo>,
    ) -> Self {
        Stream {
            opts,
            format,
            color,
            json,
            simulation,
            so_far: Piece::default(),
        }
    }

    /// Judges and prints the next balancers, batches of them with their audits (each
    /// batch by one task, on several threads).
    pub fn window(&mut self, batches: Vec<(Vec<Balancer>, Vec<Audit>)>) -> std::io::Result<()> {
        use rayon::prelude::*;
        let (opts, format, color) = (&self.opts, self.format, self.color);
        let pieces: Vec<Piece> = batches
            .into_par_iter()
            .map(|(balancers, audits)| {
                let mut p = Piece::default();
                for (b, a) in balancers.iter().zip(&audits) {
                    let r = BalancerReport::from_balancer(b, Some(a));
                    let v = judge(&r, opts);
                    p.checked += 1;
                    p.failed += usize::from(!v.pass);
                    p.monte_carlo |= uses_monte_carlo(&r);
                    text_block(&mut p.text, &r, &v, color);
                    match format {
                        Format::Text => {}
                        Format::Junit => junit_case(&mut p.body, &r, &v),
                        Format::Markdown => markdown_row(&mut p.body, &r, &v),
                        Format::Json => json_balancer(&mut p.body, &r, &v),
                    }
                    if format == Format::Json {
                        p.warnings.extend(b.warnings.iter().cloned());
                    }
                }
                p
            })
            .collect();
        for p in pieces {
            if format == Format::Json
                && !p.body.is_empty()
                && let Some(w) = self.json.as_mut()
            {
                if self.so_far.checked == 0 {
                    w.write_all(JSON_OPEN.as_bytes())?;
                    w.write_all(&p.body.as_bytes()[1..])?;
                } else {
                    w.write_all(p.body.as_bytes())?;
                }
            } else {
                self.so_far.body.push_str(&p.body);
            }
            let so_far = &mut self.so_far;
            so_far.checked += p.checked;
            so_far.failed += p.failed;
            so_far.monte_carlo |= p.monte_carlo;
            so_far.text.push_str(&p.text);
            so_far.warnings.extend(p.warnings);
        }
        Ok(())
    }

    /// Ends the check of the input `rs` named `source`, whose reading warned
    /// `warnings`: writes the rest of the JSON when some was written.
    pub fn finish(
        mut self,
        source: &str,
        rs: &Ruleset<'_>,
        mut warnings: Vec<Warning>,
    ) -> std::io::Result<Checked> {
        let mut all = std::mem::take(&mut self.so_far);
        let (checked, failed) = (all.checked, all.failed);
        text_end(&mut all.text, checked, failed, self.color);
        let formatted = match self.format {
            Format::Text => None,
            Format::Junit => Some(junit_document(source, checked, failed, &all.body)),
            Format::Markdown => Some(markdown_document(checked, failed, &all.body)),
            Format::Json => {
                warnings.append(&mut all.warnings);
                let head = Report::header(source, rs, &[], self.simulation.take(), warnings);
                let end = json_end(&head, checked, failed, &self.opts);
                match self.json.as_mut() {
                    Some(w) if checked > 0 => {
                        w.write_all(json_close(&end).as_bytes())?;
                        None
                    }
                    _ => Some(json_document(&all.body, &end)),
                }
            }
        };
        Ok(Checked {
            checked,
            failed,
            monte_carlo: all.monte_carlo,
            text: all.text,
            formatted,
        })
    }
}

/// Escapes text for XML attributes and content; drops characters XML 1.0 forbids.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, AuditOptions};
    use crate::balance::Candidate;
    use crate::graph::Graph;
    use crate::parse::{self, ParseOptions};

    /// `Outcome::to_json` as it was first written (the whole report as one value): the
    /// oracle of the JSON now printed a balancer at a time.
    fn whole_json(outcome: &Outcome, report: &Report, opts: &CheckOptions) -> String {
        let mut v = serde_json::to_value(report).unwrap();
        if let Some(list) = v.get_mut("balancers").and_then(|b| b.as_array_mut()) {
            for (b, verdict) in list.iter_mut().zip(&outcome.verdicts) {
                let obj = b.as_object_mut().unwrap();
                obj.insert("verdict".into(), serde_json::to_value(verdict).unwrap());
            }
        }
        v.as_object_mut().unwrap().insert(
            "verdict".into(),
            serde_json::json!({
                "pass": outcome.pass(),
                "checked": outcome.verdicts.len(),
                "failed": outcome.failed(),
                "max_skew": opts.max_skew,
                "alpha": opts.alpha,
                "allow_unmatched": opts.allow_unmatched,
                "min_endpoints": opts.min_endpoints,
            }),
        );
        serde_json::to_string_pretty(&v).unwrap() + "\n"
    }

    /// A check of `candidates` streamed a window at a time gives what the report built
    /// whole gives, in every format, the JSON written to a writer or kept.
    fn streamed_is_built(
        name: &str,
        rs: &Ruleset<'_>,
        graph: &Graph<'_, '_>,
        candidates: &[Candidate],
        opts: &AuditOptions,
        check: &CheckOptions,
    ) -> usize {
        let balancers: Vec<Balancer> = candidates
            .iter()
            .filter_map(|c| crate::balance::analyse(graph, c))
            .collect();
        let opts = AuditOptions {
            balancers: Some(candidates.len()),
            ..opts.clone()
        };
        let (audits, info) = audit::run(graph, &balancers, &opts);
        let given = vec![Warning::new(1, "given")];
        let report = Report::new("x", rs, &balancers, Some(&audits), info, given.clone());
        let outcome = Outcome::new(&report, check);
        let json = outcome.to_json(&report, check);
        assert_eq!(json, whole_json(&outcome, &report, check), "{name}");
        let monte_carlo = report.balancers.iter().any(uses_monte_carlo);
        for (format, built) in [
            (Format::Text, None),
            (Format::Junit, Some(outcome.to_junit(&report))),
            (Format::Markdown, Some(outcome.to_markdown(&report))),
            (Format::Json, Some(json.clone())),
        ] {
            for window in [1, 3, 1000] {
                // (Only the JSON is written as it is made.)
                let writers: &[bool] = if format == Format::Json {
                    &[false, true]
                } else {
                    &[false]
                };
                for &to_writer in writers {
                    let mut written = Vec::new();
                    let w = to_writer.then_some(&mut written as &mut dyn std::io::Write);
                    let done = crate::report::audited_windows(
                        graph,
                        candidates,
                        &opts,
                        window,
                        "checking",
                        |info| Ok(Stream::new(check.clone(), format, true, w, info)),
                        |stream, batches| stream.window(batches),
                    )
                    .unwrap()
                    .finish("x", rs, given.clone())
                    .unwrap();
                    let what = format!("{name}, {format:?}, window {window}, {to_writer}");
                    assert_eq!(done.text, outcome.to_text(&report, true), "{what}");
                    assert_eq!(done.checked, outcome.verdicts.len(), "{what}");
                    assert_eq!(done.failed, outcome.failed(), "{what}");
                    assert_eq!(done.monte_carlo, monte_carlo, "{what}");
                    let mut got = String::from_utf8(written).unwrap();
                    got.push_str(done.formatted.as_deref().unwrap_or_default());
                    let want = built.as_deref().unwrap_or_default();
                    assert_eq!(got, want, "{what}");
                }
            }
        }
        outcome.failed()
    }

    /// Every fixture, and a dump with counters, with and without a simulation, with
    /// tight and loose options: the streamed check is the built one.
    #[test]
    fn streamed_check_is_the_built_reports_check() {
        let mut texts = crate::testing::fixture_texts();
        texts.push(("counted".into(), crate::testing::counted_dump()));
        let expectations =
            crate::expect::Expectations::parse("*,10.0.0.1:80,3\n*,nowhere,1\n", "weights.csv")
                .unwrap();
        let variants = [
            (AuditOptions::default(), CheckOptions::default()),
            (
                AuditOptions {
                    connections: Some(0),
                    ..AuditOptions::default()
                },
                CheckOptions {
                    max_skew: 1e-12,
                    allow_unmatched: true,
                    alpha: 0.2,
                    min_endpoints: 3,
                },
            ),
            (
                AuditOptions {
                    connections: Some(300),
                    clients: Some(3),
                    expectations: Some(expectations),
                    ..AuditOptions::default()
                },
                CheckOptions {
                    alpha: 0.5,
                    ..CheckOptions::default()
                },
            ),
        ];
        let mut failed = 0;
        for (name, text) in &texts {
            let rs = parse::parse(text, &ParseOptions { lenient: true }).unwrap();
            let graph = Graph::build(&rs, true).unwrap();
            let candidates = crate::balance::candidates(&graph);
            for (opts, check) in &variants {
                failed += streamed_is_built(name, &rs, &graph, &candidates, opts, check);
            }
        }
        assert!(
            failed > 100,
            "{failed} balancers failed: the failing paths ran"
        );
    }

    /// Batches without a balancer first (generic chains whose statistic rules no
    /// traffic reaches, listed first by name), then balancers: the JSON still opens once.
    #[test]
    fn streamed_check_after_empty_batches() {
        let text = crate::testing::unreached_then_services();
        let rs = parse::parse(&text, &ParseOptions::default()).unwrap();
        let graph = Graph::build(&rs, false).unwrap();
        let candidates = crate::balance::candidates(&graph);
        assert_eq!(candidates.len(), 130);
        // Generic candidates only: none of them is a balancer.
        let generic = &candidates[..40];
        for connections in [0, 200] {
            let opts = AuditOptions {
                connections: Some(connections),
                ..AuditOptions::default()
            };
            let check = CheckOptions::default();
            streamed_is_built("many batches", &rs, &graph, &candidates, &opts, &check);
            streamed_is_built("none", &rs, &graph, generic, &opts, &check);
        }
    }
}
