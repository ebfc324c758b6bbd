//! The parsed ruleset: plain data, borrowed from the input text.
//!
//! Every item keeps the 1-based line (and where useful the 1-based column, in
//! characters) it came from, so that later stages can point at the input.
//! Strings borrow from the input (`&'a str`); only quoted strings that contained
//! escapes are owned (`Cow::Owned`). Chains hold their rules as [`RuleLine`]s (the
//! line's text and a summary); [`Rule`] is a rule with all its options, read from a
//! `RuleLine` when needed.

use crate::statistic::Statistic;
use std::borrow::Cow;
use std::fmt;

/// Which tool printed the input, as far as the parser could tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `iptables-save` (legacy or nft), `ip6tables-save`; `*table` headers and `COMMIT`.
    Save,
    /// `iptables -S` / `iptables -t nat -S`: `-P`, `-N`, `-A` lines, no table headers.
    Spec,
    /// Bare `-A` lines (for example `iptables-save | grep NAME`): no table, chains not declared.
    Fragment,
    /// Nothing but comments and blank lines.
    Empty,
}

/// Address family, from the addresses seen in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// `[packets:bytes]` from `iptables-save -c`, or `-c PKTS BYTES` from `iptables -S -v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// A non-fatal remark about the input or an assumption the analysis made.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Warning {
    /// 1-based input line, 0 when the warning is about the input as a whole.
    pub line: u32,
    pub message: String,
}

impl Warning {
    pub fn new(line: u32, message: impl Into<String>) -> Self {
        Self {
            line,
            message: message.into(),
        }
    }
}

/// One option of a rule, a match module or a target: `[!] --name [value …]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opt<'a> {
    /// The option name without leading dashes, as written (`dport`, `to-destination`).
    /// Core options are stored in their short form: `s`, `d`, `p`, `i`, `o`, `f`.
    pub name: &'a str,
    /// `!` preceded the option (or, for iptables' legacy placement, its value).
    pub negated: bool,
    /// Values in order; quotes removed and escapes resolved.
    pub values: Vec<Cow<'a, str>>,
    /// 1-based column (characters) of the option name in the line.
    pub col: u32,
}

impl<'a> Opt<'a> {
    /// The first value, or "" when the option has none.
    pub fn value(&self) -> &str {
        self.values.first().map_or("", |v| v.as_ref())
    }

    /// (name, `!` before it, first value): what tests of a connection look at.
    pub fn parts(&self) -> (&str, bool, &str) {
        (self.name, self.negated, self.value())
    }
}

/// One `-m module [options]` of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<'a> {
    /// Module name (`statistic`, `comment`, `tcp`, …). An option that appears before any
    /// `-m` and is not a core option is put in an implicit match named after the
    /// rule's protocol (`-p tcp --dport 80`), flagged with `implicit`.
    pub module: &'a str,
    pub implicit: bool,
    pub options: Vec<Opt<'a>>,
    /// 1-based column of `-m` (or of the first option for an implicit match).
    pub col: u32,
}

impl<'a> Match<'a> {
    /// The first option with that name.
    pub fn opt(&self, name: &str) -> Option<&Opt<'a>> {
        self.options.iter().find(|o| o.name == name)
    }
}

/// How a rule hands over to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jump {
    /// `-j`
    Jump,
    /// `-g`
    Goto,
}

/// `-j NAME [options]` or `-g CHAIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub jump: Jump,
    /// The chain or target extension name, as written.
    pub name: &'a str,
    pub options: Vec<Opt<'a>>,
    /// 1-based column of `-j`/`-g`.
    pub col: u32,
}

impl<'a> Target<'a> {
    pub fn opt(&self, name: &str) -> Option<&Opt<'a>> {
        self.options.iter().find(|o| o.name == name)
    }
}

/// One `-A CHAIN …` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule<'a> {
    /// 1-based line of the rule in the input.
    pub line: u32,
    pub counters: Option<Counters>,
    /// Core options in the order written: `-s`, `-d`, `-p`, `-i`, `-o`, `-f`.
    pub core: Vec<Opt<'a>>,
    pub matches: Vec<Match<'a>>,
    /// `None` for a rule without `-j`/`-g` (it only counts packets).
    pub target: Option<Target<'a>>,
}

impl<'a> Rule<'a> {
    /// The core option with that short name (`s`, `d`, `p`, `i`, `o`, `f`).
    pub fn core(&self, name: &str) -> Option<&Opt<'a>> {
        self.core.iter().find(|o| o.name == name)
    }
    /// The first match of that module.
    pub fn find_match(&self, module: &str) -> Option<&Match<'a>> {
        self.matches.iter().find(|m| m.module == module)
    }
    /// The text of the first `-m comment --comment`, if any.
    pub fn comment(&self) -> Option<&str> {
        self.matches
            .iter()
            .filter(|m| m.module == "comment")
            .find_map(|m| m.opt("comment"))
            .map(|o| o.value())
    }
}

/// A rule's target as far as the chain graph needs it: `-j NAME` or `-g CHAIN`,
/// without the target's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetHead<'a> {
    pub jump: Jump,
    /// The chain or target extension name, as written.
    pub name: &'a str,
    /// The target has options (`--to-destination …`).
    pub has_options: bool,
}

/// One `-A CHAIN …` line as the ruleset keeps it: the line's text, its number, where
/// its target's name is and a few flags (32 bytes). The options are read again from
/// the text when they are needed ([`RuleLine::parse`]), so that a dump of half a
/// million rules costs little more memory than its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleLine<'a> {
    /// The whole input line, as it was read (without its line break).
    pub text: &'a str,
    /// 1-based line of the rule in the input.
    pub line: u32,
    /// Byte range of the target's name in `text` (a length of `u16::MAX`: longer, read
    /// the rule again to find it).
    target_at: u32,
    target_len: u16,
    flags: u8,
    /// What decides whether the rule applies, when its first reading could tell (see
    /// [`RuleLine::fixed_share`] and [`RuleLine::dnat`]): `FIXED_*` and the statistic's
    /// value, or a [`DnatFacts`] packed.
    fixed: u8,
    fixed_value: u32,
}

/// [`RuleLine::fixed`]: the options must be read to decide.
const FIXED_NO: u8 = 0;
/// Applies to every connection that reaches it.
const FIXED_ALWAYS: u8 = 1;
/// `-m statistic --mode random` with threshold `fixed_value` (or inverted).
const FIXED_RANDOM: u8 = 2;
const FIXED_RANDOM_INVERTED: u8 = 3;
/// `-m statistic --mode nth --every fixed_value` (or inverted).
const FIXED_NTH: u8 = 4;
const FIXED_NTH_INVERTED: u8 = 5;
/// A `-j DNAT` rule of the simplest shape ([`DnatFacts`]); `fixed_value` is its facts
/// packed: the value's offset in the bits from [`DNAT_LEN_SHIFT`] down, its length
/// above, the protocol's code (0: none) from [`DNAT_PROTO_SHIFT`] up.
const FIXED_DNAT: u8 = 6;
const DNAT_LEN_SHIFT: u32 = 20;
const DNAT_PROTO_SHIFT: u32 = 28;

/// The options of `-j DNAT` whose value is the destination: the first of them gives
/// the outcome.
pub(crate) const DNAT_DESTINATION: [&str; 2] = ["to-destination", "to"];

/// The protocols a [`DnatFacts`] rule may test, as written in its `-p` (code: index + 1).
const DNAT_PROTOCOLS: [&str; 3] = ["tcp", "udp", "sctp"];

/// What decides a `-j DNAT` rule of the simplest shape and what it gives, as its first
/// reading found it, so that a walk need not read it again (kube-proxy's
/// `-p tcp -m comment --comment "…" -m tcp -j DNAT --to-destination 10.1.2.3:8443`).
/// The shape: a [`LightRule`] whose matches always match
/// ([`LightRule::matches_always`]), whose core options are none or one `-p` without
/// `!` naming one of [`DNAT_PROTOCOLS`] as written, and whose target is `DNAT`. Such a
/// rule applies exactly when that `-p` does, and ends in the first value of its first
/// `--to-destination` or `--to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DnatFacts {
    /// An index in [`DNAT_PROTOCOLS`] plus one; 0 when there is no `-p`.
    proto: u8,
    /// Byte range of the destination in the line (`(0, 0)` for none or an empty one).
    value: (u32, u32),
}

impl DnatFacts {
    /// The facts of `rule`, read from the line `text`, when it is of the shape.
    pub(crate) fn of(rule: &LightRule<'_>, text: &str) -> Option<DnatFacts> {
        let (target, options) = rule.target()?;
        if target != "DNAT" || !rule.matches_always() {
            return None;
        }
        let proto = match rule.core() {
            [] => None,
            [o] if o.name == "p" && !o.negated => Some(o.value().as_bytes()),
            _ => return None,
        };
        let value = (options.iter())
            .find(|o| Self::is_destination(o.name.as_bytes()))
            .map_or("", LightOpt::value);
        if value.is_empty() {
            return Self::new(proto, (0, 0));
        }
        // The light reading's values are slices of the line.
        let off = (value.as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
        if off > text.len() || value.len() > text.len() - off {
            return None;
        }
        let end = off + value.len();
        Self::new(proto, (u32::try_from(off).ok()?, u32::try_from(end).ok()?))
    }

    /// Is a DNAT option of that name one whose value is the destination (the first such
    /// option's, as `eval::target_outcome` finds it)?
    #[inline]
    pub(crate) fn is_destination(name: &[u8]) -> bool {
        DNAT_DESTINATION.iter().any(|d| d.as_bytes() == name)
    }

    /// The facts of a rule of the shape whose `-p` names `proto` (`None`: none) and whose
    /// destination is the byte range `value` of its line; `None` for a protocol not in
    /// [`DNAT_PROTOCOLS`].
    pub(crate) fn new(proto: Option<&[u8]>, value: (u32, u32)) -> Option<DnatFacts> {
        let proto = match proto {
            None => 0,
            Some(name) => {
                let p = DNAT_PROTOCOLS.iter().position(|p| p.as_bytes() == name)?;
                u8::try_from(p + 1).ok()?
            }
        };
        // An empty destination is `""` wherever it is.
        let value = if value.0 >= value.1 { (0, 0) } else { value };
        Some(DnatFacts { proto, value })
    }

    /// The facts packed in a `fixed_value` (see [`FIXED_DNAT`]), when they fit.
    fn pack(self) -> Option<u32> {
        let (off, end) = self.value;
        let len = end - off;
        (off < 1 << DNAT_LEN_SHIFT && len < 1 << (DNAT_PROTO_SHIFT - DNAT_LEN_SHIFT))
            .then_some(off | len << DNAT_LEN_SHIFT | u32::from(self.proto) << DNAT_PROTO_SHIFT)
    }

    /// [`Self::pack`] undone.
    fn unpack(v: u32) -> DnatFacts {
        let off = v & ((1 << DNAT_LEN_SHIFT) - 1);
        let len = (v >> DNAT_LEN_SHIFT) & ((1 << (DNAT_PROTO_SHIFT - DNAT_LEN_SHIFT)) - 1);
        DnatFacts {
            proto: (v >> DNAT_PROTO_SHIFT) as u8,
            value: (off, off + len),
        }
    }
}

const HAS_TARGET: u8 = 1;
const GOTO: u8 = 2;
const TARGET_OPTIONS: u8 = 4;
const STATISTIC: u8 = 8;
const COUNTED: u8 = 16;
const PLAIN: u8 = 32;
const TESTS_SOURCE: u8 = 64;

/// Match modules about a connection's state rather than its addresses and ports
/// (`statistic`, `comment`, marks, `recent`, conntrack): what a balancer's selector
/// leaves out.
pub fn is_state_module(module: &str) -> bool {
    matches!(
        module,
        "statistic" | "comment" | "mark" | "connmark" | "recent" | "conntrack" | "state"
    )
}

impl<'a> RuleLine<'a> {
    /// The line `text` (number `line`), whose rule `rule` is.
    pub fn new(line: u32, text: &'a str, rule: &Rule<'_>) -> Self {
        Self::from_parts(
            line,
            text,
            rule.target
                .as_ref()
                .map(|t| (t.jump, t.name, !t.options.is_empty())),
            rule.matches.iter().any(|m| m.module == "statistic"),
            rule.counters.is_some(),
            rule.core.is_empty()
                && rule
                    .matches
                    .iter()
                    .all(|m| m.options.is_empty() || is_state_module(m.module)),
        )
        .with_facts(
            fixed_decision(rule),
            rule.core.iter().any(|o| o.name == "s"),
            // (Read again lightly: the facts are of the light reading.)
            match &rule.target {
                Some(t) if t.name == "DNAT" => {
                    let mut light = LightRule::empty(line);
                    crate::parse::light_into(text, line, &mut light)
                        .then(|| DnatFacts::of(&light, text))
                        .flatten()
                }
                _ => None,
            },
        )
    }

    /// Records what decides whether the rule applies, as [`fixed_decision`] found it,
    /// whether it has a `-s` option, and its [`DnatFacts`] if it has them.
    pub(crate) fn with_facts(
        mut self,
        fixed: Option<Option<Statistic>>,
        tests_source: bool,
        dnat: Option<DnatFacts>,
    ) -> Self {
        if tests_source {
            self.flags |= TESTS_SOURCE;
        }
        (self.fixed, self.fixed_value) = match fixed {
            None => (FIXED_NO, 0),
            Some(None) => (FIXED_ALWAYS, 0),
            Some(Some(Statistic::Random {
                threshold,
                inverted,
            })) => (
                if inverted {
                    FIXED_RANDOM_INVERTED
                } else {
                    FIXED_RANDOM
                },
                threshold,
            ),
            Some(Some(Statistic::Nth {
                every, inverted, ..
            })) => (
                if inverted {
                    FIXED_NTH_INVERTED
                } else {
                    FIXED_NTH
                },
                every,
            ),
        };
        // A DNAT rule of the shape is decided by chance alone exactly when it has no
        // `-p` (and then always applies); the facts replace that record.
        if let Some((facts, packed)) = dnat.and_then(|d| Some((d, d.pack()?))) {
            let agrees = match self.fixed {
                FIXED_ALWAYS => facts.proto == 0,
                FIXED_NO => facts.proto != 0,
                _ => false,
            };
            if agrees {
                (self.fixed, self.fixed_value) = (FIXED_DNAT, packed);
            }
        }
        self
    }

    /// The rule's `DnatFacts`, when its first reading found it of that shape: the
    /// protocol its one `-p` names (`None`: it has no core option) and its destination
    /// (`""` for none).
    pub fn dnat(&self) -> Option<(Option<&'static str>, &'a str)> {
        if self.fixed != FIXED_DNAT {
            return None;
        }
        let facts = DnatFacts::unpack(self.fixed_value);
        let proto = match facts.proto {
            0 => None,
            p => Some(*DNAT_PROTOCOLS.get(usize::from(p) - 1)?),
        };
        let (from, to) = facts.value;
        Some((proto, self.text.get(from as usize..to as usize)?))
    }

    /// Whether the rule applies to every connection that reaches it, as its first
    /// reading found.
    fn fixed_always(&self) -> bool {
        match self.fixed {
            FIXED_ALWAYS => true,
            FIXED_DNAT => self.fixed_value >> DNAT_PROTO_SHIFT == 0,
            _ => false,
        }
    }

    /// [`RuleLine::fixed_share`] for the simulator, which needs the match itself:
    /// `Some(None)` for a rule that applies to every connection reaching it,
    /// `Some(Some((threshold, inverted)))` for a random-mode statistic rule. `None` also
    /// for nth mode (its `--packet` is not kept).
    pub fn fixed_random(&self) -> Option<Option<(u32, bool)>> {
        match self.fixed {
            _ if self.fixed_always() => Some(None),
            FIXED_RANDOM => Some(Some((self.fixed_value, false))),
            FIXED_RANDOM_INVERTED => Some(Some((self.fixed_value, true))),
            _ => None,
        }
    }

    /// Whether the rule applies, when that depends on nothing but chance: `Some(None)`
    /// for a rule that applies to every connection reaching it, `Some(Some((num, den)))`
    /// for one that applies to that share of them (its one `-m statistic` match: `q/2^31`
    /// in random mode, the long-run share in nth mode). Such a rule has no core option
    /// and no match but comments, its statistic and modules without options. `None`: the
    /// options must be read ([`RuleLine::parse`]).
    pub fn fixed_share(&self) -> Option<Option<(u64, u64)>> {
        let v = u64::from(self.fixed_value);
        let scale = crate::statistic::SCALE;
        match self.fixed {
            _ if self.fixed_always() => Some(None),
            FIXED_RANDOM => Some(Some((v, scale))),
            FIXED_RANDOM_INVERTED => Some(Some((scale - v, scale))),
            FIXED_NTH => Some(Some((1, v))),
            FIXED_NTH_INVERTED => Some(Some((v - 1, v))),
            _ => None,
        }
    }

    /// The line `text` (number `line`) of a rule with that target (jump, name, whether
    /// it has options), a statistic match or not, counters or not, and `plain` when
    /// it has no core option and no option of a match that is not about state.
    pub(crate) fn from_parts(
        line: u32,
        text: &'a str,
        target: Option<(Jump, &str, bool)>,
        statistic: bool,
        counted: bool,
        plain: bool,
    ) -> Self {
        let mut flags = 0u8;
        let (mut at, mut len) = (0u32, 0u16);
        if let Some((jump, name, options)) = target {
            flags |= HAS_TARGET;
            if jump == Jump::Goto {
                flags |= GOTO;
            }
            if options {
                flags |= TARGET_OPTIONS;
            }
            // The name is a slice of the line; find it there otherwise.
            let off = (name.as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
            // (Inside the line's memory it is that part of the line: no need to compare.)
            let off = if off <= text.len() && name.len() <= text.len() - off {
                off
            } else {
                text.rfind(name).unwrap_or(text.len())
            };
            at = u32::try_from(off).unwrap_or(u32::MAX);
            len = u16::try_from(name.len()).unwrap_or(u16::MAX);
        }
        if statistic {
            flags |= STATISTIC;
        }
        if counted {
            flags |= COUNTED;
        }
        if plain {
            flags |= PLAIN;
        }
        RuleLine {
            text,
            line,
            target_at: at,
            target_len: len,
            flags,
            fixed: FIXED_NO,
            fixed_value: 0,
        }
    }

    /// The rule with all its options. The line was read once already without error,
    /// so this reads it the same way again.
    pub fn parse(&self) -> Rule<'a> {
        crate::parse::reparse(self.text, self.line)
    }

    /// The rule's comment, as [`Rule::comment`] of [`Self::parse`] gives it (mostly
    /// without reading the whole rule).
    pub fn comment(&self) -> Option<std::borrow::Cow<'a, str>> {
        crate::parse::rule_comment(self.text, self.line)
    }

    /// The rule read without allocating, when it is of the simplest shape (see
    /// [`LightRule`]): what [`Self::parse`] gives, for a fraction of the work.
    pub fn light(&self) -> Option<LightRule<'a>> {
        let mut rule = LightRule::empty(self.line);
        self.light_into(&mut rule).then_some(rule)
    }

    /// [`Self::light`] into `rule` (a few hundred bytes, better not moved about): `false`
    /// when the rule is not of the shape (`rule` is then unspecified).
    #[inline]
    pub fn light_into(&self, rule: &mut LightRule<'a>) -> bool {
        crate::parse::light_into(self.text, self.line, rule)
    }

    /// `-j NAME` or `-g CHAIN`, if the rule has one.
    pub fn target(&self) -> Option<TargetHead<'a>> {
        (self.flags & HAS_TARGET != 0).then(|| TargetHead {
            jump: if self.flags & GOTO != 0 {
                Jump::Goto
            } else {
                Jump::Jump
            },
            name: if self.target_len == u16::MAX {
                // A name of 64 KiB or more: not worth two more bytes on every rule.
                self.parse().target.map_or("", |t| t.name)
            } else {
                self.text
                    .get(
                        self.target_at as usize
                            ..(self.target_at as usize + self.target_len as usize),
                    )
                    .unwrap_or("")
            },
            has_options: self.flags & TARGET_OPTIONS != 0,
        })
    }

    /// The rule has a `-m statistic` match.
    pub fn statistic(&self) -> bool {
        self.flags & STATISTIC != 0
    }

    /// The rule has counters (`[p:b]` or `-c P B`).
    pub fn counted(&self) -> bool {
        self.flags & COUNTED != 0
    }

    /// The rule has a `-s` option (either way round).
    pub fn tests_source(&self) -> bool {
        self.flags & TESTS_SOURCE != 0
    }

    /// The rule has no core option (`-s`, `-d`, `-p`, …) and no option of a match that
    /// is not about state ([`is_state_module`]): its balancer selector is empty.
    pub fn plain(&self) -> bool {
        self.flags & PLAIN != 0
    }
}

/// One option of a [`LightRule`]: its name (without dashes; core options by their short
/// name), whether `!` preceded it, and its one value if it has one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LightOpt<'a> {
    pub name: &'a str,
    pub negated: bool,
    pub value: Option<&'a str>,
}

impl LightOpt<'_> {
    /// The value, or "" when the option has none (as [`Opt::value`]).
    pub fn value(&self) -> &str {
        self.value.unwrap_or("")
    }

    /// As [`Opt::parts`].
    pub fn parts(&self) -> (&str, bool, &str) {
        (self.name, self.negated, self.value())
    }
}

/// Room in a [`LightRule`]: core options, matches, options of matches and target.
pub(crate) const LIGHT_CORE: usize = 4;
pub(crate) const LIGHT_MATCHES: usize = 4;
pub(crate) const LIGHT_OPTS: usize = 8;

/// A rule of the simplest shape, read from its line without allocating ([`RuleLine::light`]):
/// what [`RuleLine::parse`] gives for it, borrowed. The shape: `-A CHAIN`, then core
/// options (`-s`, `-d`, `-p`, `-i`, `-o`, in any of their forms) with one value each,
/// `-m MODULE` matches and at most one `-j TARGET` after them, every option of a match
/// or the target with at most one value, `!` only right before an option, values bare
/// words or quoted strings without backslashes, and no counters; room for a few of
/// each. kube-proxy writes its rules so. The parser's fast path reads it
/// ([`crate::parse::light_into`]).
#[derive(Debug, Clone)]
pub struct LightRule<'a> {
    /// 1-based line of the rule in the input.
    pub line: u32,
    core: [LightOpt<'a>; LIGHT_CORE],
    n_core: u8,
    /// Each match: its module and the range of its options in `opts`.
    matches: [(&'a str, u8, u8); LIGHT_MATCHES],
    n_matches: u8,
    /// Options of the matches, then of the target.
    opts: [LightOpt<'a>; LIGHT_OPTS],
    n_opts: u8,
    /// The `-j` target's name and where its options start in `opts`.
    target: Option<(&'a str, u8)>,
}

impl<'a> LightRule<'a> {
    /// The core options in the order written.
    pub fn core(&self) -> &[LightOpt<'a>] {
        &self.core[..usize::from(self.n_core)]
    }

    /// The matches in order: each module's name and options.
    pub fn matches(&self) -> impl Iterator<Item = (&'a str, &[LightOpt<'a>])> + '_ {
        self.matches[..usize::from(self.n_matches)]
            .iter()
            .map(|&(m, a, b)| (m, &self.opts[usize::from(a)..usize::from(b)]))
    }

    /// The `-j` target's name and options, if the rule has one.
    pub fn target(&self) -> Option<(&'a str, &[LightOpt<'a>])> {
        self.target
            .map(|(name, a)| (name, &self.opts[usize::from(a)..usize::from(self.n_opts)]))
    }

    /// The text of the first `-m comment --comment` (as [`Rule::comment`]).
    pub fn comment(&self) -> Option<&'a str> {
        self.matches()
            .filter(|(m, _)| *m == "comment")
            .find_map(|(_, opts)| opts.iter().find(|o| o.name == "comment"))
            .map(|o| o.value.unwrap_or(""))
    }

    /// Whether every match matches whatever the connection, as the walk's match tests
    /// find: comments, and modules without options other than `statistic`.
    pub fn matches_always(&self) -> bool {
        self.matches()
            .all(|(m, opts)| m == "comment" || (opts.is_empty() && m != "statistic"))
    }

    /// Empties the rule, to be filled again as line `line`.
    pub(crate) fn clear(&mut self, line: u32) {
        self.line = line;
        self.n_core = 0;
        self.n_matches = 0;
        self.n_opts = 0;
        self.target = None;
    }

    /// An empty rule of line `line`, to fill with [`RuleLine::light_into`].
    pub fn empty(line: u32) -> Self {
        LightRule {
            line,
            core: [LightOpt::default(); LIGHT_CORE],
            n_core: 0,
            matches: [("", 0, 0); LIGHT_MATCHES],
            n_matches: 0,
            opts: [LightOpt::default(); LIGHT_OPTS],
            n_opts: 0,
            target: None,
        }
    }

    /// Adds a core option; `None` when there is no room.
    pub(crate) fn push_core(&mut self, o: LightOpt<'a>) -> Option<()> {
        *self.core.get_mut(usize::from(self.n_core))? = o;
        self.n_core += 1;
        Some(())
    }

    /// Adds a match (before any target); `None` when there is no room.
    pub(crate) fn push_match(&mut self, module: &'a str) -> Option<()> {
        if self.target.is_some() {
            return None;
        }
        *self.matches.get_mut(usize::from(self.n_matches))? = (module, self.n_opts, self.n_opts);
        self.n_matches += 1;
        Some(())
    }

    /// Adds an option of the last match, or of the target once there is one; `None`
    /// when there is no room or nothing to add it to.
    pub(crate) fn push_opt(&mut self, o: LightOpt<'a>) -> Option<()> {
        if self.target.is_none() && self.n_matches == 0 {
            return None;
        }
        *self.opts.get_mut(usize::from(self.n_opts))? = o;
        self.n_opts += 1;
        if self.target.is_none() {
            self.matches[usize::from(self.n_matches) - 1].2 = self.n_opts;
        }
        Some(())
    }

    /// Sets the `-j` target; `None` when there is one already.
    pub(crate) fn set_target(&mut self, name: &'a str) -> Option<()> {
        if self.target.is_some() {
            return None;
        }
        self.target = Some((name, self.n_opts));
        Some(())
    }
}

/// What decides whether `rule` applies when that depends on chance alone (see
/// [`RuleLine::fixed_share`]): `Some(None)` when nothing does, `Some(Some(statistic))`
/// for its one valid `-m statistic` match, `None` when other options take part.
pub(crate) fn fixed_decision(rule: &Rule<'_>) -> Option<Option<Statistic>> {
    if !rule.core.is_empty() {
        return None;
    }
    let mut found = None;
    for m in &rule.matches {
        match m.module {
            "comment" => {}
            "statistic" if found.is_none() => {
                found = Some(crate::statistic::from_match(m).ok()?);
            }
            _ if m.options.is_empty() => {}
            _ => return None,
        }
    }
    Some(found)
}

/// A chain's default policy (built-in chains only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy<'a> {
    Accept,
    Drop,
    /// Any other word a dump might carry (`QUEUE`, `RETURN`); treated as a verdict.
    Other(&'a str),
}

impl fmt::Display for Policy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Accept => f.write_str("ACCEPT"),
            Policy::Drop => f.write_str("DROP"),
            Policy::Other(s) => f.write_str(s),
        }
    }
}

/// One chain of a table, with its rules in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain<'a> {
    pub name: &'a str,
    /// `Some` for a built-in chain with a policy; `None` for user chains (`-` in
    /// iptables-save, no `-P` line in `-S`) and for chains not declared.
    pub policy: Option<Policy<'a>>,
    /// The `[p:b]` of the declaration line, when present.
    pub policy_counters: Option<Counters>,
    /// Line of the `:CHAIN` / `-N` / `-P` declaration; `None` when the chain only
    /// appears in `-A` lines or as a jump target (fragments).
    pub declared_line: Option<u32>,
    pub rules: Vec<RuleLine<'a>>,
}

impl<'a> Chain<'a> {
    /// A chain of that name with no rules, not declared (yet).
    pub fn named(name: &'a str) -> Self {
        Chain {
            name,
            policy: None,
            policy_counters: None,
            declared_line: None,
            rules: Vec::new(),
        }
    }
}

impl Chain<'_> {
    /// Is this one of the kernel's built-in chains (of any table)?
    pub fn is_builtin_name(name: &str) -> bool {
        matches!(
            name,
            "PREROUTING" | "INPUT" | "FORWARD" | "OUTPUT" | "POSTROUTING"
        )
    }
}

/// One table (`*nat` … `COMMIT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table<'a> {
    pub name: &'a str,
    /// Line of `*name`; `None` when the table was assumed (fragments, `-S` output).
    pub line: Option<u32>,
    /// `COMMIT` seen for this table.
    pub committed: bool,
    /// Chains in order of first appearance (declaration or first rule).
    pub chains: Vec<Chain<'a>>,
}

impl<'a> Table<'a> {
    pub fn chain(&self, name: &str) -> Option<&Chain<'a>> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// The whole parsed input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset<'a> {
    pub format: Format,
    pub family: Family,
    pub tables: Vec<Table<'a>>,
    /// Lines skipped with `--lenient`, assumptions made for fragments, and other remarks.
    pub warnings: Vec<Warning>,
    /// Number of lines in the input.
    pub lines: u32,
}

impl<'a> Ruleset<'a> {
    pub fn table(&self, name: &str) -> Option<&Table<'a>> {
        self.tables.iter().find(|t| t.name == name)
    }
    /// Number of rules in all tables.
    pub fn rule_count(&self) -> usize {
        self.tables
            .iter()
            .flat_map(|t| &t.chains)
            .map(|c| c.rules.len())
            .sum()
    }
}

// A rule costs 32 bytes besides its text (see `RuleLine`).
const _: () = assert!(std::mem::size_of::<RuleLine<'static>>() <= 32);
// The protocol's code fits above the DNAT destination's offset and length.
const _: () = assert!(DNAT_PROTOCOLS.len() < 1 << (32 - DNAT_PROTO_SHIFT));

#[cfg(test)]
mod tests {
    use super::{LightRule, Rule};
    use crate::parse::{ParseOptions, parse};
    use proptest::prelude::*;

    /// Does the light reading say what the whole rule says?
    fn same(light: &LightRule<'_>, rule: &Rule<'_>) -> bool {
        let opts_same = |l: &[super::LightOpt<'_>], r: &[super::Opt<'_>]| {
            l.len() == r.len()
                && l.iter().zip(r).all(|(a, b)| {
                    a.name == b.name
                        && a.negated == b.negated
                        && b.values.len() == usize::from(a.value.is_some())
                        && a.value() == b.value()
                })
        };
        light.line == rule.line
            && rule.counters.is_none()
            && opts_same(light.core(), &rule.core)
            && light.matches().count() == rule.matches.len()
            && light
                .matches()
                .zip(&rule.matches)
                .all(|((m, o), r)| m == r.module && !r.implicit && opts_same(o, &r.options))
            && match (light.target(), &rule.target) {
                (None, None) => true,
                (Some((name, o)), Some(t)) => {
                    t.jump == super::Jump::Jump && name == t.name && opts_same(o, &t.options)
                }
                _ => false,
            }
            && light.comment() == rule.comment()
    }

    /// Checks every rule line of `text` (read leniently); the number read lightly.
    fn check_light(text: &str) -> usize {
        let Ok(rs) = parse(text, &ParseOptions { lenient: true }) else {
            return 0;
        };
        let mut n = 0;
        for line in rs
            .tables
            .iter()
            .flat_map(|t| &t.chains)
            .flat_map(|c| &c.rules)
        {
            if let Some(light) = line.light() {
                let rule = line.parse();
                assert!(same(&light, &rule), "{}\n{light:?}\n{rule:?}", line.text);
                n += 1;
            }
        }
        n
    }

    #[test]
    fn light_rules_are_the_rules_parse_reads() {
        let mut n = 0;
        for (_, text) in crate::testing::fixture_texts() {
            n += check_light(&text);
        }
        n += check_light(
            "-A A -p tcp -m comment --comment \"a b\" -m tcp -j DNAT --to-destination 1.2.3.4:80\n\
             -A A ! -s 10.0.0.0/8 -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-MARK-MASQ\n\
             -A A -m comment --comment \"\" -m statistic --mode random --probability 0.5 -j B\n\
             -A A -p tcp -m tcp ! --dport 80 -j ACCEPT\n\
             --append A --source 1.2.3.4 --match tcp --jump B\n",
        );
        assert!(n > 200, "{n} rules read lightly");
        // Not of the shape: left to the whole reading.
        let rs = parse(
            "-A A -p tcp --dport 80 -j B\n\
             -A A -f -j B\n\
             -A A -m tcp -j B -c 1 2\n\
             -A A -s 1.2.3.4 -g B\n\
             [1:2] -A A -j B\n\
             -A A -m multiport --dports 1 2 -j B\n\
             -A A -m comment --comment \"a\\\"b\" -j B\n\
             -A A -j B -m tcp\n",
            &ParseOptions { lenient: true },
        )
        .unwrap();
        for line in &rs.tables[0].chains[0].rules {
            assert!(line.light().is_none(), "{}", line.text);
        }
    }

    proptest! {
        /// On lines made of the tokens that matter, the light reading, when there is one,
        /// is the whole reading.
        #[test]
        fn light_reading_agrees_on_random_lines(
            words in proptest::collection::vec(
                proptest::sample::select(vec![
                    "-s", "-d", "-p", "-i", "-o", "-f", "-m", "-j", "-g", "-c", "!", "--source",
                    "--dport", "--comment", "comment", "tcp", "statistic", "10.0.0.1/32", "1",
                    "\"a b\"", "\"x\\\"y\"", "\"\"", "\"-s\"", "a\"b", "--", "-1", "-x",
                    "DNAT", "--to-destination", "1.2.3.4:80", "--match", "-A", "\t", "é",
                    // Whole pieces, so that many lines are of the shape.
                    "-p tcp", "! -s 10.0.0.0/8", "-d 10.96.0.1/32", "-m comment --comment \"a b\"",
                    "-m tcp", "-m tcp --dport 80", "! --dport 80", "-j DNAT --to-destination 1.2.3.4:80",
                    "-j KUBE-SEP-X", "-m statistic --mode random --probability 0.5", "-i eth+",
                    "-m mark --mark 0x4000/0x4000", "--comment \"\"",
                ]),
                0..12,
            )
        ) {
            let text = format!("-A X {}\n", words.join(" "));
            check_light(&text);
        }

        /// The same on lines of pieces kube-proxy writes (most of them of the shape).
        #[test]
        fn light_reading_agrees_on_kube_like_lines(
            words in proptest::collection::vec(
                proptest::sample::select(vec![
                    "-p tcp", "-p udp", "! -s 10.0.0.0/8", "-s 10.1.2.3/32", "-d 10.96.0.1/32",
                    "-m comment --comment \"a b\"", "-m comment --comment x", "-m tcp",
                    "--dport 80", "! --dport 80", "-m addrtype --dst-type LOCAL", "-m udp",
                    "-j DNAT --to-destination 1.2.3.4:80", "-j KUBE-SEP-X", "-j RETURN",
                    "-m statistic --mode random --probability 0.5", "-o eth0", "--set-xmark 0x4000/0",
                ]),
                0..7,
            )
        ) {
            let text = format!("-A X {}\n", words.join(" "));
            check_light(&text);
        }
    }

    /// `fixed_share` of each rule of a one-chain fragment, as the first reading kept it.
    fn shares(rules: &[&str]) -> Vec<Option<Option<(u64, u64)>>> {
        let text: String = rules.iter().map(|r| format!("-A X {r}\n")).collect();
        let rs = parse(&text, &ParseOptions::default()).expect("parses");
        rs.tables[0].chains[0]
            .rules
            .iter()
            .map(|l| l.fixed_share())
            .collect()
    }

    #[test]
    fn only_chance_decides_fixed_rules() {
        let scale = 1u64 << 31;
        assert_eq!(
            shares(&[
                "-m comment --comment \"a b\" -m statistic --mode random --probability 0.5 -j Y",
                "-m statistic --mode random ! --probability 0.25 -j Y",
                "-m statistic --mode nth --every 3 --packet 0 -j Y",
                "-m statistic --mode nth ! --every 3 --packet 1 -j Y",
                "-m comment --comment x -j Y",
                "-m tcp -j Y",
                "-j Y",
            ]),
            vec![
                Some(Some((scale / 2, scale))),
                Some(Some((scale - scale / 4, scale))),
                Some(Some((1, 3))),
                Some(Some((2, 3))),
                Some(None),
                Some(None),
                Some(None),
            ]
        );
        // Anything else takes part: the rule is read again to decide.
        assert_eq!(
            shares(&[
                "-s 10.0.0.1 -m statistic --mode random --probability 0.5 -j Y",
                "-m mark --mark 0x1 -j Y",
                "-m recent --rcheck --name a -j Y",
                "-m statistic --mode random --probability 0.5 -m statistic --mode nth --every 2 -j Y",
                "-p tcp --dport 80 -j Y",
            ]),
            vec![None; 5]
        );
    }
}
