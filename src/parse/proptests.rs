//! Property tests: no input makes the parser panic, well-formed rulesets always parse,
//! and printing then parsing gives back the same rules.

use std::borrow::Cow;

use proptest::prelude::*;

use super::*;
use crate::model::{
    Chain, Counters, Family, Format, Jump, Match, Opt, Policy, Rule, RuleLine, Table, Target,
};

fn lenient() -> ParseOptions {
    ParseOptions { lenient: true }
}

/// Reading a line for its summary (as `parse` does) and reading it whole (as
/// `RuleLine::parse` does) agree: the same error, or the same kept facts.
fn check_summaries(text: &str) -> Result<(), TestCaseError> {
    for (i, line) in text.lines().enumerate() {
        let ctx = rule::LineCtx::new(line, i as u32 + 1);
        let mut sc = Scratch::default();
        let light = line::parse_line(&ctx, &mut sc, false);
        let mut sc = Scratch::default();
        let full = line::parse_line(&ctx, &mut sc, true);
        match (light, full) {
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (Ok(Line::Summary { chain: c1, summary }), Ok(Line::Rule { chain: c2, rule })) => {
                prop_assert_eq!(c1, c2);
                prop_assert_eq!(summary.v6, build::rule_is_v6(&rule), "{}", line);
                let a = summary.rule_line(1, line);
                prop_assert_eq!(a, RuleLine::new(1, line, &rule), "{}", line);
            }
            (Ok(Line::Other(_)), Ok(Line::Other(_))) => {}
            (a, b) => prop_assert!(false, "{line}: {:?} / {:?}", a.is_ok(), b.is_ok()),
        }
    }
    Ok(())
}

/// Whatever a lenient parse accepted prints to text that parses back to the same rules.
fn check_round_trip(rs: &Ruleset<'_>) -> Result<(), TestCaseError> {
    let text = to_save(rs);
    let back = parse(&text, &lenient());
    prop_assert!(back.is_ok(), "{:?}\n{text}", back.err());
    let back = back.unwrap();
    prop_assert!(same_rules(rs, &back), "{text}");
    prop_assert_eq!(&to_save(&back), &text);
    Ok(())
}

/// Pieces of lines that exercise every branch of the grammar.
const PIECES: &[&str] = &[
    "*nat",
    "*filter",
    ":A - [0:0]",
    ":INPUT ACCEPT [1:2]",
    ":B",
    "COMMIT",
    "-A",
    "-A A",
    "-A B",
    "A",
    "-s",
    "-d",
    "fd00::1",
    "!",
    "-m",
    "statistic",
    "--mode",
    "random",
    "--probability",
    "0.5",
    "1.5",
    "nth",
    "--every",
    "3",
    "--packet",
    "0",
    "-j",
    "-g",
    "DNAT",
    "--to-destination",
    "[fd00::5]:80",
    "\"x y\"",
    "\"a\\\"b\"",
    "\"unterminated",
    "a\"b c\"d",
    "\"\"",
    "\\",
    "-c",
    "1",
    "2",
    "[1:2]",
    "[1:",
    "#",
    "$",
    "-P",
    "-N",
    "-p",
    "tcp",
    "--dport",
    "80",
    "-1",
    "--",
    "---",
    "-",
    "\t",
    "é",
    "\r",
    "\u{feff}",
    "99999999999999999999999",
];

fn soup() -> impl Strategy<Value = String> {
    let line = prop::collection::vec(prop::sample::select(PIECES), 0..12).prop_map(|p| p.join(" "));
    prop::collection::vec(line, 0..12).prop_map(|l| l.join("\n"))
}

// ---- Well-formed rulesets, generated as owned data and borrowed into a Ruleset. ----

#[derive(Debug, Clone)]
struct GOpt {
    name: String,
    negated: bool,
    values: Vec<String>,
}

#[derive(Debug, Clone)]
struct GRule {
    counters: Option<(u64, u64)>,
    core: Vec<GOpt>,
    matches: Vec<(String, Vec<GOpt>)>,
    target: Option<(bool, String, Vec<GOpt>)>,
}

#[derive(Debug, Clone)]
struct GChain {
    name: String,
    declared: bool,
    policy: Option<String>,
    counters: Option<(u64, u64)>,
    rules: Vec<GRule>,
}

#[derive(Debug, Clone)]
struct GTable {
    name: String,
    committed: bool,
    chains: Vec<GChain>,
}

const RESERVED: &[&str] = &[
    "s",
    "d",
    "p",
    "i",
    "o",
    "f",
    "m",
    "j",
    "g",
    "c",
    "source",
    "src",
    "destination",
    "dst",
    "protocol",
    "in-interface",
    "out-interface",
    "fragment",
    "match",
    "jump",
    "goto",
    "set-counters",
];

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9_~.+-]{0,12}"
}

fn value() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 !\"\\\\#\t:/é\\[\\]$;|'-]{0,10}"
}

fn opt_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,10}".prop_filter("reserved", |n| !RESERVED.contains(&n.as_str()))
}

fn gopt(names: BoxedStrategy<String>) -> impl Strategy<Value = GOpt> {
    (names, any::<bool>(), prop::collection::vec(value(), 0..3)).prop_map(
        |(name, negated, values)| GOpt {
            name,
            negated,
            values,
        },
    )
}

fn grule() -> impl Strategy<Value = GRule> {
    let core_name = prop::sample::select(&["s", "d", "p", "i", "o", "f"][..])
        .prop_map(str::to_string)
        .boxed();
    let opts = || prop::collection::vec(gopt(opt_name().boxed()), 0..3);
    (
        prop::option::of((any::<u64>(), any::<u64>())),
        prop::collection::vec(gopt(core_name), 0..3),
        prop::collection::vec(
            (
                name().prop_filter("statistic", |m| m != "statistic"),
                opts(),
            ),
            0..3,
        ),
        prop::option::of((any::<bool>(), name(), opts())),
    )
        .prop_map(|(counters, core, matches, target)| GRule {
            counters,
            core,
            matches,
            target,
        })
}

fn gchain() -> impl Strategy<Value = GChain> {
    (
        name(),
        any::<bool>(),
        prop::option::of(prop::sample::select(
            &["ACCEPT", "DROP", "QUEUE", "RETURN"][..],
        )),
        prop::option::of((any::<u64>(), any::<u64>())),
        prop::collection::vec(grule(), 0..4),
    )
        .prop_map(|(name, declared, policy, counters, rules)| GChain {
            name,
            declared: declared || rules.is_empty(),
            policy: policy.filter(|_| declared).map(str::to_string),
            counters: counters.filter(|_| declared),
            rules,
        })
}

fn gtables() -> impl Strategy<Value = Vec<GTable>> {
    prop::collection::vec((name(), prop::collection::vec(gchain(), 0..5)), 1..4).prop_flat_map(
        |tables| {
            let n = tables.len();
            (Just(tables), any::<bool>()).prop_map(move |(tables, last_committed)| {
                let mut seen = std::collections::HashSet::new();
                tables
                    .into_iter()
                    .filter(|(name, _)| seen.insert(name.clone()))
                    .enumerate()
                    .map(|(i, (name, chains))| {
                        let mut names = std::collections::HashSet::new();
                        GTable {
                            name,
                            committed: i + 1 < n || last_committed,
                            chains: chains
                                .into_iter()
                                .filter(|c| names.insert(c.name.clone()))
                                .collect(),
                        }
                    })
                    .collect()
            })
        },
    )
}

fn opt_of(o: &GOpt) -> Opt<'_> {
    Opt {
        name: &o.name,
        negated: o.negated,
        values: o.values.iter().map(|v| Cow::Borrowed(v.as_str())).collect(),
        col: 0,
    }
}

/// The generated rule as the parser's full form.
fn full_rule(r: &GRule) -> Rule<'_> {
    Rule {
        line: 0,
        counters: r
            .counters
            .map(|(packets, bytes)| Counters { packets, bytes }),
        core: r.core.iter().map(opt_of).collect(),
        matches: r
            .matches
            .iter()
            .map(|(module, opts)| Match {
                module,
                implicit: false,
                options: opts.iter().map(opt_of).collect(),
                col: 0,
            })
            .collect(),
        target: r.target.as_ref().map(|(goto, name, opts)| Target {
            jump: if *goto { Jump::Goto } else { Jump::Jump },
            name,
            options: opts.iter().map(opt_of).collect(),
            col: 0,
        }),
    }
}

/// Each generated rule printed as its `-A` line (per table, per chain, per rule).
fn rule_lines(tables: &[GTable]) -> Vec<Vec<Vec<String>>> {
    tables
        .iter()
        .map(|t| {
            t.chains
                .iter()
                .map(|c| {
                    c.rules
                        .iter()
                        .map(|r| {
                            let mut line = String::new();
                            save::write_rule(&mut line, &c.name, &full_rule(r));
                            line.truncate(line.trim_end_matches('\n').len());
                            line
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// The generated tables as a ruleset whose rules are the printed lines.
fn ruleset_of<'a>(tables: &'a [GTable], lines: &'a [Vec<Vec<String>>]) -> Ruleset<'a> {
    let tables = tables
        .iter()
        .zip(lines)
        .map(|(t, tl)| Table {
            name: &t.name,
            line: Some(0),
            committed: t.committed,
            chains: t
                .chains
                .iter()
                .zip(tl)
                .map(|(c, cl)| Chain {
                    name: &c.name,
                    policy: c.policy.as_deref().map(|p| match p {
                        "ACCEPT" => Policy::Accept,
                        "DROP" => Policy::Drop,
                        other => Policy::Other(other),
                    }),
                    policy_counters: c
                        .counters
                        .map(|(packets, bytes)| Counters { packets, bytes }),
                    declared_line: c.declared.then_some(0),
                    rules: c
                        .rules
                        .iter()
                        .zip(cl)
                        .map(|(r, text)| RuleLine::new(0, text, &full_rule(r)))
                        .collect(),
                })
                .collect(),
        })
        .collect();
    Ruleset {
        format: Format::Save,
        family: Family::Ipv4,
        tables,
        warnings: Vec::new(),
        lines: 0,
    }
}

proptest! {
    // 256 cases each by default (PROPTEST_CASES overrides).
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        for lenient_decode in [false, true] {
            if let Ok((text, _)) = decode(&bytes, lenient_decode) {
                let _ = parse(&text, &ParseOptions::default());
                if let Ok(rs) = parse(&text, &lenient()) {
                    check_round_trip(&rs)?;
                }
            }
        }
    }

    #[test]
    fn summaries_agree_with_whole_rules(text in soup()) {
        check_summaries(&text)?;
    }

    #[test]
    fn random_text_never_panics(text in "\\PC{0,300}") {
        let _ = parse(&text, &ParseOptions::default());
        if let Ok(rs) = parse(&text, &lenient()) {
            check_round_trip(&rs)?;
        }
    }

    #[test]
    fn token_soup_never_panics_and_round_trips(text in soup()) {
        let strict = parse(&text, &ParseOptions::default());
        let loose = parse(&text, &lenient());
        // Lenient accepts whatever strict accepts, with the same rules.
        if let Ok(s) = &strict {
            prop_assert!(loose.is_ok());
            prop_assert!(same_rules(s, loose.as_ref().unwrap()));
        }
        if let Ok(rs) = loose {
            check_round_trip(&rs)?;
        }
    }

    #[test]
    fn well_formed_rulesets_parse_back(tables in gtables()) {
        let lines = rule_lines(&tables);
        for t in lines.iter().flatten().flatten() {
            check_summaries(t)?;
        }
        // Each generated rule's printed line reads back as the generated rule.
        for (t, tl) in tables.iter().zip(&lines) {
            for (c, cl) in t.chains.iter().zip(tl) {
                for (r, text) in c.rules.iter().zip(cl) {
                    prop_assert!(rules_equal(&full_rule(r), &reparse(text, 1)), "{text}");
                }
            }
        }
        let mut rs = ruleset_of(&tables, &lines);
        let text = to_save(&rs);
        let back = parse(&text, &ParseOptions::default());
        prop_assert!(back.is_ok(), "{:?}\n{text}", back.err());
        let back = back.unwrap();
        prop_assert_eq!(back.format, Format::Save);
        prop_assert!(same_rules(&rs, &back), "{text}\n{back:#?}");
        // And once more: printing is stable (the family comes from the addresses).
        rs.family = back.family;
        prop_assert_eq!(to_save(&back), to_save(&rs));
        // Line numbers point at the rules' own lines.
        for t in &back.tables {
            for c in &t.chains {
                for r in &c.rules {
                    let line = text.lines().nth(r.line as usize - 1).unwrap_or("");
                    prop_assert!(line.contains(&format!("-A {} ", c.name)) || line.ends_with(&format!("-A {}", c.name)), "{line}");
                }
            }
        }
    }
}

// ---- The fast path against the nom parsers. ----

/// Pieces for the lexer: quotes, escapes, `!`, blanks of every kind, non-ASCII, empty
/// and unterminated quotes, words of every length.
const LEX_PIECES: &[&str] = &[
    "a",
    "-m",
    "-j",
    "--comment",
    "!",
    "!x",
    "\"x y\"",
    "\"\"",
    "\"a\\\"b\"",
    "\"\\\\\"",
    "\"it\\'s\"",
    "\"unterminated",
    "\"",
    "\\",
    "a\\b",
    "é",
    "\"é ü\"",
    "-",
    "--",
    "-1",
    "0.5",
    "[1:2]",
    "abcdefghijklmnopq",
    "\"abcdefghij klmnopq\"",
    "\"-x\"",
    "\"!\"",
    "x\"y\"",
    "\"y\"x",
    "\u{7f}",
    "\u{1}",
    "\n",
];

const LEX_SEPS: &[&str] = &[" ", " ", " ", "", "  ", "\t", " \t ", "\r", "\x0b", "\x0c"];

fn lex_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            prop::sample::select(LEX_PIECES),
            prop::sample::select(LEX_SEPS),
        ),
        0..16,
    )
    .prop_map(|parts| {
        parts
            .into_iter()
            .flat_map(|(p, s)| [p, s])
            .collect::<String>()
    })
}

/// The fast scanner gives the tokens of the nom lexer, or gives up; it never gives up
/// on a line of plain words and whole quoted strings.
fn check_fast_tokens(line: &str) -> Result<(), TestCaseError> {
    let mut slow = Vec::new();
    let slow_ok = lex::tokens(line, line, &mut slow).is_ok();
    let mut fast = Vec::new();
    if lex::fast_tokens(line.as_bytes(), 0, &mut fast) {
        prop_assert!(
            slow_ok,
            "{line:?}: the fast scanner read a line with an error"
        );
        prop_assert_eq!(fast.len(), slow.len(), "{:?}", line);
        for (f, s) in fast.iter().zip(&slow) {
            prop_assert_eq!(&line[f.start as usize..f.end as usize], s.raw, "{:?}", line);
            prop_assert_eq!(&line[f.text_range()], s.text.as_ref(), "{:?}", line);
            prop_assert_eq!(f.kind, s.kind, "{:?}", line);
            prop_assert_eq!(f.start as usize, s.off, "{:?}", line);
        }
    } else if slow_ok {
        // Only quotes that are glued, escaped or cut short send a line to the slow path.
        let plain = slow.iter().all(|t| {
            let r = t.raw.as_bytes();
            !r.contains(&b'"')
                || (r.len() >= 2
                    && r[0] == b'"'
                    && r[r.len() - 1] == b'"'
                    && !r[1..r.len() - 1].iter().any(|&c| c == b'"' || c == b'\\'))
        });
        prop_assert!(!plain, "{line:?}: the fast scanner gave up on plain tokens");
    }
    Ok(())
}

/// Every line reads the same with the fast path as with the nom parsers alone: the same
/// item, summary or rule (columns included), or the same error.
fn check_fast_lines(text: &str) -> Result<(), TestCaseError> {
    for (i, line) in text.lines().enumerate() {
        for full in [false, true] {
            let ctx = rule::LineCtx::new(line, i as u32 + 1);
            let mut sc = Scratch::default();
            let fast = line::parse_line(&ctx, &mut sc, full);
            let ctx = rule::LineCtx::new(line, i as u32 + 1);
            let mut sc = Scratch::default();
            let slow = line::parse_line_slow(&ctx, &mut sc, full);
            prop_assert_eq!(&fast, &slow, "{:?}", line);
        }
        // A rule's comment read alone: the whole rule's, when the fast path reads it.
        let ctx = rule::LineCtx::new(line, 7);
        if let Ok(Line::Rule { rule, .. }) =
            line::parse_line_slow(&ctx, &mut Scratch::default(), true)
            && let Some(comment) = line::fast_comment(line)
        {
            prop_assert_eq!(comment, rule.comment(), "{:?}", line);
        }
        // And a rule read again.
        if let Some(rule) = line::fast_rule_line(&ctx, &mut fast::FastBufs::default()) {
            let mut sc = Scratch::default();
            let slow = line::parse_line_slow(&ctx, &mut sc, true);
            prop_assert!(
                matches!(&slow, Ok(Line::Rule { rule: r, .. }) if *r == rule),
                "{:?}: {:?} / {:?}",
                line,
                rule,
                slow
            );
        }
    }
    Ok(())
}

/// Rule lines built from the lexer's pieces and the grammar's, after `-A CHAIN`, with
/// or without counters.
fn rule_soup() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(LEX_PIECES),
        prop::sample::select(PIECES)
    ];
    let body =
        prop::collection::vec((piece, prop::sample::select(LEX_SEPS)), 0..14).prop_map(|parts| {
            parts
                .into_iter()
                .flat_map(|(p, s)| [p, s])
                .collect::<String>()
        });
    let head = prop::sample::select(
        &[
            "-A X ",
            "-A X\t",
            "[1:2] -A KUBE-SVC-1 ",
            "  -A é ",
            "--append A ",
            "-A  A  ",
            "[99999999999999999999:1] -A X ",
            "[1:2]-A X ",
            "-A ",
            "",
        ][..],
    );
    (head, body).prop_map(|(h, b)| format!("{h}{b}"))
}

/// The lines of a text as `str::lines` gives them (what [`lines`] must give), and its
/// [`outline`] that of those lines each outlined alone, put together as `parse_in` puts
/// pieces' outlines together.
fn check_lines(text: &str) -> Result<(), TestCaseError> {
    let got: Vec<&str> = lines(text).collect();
    let want: Vec<&str> = text.lines().collect();
    prop_assert_eq!(&got, &want);
    let feeds: Vec<usize> = lex::Newlines::new(text.as_bytes()).collect();
    let want_feeds: Vec<usize> = memchr::memchr_iter(b'\n', text.as_bytes()).collect();
    prop_assert_eq!(feeds, want_feeds);
    let o = outline(text);
    prop_assert_eq!(o.lines as usize, want.len());
    let mut decls = vec![0usize];
    for line in &want {
        let one = outline(line);
        *decls.last_mut().expect("non-empty") += one.decls[0];
        decls.extend_from_slice(&one.decls[1..]);
    }
    prop_assert_eq!(o.decls, decls);
    Ok(())
}

#[test]
fn lines_cut_at_every_place_of_a_block() {
    // Line feeds (and CRLFs) at each offset around the 64-byte blocks, and texts that
    // end with and without one.
    for n in 0..200 {
        for feed in ["\n", "\r\n"] {
            let mut text = "x".repeat(n);
            text.push_str(feed);
            text.push_str(&":C - [0:0]\n".repeat(n % 7));
            text.push_str(&"é".repeat(n % 5));
            check_lines(&text).unwrap();
            text.push('\n');
            check_lines(&text).unwrap();
        }
    }
    check_lines("").unwrap();
    check_lines("\n\n\n").unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    /// Lines and outlines are those of `str::lines`, for texts of short and long lines,
    /// carriage returns, blanks and declarations.
    #[test]
    fn lines_are_those_of_str_lines(
        text in r"([ \t]?(:C|\*nat|-N X|-P Y|-A Z|x{0,90}|é)\r?\n?){0,40}",
    ) {
        check_lines(&text)?;
    }

    #[test]
    fn fast_tokens_agree_with_nom(line in lex_soup()) {
        check_fast_tokens(&line)?;
    }

    #[test]
    fn fast_lines_agree_with_nom(text in soup()) {
        check_fast_lines(&text)?;
    }

    #[test]
    fn fast_rules_agree_with_nom(line in rule_soup()) {
        check_fast_lines(&line)?;
    }

    /// The summary made token by token as the line is scanned (`fast::summary_line`)
    /// says what the whole rule says, on rule lines of every shape.
    #[test]
    fn fast_summaries_agree_with_whole_rules(line in rule_soup()) {
        check_summaries(&line)?;
    }

    #[test]
    fn fast_rules_agree_on_statistic_matches(
        mode in prop::sample::select(&["random", "nth", "\"random\"", "rand", ""][..]),
        p in prop::sample::select(&["0.5", "0.33333333349", "1", "1.000", "1.5", "0", "0.", ".5", "1e-1", "-0.1", "0.5 0.6", "\"0.25\"", ""][..]),
        order in 0..4u8,
        neg in any::<bool>(),
    ) {
        let bang = if neg { "! " } else { "" };
        let opts = match order {
            0 => format!("--mode {mode} {bang}--probability {p}"),
            1 => format!("{bang}--probability {p} --mode {mode}"),
            2 => format!("--probability {p}"),
            _ => format!("--mode {mode} --every 3 --packet {p}"),
        };
        let line = format!("-A KUBE-SVC-X -m comment --comment \"é\" -m statistic {opts} -j KUBE-SEP-Y");
        check_fast_lines(&line)?;
    }
}

#[test]
fn fast_path_reads_kube_lines() {
    let lines = [
        "-A KUBE-SEP-X -p tcp -m comment --comment \"ns/svc:port\" -m tcp -j DNAT --to-destination 10.244.1.5:8080",
        "-A KUBE-SVC-X -m comment --comment \"ns/svc:port -> 10.1.2.3:80\" -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-Y",
        "[5:300] -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j KUBE-SVC-Z",
        "-A KUBE-SEP-X -s 10.1.2.3/32 -m comment --comment \"a\" -j KUBE-MARK-MASQ",
    ];
    for line in lines {
        let ctx = rule::LineCtx::new(line, 1);
        let mut bufs = fast::FastBufs::default();
        assert!(line::fast_rule_line(&ctx, &mut bufs).is_some(), "{line}");
        assert!(line::fast_comment(line).is_some(), "{line}");
        check_fast_lines(line).unwrap();
    }
}

#[test]
fn fast_path_agrees_on_the_fixtures() {
    for (path, text) in crate::testing::fixture_texts() {
        if let Err(e) = check_fast_lines(&text) {
            panic!("{path}: {e}");
        }
    }
}
