//! Proof against the real kernel: the split that netfilter actually makes agrees with
//! the probabilities lbaudit computes.
//!
//! For each iptables backend present (`iptables-legacy-restore`, `iptables-nft-restore`,
//! or plain `iptables-restore` when neither is), the test
//!
//! 1. creates a private network namespace (`ip netns add lbaudit-<pid>-<backend>`,
//!    always deleted again by a guard, also when the test fails or panics) and brings
//!    its `lo` up;
//! 2. loads with `iptables-restore` a kube-proxy-style nat dump whose cluster IPs and
//!    endpoints are loopback addresses (127.x.y.z), so that no packet can leave the
//!    namespace. Services have 1, 2, 3, 5, 10, 20 and 50 endpoints, once with the
//!    probabilities kube-proxy writes today (`%0.10f`, namespace `modern`) and once as
//!    before 2019 (`%0.5f`, namespace `legacy5`), plus one deliberately skewed service
//!    (namespace `skewed`: `0.5`, `0.5`, rest, i.e. 1/2, 1/4, 1/4) used as a control;
//! 3. opens real TCP connections to every cluster IP:port from inside the namespace
//!    (this test binary re-run there with `ip netns exec`, see [`connect_helper`]).
//!    Nothing listens, so each connection is refused at once, but its first packet
//!    has gone through the nat OUTPUT chain and one `-m statistic` cascade;
//! 4. reads the kernel's own account with `iptables-save -c -t nat` and checks it:
//!    (a) every statistic rule the kernel prints, read back by lbaudit's parser
//!    (`threshold_from_text` and `statistic::from_match`), gives the integer threshold
//!    `lround(2^31 · P)` of the text that was written, computed here independently
//!    with integer arithmetic;
//!    (b) the kernel's per-endpoint connection counts fit lbaudit's exact
//!    probabilities: `lbaudit report --format json --connections 0` gives, per service,
//!    a goodness-of-fit p-value of the observed counters, Holm-adjusted across all the
//!    services of the dump (`balancers[].observed.p_value_adjusted`); every one must
//!    be ≥ α = 0.001. Holm's procedure controls the family-wise error rate, so when
//!    lbaudit and the kernel agree, the chance that any service of a dump fails is at
//!    most 0.001: one false failure in a thousand runs (per backend; two backends make
//!    it at most 0.002 per run of this test). The endpoints' exact probabilities are
//!    also compared with the product formula `q_i/2^31 · Π_{j<i} (1 − q_j/2^31)`, and
//!    the observed counts must add up to the connections made;
//!    (c) `lbaudit check --namespace modern` exits 0 on the kernel's dump, and
//!    `lbaudit check --namespace skewed` exits 1 (the skew is real);
//!    (d) power: 200 connections per endpoint detect a gross error. The skewed
//!    service's kernel counts, handed to lbaudit with its first rule's probability
//!    edited to what a uniform split would print, must give p < 10⁻⁶.
//!
//! The test skips (passes, saying why on stderr) when not run as root or when `ip` or
//! `iptables-restore` is missing. When some backend cannot load rules (a kernel
//! without its modules), it says so and goes on with the others; at least one must
//! work. About 37,000 connections per backend; the whole test takes a few seconds.

use lbaudit::parse::{ParseOptions, parse};
use lbaudit::statistic::{self, Statistic, threshold_from_text};
use serde_json::Value;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Significance level of the per-service counter tests after Holm's correction.
const ALPHA: f64 = 0.001;
/// Connections per endpoint of a service.
const PER_ENDPOINT: u64 = 200;
/// Endpoints of the generated services, in each probability form.
const SIZES: [usize; 7] = [1, 2, 3, 5, 10, 20, 50];
/// The environment variable that turns [`connect_helper`] on: `ip:port:count` items
/// separated by commas.
const HELPER_ENV: &str = "LBAUDIT_KERNEL_CONNECT";

// ------------------------------------------------------------------------ the dump

/// How a service's probabilities are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// kube-proxy since 2019 (kubernetes PR 83599): `%0.10f` of 1/(n−i).
    Modern,
    /// kube-proxy before 2019: `%0.5f` of 1/(n−i).
    Legacy5,
    /// A deliberately skewed cascade: every statistic rule writes `0.5000000000`.
    Skewed,
}

impl Form {
    fn namespace(self) -> &'static str {
        match self {
            Form::Modern => "modern",
            Form::Legacy5 => "legacy5",
            Form::Skewed => "skewed",
        }
    }

    /// The `--probability` text of rule `i` (0-based) of a cascade of `n` endpoints.
    fn text(self, i: usize, n: usize) -> String {
        let p = 1.0 / (n - i) as f64;
        match self {
            Form::Modern => format!("{p:.10}"),
            Form::Legacy5 => format!("{p:.5}"),
            Form::Skewed => "0.5000000000".to_string(),
        }
    }
}

/// One generated service.
#[derive(Debug, Clone)]
struct Service {
    form: Form,
    name: String,
    vip: Ipv4Addr,
    port: u16,
    svc_chain: String,
    endpoints: Vec<Ipv4Addr>,
    sep_chains: Vec<String>,
    /// The `--probability` texts written, one per endpoint but the last.
    texts: Vec<String>,
}

impl Service {
    fn port_name(&self) -> String {
        format!("{}/{}:http", self.form.namespace(), self.name)
    }
    fn connections(&self) -> u64 {
        PER_ENDPOINT * self.endpoints.len() as u64
    }
}

/// A kube-proxy-like chain name: prefix and 16 base32 characters of a hash.
fn chain_name(prefix: &str, key: &str) -> String {
    // FNV-1a, twice with different bases, gives 80 bits for 16 base32 characters.
    let fnv = |seed: u64| {
        key.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let (a, b) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_6175_6469_7421));
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bits = (u128::from(a) << 64) | u128::from(b);
    let hash: String = (0..16)
        .map(|k| ALPHABET[((bits >> (5 * k)) & 31) as usize] as char)
        .collect();
    format!("{prefix}{hash}")
}

/// The services of the dump: every size in the modern and the 5-decimal form, and the
/// skewed control. Cluster IPs are 127.10.f.s, endpoints 127.(20+f).s.e.
fn services() -> Vec<Service> {
    let mut out = Vec::new();
    let mut add = |form: Form, f: u8, s: u8, n: usize| {
        let name = format!("svc-{n}");
        let key = format!("{}/{name}", form.namespace());
        let endpoints: Vec<Ipv4Addr> = (0..n)
            .map(|e| Ipv4Addr::new(127, 20 + f, s, e as u8 + 1))
            .collect();
        out.push(Service {
            form,
            vip: Ipv4Addr::new(127, 10, f, s + 1),
            port: 80,
            svc_chain: chain_name("KUBE-SVC-", &key),
            sep_chains: endpoints
                .iter()
                .map(|ip| chain_name("KUBE-SEP-", &format!("{key}/{ip}")))
                .collect(),
            texts: (0..n.saturating_sub(1)).map(|i| form.text(i, n)).collect(),
            endpoints,
            name,
        });
    };
    for (f, form) in [Form::Modern, Form::Legacy5].into_iter().enumerate() {
        for (s, &n) in SIZES.iter().enumerate() {
            add(form, f as u8, s as u8, n);
        }
    }
    add(Form::Skewed, 2, 0, 3);
    out
}

/// The nat table kube-proxy (iptables mode) would write for these services, as handed
/// to `iptables-restore`, with `-j KUBE-SERVICES` in OUTPUT for local traffic.
fn restore_text(services: &[Service]) -> String {
    let mut s = String::from("*nat\n");
    for c in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        writeln!(s, ":{c} ACCEPT [0:0]").unwrap();
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        writeln!(s, ":{c} - [0:0]").unwrap();
    }
    for svc in services {
        writeln!(s, ":{} - [0:0]", svc.svc_chain).unwrap();
        for sep in &svc.sep_chains {
            writeln!(s, ":{sep} - [0:0]").unwrap();
        }
    }
    s += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    s += "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    s += "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n";
    s += "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n";
    s += "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n";
    s += "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n";
    s += "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE\n";
    for svc in services {
        let pn = svc.port_name();
        writeln!(
            s,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport {} -j {}",
            svc.vip, svc.port, svc.svc_chain
        )
        .unwrap();
    }
    s += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
    for svc in services {
        let pn = svc.port_name();
        writeln!(
            s,
            "-A {} ! -s 127.0.0.0/16 -d {}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
            svc.svc_chain, svc.vip, svc.port
        )
        .unwrap();
        let n = svc.endpoints.len();
        for (i, (ip, sep)) in svc.endpoints.iter().zip(&svc.sep_chains).enumerate() {
            let c = format!("-m comment --comment \"{pn} -> {ip}:8080\"");
            if i + 1 < n {
                writeln!(
                    s,
                    "-A {} {c} -m statistic --mode random --probability {} -j {sep}",
                    svc.svc_chain, svc.texts[i]
                )
                .unwrap();
            } else {
                writeln!(s, "-A {} {c} -j {sep}", svc.svc_chain).unwrap();
            }
        }
        for (ip, sep) in svc.endpoints.iter().zip(&svc.sep_chains) {
            writeln!(
                s,
                "-A {sep} -s {ip}/32 -m comment --comment \"{pn}\" -j KUBE-MARK-MASQ"
            )
            .unwrap();
            writeln!(
                s,
                "-A {sep} -p tcp -m comment --comment \"{pn}\" -m tcp -j DNAT --to-destination {ip}:8080"
            )
            .unwrap();
        }
    }
    s += "COMMIT\n";
    s
}

/// `lround(2^31 · P)` for a plain decimal text P in [0, 1], in exact integer
/// arithmetic (no floating point, so independent of lbaudit's `threshold_from_text`).
/// A tie is impossible: 2^31·m/10^d is never an odd multiple of 1/2 for d ≤ 31.
fn exact_threshold(text: &str) -> u32 {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    assert!(frac.len() <= 18, "too many decimals in {text}");
    let den = 10u128.pow(frac.len() as u32);
    let num = format!("{int}{frac}").parse::<u128>().expect("decimal") << 31;
    // round(num / den), halves up (no halves occur).
    u32::try_from((2 * num + den) / (2 * den)).expect("P <= 1")
}

/// iptables' own computation, `lround(0x80000000 * strtod(text))` in binary floating
/// point; must agree with [`exact_threshold`] for the texts used here.
fn iptables_threshold(text: &str) -> u32 {
    (text.parse::<f64>().expect("decimal") * 2f64.powi(31)).round() as u32
}

// ------------------------------------------------------------------------ the host

/// A program on PATH or in the usual system folders.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("Uid:"))
    {
        return line.split_whitespace().nth(2) == Some("0");
    }
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// An iptables backend: its restore and save programs.
#[derive(Debug)]
struct Backend {
    name: &'static str,
    restore: PathBuf,
    save: PathBuf,
}

fn backends() -> Vec<Backend> {
    let mut out: Vec<Backend> = [
        ("legacy", "iptables-legacy-restore", "iptables-legacy-save"),
        ("nft", "iptables-nft-restore", "iptables-nft-save"),
    ]
    .into_iter()
    .filter_map(|(name, r, s)| {
        Some(Backend {
            name,
            restore: tool(r)?,
            save: tool(s)?,
        })
    })
    .collect();
    if out.is_empty()
        && let (Some(restore), Some(save)) = (tool("iptables-restore"), tool("iptables-save"))
    {
        out.push(Backend {
            name: "default",
            restore,
            save,
        });
    }
    out
}

fn describe(o: &Output) -> String {
    format!(
        "{}; stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// A network namespace of this test, deleted when dropped (also while unwinding).
struct Netns {
    ip: PathBuf,
    name: String,
}

impl Netns {
    fn create(ip: &Path, name: String) -> Result<Netns, String> {
        // A namespace left by an earlier process with the same pid is ours to remove.
        let _ = Command::new(ip)
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let o = Command::new(ip)
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("ip netns add: {e}"))?;
        if !o.status.success() {
            return Err(format!("ip netns add {name}: {}", describe(&o)));
        }
        let ns = Netns {
            ip: ip.to_path_buf(),
            name,
        };
        ns.run(Command::new(ip).args(["link", "set", "lo", "up"]), None)?;
        Ok(ns)
    }

    /// Runs `cmd` inside the namespace, with `stdin` as its standard input; its stdout
    /// on success.
    fn run(&self, cmd: &Command, stdin: Option<&str>) -> Result<String, String> {
        let mut c = Command::new(&self.ip);
        c.args(["netns", "exec", &self.name])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        let shown = format!("{:?}", cmd.get_program());
        let o = if let Some(input) = stdin {
            use std::io::Write;
            let mut child = c
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("{shown}: {e}"))?;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(input.as_bytes())
                .map_err(|e| format!("{shown}: writing stdin: {e}"))?;
            child
                .wait_with_output()
                .map_err(|e| format!("{shown}: {e}"))?
        } else {
            c.output().map_err(|e| format!("{shown}: {e}"))?
        };
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(format!("{shown} in {}: {}", self.name, describe(&o)))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ok = Command::new(&self.ip)
            .args(["netns", "del", &self.name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "kernel test: could not delete network namespace {}",
                self.name
            );
        }
    }
}

// ------------------------------------------------------------------------ traffic

/// Run inside the namespace by the main test (`ip netns exec NS <this binary>
/// --ignored --exact connect_helper`): opens the connections that
/// `LBAUDIT_KERNEL_CONNECT` lists and prints how many were refused, accepted or
/// failed otherwise. Does nothing without that variable.
#[test]
#[ignore = "helper: run inside a network namespace by kernel_split_matches_exact_probabilities"]
fn connect_helper() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let (mut refused, mut accepted, mut other) = (0u64, 0u64, 0u64);
    let mut first_error = None;
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let mut parts = item.split(':');
        let ip: Ipv4Addr = parts.next().unwrap().parse().unwrap();
        let port: u16 = parts.next().unwrap().parse().unwrap();
        let count: u64 = parts.next().unwrap().parse().unwrap();
        let addr = SocketAddrV4::new(ip, port);
        for _ in 0..count {
            match TcpStream::connect(addr) {
                Ok(_) => accepted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                Err(e) => {
                    other += 1;
                    first_error.get_or_insert_with(|| format!("{addr}: {e}"));
                }
            }
        }
    }
    println!("\nLBAUDIT-CONNECT refused={refused} accepted={accepted} other={other}");
    if let Some(e) = first_error {
        println!("LBAUDIT-CONNECT first error: {e}");
    }
}

/// Opens `svc.connections()` connections to every service from inside `ns`.
fn make_traffic(ns: &Netns, services: &[Service]) -> Result<(), String> {
    let spec: Vec<String> = services
        .iter()
        .map(|s| format!("{}:{}:{}", s.vip, s.port, s.connections()))
        .collect();
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--ignored",
        "--exact",
        "connect_helper",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(HELPER_ENV, spec.join(","));
    let out = ns.run(&cmd, None)?;
    let line = out
        .lines()
        .find_map(|l| l.find("LBAUDIT-CONNECT refused=").map(|i| &l[i..]))
        .ok_or_else(|| format!("the connect helper printed no summary:\n{out}"))?;
    let total: u64 = services.iter().map(Service::connections).sum();
    let expected = format!("LBAUDIT-CONNECT refused={total} accepted=0 other=0");
    if line != expected {
        return Err(format!(
            "connections: expected `{expected}`, got `{line}`\n{out}"
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------------ checks

fn lbaudit() -> assert_cmd::Command {
    assert_cmd::cargo::cargo_bin_cmd!("lbaudit")
}

/// (a) Every statistic rule the kernel printed gives back the threshold written.
fn check_thresholds(dump: &str, services: &[Service], problems: &mut Vec<String>) {
    let rs = match parse(dump, &ParseOptions::default()) {
        Ok(rs) => rs,
        Err(e) => {
            problems.push(format!("lbaudit cannot parse the kernel's dump: {e:?}"));
            return;
        }
    };
    let Some(nat) = rs.table("nat") else {
        problems.push("no nat table in the kernel's dump".into());
        return;
    };
    let mut checked = 0;
    for svc in services {
        let Some(chain) = nat.chain(&svc.svc_chain) else {
            problems.push(format!("{}: chain missing from the dump", svc.svc_chain));
            continue;
        };
        let parsed: Vec<_> = chain.rules.iter().map(|r| r.parse()).collect();
        let printed: Vec<_> = parsed
            .iter()
            .filter_map(|r| r.find_match("statistic"))
            .collect();
        if printed.len() != svc.texts.len() {
            problems.push(format!(
                "{}: {} statistic rules printed, {} written",
                svc.svc_chain,
                printed.len(),
                svc.texts.len()
            ));
            continue;
        }
        for (written, m) in svc.texts.iter().zip(printed) {
            let want = exact_threshold(written);
            let text = m.opt("probability").map_or("", |o| o.value());
            let got = threshold_from_text(text);
            let full = statistic::from_match(m).ok();
            if got != Some(want)
                || full
                    != Some(Statistic::Random {
                        threshold: want,
                        inverted: false,
                    })
            {
                problems.push(format!(
                    "{}: wrote {written} (q = {want}), kernel printed {text}: threshold_from_text gives {got:?}, from_match {full:?}",
                    svc.svc_chain
                ));
            }
            checked += 1;
        }
    }
    let written: usize = services.iter().map(|s| s.texts.len()).sum();
    assert_eq!(checked, written, "every written statistic rule was checked");
}

/// The exact probabilities of a cascade, by the product formula, from the thresholds.
fn cascade_probabilities(svc: &Service) -> Vec<f64> {
    let mut rest = 1.0f64;
    let mut out = Vec::new();
    for t in &svc.texts {
        let p = f64::from(exact_threshold(t)) / 2f64.powi(31);
        out.push(rest * p);
        rest *= 1.0 - p;
    }
    out.push(rest);
    out
}

/// The report's balancer for a service.
fn balancer<'r>(report: &'r Value, svc: &Service) -> Option<&'r Value> {
    report["balancers"]
        .as_array()?
        .iter()
        .find(|b| b["chain"] == svc.svc_chain.as_str())
}

/// (b) The kernel's counts fit lbaudit's exact probabilities.
fn check_counts(report: &Value, services: &[Service], problems: &mut Vec<String>) -> String {
    let mut table = String::new();
    for svc in services {
        let Some(b) = balancer(report, svc) else {
            problems.push(format!("{}: not in lbaudit's report", svc.svc_chain));
            continue;
        };
        let eps = b["endpoints"].as_array().cloned().unwrap_or_default();
        if eps.len() != svc.endpoints.len() {
            problems.push(format!(
                "{}: lbaudit found {} endpoints, {} written",
                svc.svc_chain,
                eps.len(),
                svc.endpoints.len()
            ));
            continue;
        }
        let want = cascade_probabilities(svc);
        let mut total = 0u64;
        let mut counts = Vec::new();
        for ((e, ip), p) in eps.iter().zip(&svc.endpoints).zip(&want) {
            let label = e["endpoint"].as_str().unwrap_or("");
            if !label.contains(&format!("{ip}:8080")) {
                problems.push(format!(
                    "{}: endpoint {label} where {ip}:8080 was written",
                    svc.svc_chain
                ));
            }
            let prob = e["probability"].as_f64().unwrap_or(f64::NAN);
            if (prob - p).abs() > 1e-12 * p.max(1e-3) {
                problems.push(format!(
                    "{}: {ip}: lbaudit's probability {prob} vs product formula {p}",
                    svc.svc_chain
                ));
            }
            let k = e["observed"].as_u64().unwrap_or(0);
            counts.push(k);
            total += k;
        }
        if total != svc.connections() {
            problems.push(format!(
                "{}: counters show {total} connections, {} were made",
                svc.svc_chain,
                svc.connections()
            ));
        }
        let obs = &b["observed"];
        let p_adj = obs["p_value_adjusted"].as_f64();
        let p = obs["p_value"].as_f64();
        match p_adj {
            Some(pa) if pa >= ALPHA => {}
            _ => problems.push(format!(
                "{}: counts {counts:?} do not fit the exact probabilities: p = {p:?}, Holm-adjusted {p_adj:?} < {ALPHA}",
                svc.svc_chain
            )),
        }
        writeln!(
            table,
            "  {:<8} {:>3} endpoints  {:>6} connections  p = {:<10.4}  Holm-adjusted {:.4}  skew {:.2e}",
            svc.form.namespace(),
            svc.endpoints.len(),
            total,
            p.unwrap_or(f64::NAN),
            p_adj.unwrap_or(f64::NAN),
            b["max_relative_skew"].as_f64().unwrap_or(f64::NAN),
        )
        .unwrap();
    }
    table
}

/// `lbaudit` on a file; exit code, stdout and stderr.
fn run_lbaudit(args: &[&str]) -> (i32, String, String) {
    let o = lbaudit().args(args).output().expect("lbaudit runs");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// (d) The skewed service's counts against a dump that claims a uniform split.
fn check_power(dump: &str, services: &[Service], dir: &Path, problems: &mut Vec<String>) {
    let svc = services
        .iter()
        .find(|s| s.form == Form::Skewed)
        .expect("control");
    let needle = format!("-A {} ", svc.svc_chain);
    let mut edited = String::new();
    let mut done = false;
    for line in dump.lines() {
        if !done && line.contains(&needle) && line.contains("--probability ") {
            let (head, tail) = line.split_once("--probability ").unwrap();
            let rest = tail.split_once(' ').map_or("", |(_, r)| r);
            // What iptables-save prints for 1/3 written as kube-proxy does.
            writeln!(edited, "{head}--probability 0.33333333349 {rest}").unwrap();
            done = true;
        } else {
            writeln!(edited, "{line}").unwrap();
        }
    }
    assert!(done, "the control's first statistic rule is in the dump");
    let path = dir.join("edited.txt");
    std::fs::write(&path, &edited).unwrap();
    let (code, out, err) = run_lbaudit(&[
        "report",
        "--format",
        "json",
        "--connections",
        "0",
        "--namespace",
        "skewed",
        path.to_str().unwrap(),
    ]);
    if code != 0 {
        problems.push(format!("power check: lbaudit exited {code}: {err}"));
        return;
    }
    let report: Value = serde_json::from_str(&out).expect("JSON report");
    let p = balancer(&report, svc).and_then(|b| b["observed"]["p_value"].as_f64());
    match p {
        Some(p) if p < 1e-6 => {}
        _ => problems.push(format!(
            "power check: counts of a 1/2, 1/4, 1/4 split against a uniform claim gave p = {p:?}, want < 1e-6"
        )),
    }
}

/// Loads, drives and checks one backend; `Err` when the backend cannot load the rules
/// (not a failure of lbaudit), panics when a check fails.
fn run_backend(ip: &Path, be: &Backend, services: &[Service], dir: &Path) -> Result<(), String> {
    let ns = Netns::create(ip, format!("lbaudit-{}-{}", std::process::id(), be.name))?;
    let rules = restore_text(services);
    std::fs::write(dir.join("restore.txt"), &rules).unwrap();
    ns.run(&Command::new(&be.restore), Some(&rules))
        .map_err(|e| format!("loading the rules: {e}"))?;
    let t = std::time::Instant::now();
    make_traffic(&ns, services).unwrap_or_else(|e| panic!("{}: traffic: {e}", be.name));
    let traffic_secs = t.elapsed().as_secs_f64();
    let dump = ns
        .run(Command::new(&be.save).args(["-c", "-t", "nat"]), None)
        .unwrap_or_else(|e| panic!("{}: {e}", be.name));
    drop(ns);
    let path = dir.join("kernel-dump.txt");
    std::fs::write(&path, &dump).unwrap();
    let file = path.to_str().unwrap();

    let mut problems = Vec::new();
    check_thresholds(&dump, services, &mut problems);

    let (code, out, err) = run_lbaudit(&["report", "--format", "json", "--connections", "0", file]);
    assert_eq!(code, 0, "{}: lbaudit report failed: {err}", be.name);
    let report: Value = serde_json::from_str(&out).expect("JSON report");
    let table = check_counts(&report, services, &mut problems);
    eprintln!(
        "kernel test, {} backend: {} connections in {traffic_secs:.2} s\n{table}",
        be.name,
        services.iter().map(Service::connections).sum::<u64>()
    );

    let (code, out, err) = run_lbaudit(&["check", "--namespace", "modern", file]);
    if code != 0 {
        problems.push(format!(
            "lbaudit check --namespace modern exited {code}:\n{out}{err}"
        ));
    }
    let (code, out, err) = run_lbaudit(&["check", "--namespace", "skewed", file]);
    if code != 1 {
        problems.push(format!(
            "lbaudit check --namespace skewed exited {code}, want 1:\n{out}{err}"
        ));
    }
    check_power(&dump, services, dir, &mut problems);

    assert!(
        problems.is_empty(),
        "{} backend ({}), dump kept in {file}:\n  {}",
        be.name,
        be.restore.display(),
        problems.join("\n  ")
    );
    Ok(())
}

#[test]
fn kernel_split_matches_exact_probabilities() {
    if std::env::var_os(HELPER_ENV).is_some() {
        return;
    }
    let skip = |why: &str| eprintln!("kernel test skipped: {why}");
    if !is_root() {
        return skip("not root (network namespaces and iptables need it)");
    }
    let Some(ip) = tool("ip") else {
        return skip("`ip` (iproute2) not found");
    };
    if tool("iptables-restore").is_none() {
        return skip("`iptables-restore` not found (Debian package iptables)");
    }
    let services = services();
    // The written texts must be unambiguous: iptables' floating-point lround and the
    // exact rounding agree.
    for svc in &services {
        for t in &svc.texts {
            assert_eq!(exact_threshold(t), iptables_threshold(t), "{t}");
        }
    }
    let mut worked = Vec::new();
    let mut failed = Vec::new();
    for be in backends() {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernel-{}", be.name));
        std::fs::create_dir_all(&dir).unwrap();
        match run_backend(&ip, &be, &services, &dir) {
            Ok(()) => worked.push(be.name),
            Err(e) => {
                eprintln!("kernel test: {} backend unusable here: {e}", be.name);
                failed.push(format!("{}: {e}", be.name));
            }
        }
    }
    eprintln!("kernel test: backends that worked: {worked:?}");
    assert!(
        !worked.is_empty(),
        "no iptables backend could load rules here:\n{}",
        failed.join("\n")
    );
}

#[test]
fn exact_threshold_is_lround() {
    assert_eq!(exact_threshold("0.5000000000"), 1 << 30);
    assert_eq!(exact_threshold("1"), 1 << 31);
    assert_eq!(exact_threshold("0"), 0);
    // 0.33333·2^31 = 715820724.39…
    assert_eq!(exact_threshold("0.33333"), 715_820_724);
    // 0.3333333333·2^31 = 715827882.595…
    assert_eq!(exact_threshold("0.3333333333"), 715_827_883);
    assert_eq!(exact_threshold("0.33333333349"), 715_827_883);
}
