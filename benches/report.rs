//! lbaudit on large kube-proxy dumps, against the tools people would otherwise use, with
//! targets. Run through `bash benches/run.sh` (which also runs `cargo bench --bench
//! simulate` and hands its output here), or alone:
//!
//!     cargo bench --bench report [-- --scale] [-- --runs N]
//!
//! Generates, deterministically, into `$LBAUDIT_BENCH_DIR` (default
//! `target/lbaudit-bench`): a 30,000-service kube-proxy nat dump (iptables-save form,
//! about 60 MB and 500,000 lines; services of 1–10 endpoints, fewer endpoints being
//! likelier, comments, KUBE-SERVICES / KUBE-SVC / KUBE-SEP / KUBE-MARK-MASQ /
//! KUBE-NODEPORTS / KUBE-EXT chains, all declared) and a dump with one service of 5,000
//! endpoints. With `--scale`, also a 100,000-service dump, one service of 20,000
//! endpoints, and the 30,000-service dump with small `iptables-save -c` counters.
//!
//! Every figure is the median of several runs of the release binary as a child process
//! (wall time; peak memory is the child's maximum resident set from `/usr/bin/time`),
//! except the 5,000-endpoint analysis, which is also timed inside this process
//! (parse, graph, balancers, report JSON: the work without process start and file
//! reading). lbaudit's report without and with the cross-check, `grep -c statistic`, and
//! the report with no balancer selected (what reading the dump, building the chain graph
//! and listing the balancers take, before any analysis) run by turns, so that their
//! ratios are not skewed by a change in the machine's load between them.
//! `iptables-restore --test` runs inside a network namespace of its own when `ip` is
//! present, so that nothing can touch the host's rules; its row shows its runs' spread
//! and the report time that 50x asks for.

use lbaudit::graph::Graph;
use lbaudit::parse::{ParseOptions, parse};
use lbaudit::report::Report;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const LBAUDIT: &str = env!("CARGO_BIN_EXE_lbaudit");

// The same allocator as the lbaudit binary, for the in-process timing.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// ------------------------------------------------------------------ the generator

/// splitmix64: a small deterministic generator for the dump's shape.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Endpoints of a service: 1–10, with weight 1/n (mean about 3.4, as in clusters where
/// most services have a few replicas).
fn endpoint_count(rng: &mut Rng) -> usize {
    let h: f64 = (1..=10).map(|n| 1.0 / n as f64).sum();
    let mut u = rng.unit() * h;
    for n in 1..=10 {
        u -= 1.0 / n as f64;
        if u < 0.0 {
            return n;
        }
    }
    10
}

/// A kube-proxy chain name: the prefix and 16 base32 characters of a hash.
fn chain_name(prefix: &str, a: u64, b: u64) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h = Rng(a.wrapping_mul(0x0000_0100_0000_01b3) ^ b.rotate_left(29));
    let bits = (u128::from(h.next()) << 64) | u128::from(h.next());
    let mut s = String::with_capacity(prefix.len() + 16);
    s.push_str(prefix);
    for k in 0..16 {
        s.push(ALPHABET[((bits >> (5 * k)) & 31) as usize] as char);
    }
    s
}

/// What iptables-save prints for kube-proxy's `%0.10f` of 1/k: the threshold q that
/// iptables stores, printed as `%.11f` of q/2^31.
fn saved_probability(k: usize) -> String {
    let written: f64 = format!("{:.10}", 1.0 / k as f64).parse().unwrap();
    let q = (written * 2f64.powi(31)).round();
    format!("{:.11}", q / 2f64.powi(31))
}

fn ipv4(n: u32) -> String {
    let [a, b, c, d] = n.to_be_bytes();
    format!("{a}.{b}.{c}.{d}")
}

/// The nat table of a node with `services` services, in iptables-save form (no
/// counters). `endpoints` gives each service's endpoint count. Chains are declared and
/// printed in iptables-save's order: built-in chains, then user chains by name.
fn kube_dump(services: usize, mut endpoints: impl FnMut(&mut Rng) -> usize) -> String {
    let mut rng = Rng(0x6c62_6175_6469_7421);
    let mut chains: Vec<(String, Vec<String>)> = Vec::new();
    let mut kube_services = Vec::with_capacity(services + 1);
    let mut nodeports = Vec::new();
    let mut probs: Vec<String> = Vec::new();
    let mut next_ep: u32 = u32::from_be_bytes([10, 128, 0, 2]);
    for i in 0..services {
        let n = endpoints(&mut rng);
        while probs.len() <= n {
            probs.push(saved_probability(probs.len().max(1)));
        }
        let ns = format!("team-{:04}", i % 997);
        let pn = format!("{ns}/app-{i:06}-api:https");
        let vip = ipv4(u32::from_be_bytes([10, 96, 0, 0]) + 1 + i as u32);
        let svc = chain_name("KUBE-SVC-", i as u64, 1);
        kube_services.push(format!(
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport 443 -j {svc}"
        ));
        let mut svc_rules = Vec::with_capacity(n + 1);
        svc_rules.push(format!(
            "-A {svc} ! -s 10.128.0.0/14 -d {vip}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport 443 -j KUBE-MARK-MASQ"
        ));
        for e in 0..n {
            let ip = ipv4(next_ep);
            next_ep += 1;
            let sep = chain_name("KUBE-SEP-", i as u64, 2 + e as u64);
            let c = format!("-m comment --comment \"{pn} -> {ip}:8443\"");
            if e + 1 < n {
                svc_rules.push(format!(
                    "-A {svc} {c} -m statistic --mode random --probability {} -j {sep}",
                    probs[n - e]
                ));
            } else {
                svc_rules.push(format!("-A {svc} {c} -j {sep}"));
            }
            chains.push((
                sep.clone(),
                vec![
                    format!("-A {sep} -s {ip}/32 -m comment --comment \"{pn}\" -j KUBE-MARK-MASQ"),
                    format!(
                        "-A {sep} -p tcp -m comment --comment \"{pn}\" -m tcp -j DNAT --to-destination {ip}:8443"
                    ),
                ],
            ));
        }
        // Every twelfth service also has a node port (while the range lasts).
        if i % 12 == 0 && nodeports.len() < 2768 {
            let ext = chain_name("KUBE-EXT-", i as u64, 0);
            let port = 30000 + nodeports.len();
            nodeports.push(format!(
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{pn}\" -m tcp --dport {port} -j {ext}"
            ));
            chains.push((
                ext.clone(),
                vec![
                    format!(
                        "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ"
                    ),
                    format!("-A {ext} -j {svc}"),
                ],
            ));
        }
        chains.push((svc, svc_rules));
    }
    kube_services.push(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into(),
    );
    chains.push(("KUBE-SERVICES".into(), kube_services));
    chains.push(("KUBE-NODEPORTS".into(), nodeports));
    chains.push((
        "KUBE-MARK-MASQ".into(),
        vec!["-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000".into()],
    ));
    chains.push((
        "KUBE-POSTROUTING".into(),
        vec![
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".into(),
            "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0".into(),
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
        ],
    ));
    chains.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let builtin = [
        (
            "PREROUTING",
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        ),
        ("INPUT", ""),
        (
            "OUTPUT",
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        ),
        (
            "POSTROUTING",
            "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        ),
    ];
    let mut s = String::with_capacity(services * 2200);
    s.push_str("# Generated by iptables-save v1.8.9 on Tue Nov 24 09:00:00 2026\n*nat\n");
    for (c, _) in builtin {
        writeln!(s, ":{c} ACCEPT [0:0]").unwrap();
    }
    for (c, _) in &chains {
        writeln!(s, ":{c} - [0:0]").unwrap();
    }
    for (_, r) in builtin {
        if !r.is_empty() {
            writeln!(s, "{r}").unwrap();
        }
    }
    for (_, rules) in &chains {
        for r in rules {
            writeln!(s, "{r}").unwrap();
        }
    }
    s.push_str("COMMIT\n# Completed on Tue Nov 24 09:00:00 2026\n");
    s
}

/// `text` as `iptables-save -c` prints it on a quiet node: each service chain took 0–40
/// connections, split uniformly over its endpoints (as its rules intend); every other
/// rule shows `[0:0]`. Small counts like these send lbaudit's counter test to the exact
/// or Monte-Carlo multinomial test for many services.
fn with_counters(text: &str) -> String {
    let mut rng = Rng(7);
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let Some(rest) = line.strip_prefix("-A KUBE-SVC-") else {
            if line.starts_with("-A ") {
                out.push_str("[0:0] ");
            }
            out.push_str(line);
            out.push('\n');
            i += 1;
            continue;
        };
        let prefix = format!("-A KUBE-SVC-{} ", rest.split(' ').next().unwrap_or(""));
        let end = (i..lines.len())
            .find(|&j| !lines[j].starts_with(&prefix))
            .unwrap_or(lines.len());
        let block = &lines[i..end];
        let choices: Vec<usize> = (0..block.len())
            .filter(|&k| !block[k].ends_with("-j KUBE-MARK-MASQ"))
            .collect();
        let mut counts = vec![0u64; block.len()];
        for _ in 0..rng.next() % 41 {
            counts[choices[(rng.next() % choices.len() as u64) as usize]] += 1;
        }
        for (l, n) in block.iter().zip(counts) {
            writeln!(out, "[{n}:{}] {l}", n * 60).unwrap();
        }
        i = end;
    }
    out
}

/// Writes `name` into `dir` unless it is already there with the same content length
/// and a marker of this generator's version.
fn generate(dir: &Path, name: &str, make: impl FnOnce() -> String) -> PathBuf {
    const VERSION: &str = "gen-v2";
    let path = dir.join(name);
    let stamp = dir.join(format!("{name}.{VERSION}"));
    if path.exists() && stamp.exists() {
        return path;
    }
    let t = Instant::now();
    let text = make();
    std::fs::write(&path, &text).expect("write dump");
    std::fs::write(&stamp, text.len().to_string()).expect("write stamp");
    eprintln!(
        "generated {} ({:.1} MB, {} lines) in {:.1} s",
        path.display(),
        text.len() as f64 / 1e6,
        text.lines().count(),
        t.elapsed().as_secs_f64()
    );
    path
}

// ------------------------------------------------------------------ measuring

/// Wall time, and with `/usr/bin/time` peak memory (kB) and CPU time (user + system), of
/// one command.
struct Sample {
    secs: f64,
    max_rss_kb: Option<u64>,
    cpu_secs: Option<f64>,
}

/// Medians over several runs: wall seconds, peak memory in bytes, CPU seconds; and the
/// fastest and slowest run's wall seconds.
struct Measured {
    secs: f64,
    rss: Option<f64>,
    cpu: Option<f64>,
    fastest: f64,
    slowest: f64,
}

impl Measured {
    /// `0.700 s (CPU 1.10 s)`.
    fn shown(&self) -> String {
        match self.cpu {
            Some(c) => format!("{:.3} s (CPU {c:.2} s)", self.secs),
            None => format!("{:.3} s", self.secs),
        }
    }
}

fn time_tool() -> Option<&'static str> {
    Path::new("/usr/bin/time")
        .is_file()
        .then_some("/usr/bin/time")
}

/// Runs `argv` with `stdin` (a file) if given, output discarded; panics unless it exits
/// with one of `ok_codes`.
fn run_once(argv: &[&str], stdin: Option<&Path>, ok_codes: &[i32], dir: &Path) -> Sample {
    let rss_file = dir.join("rss.txt");
    let mut cmd = match time_tool() {
        Some(t) => {
            let mut c = Command::new(t);
            c.args(["-f", "%M %U %S", "-o"]).arg(&rss_file).args(argv);
            c
        }
        None => {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    match stdin {
        Some(p) => cmd.stdin(std::fs::File::open(p).expect("stdin file")),
        None => cmd.stdin(Stdio::null()),
    };
    let t = Instant::now();
    let out = cmd.output().expect("spawn");
    let secs = t.elapsed().as_secs_f64();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        ok_codes.contains(&code),
        "{argv:?} exited {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `/usr/bin/time -o` writes "MAXRSS USER SYSTEM" as its last line.
    let fields: Vec<f64> = time_tool()
        .and_then(|_| std::fs::read_to_string(&rss_file).ok())
        .and_then(|t| {
            let last = t.lines().last()?.to_string();
            last.split_whitespace().map(|f| f.parse().ok()).collect()
        })
        .unwrap_or_default();
    let (max_rss_kb, cpu_secs) = match fields[..] {
        [rss, user, sys] => (Some(rss as u64), Some(user + sys)),
        _ => (None, None),
    };
    Sample {
        secs,
        max_rss_kb,
        cpu_secs,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians of `runs` runs (after one warm-up run when `warm`).
fn measure(
    argv: &[&str],
    stdin: Option<&Path>,
    ok_codes: &[i32],
    runs: usize,
    warm: bool,
    dir: &Path,
) -> Measured {
    if warm {
        run_once(argv, stdin, ok_codes, dir);
    }
    let samples: Vec<Sample> = (0..runs)
        .map(|_| run_once(argv, stdin, ok_codes, dir))
        .collect();
    medians(&samples)
}

/// Medians of `runs` runs each of some commands (exit code 0), run by turns after a
/// warm-up run of each: a change in the machine's load while they are measured (this
/// VM's wall times move by 10-20% from minute to minute) falls on all alike, so that
/// their ratios are not skewed one way or the other.
fn measure_turns(cmds: &[&[&str]], runs: usize, dir: &Path) -> Vec<Measured> {
    for c in cmds {
        run_once(c, None, &[0], dir);
    }
    let mut samples: Vec<Vec<Sample>> = cmds.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (c, s) in cmds.iter().zip(&mut samples) {
            s.push(run_once(c, None, &[0], dir));
        }
    }
    samples.iter().map(|s| medians(s)).collect()
}

/// The medians of some runs' wall times, peak memory and CPU times.
fn medians(samples: &[Sample]) -> Measured {
    let rss: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.max_rss_kb)
        .map(|k| k as f64 * 1024.0)
        .collect();
    let cpu: Vec<f64> = samples.iter().filter_map(|s| s.cpu_secs).collect();
    let walls = samples.iter().map(|s| s.secs);
    Measured {
        secs: median(walls.clone().collect()),
        rss: (!rss.is_empty()).then(|| median(rss)),
        cpu: (!cpu.is_empty()).then(|| median(cpu)),
        fastest: walls.clone().fold(f64::INFINITY, f64::min),
        slowest: walls.fold(0.0, f64::max),
    }
}

/// The 1-minute load average: other work on the machine makes wall times noisy.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A program on PATH or in the system folders.
fn tool(name: &str) -> Option<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
}

/// A network namespace for `iptables-restore --test`, deleted when dropped.
struct Netns {
    ip: String,
    name: String,
}

impl Netns {
    fn create() -> Option<Netns> {
        let ip = tool("ip")?;
        let name = format!("lbaudit-bench-{}", std::process::id());
        let ok = Command::new(&ip)
            .args(["netns", "add", &name])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Netns { ip, name })
    }
    /// `argv` prefixed to run inside the namespace.
    fn wrap<'a>(&'a self, argv: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![self.ip.as_str(), "netns", "exec", self.name.as_str()];
        v.extend_from_slice(argv);
        v
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(&self.ip)
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The 5,000-endpoint (or any single-service) analysis inside this process: parse,
/// graph, balancers, report JSON. Median of `runs`.
fn analyse_in_process(text: &str, runs: usize) -> f64 {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs + 1 {
        let t = Instant::now();
        let rs = parse(text, &ParseOptions::default()).expect("parse");
        let graph = Graph::build(&rs, false).expect("graph");
        let balancers = lbaudit::balance::find(&graph);
        let report = Report::new("bench", &rs, &balancers, None, None, Vec::new());
        // As `lbaudit report --format json` does: streamed (here to nowhere).
        report.write_json(&mut std::io::sink()).expect("JSON");
        times.push(t.elapsed().as_secs_f64());
        assert_eq!(balancers.len(), 1);
    }
    times.remove(0); // warm-up
    median(times)
}

// ------------------------------------------------------------------ the table

struct Row {
    what: String,
    value: String,
    target: String,
    verdict: &'static str,
}

fn row(rows: &mut Vec<Row>, what: &str, value: String, target: &str, pass: Option<bool>) {
    rows.push(Row {
        what: what.into(),
        value,
        target: target.into(),
        verdict: match pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "-",
        },
    });
}

fn print_table(title: &str, rows: &[Row]) {
    let w0 = rows
        .iter()
        .map(|r| r.what.chars().count())
        .max()
        .unwrap_or(0);
    let w1 = rows
        .iter()
        .map(|r| r.value.chars().count())
        .max()
        .unwrap_or(0);
    let w2 = rows
        .iter()
        .map(|r| r.target.chars().count())
        .max()
        .unwrap_or(0);
    println!("\n{title}");
    println!(
        "| {:w0$} | {:w1$} | {:w2$} | verdict |",
        "figure", "measured", "target"
    );
    println!(
        "|{}|{}|{}|---------|",
        "-".repeat(w0 + 2),
        "-".repeat(w1 + 2),
        "-".repeat(w2 + 2)
    );
    for r in rows {
        println!(
            "| {:w0$} | {:w1$} | {:w2$} | {:7} |",
            r.what, r.value, r.target, r.verdict
        );
    }
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

/// The simulate bench's figures, from its output: per cascade, simulator and bare-loop
/// rates on one thread and their ratio.
fn simulate_rows(rows: &mut Vec<Row>) {
    let Some(path) = std::env::var_os("LBAUDIT_SIM_BENCH_OUTPUT") else {
        row(
            rows,
            "simulator vs bare generator loop",
            "not run (bash benches/run.sh runs it)".into(),
            "-",
            None,
        );
        return;
    };
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut cascade = String::new();
    let (mut sim, mut bare) = (None, None);
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("kube cascade, ") {
            cascade = rest.split(':').next().unwrap_or("").to_string();
        } else if t.starts_with("1 thread : simulator") {
            sim = t.split_whitespace().nth(4).map(str::to_string);
        } else if t.starts_with("bare loop") && bare.is_none() && sim.is_some() {
            bare = t.split_whitespace().nth(2).map(str::to_string);
        } else if let Some(r) = t.strip_prefix("ratio: evaluations/s over comparisons/s ") {
            let ratio = r.split(';').next().unwrap_or("?");
            row(
                rows,
                &format!(
                    "simulator, {cascade}: rule evaluations/s vs bare loop comparisons/s, 1 thread"
                ),
                format!(
                    "{} M/s vs {} M/s = {ratio}",
                    sim.take().unwrap_or_default(),
                    bare.take().unwrap_or_default()
                ),
                ">= 0.5 per core",
                ratio.trim().parse::<f64>().ok().map(|r| r >= 0.5),
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scale = args.iter().any(|a| a == "--scale");
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(5);
    let dir = std::env::var_os("LBAUDIT_BENCH_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/lbaudit-bench"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("bench dir");
    println!(
        "lbaudit benchmarks: {} cores, median of {runs} runs, {}; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        LBAUDIT,
        load_average()
    );

    let big = generate(&dir, "kube-30000.txt", || kube_dump(30_000, endpoint_count));
    let one = generate(&dir, "kube-1x5000.txt", || kube_dump(1, |_| 5000));
    let big_s = big.to_str().unwrap();
    let one_s = one.to_str().unwrap();
    let size = std::fs::metadata(&big).unwrap().len() as f64;
    let lines = std::fs::read(&big)
        .unwrap()
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    println!(
        "30,000-service dump: {} ({}, {lines} lines)",
        big.display(),
        mb(size)
    );

    let mut rows = Vec::new();
    let report0 = ["report", "--format", "json", "--connections", "0"];
    let mut argv: Vec<&str> = vec![LBAUDIT];
    argv.extend(report0);
    argv.push(big_s);
    // lbaudit without and with the cross-check, grep, and the reading alone, by turns
    // (see `measure_turns`).
    let mut argv_mc: Vec<&str> = vec![LBAUDIT, "report", "--format", "json"];
    argv_mc.push(big_s);
    let grep_argv = ["grep", "-c", "statistic", big_s];
    // The same report with no balancer selected: reading the dump, the chain graph and
    // the balancer list, without analysis or output; what any report costs at least.
    let mut argv_read: Vec<&str> = argv[..argv.len() - 1].to_vec();
    argv_read.extend(["--balancer", "no balancer is named this", big_s]);
    let measured = measure_turns(&[&argv, &argv_mc, &grep_argv, &argv_read], runs, &dir);
    let [lb, mc, grep, read]: [Measured; 4] = measured.try_into().ok().expect("four commands");
    let t_lb = lb.secs;
    row(
        &mut rows,
        "lbaudit report --format json --connections 0, 30k services",
        lb.shown(),
        "-",
        None,
    );
    row(
        &mut rows,
        "  of which reading (the same with no balancer selected)",
        format!(
            "{}; {:.0}% of the report",
            read.shown(),
            100.0 * read.secs / t_lb
        ),
        "-",
        None,
    );

    let t_grep = grep.secs;
    let r = t_lb / t_grep;
    row(
        &mut rows,
        "  vs grep -c statistic",
        format!("{t_grep:.3} s; lbaudit/grep = {r:.1}x"),
        "<= 10x",
        Some(r <= 10.0),
    );

    let ns = Netns::create();
    // Each backend once: plain `iptables-restore` is an alternative for one of the others.
    let mut restores: Vec<(&str, String)> = Vec::new();
    let mut seen = Vec::new();
    for (name, label) in [
        ("iptables-legacy-restore", "legacy"),
        ("iptables-nft-restore", "nft"),
        ("iptables-restore", "default"),
    ] {
        if let Some(path) = tool(name) {
            let real = std::fs::canonicalize(&path).unwrap_or_else(|_| PathBuf::from(&path));
            if !seen.contains(&real) {
                seen.push(real);
                restores.push((label, path));
            }
        }
    }
    if restores.is_empty() {
        row(
            &mut rows,
            "  vs iptables-restore --test",
            "iptables-restore not found".into(),
            ">= 50x",
            None,
        );
    }
    for (label, path) in &restores {
        let base = [path.as_str(), "--test"];
        let argv = match &ns {
            Some(ns) => ns.wrap(&base),
            None => base.to_vec(),
        };
        // One timed run first: if it is slow, fewer runs.
        let first = run_once(&argv, Some(&big), &[0], &dir);
        let n = if first.secs > 20.0 { 1 } else { runs.min(3) };
        let m = measure(&argv, Some(&big), &[0], n, false, &dir);
        let t = m.secs;
        let r = t / t_lb;
        let shown = Path::new(path).file_name().unwrap().to_string_lossy();
        // Its runs' spread, and the report time 50x asks for against the median.
        let spread = if n > 1 {
            format!(" (runs {:.2}-{:.2} s)", m.fastest, m.slowest)
        } else {
            String::new()
        };
        row(
            &mut rows,
            &format!(
                "  vs {shown} --test ({label}{})",
                if ns.is_some() { ", in a netns" } else { "" }
            ),
            format!(
                "{t:.2} s{spread}; lbaudit {r:.0}x faster (50x: {:.3} s)",
                t / 50.0
            ),
            ">= 50x faster",
            Some(r >= 50.0),
        );
    }
    drop(ns);

    // (Measured with the report without it and grep, by turns.)
    let r = mc.secs / t_lb;
    row(
        &mut rows,
        "  with the default Monte-Carlo cross-check",
        format!("{}; with/without = {r:.2}x", mc.shown()),
        "<= 2x",
        Some(r <= 2.0),
    );
    for (what, rss) in [("--connections 0", lb.rss), ("default cross-check", mc.rss)] {
        match rss {
            Some(rss) => {
                let r = rss / size;
                row(
                    &mut rows,
                    &format!("  peak memory ({what}) vs file size"),
                    format!("{} / {} = {r:.2}x", mb(rss), mb(size)),
                    "<= 2x",
                    Some(r <= 2.0),
                );
            }
            None => row(
                &mut rows,
                &format!("  peak memory ({what})"),
                "/usr/bin/time missing (apt-get install time)".into(),
                "<= 2x",
                None,
            ),
        }
    }

    let one_text = std::fs::read_to_string(&one).unwrap();
    let t_one = analyse_in_process(&one_text, runs.max(7));
    row(
        &mut rows,
        "5,000-endpoint service: analysis (parse, graph, report JSON)",
        format!("{:.1} ms", t_one * 1e3),
        "< 100 ms",
        Some(t_one < 0.1),
    );
    let mut argv: Vec<&str> = vec![LBAUDIT];
    argv.extend(report0);
    argv.push(one_s);
    let t_one_cli = measure(&argv, None, &[0], runs, true, &dir).secs;
    row(
        &mut rows,
        "  the whole command (--connections 0)",
        format!("{:.1} ms", t_one_cli * 1e3),
        "< 100 ms",
        Some(t_one_cli < 0.1),
    );
    let mut argv: Vec<&str> = vec![LBAUDIT, "report", "--format", "json"];
    argv.push(one_s);
    let t_one_mc = measure(&argv, None, &[0], runs, false, &dir).secs;
    row(
        &mut rows,
        "  the whole command with the default cross-check",
        format!("{:.1} ms", t_one_mc * 1e3),
        "-",
        None,
    );
    simulate_rows(&mut rows);
    print_table("Targets", &rows);

    if scale {
        let inputs = [
            (big.clone(), "30,000 services"),
            (
                generate(&dir, "kube-100000.txt", || {
                    kube_dump(100_000, endpoint_count)
                }),
                "100,000 services",
            ),
            (
                generate(&dir, "kube-30000-counters.txt", || {
                    with_counters(&kube_dump(30_000, endpoint_count))
                }),
                "30,000 services with counters (-c; 0-40 connections each)",
            ),
            (one.clone(), "1 service, 5,000 endpoints"),
            (
                generate(&dir, "kube-1x20000.txt", || kube_dump(1, |_| 20_000)),
                "1 service, 20,000 endpoints",
            ),
        ];
        println!(
            "\nScale: lbaudit report --format json --connections 0 (median of {})",
            runs.min(3)
        );
        println!("| input | size | lines | time | CPU | MB/s | peak memory | memory/size |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for (path, what) in &inputs {
            let size = std::fs::metadata(path).unwrap().len() as f64;
            let lines = std::fs::read(path)
                .unwrap()
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            let mut argv: Vec<&str> = vec![LBAUDIT];
            argv.extend(report0);
            argv.push(path.to_str().unwrap());
            let m = measure(&argv, None, &[0], runs.min(3), true, &dir);
            let (t, rss) = (m.secs, m.rss);
            println!(
                "| {what} | {} | {lines} | {t:.3} s | {} | {:.0} | {} | {} |",
                mb(size),
                m.cpu.map_or("n/a".into(), |c| format!("{c:.2} s")),
                size / 1e6 / t,
                rss.map_or("n/a".into(), mb),
                rss.map_or("n/a".into(), |r| format!("{:.2}x", r / size)),
            );
        }
    }
    println!("\nload average at the end: {}", load_average());
    std::io::stdout().flush().unwrap();
}
