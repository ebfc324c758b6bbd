//! Simulator throughput: rule evaluations per second per core on kube-proxy cascades of
//! 5 and 100 endpoints, against a bare loop of the same generator drawing 31-bit numbers
//! and comparing them with the cascade's thresholds (as many comparisons as the
//! simulator made draws), single-threaded and on all threads.
//!
//! `cargo bench --bench simulate` (release). An optional number argument scales the
//! work (default 1.0; e.g. `cargo bench --bench simulate -- 0.1` for a quick run);
//! `SIM_BENCH_ENDPOINTS=5` runs only the cascade with that many endpoints.

use lbaudit::balance;
use lbaudit::graph::Graph;
use lbaudit::parse::{ParseOptions, parse};
use lbaudit::simulate::{BATCH, GENERATOR, Program, SimOptions, batch_seed};
use lbaudit::statistic::threshold_from_text;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Instant;

/// A kube-proxy (1.2x, iptables mode) nat table with one service of `n` endpoints.
fn kube_cascade(n: usize) -> String {
    let svc = "KUBE-SVC-BENCHBENCHBENCHBE";
    let sep = |i: usize| format!("KUBE-SEP-BENCH{i:012}");
    let ip = |i: usize| format!("10.244.{}.{}", i / 250, i % 250 + 2);
    let mut s = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    s += ":KUBE-MARK-MASQ - [0:0]\n";
    writeln!(s, ":{svc} - [0:0]").unwrap();
    for i in 0..n {
        writeln!(s, ":{} - [0:0]", sep(i)).unwrap();
    }
    s += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    s += "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n";
    writeln!(
        s,
        "-A KUBE-SERVICES -d 172.30.0.10/32 -p tcp -m comment --comment \"bench/web:http cluster IP\" -m tcp --dport 80 -j {svc}"
    )
    .unwrap();
    writeln!(
        s,
        "-A {svc} ! -s 10.244.0.0/16 -d 172.30.0.10/32 -p tcp -m comment --comment \"bench/web:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ"
    )
    .unwrap();
    for i in 0..n {
        let c = format!("-m comment --comment \"bench/web:http -> {}:8080\"", ip(i));
        if i + 1 < n {
            let p = 1.0 / (n - i) as f64;
            writeln!(
                s,
                "-A {svc} {c} -m statistic --mode random --probability {p:.10} -j {}",
                sep(i)
            )
            .unwrap();
        } else {
            writeln!(s, "-A {svc} {c} -j {}", sep(i)).unwrap();
        }
    }
    for i in 0..n {
        writeln!(
            s,
            "-A {} -s {}/32 -m comment --comment \"bench/web:http\" -j KUBE-MARK-MASQ",
            sep(i),
            ip(i)
        )
        .unwrap();
        writeln!(
            s,
            "-A {} -p tcp -m comment --comment \"bench/web:http\" -m tcp -j DNAT --to-destination {}:8080",
            sep(i),
            ip(i)
        )
        .unwrap();
    }
    s += "COMMIT\n";
    s
}

/// The cascade's thresholds, in rule order.
fn thresholds(n: usize) -> Vec<u32> {
    (0..n - 1)
        .map(|i| threshold_from_text(&format!("{:.10}", 1.0 / (n - i) as f64)).unwrap())
        .collect()
}

/// The bare loop: `draws` draws of the same generator, seeded per batch like the
/// simulator, each masked to 31 bits and compared with the next threshold of the cascade.
fn bare_batch(seed: u64, b: u64, draws: u64, th: &[u32]) -> u64 {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(batch_seed(seed, 0, b));
    let mut hits = 0u64;
    let mut k = 0usize;
    for _ in 0..draws {
        hits += u64::from((rng.next_u32() & 0x7FFF_FFFF) < th[k]);
        k += 1;
        if k == th.len() {
            k = 0;
        }
    }
    hits
}

/// Runs the bare loop for `draws` comparisons in chunks of `chunk`, on the current pool.
fn bare(seed: u64, draws: u64, chunk: u64, th: &[u32]) -> u64 {
    let chunks = draws.div_ceil(chunk);
    (0..chunks)
        .into_par_iter()
        .map(|b| bare_batch(seed, b, chunk.min(draws - b * chunk), th))
        .sum()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn secs(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..reps {
        let mut r = None;
        let t = secs(|| r = Some(f()));
        if t < best {
            best = t;
        }
        out = r;
    }
    (best, out.expect("at least one repetition"))
}

/// Best times of `a` and `b`, run alternately `reps` times each (so that a change in
/// the machine's load affects both alike).
fn best_of_pair<A, B>(
    reps: usize,
    mut a: impl FnMut() -> A,
    mut b: impl FnMut() -> B,
) -> ((f64, A), (f64, B)) {
    let (mut ta, mut tb) = (f64::INFINITY, f64::INFINITY);
    let (mut ra, mut rb) = (None, None);
    for _ in 0..reps {
        let t = secs(|| ra = Some(a()));
        ta = ta.min(t);
        let t = secs(|| rb = Some(b()));
        tb = tb.min(t);
    }
    (
        (ta, ra.expect("at least one repetition")),
        (tb, rb.expect("at least one repetition")),
    )
}

fn main() {
    let scale: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1.0);
    let threads = rayon::current_num_threads();
    println!(
        "simulator vs bare {GENERATOR} loop; {threads} threads available; batch {BATCH} connections"
    );
    // `SIM_BENCH_ENDPOINTS=5` runs one of the cascades only (for profiling).
    let only: Option<usize> = std::env::var("SIM_BENCH_ENDPOINTS")
        .ok()
        .and_then(|v| v.parse().ok());
    for (n, connections) in [(5usize, 20_000_000u64), (100, 2_000_000)] {
        if only.is_some_and(|o| o != n) {
            continue;
        }
        let connections = ((connections as f64 * scale) as u64).max(BATCH);
        let text = kube_cascade(n);
        let rs = parse(&text, &ParseOptions::default()).expect("parse");
        let graph = Graph::build(&rs, false).expect("graph");
        let balancers = balance::find(&graph);
        assert_eq!(balancers.len(), 1);
        let b = &balancers[0];
        assert_eq!(b.endpoints.len(), n);
        let (t_compile, program) = best_of(3, || Program::compile(&graph, b));
        let opts = SimOptions {
            connections,
            seed: 1,
            clients: None,
        };
        let th = thresholds(n);

        // One thread: the simulator once to learn the number of draws, then both
        // alternately.
        let one = pool(1);
        let r = one.install(|| program.run(0, &opts));
        assert_eq!(r.other, 0);
        assert_eq!(r.unmatched, 0);
        let evals = r.rule_evaluations as f64;
        let draws = r.random_draws;
        let ((t_sim1, r1), (t_bare1, hits)) = best_of_pair(
            5,
            || one.install(|| program.run(0, &opts)),
            || one.install(|| bare(1, draws, BATCH, &th)),
        );
        assert_eq!(r, r1);
        black_box(hits);

        // All threads.
        let all = pool(threads);
        let ((t_sim_n, r_n), (t_bare_n, hits)) = best_of_pair(
            5,
            || all.install(|| program.run(0, &opts)),
            || all.install(|| bare(1, draws, BATCH, &th)),
        );
        assert_eq!(r, r_n, "thread count changed the result");
        black_box(hits);

        let sim_rate = evals / t_sim1;
        let draw_rate = draws as f64 / t_sim1;
        let bare_rate = draws as f64 / t_bare1;
        println!();
        println!(
            "kube cascade, {n} endpoints: {} instructions, compiled in {:.3} ms",
            program.len(),
            t_compile * 1e3
        );
        println!(
            "  {connections} connections, {:.0} rule evaluations, {draws} draws ({:.2} evaluations and {:.2} draws per connection)",
            evals,
            evals / connections as f64,
            draws as f64 / connections as f64
        );
        println!(
            "  1 thread : simulator {:>7.1} M rule evaluations/s ({:.1} M draws/s, {:.1} M connections/s, {:.3} s)",
            sim_rate / 1e6,
            draw_rate / 1e6,
            connections as f64 / t_sim1 / 1e6,
            t_sim1
        );
        println!(
            "             bare loop {:>7.1} M comparisons/s ({:.3} s)",
            bare_rate / 1e6,
            t_bare1
        );
        println!(
            "             ratio: evaluations/s over comparisons/s {:.2}; draws/s over comparisons/s {:.2}",
            sim_rate / bare_rate,
            draw_rate / bare_rate
        );
        println!(
            "  {threads} threads: simulator {:>7.1} M rule evaluations/s ({:.2}x of 1 thread, {:.1} M/s per core)",
            evals / t_sim_n / 1e6,
            t_sim1 / t_sim_n,
            evals / t_sim_n / threads as f64 / 1e6
        );
        println!(
            "             bare loop {:>7.1} M comparisons/s ({:.2}x of 1 thread)",
            draws as f64 / t_bare_n / 1e6,
            t_bare1 / t_bare_n
        );
    }
}
