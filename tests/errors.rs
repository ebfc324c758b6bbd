//! Input errors: exit code 2, nothing on stdout, and stderr names the line and column of
//! the offending text. The bad inputs are in `fixtures/errors/`, with the expected
//! locations in `fixtures/errors/expected.json` (written by fixtures/gen/generate.py,
//! which locates the offending token in the file it writes).

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

fn errors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("errors")
}

fn lbaudit() -> assert_cmd::Command {
    assert_cmd::cargo::cargo_bin_cmd!("lbaudit")
}

fn manifest() -> Value {
    let p = errors_dir().join("expected.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn run_file(args_before: &[&str], file: &str) -> Output {
    lbaudit()
        .arg("report")
        .args(args_before)
        .arg(errors_dir().join(file))
        .args(["--format", "json"])
        .output()
        .unwrap()
}

/// Every (line, column) pair stderr mentions, in the forms "line L, column C",
/// "line L column C", "line L:C", "L:C" (as in `file:L:C`).
fn locations(stderr: &str) -> Vec<(u64, u64)> {
    let lower = stderr.to_lowercase();
    let b = lower.as_bytes();
    let mut out = Vec::new();
    let num_at = |mut i: usize| -> Option<(u64, usize)> {
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == s {
            None
        } else {
            Some((lower[s..i].parse().ok()?, i))
        }
    };
    let mut i = 0;
    while i < b.len() {
        // "line L ... column C" (the column within the next 24 bytes)
        if lower[i..].starts_with("line") {
            let mut j = i + 4;
            while j < b.len() && b[j] == b' ' {
                j += 1;
            }
            if let Some((l, end)) = num_at(j) {
                if end < b.len()
                    && b[end] == b':'
                    && let Some((c, _)) = num_at(end + 1)
                {
                    out.push((l, c));
                }
                let window = &lower[end..(end + 24).min(lower.len())];
                if let Some(k) = window.find("col") {
                    let mut m = end + k;
                    while m < b.len() && b[m].is_ascii_alphabetic() {
                        m += 1;
                    }
                    while m < b.len() && (b[m] == b' ' || b[m] == b':') {
                        m += 1;
                    }
                    if let Some((c, _)) = num_at(m) {
                        out.push((l, c));
                    }
                }
            }
        }
        // "L:C"
        if b[i].is_ascii_digit()
            && (i == 0 || !b[i - 1].is_ascii_digit())
            && let Some((l, end)) = num_at(i)
            && end < b.len()
            && b[end] == b':'
            && let Some((c, _)) = num_at(end + 1)
        {
            out.push((l, c));
        }
        i += 1;
    }
    out
}

fn check_error(what: &str, out: &Output, expected_locations: &[Value]) -> Vec<String> {
    let mut errs = Vec::new();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(2) {
        errs.push(format!(
            "{what}: exit status {:?}, want 2 (stderr: {})",
            out.status.code(),
            stderr.trim_end()
        ));
    }
    if !out.stdout.is_empty() {
        errs.push(format!(
            "{what}: stdout should be empty, got {:?}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    if stderr.trim().is_empty() {
        errs.push(format!("{what}: nothing on stderr"));
        return errs;
    }
    if expected_locations.is_empty() {
        return errs;
    }
    let found = locations(&stderr);
    let ok = expected_locations.iter().any(|loc| {
        let line = loc["line"].as_u64().unwrap();
        let cols: Vec<u64> = loc["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        found.iter().any(|&(l, c)| l == line && cols.contains(&c))
    });
    if !ok {
        errs.push(format!(
            "{what}: stderr should name one of {} (line, column); it names {found:?}:\n{}",
            serde_json::to_string(expected_locations).unwrap(),
            stderr.trim_end()
        ));
    }
    errs
}

/// Each bad input in fixtures/errors: probability outside [0, 1] (above 1; negative, in a
/// fragment), `--every 0`, `--packet` >= every, an unterminated quote, a rule outside
/// any table, a loop, a jump to an undeclared chain (both in full dumps), NUL bytes,
/// non-UTF-8 bytes, an empty file.
#[test]
fn bad_inputs_exit_2_and_name_line_and_column() {
    let m = manifest();
    let cases = m["errors"].as_array().unwrap();
    assert!(cases.len() >= 11);
    let mut errs = Vec::new();
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let out = run_file(&[], file);
        let what = format!("{file} ({})", case["what"].as_str().unwrap());
        errs.extend(check_error(
            &what,
            &out,
            case["locations"].as_array().unwrap(),
        ));
        if file == "empty.txt" {
            let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
            if !(stderr.contains("empty") || stderr.contains("no rule")) {
                errs.push(format!(
                    "{what}: stderr should say the input is empty: {stderr}"
                ));
            }
        }
    }
    assert!(errs.is_empty(), "{}", errs.join("\n\n"));
}

/// The same bytes through stdin give the same errors (NUL bytes, non-UTF-8, empty).
#[test]
fn bad_bytes_on_stdin() {
    let m = manifest();
    let mut errs = Vec::new();
    for case in m["errors"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        if !matches!(file, "nul-bytes.bin" | "latin1.bin" | "empty.txt") {
            continue;
        }
        let bytes = std::fs::read(errors_dir().join(file)).unwrap();
        let out = lbaudit()
            .args(["report", "-", "--format", "json"])
            .write_stdin(bytes)
            .output()
            .unwrap();
        errs.extend(check_error(
            &format!("stdin <- {file}"),
            &out,
            case["locations"].as_array().unwrap(),
        ));
    }
    assert!(errs.is_empty(), "{}", errs.join("\n\n"));
}

/// Binary garbage written on the fly (not a committed file): a NUL on line 2, column 4.
#[test]
fn binary_garbage_from_a_temp_file() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("lbaudit-garbage-{}.bin", std::process::id()));
    let mut bytes = b"*nat\n:PR\0EROUTING ACCEPT [0:0]\n".to_vec();
    bytes.extend((0u8..=255).cycle().take(512));
    std::fs::write(&path, &bytes).unwrap();
    let out = lbaudit()
        .arg("report")
        .arg(&path)
        .args(["--format", "json"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let loc = serde_json::json!([{"line": 2, "columns": [4]}]);
    let errs = check_error("garbage", &out, loc.as_array().unwrap());
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}

/// `--lenient` skips the one bad line (a probability of 2) with a warning naming it; the
/// rest of the balancer is analysed. Without `--lenient` the same file is an error there.
#[test]
fn lenient_skips_one_bad_line_with_a_warning() {
    let m = manifest();
    let l = &m["lenient"];
    let file = l["file"].as_str().unwrap();
    let bad = l["bad_line"].as_u64().unwrap();

    let strict = run_file(&[], file);
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert_eq!(strict.status.code(), Some(2), "without --lenient: {stderr}");
    assert!(
        locations(&stderr).iter().any(|&(line, _)| line == bad),
        "without --lenient, stderr should name line {bad}: {stderr}"
    );

    let out = run_file(&["--lenient"], file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "--lenient: {stderr}");
    let got: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let warnings = got["warnings"].as_array().expect("warnings array");
    assert!(
        warnings.iter().any(|w| w["line"].as_u64() == Some(bad)),
        "--lenient: no warning for line {bad}: {warnings:?}"
    );
    let chain = l["chain"].as_str().unwrap();
    let b = got["balancers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["chain"] == chain)
        .unwrap_or_else(|| panic!("no balancer {chain}"));
    let eps: Vec<(String, f64)> = b["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["endpoint"].as_str().unwrap().to_string(),
                e["probability"].as_f64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, f64)> = l["endpoints"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    assert_eq!(eps, want, "--lenient: the balancer without the bad rule");
}

/// A file that does not exist: exit 2, message on stderr, nothing on stdout.
#[test]
fn missing_file_exits_2() {
    let out = lbaudit()
        .args([
            "report",
            "/nonexistent/lbaudit/dump.txt",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dump.txt"));
}

#[test]
fn location_reader() {
    assert_eq!(
        locations("error: line 9, column 34: probability 1.5 is outside [0, 1]"),
        vec![(9, 34)]
    );
    assert!(locations("x.txt:12:5: bad").contains(&(12, 5)));
    assert!(locations("at line 3 col 7").contains(&(3, 7)));
    assert!(locations("Line 4:6 NUL byte").contains(&(4, 6)));
}
