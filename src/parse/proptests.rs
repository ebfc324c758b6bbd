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
                let a = RuleLine::from_parts(
                    1,
                    line,
                    summary.target,
                    summary.statistic,
                    summary.counted,
                    summary.plain,
                )
                .with_facts(summary.fixed, summary.tests_source);
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
