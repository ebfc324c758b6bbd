//! Small per-service counters (`iptables-save -c` on a quiet node) end to end: the
//! counter tests go to the exact or the sequential Monte-Carlo multinomial test, stay
//! cheap when the split fits, still reject a real skew after Holm's correction, and give
//! the same report whatever the number of threads.

use serde_json::Value;
use std::fmt::Write as _;
use std::path::PathBuf;

fn lbaudit() -> assert_cmd::Command {
    assert_cmd::cargo::cargo_bin_cmd!("lbaudit")
}

/// What iptables-save prints for kube-proxy's `%0.10f` of 1/k: the threshold q that
/// iptables stores, printed as `%.11f` of q/2^31 (as benches/report.rs does).
fn saved_probability(k: usize) -> String {
    let written: f64 = format!("{:.10}", 1.0 / k as f64).parse().unwrap();
    let q = (written * 2f64.powi(31)).round();
    format!("{:.11}", q / 2f64.powi(31))
}

/// `services` kube-proxy services of 10 endpoints, each with 40 connections in its
/// counters: spread evenly at random (a small LCG) for all but service 0, where one
/// endpoint took 31 (exact Pearson-ordered tail 1.1e-22, fixtures/stats/vectors.json).
fn dump(services: usize) -> String {
    dump_with(services, true)
}

/// [`dump`], with service 0 spread at random too unless `skewed`.
fn dump_with(services: usize, skewed: bool) -> String {
    let mut state: u64 = 12345;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    let mut s = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n");
    let mut rules = String::new();
    for i in 0..services {
        let svc = format!("KUBE-SVC-TEST{i:012}");
        writeln!(s, ":{svc} - [0:0]").unwrap();
        let counts: Vec<u64> = if i == 0 && skewed {
            std::iter::once(31).chain([1; 9]).collect()
        } else {
            let mut c = vec![0u64; 10];
            for _ in 0..40 {
                c[(next() % 10) as usize] += 1;
            }
            c
        };
        let name = format!("ns/svc-{i}:http");
        writeln!(
            rules,
            "[40:2400] -A PREROUTING -d 10.96.{}.{}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 80 -j {svc}",
            i / 250,
            i % 250 + 1
        )
        .unwrap();
        for (e, &n) in counts.iter().enumerate() {
            let sep = format!("KUBE-SEP-T{i:06}E{e:05}");
            writeln!(s, ":{sep} - [0:0]").unwrap();
            let ip = format!("10.{}.{}.{}", 100 + i / 250, i % 250, e + 1);
            let c = format!("-m comment --comment \"{name} -> {ip}:8080\"");
            if e < 9 {
                writeln!(
                    rules,
                    "[{n}:{}] -A {svc} {c} -m statistic --mode random --probability {} -j {sep}",
                    n * 60,
                    saved_probability(10 - e)
                )
                .unwrap();
            } else {
                writeln!(rules, "[{n}:{}] -A {svc} {c} -j {sep}", n * 60).unwrap();
            }
            writeln!(
                rules,
                "[{n}:{}] -A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ip}:8080",
                n * 60
            )
            .unwrap();
        }
    }
    s.push_str(&rules);
    s.push_str("COMMIT\n");
    s
}

fn write_dump(name: &str, services: usize) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, dump(services)).unwrap();
    path
}

/// Equal up to serde_json's float parsing (which may be one ulp off).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-15 * b.abs()
}

fn report(path: &PathBuf, extra: &[&str], threads: usize) -> String {
    let out = lbaudit()
        .args(["report", "--format", "json"])
        .args(extra)
        .arg(path)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn small_counters_are_tested_cheaply_and_a_real_skew_is_still_found() {
    let services = 60;
    let path = write_dump("small-counters.txt", services);
    let text = report(&path, &["--connections", "0"], 2);
    let v: Value = serde_json::from_str(&text).unwrap();
    let balancers = v["balancers"].as_array().unwrap();
    assert_eq!(balancers.len(), services);
    // 60 tests: the sequential test may draw up to max(100,000, 2·60/0.001) replicates.
    let most = 120_000;
    let mut stopped_early = Vec::new();
    for (i, b) in balancers.iter().enumerate() {
        let o = &b["observed"];
        assert_eq!(o["connections"], 40, "{i}");
        // 10 endpoints, 40 connections: 2·10⁹ outcomes, too many for the exact test.
        assert_eq!(o["method"], "sequential-monte-carlo-multinomial", "{i}");
        let drawn = o["replicates"].as_u64().unwrap();
        let p = o["p_value"].as_f64().unwrap();
        if i == 0 {
            // No simulated split is as extreme: the smallest p-value, which Holm's
            // correction over 60 balancers keeps below 0.001.
            assert_eq!(drawn, most);
            assert!(close(p, 1.0 / (most as f64 + 1.0)), "{p}");
            let adjusted = o["p_value_adjusted"].as_f64().unwrap();
            assert!(adjusted < 1e-3, "{adjusted}");
        } else {
            assert!(drawn <= most);
            if drawn < most {
                assert!(close(p, 20.0 / drawn as f64), "{i}: {p} after {drawn}");
                stopped_early.push(drawn);
            }
            assert!(o["p_value_adjusted"].as_f64().unwrap() > 1e-3, "{i}");
        }
    }
    // The splits that fit stop after about 20/p replicates, not 120,000.
    assert!(stopped_early.len() >= services - 3, "{stopped_early:?}");
    stopped_early.sort_unstable();
    assert!(
        stopped_early[stopped_early.len() / 2] < 1000,
        "{stopped_early:?}"
    );
    // `check` fails the skewed service, and only it.
    let out = lbaudit()
        .args(["check", "--format", "json"])
        .arg(&path)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"]["failed"], 1);
    let b = &v["balancers"][0];
    assert_eq!(b["name"], "ns/svc-0:http");
    assert_eq!(b["verdict"]["pass"], false);
    assert_eq!(b["verdict"]["failures"][0]["reason"], "observed");
}

/// `check --alpha` below the default: the Monte-Carlo tests draw enough replicates to
/// reach the smaller level. At 1e-4 over 60 balancers Holm's smallest threshold is
/// 1.7e-6; the default budget's 120,000 replicates stop at p = 8.3e-6 (adjusted 5e-4,
/// a pass), 2·60/1e-4 = 1,200,000 replicates reach 8.3e-7 (adjusted 5.0e-5, a failure).
#[test]
fn check_at_a_smaller_alpha_still_finds_a_real_skew() {
    let path = write_dump("small-counters-alpha.txt", 60);
    let out = lbaudit()
        .args(["check", "--format", "json", "--alpha", "1e-4"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"]["failed"], 1);
    let b = &v["balancers"][0];
    assert_eq!(b["name"], "ns/svc-0:http");
    assert_eq!(b["verdict"]["failures"][0]["reason"], "observed");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A level the capped budget cannot reach is said, not passed over in silence (on
    // splits that fit: their tests stop early, so the run stays short).
    let fair = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("small-counters-fair.txt");
    std::fs::write(&fair, dump_with(60, false)).unwrap();
    let out = lbaudit()
        .args(["check", "--format", "json", "--alpha", "1e-12"])
        .arg(&fair)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("so those tests cannot fail"), "{err}");
    // Nor said where no test is a Monte-Carlo one.
    let out = lbaudit()
        .args(["check", "--alpha", "1e-12", "--no-observed"])
        .arg(&fair)
        .output()
        .unwrap();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn small_count_tests_do_not_depend_on_the_thread_count() {
    let path = write_dump("small-counters-threads.txt", 40);
    // Counters, and a cross-check with 20 connections per balancer (2 expected per
    // endpoint): both go to the small-count tests.
    for extra in [&["--connections", "0"][..], &["--connections", "20"][..]] {
        let one = report(&path, extra, 1);
        assert!(one.contains("sequential-monte-carlo-multinomial"));
        for threads in [2, 3] {
            assert!(
                report(&path, extra, threads) == one,
                "{extra:?}: {threads} threads differ from 1"
            );
        }
    }
}
