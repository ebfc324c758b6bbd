//! Exact probabilities: `lbaudit report FILE --format json` against the expectations in
//! `fixtures/expected/*.json`, which `fixtures/expected/compute.py` computes with exact
//! fractions from the fixture text alone (never from lbaudit's output).
//!
//! Floats are compared with `==`. Both sides are read from their JSON text with
//! `str::parse::<f64>` (correctly rounded), not with `serde_json`'s default float parser,
//! which is allowed to be off by one ulp without its `float_roundtrip` feature; hence the
//! small JSON reader at the bottom of this file that keeps numbers as text.

use std::path::{Path, PathBuf};
use std::process::Output;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("fixtures").join(name)
}

fn lbaudit() -> assert_cmd::Command {
    assert_cmd::cargo::cargo_bin_cmd!("lbaudit")
}

/// Runs `lbaudit report FILE --format json`, requires exit 0, returns the parsed output.
fn report(path: &Path) -> Result<J, String> {
    let out = lbaudit()
        .arg("report")
        .arg(path)
        .args(["--format", "json"])
        .output()
        .map_err(|e| format!("cannot run lbaudit: {e}"))?;
    parse_success(&out, &path.display().to_string())
}

fn parse_success(out: &Output, what: &str) -> Result<J, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(0) {
        return Err(format!(
            "{what}: exit status {:?} (want 0)\nstderr: {}",
            out.status.code(),
            stderr.trim_end()
        ));
    }
    parse_json(&stdout).map_err(|e| format!("{what}: stdout is not JSON ({e}):\n{stdout}"))
}

/// The expected JSON files, sorted by name.
fn expected_files() -> Vec<PathBuf> {
    let dir = root().join("fixtures").join("expected");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    assert!(v.len() >= 30, "expected files missing in {}", dir.display());
    v
}

fn load_expected(name: &str) -> J {
    let p = root().join("fixtures").join("expected").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    parse_json(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// Compares one report with its expectation; returns every difference found.
fn compare(exp: &J, got: &J, input_lines: usize) -> Vec<String> {
    let mut errs = Vec::new();
    let fx = exp.field("fixture").str().to_string();
    for key in ["input", "balancers", "warnings"] {
        if got.get(key).is_none() {
            errs.push(format!("{fx}: output has no \"{key}\""));
        }
    }
    if !errs.is_empty() {
        return errs;
    }
    let got_b = got.field("balancers").arr();
    let exp_b = exp.field("balancers").arr();

    // balancers sorted by (name, chain)
    let keys: Vec<(String, String)> = got_b
        .iter()
        .map(|b| {
            (
                b.get("name").map_or(String::new(), |n| n.str().to_string()),
                b.get("chain")
                    .map_or(String::new(), |n| n.str().to_string()),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    if keys != sorted {
        errs.push(format!(
            "{fx}: balancers are not sorted by (name, chain): {keys:?}"
        ));
    }

    // the set of balancers (by chain, with multiplicity)
    if exp.field("exact_balancer_set").bool() {
        let mut want: Vec<&str> = exp_b.iter().map(|b| b.field("chain").str()).collect();
        let mut have: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        want.sort_unstable();
        have.sort_unstable();
        if want != have {
            errs.push(format!("{fx}: balancer chains {have:?}, want {want:?}"));
        }
    }

    for eb in exp_b {
        let chain = eb.field("chain").str();
        let want_eps: Vec<&str> = eb
            .field("endpoints")
            .arr()
            .iter()
            .map(|e| e.field("endpoint").str())
            .collect();
        let candidates: Vec<&J> = got_b
            .iter()
            .filter(|b| b.get("chain").is_some_and(|c| c.str() == chain))
            .collect();
        let endpoints_of = |b: &J| -> Vec<String> {
            b.get("endpoints").map_or(Vec::new(), |e| {
                e.arr()
                    .iter()
                    .map(|x| {
                        x.get("endpoint")
                            .map_or(String::new(), |s| s.str().to_string())
                    })
                    .collect()
            })
        };
        let gb = match candidates.len() {
            0 => {
                errs.push(format!("{fx}: no balancer with chain {chain}"));
                continue;
            }
            1 => candidates[0],
            _ => {
                // a built-in chain with one balancer per destination: match on endpoints
                let mut want_sorted = want_eps.clone();
                want_sorted.sort_unstable();
                match candidates.iter().find(|b| {
                    let mut e = endpoints_of(b);
                    e.sort();
                    e == want_sorted
                }) {
                    Some(b) => b,
                    None => {
                        errs.push(format!(
                            "{fx}: no balancer in {chain} with endpoints {want_eps:?}"
                        ));
                        continue;
                    }
                }
            }
        };
        let at = format!("{fx}: {chain}");
        if eb.field("check_name").bool() {
            let want = eb.field("name").str();
            match gb.get("name") {
                Some(n) if n.str() == want => {}
                other => errs.push(format!("{at}: name {other:?}, want {want:?}")),
            }
        }
        let want_table = eb.field("table").str();
        if gb.get("table").map(J::str) != Some(want_table) {
            errs.push(format!(
                "{at}: table {:?}, want {want_table:?}",
                gb.get("table")
            ));
        }
        let have_affinity = gb.get("affinity").is_some_and(|a| !a.is_null());
        match eb.field("affinity") {
            J::Bool(true) if !have_affinity => {
                errs.push(format!(
                    "{at}: affinity missing (the chain has --rcheck rules)"
                ));
            }
            J::Bool(false) if have_affinity => {
                errs.push(format!("{at}: affinity should be null"));
            }
            _ => {}
        }
        // entries: every expected one must be present
        let got_entries: Vec<(String, String)> = gb.get("entries").map_or(Vec::new(), |e| {
            e.arr()
                .iter()
                .map(|x| {
                    (
                        x.get("kind").map_or(String::new(), |s| s.str().to_string()),
                        x.get("text").map_or(String::new(), |s| s.str().to_string()),
                    )
                })
                .collect()
        });
        for ee in eb.field("entries").arr() {
            let kind = ee.field("kind").str();
            let ok = if let Some(t) = ee.get("text") {
                got_entries.iter().any(|(k, x)| k == kind && x == t.str())
            } else {
                let part = ee.field("text_contains").str();
                got_entries
                    .iter()
                    .any(|(k, x)| k == kind && x.contains(part))
            };
            if !ok {
                errs.push(format!(
                    "{at}: entry {ee:?} missing; entries are {got_entries:?}"
                ));
            }
        }
        // endpoints, in cascade order, with exact floats
        let have_eps = endpoints_of(gb);
        if have_eps != want_eps {
            errs.push(format!(
                "{at}: endpoints {}, want {} (in cascade order)",
                short(&have_eps),
                short(&want_eps)
            ));
            continue;
        }
        let ideal = eb.field("ideal").f64();
        let mut first_bad = 0;
        for (ee, ge) in eb
            .field("endpoints")
            .arr()
            .iter()
            .zip(gb.field("endpoints").arr())
        {
            let name = ee.field("endpoint").str();
            for (key, want) in [
                ("probability", ee.field("probability").f64()),
                ("relative_deviation", ee.field("relative_deviation").f64()),
                ("ideal", ideal),
            ] {
                let have = ge.get(key).map(J::f64);
                if have != Some(want) {
                    first_bad += 1;
                    if first_bad <= 5 {
                        let exact = ee
                            .get(&format!("{key}_exact"))
                            .filter(|x| !x.is_null())
                            .map_or(String::new(), |x| format!(" = {}", x.str()));
                        errs.push(format!(
                            "{at}: {name}: {key} {have:?}, want {want:e}{exact}"
                        ));
                    }
                }
            }
            // the rule that produced the outcome (DNAT, SNAT, verdict); a mark outcome may
            // come from several MARK rules and may say 0
            let min_line = if name.starts_with("mark ") { 0.0 } else { 1.0 };
            if ge.get("line").is_none_or(|l| l.f64() < min_line) {
                first_bad += 1;
                if first_bad <= 5 {
                    errs.push(format!("{at}: {name}: no line number"));
                }
            }
        }
        if first_bad > 5 {
            errs.push(format!("{at}: ... {first_bad} endpoint differences in all"));
        }
        for key in ["unmatched", "max_relative_skew"] {
            let want = eb.field(key).f64();
            let have = gb.get(key).map(J::f64);
            if have != Some(want) {
                errs.push(format!("{at}: {key} {have:?}, want {want:e}"));
            }
        }
    }

    // warnings: fragments and excerpts carry at least one; a cut cascade's warning names
    // an input line
    let warnings = got.field("warnings").arr();
    let lines: Vec<f64> = warnings
        .iter()
        .filter_map(|w| w.get("line").map(J::f64))
        .collect();
    if lines.len() != warnings.len() {
        errs.push(format!(
            "{fx}: every warning needs a line (0 for the whole input)"
        ));
    }
    match exp.field("expect_warnings") {
        J::Str(s) if s == "some" && warnings.is_empty() => {
            errs.push(format!(
                "{fx}: no warnings (a fragment or excerpt needs some)"
            ));
        }
        J::Str(s)
            if s == "with-line" && !lines.iter().any(|&l| l >= 1.0 && l <= input_lines as f64) =>
        {
            errs.push(format!(
                "{fx}: no warning names an input line (1..={input_lines}): {lines:?}"
            ));
        }
        _ => {}
    }
    for w in warnings {
        if w.get("message").is_none_or(|m| m.str().is_empty()) {
            errs.push(format!("{fx}: a warning without a message: {w:?}"));
        }
    }
    errs
}

fn short(v: &[impl AsRef<str>]) -> String {
    if v.len() <= 6 {
        format!("{:?}", v.iter().map(AsRef::as_ref).collect::<Vec<_>>())
    } else {
        format!(
            "[{} ... {}] ({} endpoints)",
            v[..3]
                .iter()
                .map(AsRef::as_ref)
                .collect::<Vec<_>>()
                .join(", "),
            v[v.len() - 2..]
                .iter()
                .map(AsRef::as_ref)
                .collect::<Vec<_>>()
                .join(", "),
            v.len()
        )
    }
}

/// Every fixture against its expectation. The binary runs once per fixture, in parallel;
/// all differences are collected before failing.
#[test]
fn every_fixture_matches_its_exact_expectation() {
    let files = expected_files();
    let results: Vec<(String, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|p| {
                s.spawn(move || {
                    let exp = {
                        let text = std::fs::read_to_string(p).unwrap();
                        parse_json(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                    };
                    let fx = exp.field("fixture").str().to_string();
                    let input = fixture(&fx);
                    let errs = match report(&input) {
                        Ok(got) => compare(&exp, &got, count_lines(&input)),
                        Err(e) => vec![e],
                    };
                    (fx, errs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let failed: Vec<&(String, Vec<String>)> = results.iter().filter(|r| !r.1.is_empty()).collect();
    if !failed.is_empty() {
        let mut msg = format!(
            "{} of {} fixtures differ from fixtures/expected:\n",
            failed.len(),
            results.len()
        );
        for (fx, errs) in &failed {
            msg.push_str(&format!("--- {fx}\n"));
            for e in errs.iter().take(12) {
                msg.push_str(&format!("  {e}\n"));
            }
            if errs.len() > 12 {
                msg.push_str(&format!("  ... {} more\n", errs.len() - 12));
            }
        }
        panic!("{msg}");
    }
}

/// The balancer with this name that has an entry with this text.
fn by_name_and_entry<'a>(got: &'a J, name: &str, entry: &str) -> &'a J {
    got.field("balancers")
        .arr()
        .iter()
        .find(|b| {
            b.get("name").is_some_and(|n| n.str() == name)
                && b.get("entries").is_some_and(|e| {
                    e.arr()
                        .iter()
                        .any(|x| x.get("text").is_some_and(|t| t.str() == entry))
                })
        })
        .unwrap_or_else(|| panic!("no balancer named {name:?} with entry {entry:?}"))
}

fn endpoint_probs(b: &J) -> Vec<(String, f64)> {
    b.field("endpoints")
        .arr()
        .iter()
        .map(|e| {
            (
                e.field("endpoint").str().to_string(),
                e.field("probability").f64(),
            )
        })
        .collect()
}

fn report_ok(name: &str) -> J {
    report(&fixture(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// Hand-checkable anchor: the seed page with one replica sends everything to it.
#[test]
fn seed_one_replica_gets_everything() {
    let got = report_ok("seed-1-replica.txt");
    let b = by_name_and_entry(&got, "namingthings/simpleservice:", "172.30.40.155:80/tcp");
    assert_eq!(
        endpoint_probs(b),
        vec![("172.17.0.2:9876".to_string(), 1.0)]
    );
    assert_eq!(b.field("chain").str(), "KUBE-SVC-IKIIGXZ2IBFIBYI6");
    assert_eq!(b.field("unmatched").f64(), 0.0);
    assert_eq!(b.field("max_relative_skew").f64(), 0.0);
    let kinds: Vec<&str> = b
        .field("entries")
        .arr()
        .iter()
        .filter(|e| e.field("text").str() == "172.30.40.155:80/tcp")
        .map(|e| e.field("kind").str())
        .collect();
    assert_eq!(kinds, ["cluster-ip"]);
}

/// Hand-checkable anchor: two replicas, 0.50000000000 then the fallback: exactly 1/2 each.
#[test]
fn seed_two_replicas_split_in_half() {
    let got = report_ok("seed-2-replicas.txt");
    let b = by_name_and_entry(&got, "namingthings/simpleservice:", "172.30.40.155:80/tcp");
    assert_eq!(
        endpoint_probs(b),
        vec![
            ("172.17.0.2:9876".to_string(), 0.5),
            ("172.17.0.4:9876".to_string(), 0.5)
        ]
    );
    for e in b.field("endpoints").arr() {
        assert_eq!(e.field("ideal").f64(), 0.5);
        assert_eq!(e.field("relative_deviation").f64(), 0.0);
    }
    // a grep fragment: no table, KUBE-MARK-MASQ undeclared; the report says so
    assert!(!got.field("warnings").arr().is_empty());
}

/// Hand-checkable anchor: nth round robin with a fallback rule: 1/3 each.
#[test]
fn nth_with_fallback_is_a_third_each() {
    let got = report_ok("nth-fallback.txt");
    let b = &got.field("balancers").arr()[0];
    assert_eq!(b.field("chain").str(), "PREROUTING");
    let third = 1.0 / 3.0;
    assert_eq!(
        endpoint_probs(b),
        vec![
            ("10.0.0.1:8080".to_string(), third),
            ("10.0.0.2:8080".to_string(), third),
            ("10.0.0.3:8080".to_string(), third)
        ]
    );
    assert_eq!(b.field("unmatched").f64(), 0.0);
}

/// Hand-checkable anchor: --every 3 --packet 0/1/2 on three rules, no fallback:
/// 1/3, 2/9, 4/27, and 8/27 of connections match no rule.
#[test]
fn nth_without_fallback_leaks_eight_27ths() {
    let got = report_ok("nth-no-fallback.txt");
    let b = &got.field("balancers").arr()[0];
    assert_eq!(
        endpoint_probs(b),
        vec![
            ("10.0.0.1:8080".to_string(), 1.0 / 3.0),
            ("10.0.0.2:8080".to_string(), 2.0 / 9.0),
            ("10.0.0.3:8080".to_string(), 4.0 / 27.0)
        ]
    );
    assert_eq!(b.field("unmatched").f64(), 8.0 / 27.0);
    // n*p - 1 for the last endpoint: 3 * 4/27 - 1 = -5/9
    assert_eq!(b.field("max_relative_skew").f64(), 5.0 / 9.0);
}

fn six_digits(x: f64) -> String {
    format!("{x:.5e}")
}

/// The 5-decimal era had a real skew: about 5e-3 relative at 1000 endpoints (1.9e-3 at
/// 400); the 10-decimal era's skew at 1000 endpoints is below 1e-6.
#[test]
fn five_decimal_skew_is_reported() {
    let exp = load_expected("kube-2018-large.json");
    let got = report_ok("kube-2018-large.txt");
    for (name, lo, hi) in [
        ("batch/crawler:http", 4.0e-3, 6.0e-3),
        ("batch/workers:http", 1.0e-3, 3.0e-3),
    ] {
        let want = exp
            .field("balancers")
            .arr()
            .iter()
            .find(|b| b.field("name").str() == name)
            .unwrap()
            .field("max_relative_skew")
            .f64();
        assert!(want > lo && want < hi, "{name}: expectation {want}");
        let b = by_name_and_entry(
            &got,
            name,
            exp.field("balancers")
                .arr()
                .iter()
                .find(|b| b.field("name").str() == name)
                .unwrap()
                .field("entries")
                .arr()[0]
                .field("text")
                .str(),
        );
        let have = b.field("max_relative_skew").f64();
        assert_eq!(
            six_digits(have),
            six_digits(want),
            "{name}: max_relative_skew {have}, want {want}"
        );
    }
    let modern = report_ok("kube-modern-1000.txt");
    let big = modern
        .field("balancers")
        .arr()
        .iter()
        .find(|b| b.field("endpoints").arr().len() == 1000)
        .expect("the 1000-endpoint balancer");
    let skew = big.field("max_relative_skew").f64();
    assert!(
        skew > 0.0 && skew < 1e-6,
        "10-decimal skew at 1000 endpoints: {skew}"
    );
}

/// Cut excerpts: the incomplete cascade is reported as such (traffic falls off the end of
/// the KUBE-SVC chain), with a warning naming a line.
#[test]
fn cut_cascades_leave_traffic_unmatched_and_warn() {
    for (fx, chain) in [
        ("openyurt-cut.txt", "KUBE-SVC-6RKIYNRZEKOWO3E3"),
        ("k8s-47533-cut.txt", "KUBE-SVC-TCOU7JCQXEZGVUNU"),
    ] {
        let got = report_ok(fx);
        let b = got
            .field("balancers")
            .arr()
            .iter()
            .find(|b| b.field("chain").str() == chain)
            .unwrap_or_else(|| panic!("{fx}: no {chain}"));
        assert!(b.field("unmatched").f64() > 0.1, "{fx}: unmatched");
        let w = got.field("warnings").arr();
        assert!(
            w.iter().any(|w| w.field("line").f64() >= 1.0),
            "{fx}: warnings {w:?}"
        );
    }
}

/// `lbaudit report -` reads stdin, and so does `lbaudit report` when stdin is piped.
#[test]
fn stdin_dash_and_piped_stdin() {
    let text = std::fs::read(fixture("seed-2-replicas.txt")).unwrap();
    let exp = load_expected("seed-2-replicas.json");
    let runs: [(&str, Vec<&str>); 2] = [
        (
            "report - --format json",
            vec!["report", "-", "--format", "json"],
        ),
        (
            "report --format json (piped)",
            vec!["report", "--format", "json"],
        ),
    ];
    for (what, args) in runs {
        let out = lbaudit()
            .args(&args)
            .write_stdin(text.clone())
            .output()
            .unwrap();
        let got = parse_success(&out, what).unwrap_or_else(|e| panic!("{e}"));
        let errs = compare(&exp, &got, 7);
        assert!(errs.is_empty(), "{what}:\n{}", errs.join("\n"));
    }
}

/// A 20,000-endpoint kube-proxy cascade: the exact forms of the late endpoints are too long
/// to keep (about 31 bits per rule before them), yet the sum is checked exactly, each
/// probability is the nearest f64 and each deviation n·p − 1 is small (`%.11f` of 1/20000 is off by 2e-6 relative).
#[test]
fn twenty_thousand_endpoints_sum_to_exactly_one() {
    let n = 20_000usize;
    let mut text = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-BIG - [0:0]\n\
         -A PREROUTING -j KUBE-SERVICES\n\
         -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"big/service:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-BIG\n",
    );
    for i in 0..n {
        let dest = format!("10.{}.{}.{}:8080", 1 + (i >> 16), (i >> 8) & 255, i & 255);
        if i + 1 < n {
            text.push_str(&format!(
                "-A KUBE-SVC-BIG -m statistic --mode random --probability {:.11} -j DNAT --to-destination {dest}\n",
                1.0 / (n - i) as f64
            ));
        } else {
            text.push_str(&format!(
                "-A KUBE-SVC-BIG -j DNAT --to-destination {dest}\n"
            ));
        }
    }
    text.push_str("COMMIT\n");
    let out = lbaudit()
        .args(["report", "-", "--format", "json", "--connections", "0"])
        .write_stdin(text)
        .output()
        .unwrap();
    let got = parse_success(&out, "20,000 endpoints").unwrap_or_else(|e| panic!("{e}"));
    let b = &got.field("balancers").arr()[0];
    assert!(b.field("exact_sum_is_one").bool());
    assert_eq!(b.field("unmatched").f64(), 0.0);
    let eps = b.field("endpoints").arr();
    assert_eq!(eps.len(), n);
    let sum: f64 = eps.iter().map(|e| e.field("probability").f64()).sum();
    assert!((sum - 1.0).abs() < 1e-9, "{sum}");
    // Short exact forms are printed; the long ones are not.
    assert!(eps[0].get("exact").is_some());
    assert!(eps[n - 1].get("exact").is_none());
    for e in eps {
        let p = e.field("probability").f64();
        let dev = e.field("relative_deviation").f64();
        assert!(dev.abs() < 1e-5, "{}: {dev}", e.field("endpoint").str());
        assert!(((n as f64 * p - 1.0) - dev).abs() < 1e-9);
    }
}

// ---------------------------------------------------------------- a small JSON reader

/// JSON value with numbers kept as their text.
#[derive(Debug, Clone, PartialEq)]
enum J {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn field(&self, key: &str) -> &J {
        self.get(key)
            .unwrap_or_else(|| panic!("no field {key:?} in {}", brief(self)))
    }
    fn str(&self) -> &str {
        match self {
            J::Str(s) => s,
            other => panic!("not a string: {}", brief(other)),
        }
    }
    fn f64(&self) -> f64 {
        match self {
            J::Num(s) => s
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("bad number {s:?}: {e}")),
            other => panic!("not a number: {}", brief(other)),
        }
    }
    fn bool(&self) -> bool {
        match self {
            J::Bool(b) => *b,
            other => panic!("not a bool: {}", brief(other)),
        }
    }
    fn arr(&self) -> &[J] {
        match self {
            J::Arr(v) => v,
            other => panic!("not an array: {}", brief(other)),
        }
    }
    fn is_null(&self) -> bool {
        matches!(self, J::Null)
    }
}

fn brief(j: &J) -> String {
    let s = format!("{j:?}");
    if s.len() > 200 {
        format!(
            "{}...",
            &s[..s.char_indices().nth(200).map_or(s.len(), |c| c.0)]
        )
    } else {
        s
    }
}

fn parse_json(text: &str) -> Result<J, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing text at byte {}", p.i));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.i))
    }
    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }
    fn value(&mut self, depth: usize) -> Result<J, String> {
        if depth > 64 {
            return self.err("nested too deep");
        }
        self.ws();
        match self.s.get(self.i) {
            None => self.err("unexpected end"),
            Some(b'{') => {
                self.i += 1;
                let mut kv = Vec::new();
                self.ws();
                if self.eat("}") {
                    return Ok(J::Obj(kv));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return self.err("expected a key");
                    }
                    let k = self.string()?;
                    self.ws();
                    if !self.eat(":") {
                        return self.err("expected ':'");
                    }
                    let v = self.value(depth + 1)?;
                    kv.push((k, v));
                    self.ws();
                    if self.eat(",") {
                        continue;
                    }
                    if self.eat("}") {
                        return Ok(J::Obj(kv));
                    }
                    return self.err("expected ',' or '}'");
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.eat("]") {
                    return Ok(J::Arr(v));
                }
                loop {
                    v.push(self.value(depth + 1)?);
                    self.ws();
                    if self.eat(",") {
                        continue;
                    }
                    if self.eat("]") {
                        return Ok(J::Arr(v));
                    }
                    return self.err("expected ',' or ']'");
                }
            }
            Some(b'"') => Ok(J::Str(self.string()?)),
            Some(b't') if self.eat("true") => Ok(J::Bool(true)),
            Some(b'f') if self.eat("false") => Ok(J::Bool(false)),
            Some(b'n') if self.eat("null") => Ok(J::Null),
            Some(c) if *c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'
                    )
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i])
                    .unwrap()
                    .to_string();
                if t.parse::<f64>().is_err() {
                    return self.err("bad number");
                }
                Ok(J::Num(t))
            }
            Some(_) => self.err("unexpected character"),
        }
    }
    fn hex4(&mut self) -> Result<u32, String> {
        let h = self
            .s
            .get(self.i..self.i + 4)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|t| u32::from_str_radix(t, 16).ok());
        match h {
            Some(v) => {
                self.i += 4;
                Ok(v)
            }
            None => self.err("bad \\u escape"),
        }
    }
    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i] != b'"' && self.s[self.i] != b'\\' {
                self.i += 1;
            }
            out.push_str(std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?);
            match self.s.get(self.i) {
                None => return self.err("unterminated string"),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                _ => {
                    self.i += 1;
                    let c = *self.s.get(self.i).ok_or("unterminated escape")?;
                    self.i += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xD800..0xDC00).contains(&cp) && self.eat("\\u") {
                                let lo = self.hex4()?;
                                cp = 0x10000
                                    + ((cp - 0xD800) << 10)
                                    + (lo.wrapping_sub(0xDC00) & 0x3FF);
                            }
                            out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                        }
                        _ => return self.err("bad escape"),
                    }
                }
            }
        }
    }
}

#[test]
fn json_reader_keeps_numbers_exact() {
    let j =
        parse_json(r#"{"a": [1, -2.5e-7, 0.1], "b": "x\"y\u00e9", "c": null, "d": true}"#).unwrap();
    assert_eq!(j.field("a").arr()[1].f64(), -2.5e-7);
    assert_eq!(j.field("a").arr()[2], J::Num("0.1".into()));
    assert_eq!(j.field("b").str(), "x\"y\u{e9}");
    assert!(j.field("c").is_null());
    assert!(j.field("d").bool());
    // a value serde_json's fast path may misread by an ulp is read exactly here
    assert_eq!(
        parse_json("0.0010000001639127731").unwrap().f64(),
        "0.0010000001639127731".parse::<f64>().unwrap()
    );
}
