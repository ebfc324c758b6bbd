//! `lbaudit plot` end to end: every chart in both formats from fixtures, valid files of
//! the asked size, the report's numbers in the pictures, byte-identical renders, usage
//! errors that leave no file, and the README's charts in sync with the code.

use std::path::{Path, PathBuf};

fn lbaudit() -> assert_cmd::Command {
    let mut cmd = assert_cmd::cargo::cargo_bin_cmd!("lbaudit");
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

fn fixture(name: &str) -> String {
    format!("fixtures/{name}")
}

/// A fresh, empty folder for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("plot")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

struct Run {
    code: i32,
    stderr: String,
}

fn plot(args: &[&str]) -> Run {
    let out = lbaudit().arg("plot").args(args).output().expect("runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Renders and returns the file's bytes.
fn render(args: &[&str], out: &Path) -> Vec<u8> {
    let out_s = out.to_str().expect("utf-8 path");
    let mut all = args.to_vec();
    all.extend(["-o", out_s]);
    let r = plot(&all);
    assert_eq!(r.code, 0, "lbaudit plot {}: {}", all.join(" "), r.stderr);
    std::fs::read(out).expect("the chart was written")
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 33, "PNG too short");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk is IHDR");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    (be(16), be(20))
}

/// The SVG's size and all its text, after checking that it is well-formed XML.
fn svg_text(bytes: &[u8]) -> ((u32, u32), Vec<String>) {
    let text = std::str::from_utf8(bytes).expect("SVG is UTF-8");
    let doc = roxmltree::Document::parse(text).expect("SVG parses as XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    let dim = |a: &str| root.attribute(a).and_then(|v| v.parse().ok()).expect(a);
    let texts = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| {
            n.descendants()
                .filter(|d| d.is_text())
                .filter_map(|d| d.text())
                .collect::<String>()
                .trim()
                .to_string()
        })
        .collect();
    ((dim("width"), dim("height")), texts)
}

fn has(texts: &[String], needle: &str) -> bool {
    texts.iter().any(|t| t.contains(needle))
}

/// The report's JSON for the same input and selection.
fn report_json(args: &[&str]) -> serde_json::Value {
    let out = lbaudit()
        .arg("report")
        .args(args)
        .args(["-f", "json", "--connections", "0"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// A kube-proxy service of n endpoints written the pre-2019 way (`%0.5f`).
fn five_decimal_service(n: usize) -> String {
    let mut s = String::from(
        "-A KUBE-SERVICES -d 10.96.0.50/32 -p tcp -m comment --comment \"demo/big:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-DEMO\n",
    );
    for i in 0..n {
        let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
        s += &format!(
            "-A KUBE-SEP-E{i} -p tcp -m comment --comment \"demo/big:http\" -m tcp -j DNAT --to-destination {ip}:8080\n"
        );
        if i + 1 < n {
            s += &format!(
                "-A KUBE-SVC-DEMO -m comment --comment \"demo/big:http\" -m statistic --mode random --probability {:.5} -j KUBE-SEP-E{i}\n",
                1.0 / (n - i) as f64
            );
        } else {
            s += &format!(
                "-A KUBE-SVC-DEMO -m comment --comment \"demo/big:http\" -j KUBE-SEP-E{i}\n"
            );
        }
    }
    s
}

#[test]
fn endpoints_chart_in_both_formats() {
    let dir = scratch("endpoints");
    let input = fixture("ex280-10-endpoints-counters.txt");
    let json = report_json(&[&input]);
    let b = &json["balancers"][0];
    // SVG: the title, every endpoint, every exact probability as the report prints it.
    let svg = render(&[&input, "--connections", "20000"], &dir.join("ex280.svg"));
    let (size, texts) = svg_text(&svg);
    assert_eq!(size, (1000, 600));
    assert!(has(&texts, b["name"].as_str().unwrap()), "{texts:?}");
    for e in b["endpoints"].as_array().unwrap() {
        let label = e["endpoint"].as_str().unwrap();
        assert!(texts.iter().any(|t| t == label), "{label}: {texts:?}");
        let p = lbaudit::report::fmt_prob(e["probability"].as_f64().unwrap());
        assert!(texts.contains(&p), "{p}: {texts:?}");
    }
    assert!(has(&texts, "n = 10 endpoints"), "{texts:?}");
    assert!(has(&texts, "counters: 100 connections, p = "), "{texts:?}");
    assert!(
        has(&texts, "simulation: 20,000 connections, p = "),
        "{texts:?}"
    );
    assert!(
        has(&texts, "share in the counters, 95% interval"),
        "{texts:?}"
    );
    // PNG of another size.
    let png = render(
        &[&input, "--width", "800", "--height", "500"],
        &dir.join("ex280.png"),
    );
    assert_eq!(png_size(&png), (800, 500));
    // Only the chart is left in the folder: no scratch files.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ex280.png", "ex280.svg"]);
}

#[test]
fn numbers_match_the_report() {
    let dir = scratch("numbers");
    let input = fixture("kube-2018-large.txt");
    // The table's "largest relative skew" of each balancer appears in its chart.
    let out = lbaudit()
        .args(["report", &input, "--connections", "0"])
        .output()
        .expect("runs");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let skew = |name: &str| -> String {
        let at = table
            .find(&format!("{name}\n"))
            .expect("balancer in the table");
        let line = table[at..]
            .lines()
            .find(|l| l.contains("largest relative skew"))
            .expect("summary line");
        let v = line.rsplit(' ').next().unwrap();
        v.trim_start_matches('+').to_string()
    };
    let crawler = skew("batch/crawler:http");
    let svg = render(
        &[&input, "--balancer", "batch/crawler:http"],
        &dir.join("crawler.svg"),
    );
    let (_, texts) = svg_text(&svg);
    assert!(
        has(&texts, &format!("largest relative skew {crawler}")),
        "{crawler}: {texts:?}"
    );
    // 1000 endpoints: the sorted deviation plot, with the tolerance band in the legend.
    assert!(has(&texts, "±1e-3 tolerance"), "{texts:?}");
    let svg = render(&[&input], &dir.join("overview.svg"));
    let (_, texts) = svg_text(&svg);
    assert!(has(&texts, "Largest relative skew per balancer"));
    assert!(has(&texts, "3 balancers"), "{texts:?}");
    assert!(has(&texts, "2 above --max-skew 1e-3"), "{texts:?}");
    assert!(
        has(&texts, &format!("batch/crawler:http ({crawler})")),
        "{texts:?}"
    );
    assert!(has(&texts, "skew 0 (drawn at 1e-12)"), "{texts:?}");
    // Every balancer named under its point.
    for name in [
        "batch/crawler:http",
        "batch/workers:http",
        "default/kubernetes:https",
    ] {
        assert!(texts.iter().any(|t| t == name), "{name}: {texts:?}");
    }
}

#[test]
fn every_kind_in_both_formats() {
    let dir = scratch("kinds");
    let cases: [(&str, &[&str]); 4] = [
        ("endpoints", &["fixtures/seed-2-replicas.txt"]),
        ("overview", &["fixtures/kube-modern.txt"]),
        (
            "cascade",
            &["fixtures/kube-modern.txt", "--balancer", "shop/search:grpc"],
        ),
        ("nth", &["fixtures/nth-no-fallback.txt"]),
    ];
    for (name, args) in cases {
        let kind = match name {
            "nth" => "cascade",
            k => k,
        };
        let mut a = args.to_vec();
        a.extend(["--kind", kind, "--title", "Chart title here"]);
        let svg = render(&a, &dir.join(format!("{name}.svg")));
        let (size, texts) = svg_text(&svg);
        assert_eq!(size, (1000, 600), "{name}");
        assert!(
            texts.iter().any(|t| t == "Chart title here"),
            "{name}: {texts:?}"
        );
        let png = render(&a, &dir.join(format!("{name}.png")));
        assert_eq!(png_size(&png), (1000, 600), "{name}");
    }
    // The default kind follows the selection: one balancer → endpoints.
    let svg = render(
        &["fixtures/kube-modern.txt", "--balancer", "shop/cart:http"],
        &dir.join("default-one.svg"),
    );
    let (_, texts) = svg_text(&svg);
    assert!(texts.iter().any(|t| t == "shop/cart:http"), "{texts:?}");
    assert!(has(&texts, "exact probability"), "{texts:?}");
    // nth without fallback: the leak is a bar of its own.
    let svg = render(&["fixtures/nth-no-fallback.txt"], &dir.join("leak.svg"));
    let (_, texts) = svg_text(&svg);
    assert!(texts.iter().any(|t| t == "(no endpoint)"), "{texts:?}");
    // Statistic rules that no traffic reaches (after an ACCEPT) are no balancer: the
    // one balancer left gets the endpoints chart by default, as with --kind endpoints.
    let unreached = dir.join("unreached.txt");
    std::fs::write(
        &unreached,
        "*nat\n:PREROUTING ACCEPT [0:0]\n:LB - [0:0]\n:DEAD - [0:0]\n-A PREROUTING -j LB\n-A PREROUTING -j DEAD\n-A LB -m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 10.0.0.1:80\n-A LB -j DNAT --to-destination 10.0.0.2:80\n-A DEAD -j ACCEPT\n-A DEAD -m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 10.0.0.3:80\nCOMMIT\n",
    )
    .unwrap();
    let unreached = unreached.to_str().unwrap();
    let default = render(&[unreached], &dir.join("unreached.svg"));
    let endpoints = render(
        &[unreached, "--kind", "endpoints"],
        &dir.join("unreached-endpoints.svg"),
    );
    assert_eq!(default, endpoints);
    let (_, texts) = svg_text(&default);
    assert!(texts.iter().any(|t| t == "10.0.0.2:80"), "{texts:?}");
}

#[test]
fn renders_are_byte_identical() {
    let dir = scratch("identical");
    for ext in ["svg", "png"] {
        let args = [
            "fixtures/ex280-10-endpoints-counters.txt",
            "--connections",
            "5000",
        ];
        let a = render(&args, &dir.join(format!("a.{ext}")));
        let b = render(&args, &dir.join(format!("b.{ext}")));
        assert!(a == b, "two {ext} renders differ");
        let args = [
            "fixtures/kube-2018-large.txt",
            "--balancer",
            "batch/workers:http",
            "--kind",
            "cascade",
        ];
        let a = render(&args, &dir.join(format!("c.{ext}")));
        let b = render(&args, &dir.join(format!("d.{ext}")));
        assert!(a == b, "two {ext} cascade renders differ");
    }
}

#[test]
fn five_thousand_endpoints_and_thirty_thousand_balancers() {
    let dir = scratch("large");
    let input = dir.join("five-thousand.txt");
    std::fs::write(&input, five_decimal_service(5000)).unwrap();
    let input = input.to_str().unwrap();
    let svg = render(&[input], &dir.join("5000.svg"));
    let (_, texts) = svg_text(&svg);
    assert!(has(&texts, "n = 5,000 endpoints"), "{texts:?}");
    assert!(has(&texts, "rank, of 5,000"), "{texts:?}");
    // Only the two extremes are named, not 5,000 labels.
    assert!(texts.len() < 60, "{} texts", texts.len());
    let png = render(&[input], &dir.join("5000.png"));
    assert_eq!(png_size(&png), (1000, 600));

    let many = dir.join("many.txt");
    let mut text = String::new();
    for j in 0..30_000u32 {
        let p = ["0.50000000000", "0.51", "0.5001", "0.5"][j as usize % 4];
        text += &format!(
            "-A LB{j} -m statistic --mode random --probability {p} -j DNAT --to-destination 10.{}.{}.1:80\n-A LB{j} -j DNAT --to-destination 10.{}.{}.2:80\n",
            j >> 8 & 255,
            j & 255,
            j >> 8 & 255,
            j & 255
        );
    }
    std::fs::write(&many, text).unwrap();
    let svg = render(&[many.to_str().unwrap()], &dir.join("many.svg"));
    let (_, texts) = svg_text(&svg);
    assert!(has(&texts, "30,000 balancers"), "{texts:?}");
    assert!(has(&texts, "7,500 above --max-skew 1e-3"), "{texts:?}");
    assert!(has(&texts, "skew 0 (drawn at 1e-12)"), "{texts:?}");
    assert!(texts.len() < 60, "{} texts", texts.len());
    // One polyline per class, not 30,000 markers.
    assert!(svg.len() < 2_000_000, "{} bytes", svg.len());
}

#[test]
fn usage_errors_exit_2_and_leave_no_file() {
    let dir = scratch("usage");
    let out = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                fixture("seed-2-replicas.txt"),
                "-o".into(),
                out("chart.pdf"),
            ],
            ".svg or .png",
        ),
        (
            vec![fixture("seed-2-replicas.txt"), "-o".into(), out("chart")],
            ".svg or .png",
        ),
        (
            vec![
                fixture("kube-modern.txt"),
                "--balancer".into(),
                "nothing-like-this*".into(),
                "-o".into(),
                out("none.svg"),
            ],
            "no balancer matches",
        ),
        (
            vec![
                fixture("kube-modern.txt"),
                "--kind".into(),
                "endpoints".into(),
                "-o".into(),
                out("several.png"),
            ],
            "--balancer",
        ),
        (
            vec![
                fixture("kube-modern.txt"),
                "--kind".into(),
                "cascade".into(),
                "-o".into(),
                out("several.svg"),
            ],
            "--kind cascade draws one balancer",
        ),
        (
            vec![
                fixture("kube-modern.txt"),
                "--balancer".into(),
                "default/kubernetes:https".into(),
                "--kind".into(),
                "cascade".into(),
                "-o".into(),
                out("nostat.svg"),
            ],
            "no statistic rules",
        ),
        (
            vec![
                fixture("kube-2018-large.txt"),
                "--balancer".into(),
                "batch/crawler:http".into(),
                "--kind".into(),
                "cascade".into(),
                "--width".into(),
                "400".into(),
                "--height".into(),
                "300".into(),
                "-o".into(),
                out("small.png"),
            ],
            "too small",
        ),
        (
            vec![
                fixture("seed-2-replicas.txt"),
                "--width".into(),
                "10".into(),
                "-o".into(),
                out("tiny.png"),
            ],
            "--width",
        ),
        (
            vec![
                fixture("seed-2-replicas.txt"),
                "--max-skew=-1".into(),
                "-o".into(),
                out("neg.png"),
            ],
            "--max-skew",
        ),
        (
            vec![fixture("calico-nat-S.txt"), "-o".into(), out("nothing.svg")],
            "no load balancers",
        ),
        (
            vec![
                "fixtures/no-such-file.txt".into(),
                "-o".into(),
                out("missing.svg"),
            ],
            "no-such-file",
        ),
    ];
    for (args, message) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = plot(&a);
        assert_eq!(r.code, 2, "{a:?}: {}", r.stderr);
        assert!(r.stderr.contains(message), "{a:?}: {}", r.stderr);
    }
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// The README's charts: each is regenerated with the command that made it and must be
/// byte-identical to the committed file.
#[test]
fn docs_charts_are_up_to_date() {
    let dir = scratch("docs");
    let charts: [(&str, &[&str]); 3] = [
        (
            "docs/seed-2-replicas.svg",
            &["fixtures/seed-2-replicas.txt"],
        ),
        (
            "docs/kube-2018-cascade.svg",
            &[
                "fixtures/kube-2018-large.txt",
                "--balancer",
                "batch/crawler:http",
                "--kind",
                "cascade",
            ],
        ),
        (
            "docs/ex280-counters.png",
            &["fixtures/ex280-10-endpoints-counters.txt"],
        ),
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for (doc, args) in charts {
        let name = Path::new(doc).file_name().unwrap();
        let fresh = render(args, &dir.join(name));
        let committed = std::fs::read(root.join(doc)).unwrap_or_default();
        if fresh != committed {
            stale.push(format!(
                "{doc} is out of date; regenerate it with:\n  cargo run -- plot {} -o {doc}",
                args.join(" ")
            ));
        }
    }
    assert!(stale.is_empty(), "{}", stale.join("\n"));
}
