//! The body of the parser fuzz target, shared with `tests/fuzz_regressions.rs` (which
//! includes this file with `#[path]`): arbitrary bytes through everything `lbaudit
//! report` and `lbaudit check` do, namely decode, parse (strict and lenient), the chain
//! graph, balancer discovery, a small Monte-Carlo cross-check and the counter tests, the
//! report in every format, the check verdicts, and traces from the built-in chains.
//! None of it may panic. Inputs that parse must also print back with `to_save` to text
//! that parses to the same rules (the property `parse::to_save` documents), and lenient
//! reading must accept whatever strict reading accepts, with the same rules.
//!
//! The first byte of the input picks the options: bit 0 lenient, bit 1 simulate 1,000
//! connections per balancer, bit 2 with 3 clients (session affinity), bit 3 trace.
//! The rest is the dump.

use lbaudit::audit::{self, AuditOptions};
use lbaudit::balance;
use lbaudit::check::{CheckOptions, Format as CheckFormat, Outcome, Stream};
use lbaudit::eval::{self, Mode, Packet};
use lbaudit::graph::Graph;
use lbaudit::model::Ruleset;
use lbaudit::parse::{self, ParseOptions};
use lbaudit::report::{self, Report, TextFormat};

/// Runs one input; panics on any violated property.
pub fn run(data: &[u8]) {
    // The first byte picks the options; the rest is the input.
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let lenient = flags & 1 != 0;
    let Ok((text, mut warnings)) = parse::decode(bytes, lenient) else {
        return;
    };
    let strict = parse::parse(&text, &ParseOptions { lenient: false });
    let loose = parse::parse(&text, &ParseOptions { lenient: true });
    // Lenient reading accepts whatever strict reading accepts, with the same rules.
    if let Ok(s) = &strict {
        let l = loose.as_ref().expect("lenient accepts what strict accepts");
        assert!(parse::same_rules(s, l), "strict and lenient rules differ");
    }
    // Round trip (the property `parse::to_save` documents): what parses prints back to
    // text that parses, read the same way, to the same rules, and prints the same again.
    for (rs, lenient) in [(&strict, false), (&loose, true)] {
        let Ok(rs) = rs else { continue };
        let saved = parse::to_save(rs);
        let back = parse::parse(&saved, &ParseOptions { lenient })
            .unwrap_or_else(|e| panic!("to_save output does not parse: {e:?}\n{saved}"));
        assert!(
            parse::same_rules(rs, &back),
            "round trip changed the rules:\n{saved}"
        );
        assert_eq!(parse::to_save(&back), saved, "to_save is not stable");
    }
    let Ok(rs) = (if lenient { loose } else { strict }) else {
        return;
    };
    warnings.extend(rs.warnings.iter().cloned());

    let Ok(graph) = Graph::build(&rs, lenient) else {
        return;
    };
    warnings.extend(graph.warnings.iter().cloned());
    let candidates = balance::candidates(&graph);
    let balancers = balance::analyse_all(&graph, &candidates);
    let opts = AuditOptions {
        // 1,000 simulated connections per balancer exercise the simulator without making
        // an input slow. (Far fewer would send the tests to the exact or Monte-Carlo
        // multinomial test, 100,000 replicates, which takes seconds per balancer in this
        // instrumented build; counters in the input reach those tests anyway.)
        connections: Some(if flags & 2 != 0 { 1000 } else { 0 }),
        clients: (flags & 4 != 0).then_some(3),
        // The run's size is its candidates, as `report` has it.
        balancers: Some(candidates.len()),
        ..AuditOptions::default()
    };
    // The report built whole, with `opts`.
    let built = |opts: &AuditOptions| {
        let (audits, info) = audit::run(&graph, &balancers, opts);
        Report::new(
            "fuzz",
            &rs,
            &balancers,
            Some(&audits),
            info,
            warnings.clone(),
        )
    };
    let report = built(&opts);
    let json = report.to_json();
    // `report --format json` prints while it analyses, a window at a time (in two passes
    // when p-values are corrected across balancers): the same text as the built report.
    let window = usize::from(flags >> 4) + 1;
    let mut streamed = Vec::new();
    report::write_json_windowed(
        &mut streamed,
        "fuzz",
        &rs,
        &graph,
        &candidates,
        &opts,
        warnings.clone(),
        window,
    )
    .expect("writes to memory");
    assert!(
        streamed == json.as_bytes(),
        "streamed JSON (window {window}) differs from the built report's"
    );
    let _ = report.to_csv();
    let _ = report.to_markdown();
    let _ = report.to_table(false);
    let check = CheckOptions::default();
    let outcome = Outcome::new(&report, &check);
    let _ = outcome.to_text(&report, false);
    let _ = outcome.to_junit(&report);
    let _ = outcome.to_markdown(&report);
    let _ = outcome.to_json(&report, &check);
    // The other formats and `lbaudit check` are printed a window at a time too: the same
    // text as the built report's. One of the four per input, by the window, and without
    // the counters' tests: each writer analyses and audits every balancer again, and
    // the counters' small-count Monte-Carlo test is most of this instrumented build's
    // time on inputs with counters (finding 6 in fuzz/README.md). The streamed JSON
    // above goes through the same windows with them.
    let opts = AuditOptions {
        observed: false,
        ..opts
    };
    let report = built(&opts);
    let text = match window % 4 {
        0 => None,
        1 => Some((TextFormat::Table { color: true }, report.to_table(true))),
        2 => Some((TextFormat::Csv, report.to_csv())),
        _ => Some((TextFormat::Markdown, report.to_markdown())),
    };
    let mut streamed = Vec::new();
    if let Some((format, built)) = text {
        report::write_text_windowed(
            &mut streamed,
            format,
            "fuzz",
            &rs,
            &graph,
            &candidates,
            &opts,
            warnings,
            window,
        )
        .expect("writes to memory");
        assert!(
            streamed == built.as_bytes(),
            "streamed {format:?} (window {window}) differs from the built report's"
        );
    } else {
        let outcome = Outcome::new(&report, &check);
        let done = report::audited_windows(
            &graph,
            &candidates,
            &opts,
            window,
            "checking",
            |info| {
                let json = Some(&mut streamed as &mut dyn std::io::Write);
                Ok(Stream::new(
                    check.clone(),
                    CheckFormat::Json,
                    false,
                    json,
                    info,
                ))
            },
            |stream, batches| stream.window(batches),
        )
        .and_then(|stream| stream.finish("fuzz", &rs, warnings))
        .expect("writes to memory");
        streamed.extend_from_slice(done.formatted.unwrap_or_default().as_bytes());
        assert!(
            streamed == outcome.to_json(&report, &check).as_bytes()
                && done.text == outcome.to_text(&report, false),
            "streamed check (window {window}) differs from the built report's"
        );
    }
    // `lbaudit trace --dst IP[:PORT]` from each built-in chain, as the CLI does it, for the
    // first destination the rules name.
    if flags & 8 != 0
        && let Some(packet) = first_destination(&rs)
    {
        for (t, table) in rs.tables.iter().enumerate() {
            for (c, chain) in table.chains.iter().enumerate() {
                if chain.policy.is_some() && !chain.rules.is_empty() {
                    let _ = eval::evaluate(&graph, t, c, packet.clone(), Mode::Trace, true);
                }
            }
        }
    }
}

/// A TCP connection to the first `-d` address of the rules (with the rule's `--dport`).
fn first_destination(rs: &Ruleset<'_>) -> Option<Packet> {
    rs.tables
        .iter()
        .flat_map(|t| &t.chains)
        .flat_map(|c| &c.rules)
        .find_map(|r| {
            let r = r.parse();
            let d = r.core("d")?.value();
            let dst = d.split('/').next()?.parse().ok()?;
            let dport = r
                .matches
                .iter()
                .find_map(|m| m.opt("dport"))
                .and_then(|o| o.value().parse().ok());
            Some(Packet {
                dst: Some(dst),
                dport,
                proto: Some(eval::proto_name("tcp")),
                // As the CLI: `--local` or not, never unknown.
                dst_local: Some(false),
                ..Packet::default()
            })
        })
}
