//! `lbaudit check`: a fairness gate with verdicts, for people and for CI systems.

use crate::report::{BalancerReport, Report, fmt_dev, fmt_prob};
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
        format!(
            "checked {} balancer{}: {} failed",
            self.verdicts.len(),
            if self.verdicts.len() == 1 { "" } else { "s" },
            self.failed()
        )
    }

    /// The human output: each failing balancer with its reasons, then the summary line.
    pub fn to_text(&self, report: &Report, color: bool) -> String {
        let paint = |code: &str, t: &str| {
            if color {
                format!("\x1b[{code}m{t}\x1b[0m")
            } else {
                t.to_string()
            }
        };
        let mut s = String::new();
        for (b, v) in report.balancers.iter().zip(&self.verdicts) {
            if v.pass {
                continue;
            }
            let _ = writeln!(
                s,
                "{} {} ({} chain {}, {} endpoint{})",
                paint("31;1", "FAIL"),
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
                    paint("2", &format!("fix: {}", advice(f.reason)))
                );
            }
        }
        let line = self.summary_line();
        let _ = writeln!(
            s,
            "{}",
            if self.pass() {
                paint("32", &line)
            } else {
                paint("31", &line)
            }
        );
        s
    }

    /// The report JSON with a `verdict` per balancer and overall.
    pub fn to_json(&self, report: &Report, opts: &CheckOptions) -> String {
        let mut v = serde_json::to_value(report).expect("report serialises");
        if let Some(list) = v.get_mut("balancers").and_then(|b| b.as_array_mut()) {
            for (b, verdict) in list.iter_mut().zip(&self.verdicts) {
                if let Some(obj) = b.as_object_mut() {
                    obj.insert(
                        "verdict".into(),
                        serde_json::to_value(verdict).expect("verdict serialises"),
                    );
                }
            }
        }
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "verdict".into(),
                serde_json::json!({
                    "pass": self.pass(),
                    "checked": self.verdicts.len(),
                    "failed": self.failed(),
                    "max_skew": opts.max_skew,
                    "alpha": opts.alpha,
                    "allow_unmatched": opts.allow_unmatched,
                    "min_endpoints": opts.min_endpoints,
                }),
            );
        }
        serde_json::to_string_pretty(&v).expect("serialises") + "\n"
    }

    /// JUnit XML: one testsuite, one testcase per balancer.
    pub fn to_junit(&self, report: &Report) -> String {
        let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let n = self.verdicts.len();
        let failed = self.failed();
        let _ = writeln!(
            s,
            "<testsuites name=\"lbaudit\" tests=\"{n}\" failures=\"{failed}\" errors=\"0\" time=\"0\">"
        );
        let _ = writeln!(
            s,
            "  <testsuite name=\"lbaudit check {}\" tests=\"{n}\" failures=\"{failed}\" errors=\"0\" skipped=\"0\" time=\"0\">",
            xml_escape(&report.input.source)
        );
        for (b, v) in report.balancers.iter().zip(&self.verdicts) {
            let _ = write!(
                s,
                "    <testcase classname=\"lbaudit.{}.{}\" name=\"{}\" time=\"0\"",
                xml_escape(&b.table),
                xml_escape(&b.chain),
                xml_escape(&b.name)
            );
            if v.pass {
                s.push_str("/>\n");
                continue;
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
        s.push_str("  </testsuite>\n</testsuites>\n");
        s
    }

    /// A Markdown summary for a pipeline's summary page.
    pub fn to_markdown(&self, report: &Report) -> String {
        let mut s = format!(
            "### lbaudit: {}\n\n| | balancer | endpoints | largest skew | unmatched | reason |\n|---|---|---:|---:|---:|---|\n",
            self.summary_line()
        );
        for (b, v) in report.balancers.iter().zip(&self.verdicts) {
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
        s
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
