//! Inputs the parser fuzz target (fuzz/, see fuzz/README.md) found, kept in
//! `fuzz/regressions/` in the fuzz target's input form (one flag byte, then the dump).
//! Each one runs through the fuzz target's own body (`fuzz/fuzz_targets/pipeline.rs`),
//! and the ones with a story get a test of their own. Inputs of bugs that are still open
//! are in `fuzz/regressions/open/`, each with an ignored test: fix the bug, move the file
//! up one folder and drop the `#[ignore]`.

#[path = "../fuzz/fuzz_targets/pipeline.rs"]
mod pipeline;

use lbaudit::parse::{self, ParseOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn regressions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions")
}

fn input(name: &str) -> Vec<u8> {
    std::fs::read(regressions().join(name)).expect("regression input")
}

/// Every saved input passes the fuzz target's checks, with every choice of flags.
#[test]
fn every_saved_input_passes_the_fuzz_target() {
    let mut n = 0;
    for entry in std::fs::read_dir(regressions()).expect("fuzz/regressions") {
        let path = entry.unwrap().path();
        // `open/` holds inputs of bugs not fixed yet, each with an ignored test below.
        if !path.is_file() {
            continue;
        }
        let mut data = std::fs::read(&path).unwrap();
        // The high four bits pick the streamed report's window (1 to 16), and by it
        // which other writer is compared (window % 4: check, table, CSV, Markdown).
        for flags in (0..16u8).chain([0x23, 0x5b, 0x72, 0xf3]) {
            data[0] = flags;
            let t = Instant::now();
            pipeline::run(&data);
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{} with flags {flags:#x}: {:?}",
                path.display(),
                t.elapsed()
            );
        }
        n += 1;
    }
    assert!(n >= 2, "the saved inputs are there");
}

/// Found in the first seconds of fuzzing: a table cut short (no COMMIT) followed by
/// another `*table`. Lenient reading accepts it (with a warning); `to_save` prints the
/// cut table without COMMIT, as documented, so the text reads back only leniently, and
/// must then give the same rules. (Strict reading of that text fails, which is right:
/// the fuzz target's first oracle wrongly expected it to succeed.)
#[test]
fn table_without_commit_round_trips_leniently() {
    let data = input("uncommitted-table-round-trip.bin");
    let (text, _) = parse::decode(&data[1..], true).expect("decodes leniently");
    let lenient = ParseOptions { lenient: true };
    let rs = parse::parse(&text, &lenient).expect("lenient parse");
    assert!(
        rs.tables.iter().any(|t| !t.committed),
        "the input has a table without COMMIT"
    );
    let saved = parse::to_save(&rs);
    let back = parse::parse(&saved, &lenient).expect("to_save output reads back");
    assert!(parse::same_rules(&rs, &back), "{saved}");
    assert_eq!(parse::to_save(&back), saved);
    assert!(parse::parse(&saved, &ParseOptions::default()).is_err());
}

/// Found by fuzzing with traces on: a 152-line, 13 kB mangled kube-proxy dump (tables
/// repeated, cut lines) on which `lbaudit trace --lenient --dst 10.0.0.164:80` walked
/// 200,000,000 rule evaluations (about 22 s in release) and then gave up with "the rules
/// branch too much to enumerate": the exact walk forked at every rule whose match it
/// could not decide (`! -s …`, `-m recent --rcheck`) and never merged branches in the
/// same state, so its work doubled with every such non-terminal rule on the path. Fixed
/// in b867c52 (branches in the same state merge, adding their weights).
#[test]
fn trace_of_a_small_mangled_dump_finishes_quickly() {
    let data = input("trace-exponential-walk.bin");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let file = dir.join("trace-exponential-walk.txt");
    std::fs::write(&file, &data[1..]).unwrap();
    let t = Instant::now();
    let out = assert_cmd::cargo::cargo_bin_cmd!("lbaudit")
        .args(["trace", "--lenient", "--dst", "10.0.0.164:80"])
        .arg(&file)
        .timeout(Duration::from_secs(60))
        .output()
        .expect("runs");
    let took = t.elapsed();
    assert!(
        out.status.success() && took < Duration::from_secs(2),
        "trace took {took:?}, exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Found by fuzzing with traces on (after b867c52 merged branches): on this 127-line,
/// 16 kB mangled kube-proxy dump with counters, `lbaudit trace --lenient --dst
/// 172.30.91.77 --chain OUTPUT FILE` adds up more than 2^32 merged paths in
/// `eval::Walker::finish` (`o.paths += t.paths`, src/eval.rs): a debug build panics
/// with "attempt to add with overflow"; a release build prints wrapped path counts
/// (3257961504, 2594613670, … beside 4294967295). The merge itself uses
/// `saturating_add`; `finish` did not (fixed: it saturates too).
#[test]
fn trace_path_counts_do_not_overflow() {
    let data = std::fs::read(regressions().join("trace-paths-overflow.bin")).unwrap();
    pipeline::run(&data);
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("trace-paths-overflow.txt");
    std::fs::write(&file, &data[1..]).unwrap();
    let out = assert_cmd::cargo::cargo_bin_cmd!("lbaudit")
        .args([
            "trace",
            "--lenient",
            "--dst",
            "172.30.91.77",
            "--chain",
            "OUTPUT",
        ])
        .args(["--format", "json"])
        .arg(&file)
        .timeout(Duration::from_secs(60))
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    // Many paths lead to each outcome (whether the fix saturates or widens the count).
    for o in trace["outcomes"].as_array().unwrap() {
        assert!(o["paths"].as_u64().is_some_and(|p| p > 1), "{o}");
    }
}

/// Found by fuzzing (run 8): on this 126-line, 14 kB mangled mix of an mwan3 mangle
/// table (MARK, CONNMARK) and kube-proxy rules, `lbaudit report --lenient
/// --connections 0 FILE` took about 12 s in release: balancer discovery's exact walk made
/// 28,204,346 rule evaluations for one part of PREROUTING. It went depth first and merged
/// a branch only with the branches waiting at that moment, so branches that differed in
/// their marks for a while and met again later were walked twice from there on. Fixed:
/// waiting branches are taken in the order of their place in the program, so branches
/// in the same state always meet and merge (`eval::Queue`); that walk now makes 222 rule
/// evaluations (0.00 s).
#[test]
fn report_of_a_small_mark_heavy_dump_finishes_quickly() {
    let data = input("report-slow-mark-walk.bin");
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-slow-mark-walk.txt");
    std::fs::write(&file, &data[1..]).unwrap();
    let t = Instant::now();
    let out = assert_cmd::cargo::cargo_bin_cmd!("lbaudit")
        .args([
            "report",
            "--lenient",
            "--connections",
            "0",
            "--format",
            "json",
        ])
        .arg(&file)
        .timeout(Duration::from_secs(120))
        .output()
        .expect("runs");
    let took = t.elapsed();
    assert!(
        out.status.success() && took < Duration::from_secs(2),
        "report took {took:?}, exit {:?}",
        out.status.code()
    );
}
