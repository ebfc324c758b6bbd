//! `lbaudit simulate` end to end: the Monte-Carlo simulation agrees with the exact
//! analysis, is reproducible across thread counts, and follows the kernel's nth and
//! affinity semantics.

use serde_json::Value;
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

fn simulate_json(args: &[&str], threads: Option<usize>) -> (String, Value) {
    let mut cmd = lbaudit();
    cmd.arg("simulate").args(args).args(["--format", "json"]);
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
    }
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let v = serde_json::from_str(&text).expect("json");
    (text, v)
}

/// Every fixture with independently computed expectations: 10^6 simulated connections per
/// balancer fit the exact probabilities (no Holm-adjusted p-value below 0.001), and no
/// simulated connection ends anywhere the exact analysis does not know.
#[test]
fn simulation_agrees_with_the_exact_analysis_on_every_fixture() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/expected");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .map(|n| n.trim_end_matches(".json").to_string())
        .collect();
    names.sort();
    assert!(names.len() >= 30, "{names:?}");
    let mut simulated = 0;
    for name in names {
        let (_, v) = simulate_json(
            &[&fixture(&format!("{name}.txt")), "--connections", "1000000"],
            None,
        );
        for b in v["balancers"].as_array().unwrap() {
            let Some(s) = b.get("simulation") else {
                continue;
            };
            simulated += 1;
            let p = s["p_value_adjusted"].as_f64().unwrap();
            assert!(p >= 0.001, "{name} {}: {s}", b["name"]);
            assert_eq!(s["other"], 0, "{name} {}", b["name"]);
            assert_eq!(s["connections"], 1_000_000);
            let total: u64 = b["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["simulated"].as_u64().unwrap())
                .sum::<u64>()
                + s["unmatched"].as_u64().unwrap();
            assert_eq!(total, 1_000_000, "{name} {}", b["name"]);
        }
        if !v["balancers"].as_array().unwrap().is_empty() {
            assert_eq!(v["simulation"]["generator"], "xoshiro256++");
            assert_eq!(v["simulation"]["seed"], 0x6c62_6175_6469_7421u64);
        }
    }
    assert!(simulated > 50, "{simulated}");
}

#[test]
fn same_seed_same_json_for_one_thread_and_all_threads() {
    for f in ["kube-modern.txt", "kube-affinity.txt", "nth-fallback.txt"] {
        let args = [fixture(f), "--connections".into(), "300000".into()];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (one, _) = simulate_json(&args, Some(1));
        let (all, _) = simulate_json(&args, None);
        let (four, _) = simulate_json(&args, Some(4));
        assert_eq!(one, all, "{f}");
        assert_eq!(one, four, "{f}");
    }
    // Another seed gives other counts.
    let (a, _) = simulate_json(&[&fixture("kube-modern.txt"), "--seed", "1"], None);
    let (b, _) = simulate_json(&[&fixture("kube-modern.txt"), "--seed", "2"], None);
    assert_ne!(a, b);
}

#[test]
fn nth_round_robin_gives_exactly_k_each() {
    for k in [1u64, 7, 1000, 33_333] {
        let n = (3 * k).to_string();
        let (_, v) = simulate_json(&[&fixture("nth-fallback.txt"), "--connections", &n], None);
        let b = &v["balancers"][0];
        for e in b["endpoints"].as_array().unwrap() {
            assert_eq!(e["simulated"].as_u64(), Some(k), "{k}: {e}");
        }
    }
    // Without the fallback rule the kernel's counters give, per 27 connections, 9 to the
    // first endpoint, 6 to the second, 4 to the third and 8 to none (1/3, 2/9, 4/27, 8/27).
    let (_, v) = simulate_json(
        &[&fixture("nth-no-fallback.txt"), "--connections", "2700"],
        None,
    );
    let b = &v["balancers"][0];
    let counts: Vec<u64> = b["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["simulated"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![900, 600, 400]);
    assert_eq!(b["simulation"]["unmatched"], 800);
}

#[test]
fn affinity_concentrates_load_for_few_clients() {
    let (_, v) = simulate_json(
        &[
            &fixture("kube-affinity.txt"),
            "--connections",
            "100000",
            "--clients",
            "2",
        ],
        None,
    );
    let with_affinity: Vec<&Value> = v["balancers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| !b["affinity"].is_null())
        .collect();
    assert!(!with_affinity.is_empty());
    for b in with_affinity {
        let s = &b["simulation"];
        let n = b["endpoints"].as_array().unwrap().len() as f64;
        // Two clients stick to at most two endpoints: one endpoint carries at least half.
        assert!(s["max_endpoint_share"].as_f64().unwrap() >= 0.5, "{s}");
        assert!(n >= 2.0);
        // Every returning connection went where the client went before.
        assert_eq!(
            s["returning_connections"], s["same_endpoint_connections"],
            "{s}"
        );
    }
}

/// The 5-decimal (pre-2019) 1000-endpoint service has w = 1.679e-3 (Cohen's w of its exact
/// probabilities against uniform, computed with scipy from the exact report: sqrt(mean of
/// relative_deviation²)); at α = 0.05 and power 0.8 with df = 999, scipy's ncx2 gives
/// λ = 116.6, so N = λ/w² = 4.14e7 connections. Simulating 5e7 connections detects the skew
/// (p < 0.05 against uniform), while 4e5 (a hundredth of N) does not.
///
/// 5e7 connections through a 1000-rule cascade are about 2.5e10 rule evaluations, so this
/// test is run on its own in release mode: `cargo test --release --test simulate -- --ignored`.
#[test]
#[ignore = "2.5e10 rule evaluations; run with cargo test --release --test simulate -- --ignored"]
fn five_decimal_skew_is_detected_with_the_predicted_number_of_connections() {
    let run = |n: &str| {
        simulate_json(
            &[
                &fixture("kube-2018-large.txt"),
                "--balancer",
                "batch/crawler:http",
                "--connections",
                n,
            ],
            None,
        )
        .1
    };
    let v = run("50000000");
    let s = &v["balancers"][0]["simulation"];
    assert!(s["expected"]["p_value"].as_f64().unwrap() < 0.05, "{s}");
    // …and still fits the exact probabilities.
    assert!(s["p_value"].as_f64().unwrap() >= 0.001, "{s}");
    let v = run("400000");
    let s = &v["balancers"][0]["simulation"];
    assert!(s["expected"]["p_value"].as_f64().unwrap() >= 0.05, "{s}");
}
