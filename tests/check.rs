//! `lbaudit check` end to end: exit codes, messages and CI report formats on fixtures.

use std::path::Path;

fn lbaudit() -> assert_cmd::Command {
    assert_cmd::cargo::cargo_bin_cmd!("lbaudit")
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn check(args: &[&str]) -> Run {
    let out = lbaudit().arg("check").args(args).output().expect("runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn todays_kube_proxy_dumps_pass() {
    for f in [
        "kube-modern.txt",
        "kube-modern-restore.txt",
        "kube-modern-1000.txt",
        "seed-2-replicas.txt",
        "minik8s-full.txt",
        "kube-entries.txt",
    ] {
        let r = check(&[&fixture(f)]);
        assert_eq!(r.code, 0, "{f}: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.contains(": 0 failed"), "{f}: {}", r.stdout);
    }
}

#[test]
fn five_decimal_era_fails_and_names_the_service() {
    let r = check(&[&fixture("kube-2018-large.txt")]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    // 1000 endpoints: 4.96e-3 relative skew; 400 endpoints: 1.88e-3; both above 1e-3.
    assert!(r.stdout.contains("FAIL batch/crawler:http"), "{}", r.stdout);
    assert!(r.stdout.contains("FAIL batch/workers:http"), "{}", r.stdout);
    assert!(r.stdout.contains("skew:"), "{}", r.stdout);
    assert!(
        r.stdout.contains("checked 3 balancers: 2 failed"),
        "{}",
        r.stdout
    );
    // A looser threshold lets the 400-endpoint service pass but not the 1000-endpoint one.
    let r = check(&[&fixture("kube-2018-large.txt"), "--max-skew", "3e-3"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("checked 3 balancers: 1 failed"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("batch/workers"), "{}", r.stdout);
}

#[test]
fn nth_without_fallback_fails_for_unmatched_traffic() {
    let r = check(&[&fixture("nth-no-fallback.txt"), "--max-skew", "1"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("unmatched:"), "{}", r.stdout);
    // 8/27 of connections reach nothing.
    assert!(r.stdout.contains("0.296296296296"), "{}", r.stdout);
    let r = check(&[
        &fixture("nth-no-fallback.txt"),
        "--max-skew",
        "1",
        "--allow-unmatched",
    ]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    // With the fallback rule the round robin is exact.
    assert_eq!(check(&[&fixture("nth-fallback.txt")]).code, 0);
}

#[test]
fn weighted_mark_cascade_passes_only_with_its_expectations() {
    let r = check(&[&fixture("mark-cascade.txt")]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("FAIL LB-MARK"), "{}", r.stdout);
    let r = check(&[
        &fixture("mark-cascade.txt"),
        "--expect",
        &fixture("expect/mark-cascade.csv"),
    ]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

#[test]
fn skewed_counters_fail_the_observed_test() {
    let r = check(&[&fixture("counters-skewed.txt")]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("observed:"), "{}", r.stdout);
    // The same rules with the real (unskewed) counters pass, and --no-observed skips the test.
    assert_eq!(check(&[&fixture("subctl-kubedns-counters.txt")]).code, 0);
    assert_eq!(
        check(&[&fixture("counters-skewed.txt"), "--no-observed"]).code,
        0
    );
}

#[test]
fn duplicated_rules_fail_for_double_weight() {
    let r = check(&[&fixture("exadata-dup-trailing.txt")]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("double-weight:"), "{}", r.stdout);
}

#[test]
fn monte_carlo_test_passes_correct_balancers_and_catches_a_leak() {
    // Correct rules: simulated counts fit the uniform split (Holm over 7 balancers).
    let r = check(&[&fixture("kube-modern.txt"), "--connections", "200000"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    // The nth round robin without fallback: simulated connections reject the uniform split.
    let r = check(&[
        &fixture("nth-no-fallback.txt"),
        "--max-skew",
        "1",
        "--allow-unmatched",
        "--connections",
        "3000",
    ]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("simulation:"), "{}", r.stdout);
}

#[test]
fn selection_and_min_endpoints() {
    let r = check(&[
        &fixture("kube-modern.txt"),
        "--min-endpoints",
        "3",
        "--format",
        "json",
    ]);
    assert_eq!(r.code, 1);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let failed: Vec<&str> = v["balancers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["verdict"]["pass"] == false)
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert!(!failed.is_empty());
    for b in v["balancers"].as_array().unwrap() {
        let n = b["endpoints"].as_array().unwrap().len();
        assert_eq!(b["verdict"]["pass"].as_bool().unwrap(), n >= 3, "{b}");
    }
    assert_eq!(v["verdict"]["pass"], false);
    assert_eq!(v["verdict"]["checked"], 7);
    // A glob that matches nothing is a usage error.
    let r = check(&[&fixture("kube-modern.txt"), "--balancer", "no-such-*"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no balancer matches"), "{}", r.stderr);
    // Namespace and exclude.
    let r = check(&[
        &fixture("kube-2018-large.txt"),
        "--namespace",
        "batch",
        "--exclude",
        "batch/crawler*",
    ]);
    assert!(
        r.stdout.contains("checked 1 balancer: 1 failed"),
        "{}",
        r.stdout
    );
}

#[test]
fn junit_output_parses_with_one_testcase_per_balancer() {
    let dir = std::env::temp_dir().join(format!("lbaudit-junit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("report.xml");
    let r = check(&[
        &fixture("kube-2018-large.txt"),
        "--format",
        "junit",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    // The human summary still goes to stdout.
    assert!(
        r.stdout.contains("checked 3 balancers: 2 failed"),
        "{}",
        r.stdout
    );
    let xml = std::fs::read_to_string(&out).unwrap();
    let doc = roxmltree::Document::parse(&xml).expect("valid XML");
    let suites: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testsuite"))
        .collect();
    assert_eq!(suites.len(), 1);
    assert_eq!(suites[0].attribute("tests"), Some("3"));
    assert_eq!(suites[0].attribute("failures"), Some("2"));
    let cases: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    assert_eq!(cases.len(), 3);
    let failing: Vec<&str> = cases
        .iter()
        .filter(|c| c.children().any(|f| f.has_tag_name("failure")))
        .map(|c| c.attribute("name").unwrap())
        .collect();
    assert_eq!(failing, vec!["batch/crawler:http", "batch/workers:http"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn markdown_summary_and_input_errors() {
    let r = check(&[&fixture("kube-2018-large.txt"), "--format", "markdown"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("| ❌ | `batch/crawler:http` | 1000 |"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("| ✅ | `default/kubernetes:https` | 1 |"),
        "{}",
        r.stdout
    );
    // Input errors are exit 2, even for check.
    let r = check(&[&fixture("errors/probability-above-1.txt")]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(r.stdout.is_empty());
    let r = check(&[&fixture("no-such-file.txt")]);
    assert_eq!(r.code, 2);
}

#[test]
fn same_input_same_verdict() {
    let a = check(&[
        &fixture("kube-2018-large.txt"),
        "--connections",
        "5000",
        "--format",
        "json",
    ]);
    let b = check(&[
        &fixture("kube-2018-large.txt"),
        "--connections",
        "5000",
        "--format",
        "json",
    ]);
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(a.code, b.code);
}

/// The JSON is written as balancers are checked: a reader that goes away early (`|
/// head`) does not change the exit code, and nothing is printed when the selection
/// turns out to match no balancer.
#[test]
fn streamed_json_keeps_its_exit_code_and_prints_nothing_on_error() {
    use std::io::Read as _;
    use std::process::{Command, Stdio};
    let bin = assert_cmd::cargo::cargo_bin!("lbaudit");
    // Over 500 kB of JSON, far more than a pipe holds; the 5-decimal probabilities fail
    // a tight --max-skew.
    let mut child = Command::new(bin)
        .args(["check", "--format", "json", "--max-skew", "1e-9"])
        .arg(fixture("kube-2018-large.txt"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("runs");
    let mut head = [0u8; 1000];
    let mut stdout = child.stdout.take().expect("piped");
    stdout.read_exact(&mut head).expect("reads the start");
    assert!(head.starts_with(b"{\n  \"balancers\": [\n    {"));
    drop(stdout);
    assert_eq!(child.wait().expect("ends").code(), Some(1));
    // The whole output says the same.
    let r = check(&[
        &fixture("kube-2018-large.txt"),
        "--format",
        "json",
        "--max-skew",
        "1e-9",
    ]);
    assert_eq!(r.code, 1);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(v["verdict"]["pass"], false);
    // A selection that matches no balancer: a usage error, with no JSON on stdout and
    // no file (nor temporary file) left behind.
    let dir = std::env::temp_dir().join(format!("lbaudit-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("verdicts.json");
    for output in [None, Some(out.to_str().unwrap())] {
        let mut args = vec![
            fixture("nth-fallback.txt"),
            "--format".into(),
            "json".into(),
            "--balancer".into(),
            "no-such-*".into(),
        ];
        if let Some(o) = output {
            args.extend(["--output".into(), o.into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = check(&args);
        assert_eq!(r.code, 2, "{output:?}");
        assert!(r.stdout.is_empty(), "{output:?}: {}", r.stdout);
        assert!(r.stderr.contains("no balancer matches"), "{}", r.stderr);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "{output:?}");
    }
    // With a balancer, the file is written whole and the summary goes to stdout.
    let r = check(&[
        &fixture("nth-fallback.txt"),
        "--format",
        "json",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with("checked 1 balancer: 0 failed"),
        "{}",
        r.stdout
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).expect("json");
    assert_eq!(v["verdict"]["checked"], 1);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
