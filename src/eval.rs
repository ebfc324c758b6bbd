//! The exact evaluator: a walk of the chain graph for one described new connection.
//!
//! The walk follows the kernel: rules in order, `-j` pushes a return point, `-g` does
//! not, RETURN and the end of a user chain go back to the caller, a built-in chain's
//! end applies its policy. A `-m statistic` rule splits the walk in two branches with
//! exact weights: `q/2^31` for random mode, the long-run share `1/N` for nth mode.
//! The result is a distribution over outcomes whose exact probabilities sum to 1.
//!
//! Branches in the same state (place, return points, marks, what is known of the
//! connection) are merged, adding their weights; the walk advances its branches in program
//! order so that all branches reaching a state meet there (`Queue`), and so walks each
//! state once. Weights and the running sum stay exact; each outcome's probability is kept
//! exact while short and as a bounded 128-bit approximation otherwise ([`CompactProb`]).
//!
//! Conditions on the connection are decided against a [`Packet`]. A field the packet
//! leaves open is *bound* by the first positive test on it (the walk describes "a
//! connection of the kind these rules serve"); a test that cannot be decided otherwise
//! is assumed to match, with a warning naming the line — except on a rule whose target
//! only sets marks (kube-proxy's `! -s podCIDR -j KUBE-MARK-MASQ`), which is assumed not
//! to match: it cannot change where a connection is sent.

use crate::graph::{Graph, TargetRef};
use crate::model::{LightOpt, LightRule, Match, Opt, Rule, RuleLine, Warning};
use crate::prob::{Approx, CompactProb, KEEP_EXACT_BITS, Prob, Weight};
use crate::statistic::{self, SCALE, Statistic};
use rustc_hash::FxHashMap as HashMap;
use std::borrow::Cow;
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::rc::Rc;

/// What is known about the connection being walked.
#[derive(Debug, Default, PartialEq, Eq, Hash)]
pub struct Packet {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// Lower-case protocol name (`tcp`, `udp`, …).
    pub proto: Option<String>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub in_iface: Option<String>,
    pub out_iface: Option<String>,
    /// Is the destination an address of this host (`-m addrtype --dst-type LOCAL`)?
    pub dst_local: Option<bool>,
}

impl Clone for Packet {
    fn clone(&self) -> Self {
        let mut p = Packet::default();
        p.clone_from(self);
        p
    }

    /// Reuses `self`'s strings (the walk tests each rule on a copy of its packet).
    fn clone_from(&mut self, from: &Self) {
        let Packet {
            src,
            dst,
            proto,
            sport,
            dport,
            in_iface,
            out_iface,
            dst_local,
        } = from;
        self.src = *src;
        self.dst = *dst;
        self.proto.clone_from(proto);
        self.sport = *sport;
        self.dport = *dport;
        self.in_iface.clone_from(in_iface);
        self.out_iface.clone_from(out_iface);
        self.dst_local = *dst_local;
    }
}

impl Packet {
    /// A bit for each field that is open (`None`). Deciding a rule binds open fields
    /// only, so a packet differs from its copy that a rule was tested on exactly when the
    /// copy has fewer open fields.
    fn open_fields(&self) -> u8 {
        u8::from(self.src.is_none())
            | u8::from(self.dst.is_none()) << 1
            | u8::from(self.proto.is_none()) << 2
            | u8::from(self.sport.is_none()) << 3
            | u8::from(self.dport.is_none()) << 4
            | u8::from(self.in_iface.is_none()) << 5
            | u8::from(self.out_iface.is_none()) << 6
            | u8::from(self.dst_local.is_none()) << 7
    }

    /// The packet that a rule's positive conditions describe: its `-s`, `-d`, `-p`, `-i`,
    /// `-o` and destination/source port, where they name one value.
    pub fn from_rule(rule: &Rule<'_>) -> Packet {
        Packet::from_options(
            rule.core.iter().map(Opt::parts),
            (rule.matches.iter())
                .flat_map(|m| &m.options)
                .map(Opt::parts),
        )
    }

    /// [`Packet::from_rule`] of a rule of a [`LightRule`]'s shape.
    pub fn from_light(rule: &LightRule<'_>) -> Packet {
        Packet::from_options(
            rule.core().iter().map(LightOpt::parts),
            (rule.matches())
                .flat_map(|(_, opts)| opts)
                .map(LightOpt::parts),
        )
    }

    /// [`Packet::from_rule`] of a rule with these core options and options of matches,
    /// each as (name, negated, first value).
    fn from_options<'x>(
        core: impl Iterator<Item = (&'x str, bool, &'x str)>,
        options: impl Iterator<Item = (&'x str, bool, &'x str)>,
    ) -> Packet {
        let mut p = Packet::default();
        for (name, negated, v) in core {
            if negated {
                continue;
            }
            match name {
                "s" => p.src = first_addr(v),
                "d" => p.dst = first_addr(v),
                "p" => p.proto = Some(proto_name(v)),
                "i" => p.in_iface = Some(v.trim_end_matches('+').to_string()),
                "o" => p.out_iface = Some(v.trim_end_matches('+').to_string()),
                _ => {}
            }
        }
        for (name, negated, v) in options {
            if negated {
                continue;
            }
            match name {
                "dport" | "destination-port" | "dports" | "destination-ports" | "ports" => {
                    p.dport = first_port(v);
                }
                "sport" | "source-port" | "sports" | "source-ports" => {
                    p.sport = first_port(v);
                }
                _ => {}
            }
        }
        p
    }
}

/// How a walk ends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// DNAT to this destination (the `--to-destination` text as written).
    Dnat(String),
    /// Another terminating target: its name and its main option (`SNAT 10.0.0.1`,
    /// `REDIRECT 8080`, `ACCEPT`).
    Verdict(String),
    /// The walk left the start chain without a verdict but with the mark changed:
    /// final nfmark and the OR of the masks the MARK targets used.
    Mark { value: u32, mask: u32 },
    /// The walk left the start chain (or hit the policy, in trace mode) with nothing done.
    Unmatched,
    /// Trace mode: the built-in chain's policy (with the mark if one was set).
    Policy {
        policy: String,
        mark: Option<(u32, u32)>,
    },
}

impl Outcome {
    /// The label used in reports (`endpoint`).
    pub fn label(&self) -> String {
        match self {
            Outcome::Dnat(d) => d.clone(),
            Outcome::Verdict(v) => v.clone(),
            Outcome::Mark { value, mask } => format!("mark {value:#x}/{mask:#x}"),
            Outcome::Unmatched => "unmatched".to_string(),
            Outcome::Policy { policy, mark } => match mark {
                None => format!("policy {policy}"),
                Some((v, m)) => format!("policy {policy}, mark {v:#x}/{m:#x}"),
            },
        }
    }
}

/// One step of a path: a rule that jumped, went to, or ended the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub chain: usize,
    pub line: u32,
}

/// One outcome with its probability and how it is reached.
#[derive(Debug, Clone)]
pub struct OutcomeInfo {
    pub outcome: Outcome,
    /// Exact while short, otherwise a 128-bit approximation with a proven bound
    /// (see [`CompactProb`]): an outcome of a long cascade has a huge exact form.
    pub prob: CompactProb,
    /// How many distinct branches of the walk reach it.
    pub paths: u32,
    /// A shortest path found (jumping rules and the terminal rule), the first in
    /// depth-first order among equally short ones.
    pub path: Vec<Step>,
    /// Lines of the rules in the start chain through which it is reached, in line order.
    pub via: Vec<u32>,
    /// Line of the rule that produced the outcome on `path` (0 for a fall-through).
    pub line: u32,
    /// The chain the walk was in when it ended.
    pub chain: usize,
}

/// The result of a walk.
#[derive(Debug, Clone)]
pub struct Distribution {
    /// Outcomes in the order a depth-first walk that takes the matching branch of each
    /// statistic rule first reaches them (for a cascade: the order of its rules).
    pub outcomes: Vec<OutcomeInfo>,
    /// Assumptions made, with lines.
    pub warnings: Vec<Warning>,
    /// Rules evaluated.
    pub steps: u64,
    /// Statistic rules reached at the start chain's level.
    pub statistic_rules: u32,
    /// The exact sum of all outcome probabilities, added up exactly as the walk recorded
    /// them (before any was approximated).
    pub total: Prob,
}

impl Distribution {
    /// The exact sum of all outcome probabilities (1 for every complete walk).
    pub fn total(&self) -> &Prob {
        &self.total
    }
}

/// How the end of the start chain is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The start chain is a balancer: leaving it is `Unmatched` (or a mark outcome).
    Balancer,
    /// A full trace from a built-in chain: its end applies the policy.
    Trace,
}

/// The walk gave up: too many branches.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("more than {limit} {what} for one walk (the rules branch too much to enumerate)")]
pub struct TooComplex {
    pub limit: u64,
    /// What went over the limit: `rule evaluations` ([`STEP_LIMIT`]) or `outcomes and
    /// waiting branches at once` ([`STATE_LIMIT`]).
    pub what: &'static str,
}

/// The most rule evaluations one walk may make.
pub const STEP_LIMIT: u64 = 200_000_000;

/// The most outcomes plus waiting branches one walk may hold at once (several hundred
/// bytes each). Branches in different states do not merge, and every rule that may set
/// one of several marks can double their number: 20 rules `-m statistic … -j MARK
/// --or-mark BIT` make a million distinct outcomes (hundreds of megabytes, and four times
/// that per further rule). A balancer has far fewer endpoints than this (the largest
/// benchmark: 20,000).
pub const STATE_LIMIT: usize = 100_000;

/// A short list kept inline, on the heap once longer than `N`: a thread's return points,
/// its choices and its place in the program are a few items long (a kube-proxy walk: one
/// return point, two runs of choices), and a thread is copied at every split.
#[derive(Debug, Clone)]
enum Small<T, const N: usize> {
    Inline(u8, [T; N]),
    Heap(Vec<T>),
}

impl<T: Copy + Default, const N: usize> Default for Small<T, N> {
    fn default() -> Self {
        Small::Inline(0, [T::default(); N])
    }
}

impl<T: Copy + Default, const N: usize> Small<T, N> {
    fn as_slice(&self) -> &[T] {
        match self {
            Small::Inline(n, items) => &items[..usize::from(*n)],
            Small::Heap(v) => v,
        }
    }

    fn last_mut(&mut self) -> Option<&mut T> {
        match self {
            Small::Inline(n, items) => items[..usize::from(*n)].last_mut(),
            Small::Heap(v) => v.last_mut(),
        }
    }

    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    fn push(&mut self, x: T) {
        match self {
            Small::Inline(n, items) if usize::from(*n) < N => {
                items[usize::from(*n)] = x;
                *n += 1;
            }
            Small::Inline(_, items) => {
                let mut v = Vec::with_capacity(2 * N);
                v.extend_from_slice(items);
                v.push(x);
                *self = Small::Heap(v);
            }
            Small::Heap(v) => v.push(x),
        }
    }

    fn pop(&mut self) -> Option<T> {
        match self {
            Small::Inline(0, _) => None,
            Small::Inline(n, items) => {
                *n -= 1;
                Some(items[usize::from(*n)])
            }
            Small::Heap(v) => v.pop(),
        }
    }
}

impl<T: Copy + Default + PartialEq, const N: usize> PartialEq for Small<T, N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Copy + Default + Eq, const N: usize> Eq for Small<T, N> {}

impl<T: Copy + Default + Hash, const N: usize> Hash for Small<T, N> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_slice().hash(h);
    }
}

impl<T: Copy + Default + Ord, const N: usize> PartialOrd for Small<T, N> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T: Copy + Default + Ord, const N: usize> Ord for Small<T, N> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

#[derive(Clone)]
struct Thread {
    chain: usize,
    rule: usize,
    /// Return points: (chain, rule) of each `-j` that has not returned yet.
    stack: Small<(usize, usize), 2>,
    weight: Weight,
    nfmark: u32,
    ctmark: u32,
    mark_mask: u32,
    /// Shared by the branches of a split until one binds a field.
    packet: Rc<Packet>,
    path: Vec<Step>,
    via: u32,
    /// Branches merged into this thread (see [`Thread::same_state`]).
    paths: u32,
    /// The statistic-rule choices of its first path in depth-first order (of the merged
    /// branches, the least), which orders the outcomes.
    choices: Choices,
}

/// The choices a path made at statistic rules (the matching branch, or the rest), in
/// runs: `(took the rest, how many times in a row)`. Compared as the sequences they stand
/// for, they order paths as a depth-first walk that takes the matching branch first meets
/// them; a kube-proxy cascade's paths are one or two runs long.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Choices(Small<(bool, u32), 2>);

impl Choices {
    fn push(&mut self, rest: bool) {
        match self.0.last_mut() {
            Some((b, n)) if *b == rest && *n < u32::MAX => *n += 1,
            _ => self.0.push((rest, 1)),
        }
    }
}

impl Ord for Choices {
    fn cmp(&self, other: &Self) -> Ordering {
        let (mut a, mut b) = (
            self.0.as_slice().iter().copied(),
            other.0.as_slice().iter().copied(),
        );
        let (mut x, mut y) = (a.next(), b.next());
        loop {
            match (x, y) {
                (None, None) => return Ordering::Equal,
                (None, Some(_)) => return Ordering::Less,
                (Some(_), None) => return Ordering::Greater,
                (Some((p, n)), Some((q, m))) => {
                    if p != q {
                        return p.cmp(&q);
                    }
                    let k = n.min(m);
                    x = if n > k { Some((p, n - k)) } else { a.next() };
                    y = if m > k { Some((q, m - k)) } else { b.next() };
                }
            }
        }
    }
}

/// Which path an outcome shows (with its rule): the shortest (fewest recorded steps; all
/// are empty unless paths are recorded), the earlier in depth-first order among equals.
fn shorter_path(a: (&[Step], &Choices), b: (&[Step], &Choices)) -> bool {
    (a.0.len(), a.1) < (b.0.len(), b.1)
}

impl PartialOrd for Choices {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Thread {
    /// A thread at the start of chain `chain`, for `packet`, with all the weight.
    fn start(chain: usize, packet: Packet) -> Self {
        Thread {
            chain,
            rule: 0,
            stack: Small::default(),
            weight: Weight::one(),
            nfmark: 0,
            ctmark: 0,
            mark_mask: 0,
            packet: Rc::new(packet),
            path: Vec::new(),
            via: 0,
            paths: 1,
            choices: Choices::default(),
        }
    }

    /// Compares the thread's place in the program with a [`Queue`] position: the rule
    /// indices of its return points, then its own rule.
    fn cmp_position(&self, pos: &[u32]) -> Ordering {
        self.stack
            .as_slice()
            .iter()
            .map(|&(_, r)| r as u32)
            .chain(std::iter::once(self.rule as u32))
            .cmp(pos.iter().copied())
    }

    fn position(&self) -> Position {
        let mut p = Position::default();
        for &(_, r) in self.stack.as_slice() {
            p.push(r as u32);
        }
        p.push(self.rule as u32);
        p
    }

    /// Do the two threads go on identically from here? Everything that decides how a
    /// thread goes on is compared: its place and return points, marks, what is known of
    /// the connection, and the start-chain rule it went through (reported per outcome).
    /// Two threads in the same state are merged (their weights added): without this,
    /// every statistic rule whose branches meet again (a jump to a chain that returns)
    /// would double the work. The [`Queue`] makes sure that such threads meet.
    fn same_state(&self, o: &Thread) -> bool {
        self.chain == o.chain
            && self.rule == o.rule
            && self.nfmark == o.nfmark
            && self.ctmark == o.ctmark
            && self.mark_mask == o.mark_mask
            && self.via == o.via
            && self.stack == o.stack
            && self.packet == o.packet
    }

    /// A hash of what [`Thread::same_state`] compares.
    fn state_hash(&self) -> u64 {
        let mut h = rustc_hash::FxHasher::default();
        (
            self.chain,
            self.rule,
            self.nfmark,
            self.ctmark,
            self.mark_mask,
            self.via,
        )
            .hash(&mut h);
        self.stack.hash(&mut h);
        self.packet.hash(&mut h);
        h.finish()
    }
}

/// The threads waiting to go on, taken in the order of their place in the program.
///
/// A thread's *position* is the rule indices of its return points followed by its own
/// rule index, compared lexicographically. Every step of the walk moves a thread to a
/// greater position: the next rule (the last index grows), a jump (the position is
/// extended), a return (a shorter position whose last index grew). So when the walk
/// always advances the waiting thread of least position, and a running thread waits as
/// soon as another is behind it, every thread that will ever reach a state has reached it
/// before that state is walked on: branches that meet again are merged wherever they
/// meet, and each state is walked once. (A goto restarts the frame's index at 0 and
/// breaks the order; that can only cost a missed merge, never a wrong result. kube-proxy
/// and mwan3 rules do not use goto.)
///
/// The walk used to go depth first and merge a branch only with the branches waiting at
/// that moment: branches that differed for a while (in a mark, say) and met again later
/// were walked separately from there on, and on a mark-heavy input the number of such
/// walks grew with every MARK rule (fuzz/README.md, finding 5).
#[derive(Default)]
struct Queue {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Once there are more than [`SCAN_SLOTS`] slots: the first slot of each state hash
    /// (further slots with that hash are chained). Until then [`Queue::find`] compares
    /// with every slot and no hash is computed (a kube-proxy walk has one or two threads
    /// waiting at a time).
    heads: Option<HashMap<u64, usize>>,
    order: BinaryHeap<Reverse<(Position, usize)>>,
    len: usize,
}

/// A thread's place in the program (see [`Queue`]).
type Position = Small<u32, 4>;

/// Up to this many slots, waiting threads are found without an index.
const SCAN_SLOTS: usize = 16;

/// A waiting thread, with its state hash and the next slot of the same hash (both kept
/// once the queue is indexed).
struct Slot {
    thread: Option<Thread>,
    hash: u64,
    next: usize,
}

const NO_SLOT: usize = usize::MAX;

impl Queue {
    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
        self.heads = None;
        self.order.clear();
        self.len = 0;
    }

    /// The state hash of `t` once the queue is indexed (0 before: not needed).
    fn hash(&self, t: &Thread) -> u64 {
        if self.heads.is_some() {
            t.state_hash()
        } else {
            0
        }
    }

    /// The slot of a waiting thread in the same state as `t`, whose [`Queue::hash`] is
    /// `hash`.
    fn find(&self, t: &Thread, hash: u64) -> Option<usize> {
        let same = |slot: &Slot| {
            slot.hash == hash && slot.thread.as_ref().is_some_and(|w| w.same_state(t))
        };
        let Some(heads) = &self.heads else {
            return self.slots.iter().position(same);
        };
        let mut i = *heads.get(&hash)?;
        while i != NO_SLOT {
            let slot = &self.slots[i];
            if same(slot) {
                return Some(i);
            }
            i = slot.next;
        }
        None
    }

    /// Adds `t` to the waiting thread in slot `i` (same state).
    fn add_to(&mut self, i: usize, t: &Thread) {
        let w = self.slots[i].thread.as_mut().expect("waiting thread");
        w.weight.add_assign(&t.weight);
        w.paths = w.paths.saturating_add(t.paths);
        if shorter_path((&t.path, &t.choices), (&w.path, &w.choices)) {
            w.path.clone_from(&t.path);
        }
        if t.choices < w.choices {
            w.choices.clone_from(&t.choices);
        }
    }

    /// Queues `t`, merging it into a waiting thread in the same state if there is one.
    fn push(&mut self, t: Thread) {
        let hash = self.hash(&t);
        if let Some(i) = self.find(&t, hash) {
            self.add_to(i, &t);
            return;
        }
        let pos = t.position();
        let slot = Slot {
            thread: Some(t),
            hash,
            next: NO_SLOT,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        match &mut self.heads {
            Some(heads) => self.slots[i].next = heads.insert(hash, i).unwrap_or(NO_SLOT),
            None if self.slots.len() > SCAN_SLOTS => {
                let mut heads = HashMap::default();
                for (j, slot) in self.slots.iter_mut().enumerate() {
                    if let Some(w) = &slot.thread {
                        slot.hash = w.state_hash();
                        slot.next = heads.insert(slot.hash, j).unwrap_or(NO_SLOT);
                    }
                }
                self.heads = Some(heads);
            }
            None => {}
        }
        self.order.push(Reverse((pos, i)));
        self.len += 1;
    }

    /// Takes the waiting thread of least position.
    fn pop(&mut self) -> Option<Thread> {
        let Reverse((_, i)) = self.order.pop()?;
        if let Some(heads) = &mut self.heads {
            let (hash, next) = (self.slots[i].hash, self.slots[i].next);
            // Unlink slot i from its hash chain.
            let head = heads[&hash];
            if head == i {
                if next == NO_SLOT {
                    heads.remove(&hash);
                } else {
                    heads.insert(hash, next);
                }
            } else {
                let mut p = head;
                while self.slots[p].next != i {
                    p = self.slots[p].next;
                }
                self.slots[p].next = next;
            }
        }
        self.free.push(i);
        self.len -= 1;
        self.slots[i].thread.take()
    }

    /// How the least waiting position compares with the thread's.
    fn least_vs(&self, t: &Thread) -> Option<Ordering> {
        let Reverse((pos, _)) = self.order.peek()?;
        Some(t.cmp_position(pos.as_slice()).reverse())
    }

    /// Adds `t` to a waiting thread in the same state, if there is one.
    fn merge(&mut self, t: &Thread) -> bool {
        match self.find(t, self.hash(t)) {
            Some(i) => {
                self.add_to(i, t);
                true
            }
            None => false,
        }
    }
}

struct Walker<'g, 'r, 'a, 'b> {
    graph: &'g Graph<'r, 'a>,
    table: usize,
    mode: Mode,
    record_paths: bool,
    outcomes: Vec<OutcomeInfo>,
    warned: BTreeSet<(u32, String)>,
    steps: u64,
    statistic_rules: u32,
    /// Exact sum of the weights recorded in `outcomes`.
    total: Weight,
    /// A finished thread's weight, whose allocation the next split reuses (in a long
    /// cascade the weights are long: allocating afresh at every rule costs time and leaves
    /// the allocator holding many blocks of different sizes).
    spare: Prob,
    /// Rules read so far (the ruleset keeps only their text), found by (chain, rule)
    /// with [`Walker::read`].
    rules: Vec<Rule<'a>>,
    /// The rule read last by [`RuleLine::light_into`] (filled in place: it is a few
    /// hundred bytes).
    light: LightRule<'a>,
    bufs: &'b mut Buffers,
}

/// A walk's working storage, kept between walks by each thread ([`BUFFERS`]): a report
/// walks tens of thousands of balancers of a few rules each, for which setting up the
/// queue and indexes afresh cost more than the walk itself. Empty between walks.
#[derive(Default)]
struct Buffers {
    /// Threads waiting to go on.
    queue: Queue,
    /// For each outcome, the choices of its first path (see [`Choices`]).
    first: Vec<Choices>,
    index: OutcomeIndex,
    /// The (chain, rule) of each rule read, in the order of [`Walker::rules`].
    read_keys: Vec<(usize, usize)>,
    /// Once more than [`SCAN_READ`] rules are read: the index of each by (chain, rule).
    read: HashMap<(usize, usize), usize>,
    /// The packet a rule is tested on (bindings are tentative until the rule applies).
    scratch: Scratch,
}

impl Buffers {
    /// Empties the buffers for the next walk, keeping their storage unless a large walk
    /// left much of it.
    fn clear(&mut self) {
        const KEEP: usize = 1024;
        if self.queue.slots.capacity() > KEEP
            || self.first.capacity() > KEEP
            || self.index.hashes.capacity() > KEEP
            || self.read_keys.capacity() > KEEP
        {
            *self = Buffers::default();
            return;
        }
        self.queue.clear();
        self.first.clear();
        self.index.clear();
        self.read_keys.clear();
        self.read.clear();
        self.scratch.copy_of = None;
    }
}

thread_local! {
    /// Each thread's [`Buffers`], borrowed by one walk at a time.
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::default();
}

/// The outcomes recorded so far, found by content: by a scan of their hashes while there
/// are few, by an index once there are more than [`SCAN_OUTCOMES`].
#[derive(Default)]
struct OutcomeIndex {
    /// A hash of each outcome, in the order of [`Walker::outcomes`].
    hashes: Vec<u64>,
    /// Once indexed: the last outcome of each hash; `next` chains the earlier ones.
    heads: Option<HashMap<u64, usize>>,
    next: Vec<usize>,
}

/// Up to this many rules read, a walk finds them again without an index.
const SCAN_READ: usize = 16;

/// Up to this many outcomes, they are found without an index.
const SCAN_OUTCOMES: usize = 32;

impl OutcomeIndex {
    fn hash(outcome: &Outcome) -> u64 {
        let mut h = rustc_hash::FxHasher::default();
        outcome.hash(&mut h);
        h.finish()
    }

    /// The index of `outcome` (whose hash is `hash`) in `outcomes`.
    fn find(&self, hash: u64, outcome: &Outcome, outcomes: &[OutcomeInfo]) -> Option<usize> {
        let Some(heads) = &self.heads else {
            return (self.hashes.iter().zip(outcomes))
                .position(|(&h, o)| h == hash && o.outcome == *outcome);
        };
        let mut i = *heads.get(&hash)?;
        while i != NO_SLOT {
            if outcomes[i].outcome == *outcome {
                return Some(i);
            }
            i = self.next[i];
        }
        None
    }

    fn clear(&mut self) {
        self.hashes.clear();
        self.heads = None;
        self.next.clear();
    }

    /// Records that the next outcome has hash `hash`.
    fn push(&mut self, hash: u64) {
        self.hashes.push(hash);
        match &mut self.heads {
            Some(heads) => self
                .next
                .push(heads.insert(hash, self.hashes.len() - 1).unwrap_or(NO_SLOT)),
            None if self.hashes.len() > SCAN_OUTCOMES => {
                let mut heads = HashMap::default();
                self.next = (self.hashes.iter().enumerate())
                    .map(|(i, &h)| heads.insert(h, i).unwrap_or(NO_SLOT))
                    .collect();
                self.heads = Some(heads);
            }
            None => {}
        }
    }
}

/// Walks the graph from the start of `chain` in `table` for `packet`.
pub fn evaluate(
    graph: &Graph<'_, '_>,
    table: usize,
    chain: usize,
    packet: Packet,
    mode: Mode,
    record_paths: bool,
) -> Result<Distribution, TooComplex> {
    // A balancer has about one outcome per rule of its chain.
    let expected = (graph.chain(table, chain).rules.len() + 1).min(1024);
    BUFFERS.with_borrow_mut(|bufs| {
        // (Empty already, unless a walk on this thread was interrupted.)
        bufs.clear();
        let w = Walker {
            graph,
            table,
            mode,
            record_paths,
            outcomes: Vec::with_capacity(expected),
            warned: BTreeSet::new(),
            steps: 0,
            statistic_rules: 0,
            total: Weight::zero(),
            spare: Prob::zero(),
            // (Most rules a walk decides are not built: see `RuleLine::light`.)
            rules: Vec::new(),
            light: LightRule::empty(0),
            bufs: &mut *bufs,
        };
        let result = w.walk(chain, packet);
        bufs.clear();
        result
    })
}

/// Result of deciding a rule's conditions.
enum Decision {
    No,
    /// Matches with this probability (numerator, denominator) of those reaching it.
    Yes(Option<(u64, u64)>),
}

impl Walker<'_, '_, '_, '_> {
    /// The walk from the start of `chain` for `packet`.
    fn walk(mut self, chain: usize, packet: Packet) -> Result<Distribution, TooComplex> {
        self.bufs.queue.push(Thread::start(chain, packet));
        while let Some(t) = self.bufs.queue.pop() {
            self.run(t)?;
            self.check_size()?;
        }
        let total = std::mem::replace(&mut self.total, Weight::zero()).into_prob();
        self.recover_exact(&total);
        // Outcomes in the order a depth-first walk (matching branch first) reaches them: the
        // order of the rules for a cascade, whatever order the walk went in.
        let first = &self.bufs.first;
        if !first.is_sorted() {
            let mut order: Vec<usize> = (0..self.outcomes.len()).collect();
            order.sort_by(|&i, &j| first[i].cmp(&first[j]));
            let mut slots: Vec<Option<OutcomeInfo>> = self.outcomes.drain(..).map(Some).collect();
            self.outcomes = order
                .into_iter()
                .map(|i| slots[i].take().expect("each outcome once"))
                .collect();
        }
        for o in &mut self.outcomes {
            o.via.sort_unstable();
        }
        let warnings = if self.warned.is_empty() {
            Vec::new()
        } else {
            (self.warned.into_iter())
                .map(|(line, message)| Warning { line, message })
                .collect()
        };
        Ok(Distribution {
            outcomes: self.outcomes,
            warnings,
            steps: self.steps,
            statistic_rules: self.statistic_rules,
            total,
        })
    }

    /// The index in `rules` of rule `r` of chain `c`, read on first use.
    fn read(&mut self, c: usize, r: usize) -> usize {
        let key = (c, r);
        let b = &mut *self.bufs;
        let found = if b.read_keys.len() <= SCAN_READ {
            b.read_keys.iter().position(|&k| k == key)
        } else {
            b.read.get(&key).copied()
        };
        if let Some(i) = found {
            return i;
        }
        self.rules
            .push(self.graph.chain(self.table, c).rules[r].parse());
        b.read_keys.push(key);
        if b.read_keys.len() == SCAN_READ + 1 {
            b.read
                .extend(b.read_keys.iter().enumerate().map(|(i, &k)| (k, i)));
        } else if b.read_keys.len() > SCAN_READ {
            b.read.insert(key, self.rules.len() - 1);
        }
        self.rules.len() - 1
    }

    /// Records the end of thread `t` (its weight, path and choices are taken) in `outcome`.
    fn finish(&mut self, t: &mut Thread, outcome: Outcome, line: u32) {
        let weight = std::mem::replace(&mut t.weight, Weight::zero());
        self.total.add_assign(&weight);
        let weight = weight.into_prob();
        let first = &mut self.bufs.first;
        let hash = OutcomeIndex::hash(&outcome);
        match self.bufs.index.find(hash, &outcome, &self.outcomes) {
            Some(i) => {
                let o = &mut self.outcomes[i];
                o.prob.add_exact(&weight);
                o.paths = o.paths.saturating_add(t.paths);
                if t.via > 0 && !o.via.contains(&t.via) {
                    o.via.push(t.via);
                }
                if shorter_path((&t.path, &t.choices), (&o.path, &first[i])) {
                    o.path = std::mem::take(&mut t.path);
                    o.line = line;
                    o.chain = t.chain;
                }
                if t.choices < first[i] {
                    first[i] = std::mem::take(&mut t.choices);
                }
                self.recycle(weight);
            }
            None => {
                let prob = if weight.bits() <= KEEP_EXACT_BITS {
                    CompactProb::Exact(weight)
                } else {
                    let approx = CompactProb::Approx(Approx::from_prob(&weight));
                    self.recycle(weight);
                    approx
                };
                self.bufs.index.push(hash);
                self.bufs.first.push(std::mem::take(&mut t.choices));
                self.outcomes.push(OutcomeInfo {
                    outcome,
                    prob,
                    paths: t.paths,
                    path: std::mem::take(&mut t.path),
                    via: if t.via > 0 { vec![t.via] } else { Vec::new() },
                    line,
                    chain: t.chain,
                });
            }
        }
    }

    fn check_size(&self) -> Result<(), TooComplex> {
        if self.outcomes.len() + self.bufs.queue.len() > STATE_LIMIT {
            return Err(TooComplex {
                limit: STATE_LIMIT as u64,
                what: "outcomes and waiting branches at once",
            });
        }
        Ok(())
    }

    /// Keeps the larger of `w` and the spare weight for the next split to reuse.
    fn recycle(&mut self, w: Prob) {
        if w.bits() > self.spare.bits() {
            self.spare = w;
        }
    }

    /// When exactly one outcome's probability had to be approximated, it is the exact total
    /// less all the others: exact again. (A sum of long terms that collapses to a short
    /// value, e.g. every branch of a long cascade reaching one outcome, is then exact.)
    fn recover_exact(&mut self, total: &Prob) {
        let mut approx = self
            .outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| o.prob.exact().is_none());
        let (Some((i, _)), None) = (approx.next(), approx.next()) else {
            return;
        };
        let mut rest = total.clone();
        for (j, o) in self.outcomes.iter().enumerate() {
            if let (true, Some(p)) = (j != i, o.prob.exact()) {
                match rest.checked_sub(p) {
                    Some(r) => rest = r,
                    None => return,
                }
            }
        }
        debug_assert!(self.outcomes[i].prob.approx().contains(&rest));
        self.outcomes[i].prob = CompactProb::new(rest);
    }

    fn run(&mut self, mut t: Thread) -> Result<(), TooComplex> {
        let tg = &self.graph.tables[self.table];
        let table = self.graph.table(self.table);
        loop {
            // Go on only while no waiting thread is behind this one (see [`Queue`]).
            match self.bufs.queue.least_vs(&t) {
                Some(Ordering::Less) => {
                    self.bufs.queue.push(t);
                    return Ok(());
                }
                Some(Ordering::Equal) if self.bufs.queue.merge(&t) => return Ok(()),
                _ => {}
            }
            // The graph's rule counts are a small array; the chain itself is looked at
            // only to read a rule not read yet.
            if t.rule >= tg.rules(t.chain) {
                if let Some((c, r)) = t.stack.pop() {
                    t.chain = c;
                    t.rule = r + 1;
                    if t.stack.is_empty() {
                        // Back in the start chain: that jump did not decide the outcome.
                        t.via = 0;
                    }
                    continue;
                }
                let outcome = self.end_outcome(&t);
                self.finish(&mut t, outcome, 0);
                return Ok(());
            }
            self.steps += 1;
            if self.steps > STEP_LIMIT {
                return Err(TooComplex {
                    limit: STEP_LIMIT,
                    what: "rule evaluations",
                });
            }
            let target = tg.target(t.chain, t.rule);
            // Rules whose target cannot change the outcome are skipped unevaluated.
            let relevant = match target {
                TargetRef::None | TargetRef::Continue | TargetRef::Missing => false,
                TargetRef::Chain { chain, .. } => tg.may_terminate[chain] || tg.may_mark[chain],
                _ => true,
            };
            if !relevant {
                t.rule += 1;
                continue;
            }
            let mark_only = match target {
                TargetRef::Mark => true,
                TargetRef::Chain { chain, .. } => !tg.may_terminate[chain],
                _ => false,
            };
            // A rule that jumps (or returns) and that only chance decides, as its first
            // reading found, need not be read again.
            let line = &table.chains[t.chain].rules[t.rule];
            let fixed = match target {
                TargetRef::Chain { .. } | TargetRef::Return => line.fixed_share(),
                _ => None,
            };
            // Nor a mark-only rule known not to apply.
            let skipped = mark_only && mark_rule_never_applies(line, &t.packet);
            // Nor a DNAT rule whose first reading kept what decides it and its destination
            // (kube-proxy's: see `RuleLine::dnat`).
            let dnat = match (fixed, target) {
                (None, TargetRef::Terminal) if !skipped => line.dnat(),
                _ => None,
            };
            // Nor a rule of the simplest shape whose matches always match: its core
            // options and target are read without building the rule. (A MARK rule's
            // options are the whole rule's.)
            let light = match (fixed, target) {
                (None, TargetRef::Mark) => false,
                (None, _) if !skipped && dnat.is_none() => {
                    line.light_into(&mut self.light) && self.light.matches_always()
                }
                _ => false,
            };
            let (rule, decision) = match fixed {
                _ if skipped => (None, Decision::No),
                Some(share) => (None, Decision::Yes(share)),
                None => match (dnat, light.then_some(&self.light)) {
                    (Some((proto, _)), _) => {
                        let warned = &mut self.warned;
                        let decision = decide(&mut t, &mut self.bufs.scratch, |t, p| {
                            decide_dnat(line.line, proto, t, mark_only, p, warned)
                        });
                        (None, decision)
                    }
                    (None, Some(l)) => {
                        let warned = &mut self.warned;
                        let decision = decide(&mut t, &mut self.bufs.scratch, |t, p| {
                            decide_light(l, t, mark_only, p, warned)
                        });
                        (None, decision)
                    }
                    (None, None) => {
                        let i = self.read(t.chain, t.rule);
                        let (rules, warned) = (&self.rules, &mut self.warned);
                        let decision = decide(&mut t, &mut self.bufs.scratch, |t, p| {
                            decide_on(&rules[i], t, mark_only, p, warned)
                        });
                        (Some(i), decision)
                    }
                },
            };
            let line_no = line.line;
            let at_top = t.stack.is_empty();
            match decision {
                Decision::No => {
                    t.rule += 1;
                    continue;
                }
                Decision::Yes(Some((num, den))) => {
                    if at_top {
                        self.statistic_rules += 1;
                    }
                    // Split: the branch that does not match goes on with the next rule.
                    // The weight is moved, not cloned: it is long in a long cascade.
                    let mut taken = match &t.weight {
                        Weight::Exact(w) => {
                            let mut p = std::mem::replace(&mut self.spare, Prob::zero());
                            p.clone_from(w);
                            Weight::Exact(Box::new(p))
                        }
                        w => w.clone(),
                    };
                    taken.mul_ratio_assign(num, den);
                    let weight = std::mem::replace(&mut t.weight, Weight::zero());
                    let mut rest = t.clone();
                    t.weight = taken;
                    rest.weight = weight;
                    rest.weight.mul_ratio_assign(den - num, den);
                    rest.rule += 1;
                    rest.choices.push(true);
                    t.choices.push(false);
                    self.bufs.queue.push(rest);
                    self.check_size()?;
                }
                Decision::Yes(None) => {}
            }
            if at_top && t.via == 0 {
                t.via = line_no;
            }
            match target {
                TargetRef::Chain { chain, goto } => {
                    if self.record_paths {
                        t.path.push(Step {
                            chain: t.chain,
                            line: line_no,
                        });
                    }
                    if !goto {
                        t.stack.push((t.chain, t.rule));
                    }
                    t.chain = chain;
                    t.rule = 0;
                }
                TargetRef::Return => {
                    if let Some((c, r)) = t.stack.pop() {
                        t.chain = c;
                        t.rule = r + 1;
                        if t.stack.is_empty() {
                            t.via = 0;
                        }
                    } else {
                        let outcome = self.end_outcome(&t);
                        self.finish(&mut t, outcome, line_no);
                        return Ok(());
                    }
                }
                TargetRef::Mark => {
                    apply_mark(&self.rules[rule.expect("read: not fixed")], &mut t);
                    t.rule += 1;
                }
                TargetRef::Terminal => {
                    if self.record_paths {
                        t.path.push(Step {
                            chain: t.chain,
                            line: line_no,
                        });
                    }
                    let outcome = match (dnat, light.then_some(&self.light)) {
                        (Some((_, to)), _) => dnat_outcome(to),
                        (None, Some(l)) => light_outcome(l),
                        (None, None) => {
                            terminal_outcome(&self.rules[rule.expect("read: not fixed")])
                        }
                    };
                    self.finish(&mut t, outcome, line_no);
                    return Ok(());
                }
                TargetRef::None | TargetRef::Continue | TargetRef::Missing => t.rule += 1,
            }
        }
    }

    fn end_outcome(&self, t: &Thread) -> Outcome {
        let chain = self.graph.chain(self.table, t.chain);
        match (self.mode, chain.policy) {
            (Mode::Trace, Some(policy)) => Outcome::Policy {
                policy: policy.to_string(),
                mark: (t.mark_mask != 0).then_some((t.nfmark, t.mark_mask)),
            },
            _ if t.mark_mask != 0 => Outcome::Mark {
                value: t.nfmark,
                mask: t.mark_mask,
            },
            _ => Outcome::Unmatched,
        }
    }
}

/// Decides the rule's conditions for the thread's packet with `decide_on` (given the
/// thread and a copy of its packet, which it may bind: [`decide_on`] or [`decide_light`]).
fn decide(
    t: &mut Thread,
    scratch: &mut Scratch,
    decide_on: impl FnOnce(&Thread, &mut Packet) -> Decision,
) -> Decision {
    // Bindings are tentative until the whole rule is known to apply: the rule is tested
    // on a copy, made again only when the packet is another than last time's or a test
    // bound a field of the copy.
    if !(scratch.copy_of.as_ref()).is_some_and(|p| Rc::ptr_eq(p, &t.packet)) {
        scratch.packet.clone_from(&t.packet);
        scratch.copy_of = Some(Rc::clone(&t.packet));
    }
    let decision = decide_on(t, &mut scratch.packet);
    // A test binds only open fields: the copy differs exactly when it has fewer of them.
    let bound = scratch.packet.open_fields() != t.packet.open_fields();
    debug_assert_eq!(bound, scratch.packet != *t.packet);
    if bound {
        scratch.copy_of = None;
        if matches!(decision, Decision::Yes(_)) {
            t.packet = Rc::new(scratch.packet.clone());
            scratch.copy_of = Some(Rc::clone(&t.packet));
        }
    }
    decision
}

/// The packet a rule is tested on, and the packet it is a copy of while they are equal.
#[derive(Default)]
struct Scratch {
    packet: Packet,
    copy_of: Option<Rc<Packet>>,
}

/// [`decide`] with `packet`, a copy of the thread's packet, bound as the rule binds it.
fn decide_on(
    rule: &Rule<'_>,
    t: &Thread,
    mark_only: bool,
    packet: &mut Packet,
    warned: &mut BTreeSet<(u32, String)>,
) -> Decision {
    let mut undecided: Vec<String> = Vec::new();
    if !core_tests(rule.core.iter().map(Opt::parts), packet, &mut undecided) {
        return Decision::No;
    }
    let mut share: Option<(u64, u64)> = None;
    for m in &rule.matches {
        if m.module == "statistic" {
            match statistic::from_match(m) {
                Ok(s) => {
                    let (num, den) = match s {
                        Statistic::Random {
                            threshold,
                            inverted,
                        } => {
                            let q = u64::from(threshold);
                            if inverted {
                                (SCALE - q, SCALE)
                            } else {
                                (q, SCALE)
                            }
                        }
                        Statistic::Nth {
                            every, inverted, ..
                        } => {
                            let n = u64::from(every);
                            if inverted { (n - 1, n) } else { (1, n) }
                        }
                    };
                    share = Some(match share {
                        None => (num, den),
                        // Two statistic matches in one rule: independent draws.
                        Some((a, b)) => match (a.checked_mul(num), b.checked_mul(den)) {
                            (Some(x), Some(y)) => (x, y),
                            _ => (a, b),
                        },
                    });
                }
                Err(e) => {
                    warned.insert((rule.line, format!("statistic match ignored: {}", e.message)));
                }
            }
            continue;
        }
        match match_test(m, t, packet) {
            Some(true) => {}
            Some(false) => return Decision::No,
            None => undecided.push(format!("-m {}", m.module)),
        }
    }
    conclude(rule.line, share, t, mark_only, packet, undecided, warned)
}

/// [`decide_on`] for a rule of a [`LightRule`]'s shape whose matches always match
/// ([`LightRule::matches_always`]).
fn decide_light(
    rule: &LightRule<'_>,
    t: &Thread,
    mark_only: bool,
    packet: &mut Packet,
    warned: &mut BTreeSet<(u32, String)>,
) -> Decision {
    decide_core(
        rule.line,
        rule.core().iter().map(LightOpt::parts),
        t,
        mark_only,
        packet,
        warned,
    )
}

/// [`decide_light`] for the DNAT rule of line `line` as its first reading kept it
/// ([`RuleLine::dnat`]): its one core option is `-p proto`, if any.
fn decide_dnat(
    line: u32,
    proto: Option<&str>,
    t: &Thread,
    mark_only: bool,
    packet: &mut Packet,
    warned: &mut BTreeSet<(u32, String)>,
) -> Decision {
    let core = proto.map(|p| ("p", false, p));
    decide_core(line, core.into_iter(), t, mark_only, packet, warned)
}

/// [`decide_on`] for the rule of line `line` whose matches always match and whose core
/// options are `core` (name, `!` before it, first value).
fn decide_core<'x>(
    line: u32,
    core: impl Iterator<Item = (&'x str, bool, &'x str)>,
    t: &Thread,
    mark_only: bool,
    packet: &mut Packet,
    warned: &mut BTreeSet<(u32, String)>,
) -> Decision {
    let mut undecided: Vec<String> = Vec::new();
    if !core_tests(core, packet, &mut undecided) {
        return Decision::No;
    }
    conclude(line, None, t, mark_only, packet, undecided, warned)
}

/// Tests the core options `opts` (name, `!` before it, first value) on `packet`:
/// `false` as soon as one cannot match; those it cannot decide are described in
/// `undecided`.
fn core_tests<'x>(
    opts: impl Iterator<Item = (&'x str, bool, &'x str)>,
    packet: &mut Packet,
    undecided: &mut Vec<String>,
) -> bool {
    for (name, negated, v) in opts {
        match core_test_parts(name, negated, v, packet) {
            Some(true) => {}
            Some(false) => return false,
            None => undecided.push(describe(name, negated, v)),
        }
    }
    true
}

/// The end of [`decide_on`] for the rule of line `line`, once its conditions are tested:
/// the statistic share `share`, the descriptions of the tests it could not decide.
fn conclude(
    line: u32,
    share: Option<(u64, u64)>,
    t: &Thread,
    mark_only: bool,
    packet: &Packet,
    undecided: Vec<String>,
    warned: &mut BTreeSet<(u32, String)>,
) -> Decision {
    // A rule that only sets marks must not bind open fields of the connection:
    // kube-proxy's `-s <endpoint>/32 -j KUBE-MARK-MASQ` says nothing about who connects.
    if mark_only && *packet != *t.packet {
        return Decision::No;
    }
    if !undecided.is_empty() {
        if mark_only {
            // Cannot change where the connection goes; assume it does not apply.
            return Decision::No;
        }
        warned.insert((
            line,
            format!(
                "cannot decide {} for the connection; assumed to match",
                undecided.join(", ")
            ),
        ));
    }
    Decision::Yes(share)
}

/// Decides match `m` for thread `t` (its marks) and `packet`, which may be bound.
fn match_test(m: &Match<'_>, t: &Thread, packet: &mut Packet) -> Option<bool> {
    let mut all = true;
    for o in &m.options {
        let r = match (m.module, o.name) {
            ("mark", "mark") => mark_test(o, t.nfmark),
            ("connmark", "mark") => mark_test(o, t.ctmark),
            ("recent", "rcheck" | "update" | "remove") => Some(o.negated),
            ("recent", "set") => Some(true),
            (
                "recent",
                "seconds" | "reap" | "name" | "mask" | "rsource" | "rdest" | "hitcount" | "rttl",
            ) => Some(true),
            _ => static_test(m.module, o, packet),
        };
        match r {
            Some(true) => {}
            Some(false) => return Some(false),
            None => all = false,
        }
    }
    if m.options.is_empty() {
        // A module with no options (e.g. `-m tcp` alone) constrains nothing.
        return Some(true);
    }
    all.then_some(true)
}

/// Whether a rule whose target only sets marks is known, from its first reading, not to
/// apply to `packet`: it tests the source of a connection whose source is open, and
/// `-s` would bind the source or stay undecided, either way the rule is assumed not to
/// apply (see `Walker::decide`); kube-proxy's `-s <endpoint>/32 -j KUBE-MARK-MASQ`.
/// Core options are decided before any match, so no runtime match is reached either.
pub(crate) fn mark_rule_never_applies(line: &RuleLine<'_>, packet: &Packet) -> bool {
    line.tests_source() && packet.src.is_none()
}

/// The options whose result depends only on the connection (not on marks, the client's
/// history or randomness): `Some(result)`, or `None` when undecidable. Open packet fields
/// may be bound. Shared with the simulator, which decides these at compile time.
pub(crate) fn static_test(module: &str, o: &Opt<'_>, packet: &mut Packet) -> Option<bool> {
    match (module, o.name) {
        ("comment", _) => Some(true),
        (
            "tcp" | "udp" | "sctp" | "udplite" | "dccp" | "multiport",
            "dport" | "destination-port" | "dports" | "destination-ports",
        ) => port_test(o, &mut packet.dport),
        (
            "tcp" | "udp" | "sctp" | "udplite" | "dccp" | "multiport",
            "sport" | "source-port" | "sports" | "source-ports",
        ) => port_test(o, &mut packet.sport),
        ("multiport", "ports") => {
            let d = port_test(o, &mut packet.dport);
            if d == Some(true) {
                Some(true)
            } else {
                port_test(o, &mut packet.sport).or(d)
            }
        }
        ("tcp", "syn") => Some(!o.negated),
        ("tcp", "tcp-flags") => Some(tcp_flags(o)),
        ("conntrack", "ctstate") | ("state", "state") => {
            let new = o.value().split(',').any(|s| s.eq_ignore_ascii_case("NEW"));
            Some(new != o.negated)
        }
        ("addrtype", "dst-type") => packet.dst_local.map(|local| {
            let wants_local = o.value().split(',').any(|v| v == "LOCAL");
            (wants_local == local) != o.negated
        }),
        ("addrtype", "limit-iface-in" | "limit-iface-out") => Some(true),
        ("iprange", "src-range") => range_test(o, packet.src),
        ("iprange", "dst-range") => range_test(o, packet.dst),
        _ => None,
    }
}

/// The option `name` (`!` before it: `negated`) with first value `v`, as written.
fn describe(name: &str, negated: bool, v: &str) -> String {
    format!("{}-{name} {v}", if negated { "! " } else { "" })
}

/// Lower-case protocol name from a `-p` value (names or numbers).
pub fn proto_name(v: &str) -> String {
    proto_name_ref(v).into_owned()
}

/// [`proto_name`], borrowed where it can be (a name already in lower case).
fn proto_name_ref(v: &str) -> Cow<'_, str> {
    match v {
        "6" => "tcp".into(),
        "17" => "udp".into(),
        "132" => "sctp".into(),
        "1" => "icmp".into(),
        "58" => "ipv6-icmp".into(),
        _ if v.bytes().any(|b| b.is_ascii_uppercase()) => v.to_ascii_lowercase().into(),
        _ => v.into(),
    }
}

pub(crate) fn core_test(o: &Opt<'_>, p: &mut Packet) -> Option<bool> {
    let (name, negated, v) = o.parts();
    core_test_parts(name, negated, v, p)
}

/// [`core_test`] of the core option `name` (`!` before it: `negated`) with first value `v`.
pub(crate) fn core_test_parts(name: &str, negated: bool, v: &str, p: &mut Packet) -> Option<bool> {
    let r = match name {
        "p" => {
            let want = proto_name_ref(v);
            if want == "all" || want == "0" {
                Some(true)
            } else {
                match &p.proto {
                    Some(have) => Some(*have == want || (want == "icmpv6" && have == "ipv6-icmp")),
                    None if !negated => {
                        p.proto = Some(want.into_owned());
                        Some(true)
                    }
                    None => None,
                }
            }
        }
        "s" | "d" => {
            let field = if name == "s" { &mut p.src } else { &mut p.dst };
            match field {
                Some(addr) => {
                    let a = *addr;
                    let mut any = false;
                    let mut known = true;
                    for part in v.split(',') {
                        match cidr_contains(part, a) {
                            Some(true) => any = true,
                            Some(false) => {}
                            None => known = false,
                        }
                    }
                    if any || known { Some(any) } else { None }
                }
                None if !negated && !v.contains(',') => match first_addr(v) {
                    Some(a) => {
                        *field = Some(a);
                        Some(true)
                    }
                    None => None,
                },
                None => None,
            }
        }
        "i" | "o" => {
            let field = if name == "i" {
                &mut p.in_iface
            } else {
                &mut p.out_iface
            };
            match field {
                Some(have) => Some(match v.strip_suffix('+') {
                    Some(prefix) => have.starts_with(prefix),
                    None => have == v,
                }),
                None if !negated => {
                    *field = Some(v.trim_end_matches('+').to_string());
                    Some(true)
                }
                None => None,
            }
        }
        // The first packet of a connection is never a non-first fragment.
        "f" => Some(false),
        _ => None,
    };
    // `-s`/`-d` bound above already matched; negation applies to decided results.
    r.map(|m| m != negated)
}

/// The address of the first item of a list of addresses or networks (`a/len,b`).
pub(crate) fn first_addr(v: &str) -> Option<IpAddr> {
    v[..first_end(v, b'/')].parse().ok()
}

/// The first port of a list of ports or ranges (`80:90,443`).
pub(crate) fn first_port(v: &str) -> Option<u16> {
    v[..first_end(v, b':')].parse().ok()
}

/// Where the first item of the comma-separated `v` ends, or its part before `sep`.
fn first_end(v: &str, sep: u8) -> usize {
    v.bytes()
        .position(|b| b == b',' || b == sep)
        .unwrap_or(v.len())
}

/// Does `cidr` (an address, `addr/len` or `addr/dotted-mask`) contain `a`?
pub fn cidr_contains(cidr: &str, a: IpAddr) -> Option<bool> {
    let (addr, mask) = match cidr.split_once('/') {
        Some((x, m)) => (x, Some(m)),
        None => (cidr, None),
    };
    let net: IpAddr = addr.parse().ok()?;
    // Both families as u128 with their width, so one mask computation serves both.
    let (n, x, width) = match (net, a) {
        (IpAddr::V4(n), IpAddr::V4(x)) => (u128::from(u32::from(n)), u128::from(u32::from(x)), 32),
        (IpAddr::V6(n), IpAddr::V6(x)) => (u128::from(n), u128::from(x), 128),
        _ => return Some(false),
    };
    let full = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    let bits = match mask {
        None => full,
        Some(m) => match m.parse::<u32>() {
            Ok(0) => 0,
            Ok(len) if len <= width => (full << (width - len)) & full,
            Ok(_) => return None,
            // A dotted mask (`255.255.0.0`) of the same family.
            Err(_) => match net {
                IpAddr::V4(_) => u128::from(u32::from(m.parse::<std::net::Ipv4Addr>().ok()?)),
                IpAddr::V6(_) => u128::from(m.parse::<std::net::Ipv6Addr>().ok()?),
            },
        },
    };
    Some(n & bits == x & bits)
}

pub(crate) fn port_test(o: &Opt<'_>, field: &mut Option<u16>) -> Option<bool> {
    let v = o.value();
    match *field {
        Some(port) => {
            let mut any = false;
            for part in v.split(',') {
                let (lo, hi) = match part.split_once(':') {
                    Some((a, b)) => (
                        if a.is_empty() { 0 } else { a.parse().ok()? },
                        if b.is_empty() {
                            u16::MAX
                        } else {
                            b.parse().ok()?
                        },
                    ),
                    None => {
                        let x: u16 = part.parse().ok()?;
                        (x, x)
                    }
                };
                any |= (lo..=hi).contains(&port);
            }
            Some(any != o.negated)
        }
        None if !o.negated => {
            *field = Some(first_port(v)?);
            Some(true)
        }
        None => None,
    }
}

pub(crate) fn range_test(o: &Opt<'_>, a: Option<IpAddr>) -> Option<bool> {
    let a = a?;
    let (lo, hi) = o.value().split_once('-')?;
    let (lo, hi): (IpAddr, IpAddr) = (lo.parse().ok()?, hi.parse().ok()?);
    Some(((lo..=hi).contains(&a)) != o.negated)
}

/// `--tcp-flags MASK COMP` for the first packet of a connection (SYN alone).
pub(crate) fn tcp_flags(o: &Opt<'_>) -> bool {
    let flags = |s: &str| -> Vec<String> {
        s.split(',')
            .map(|f| f.trim().to_ascii_uppercase())
            .flat_map(|f| {
                if f == "ALL" {
                    ["SYN", "ACK", "FIN", "RST", "URG", "PSH"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect()
                } else if f == "NONE" {
                    Vec::new()
                } else {
                    vec![f]
                }
            })
            .collect()
    };
    let mask = flags(o.values.first().map_or("", |v| v.as_ref()));
    let comp = flags(o.values.get(1).map_or("", |v| v.as_ref()));
    let set = |f: &str| f == "SYN";
    let ok = mask.iter().all(|f| set(f) == comp.contains(f));
    ok != o.negated
}

pub(crate) fn parse_u32(v: &str) -> Option<u32> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u32::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    }
}

/// `VALUE[/MASK]` as printed by iptables.
pub fn parse_mark(v: &str) -> Option<(u32, u32)> {
    match v.split_once('/') {
        Some((a, b)) => Some((parse_u32(a)?, parse_u32(b)?)),
        None => Some((parse_u32(v)?, u32::MAX)),
    }
}

fn mark_test(o: &Opt<'_>, mark: u32) -> Option<bool> {
    let (value, mask) = parse_mark(o.value())?;
    Some(((mark & mask) == value) != o.negated)
}

fn apply_mark(rule: &Rule<'_>, t: &mut Thread) {
    let Some(target) = &rule.target else { return };
    for o in &target.options {
        let v = o.value();
        match (target.name, o.name) {
            ("MARK", "set-xmark") | ("MARK", "set-mark") => {
                if let Some((value, mask)) = parse_mark(v) {
                    let (value, mask) = if o.name == "set-mark" && !v.contains('/') {
                        (value, u32::MAX)
                    } else {
                        (value, mask)
                    };
                    t.nfmark = if o.name == "set-xmark" {
                        (t.nfmark & !mask) ^ value
                    } else {
                        (t.nfmark & !mask) | value
                    };
                    t.mark_mask |= mask;
                }
            }
            ("MARK", "and-mark") => {
                if let Some(x) = parse_u32(v) {
                    t.nfmark &= x;
                    t.mark_mask |= !x;
                }
            }
            ("MARK", "or-mark") => {
                if let Some(x) = parse_u32(v) {
                    t.nfmark |= x;
                    t.mark_mask |= x;
                }
            }
            ("MARK", "xor-mark") => {
                if let Some(x) = parse_u32(v) {
                    t.nfmark ^= x;
                    t.mark_mask |= x;
                }
            }
            ("CONNMARK", "set-xmark") | ("CONNMARK", "set-mark") => {
                if let Some((value, mask)) = parse_mark(v) {
                    t.ctmark = if o.name == "set-xmark" {
                        (t.ctmark & !mask) ^ value
                    } else {
                        (t.ctmark & !mask) | value
                    };
                }
            }
            ("CONNMARK", "restore-mark") => {
                let nfmask = target
                    .opt("nfmask")
                    .and_then(|o| parse_u32(o.value()))
                    .unwrap_or(u32::MAX);
                let ctmask = target
                    .opt("ctmask")
                    .and_then(|o| parse_u32(o.value()))
                    .unwrap_or(u32::MAX);
                let new = (t.nfmark & !nfmask) | (t.ctmark & ctmask);
                if new != t.nfmark {
                    t.mark_mask |= nfmask;
                }
                t.nfmark = new;
            }
            ("CONNMARK", "save-mark") => {
                let nfmask = target
                    .opt("nfmask")
                    .and_then(|o| parse_u32(o.value()))
                    .unwrap_or(u32::MAX);
                let ctmask = target
                    .opt("ctmask")
                    .and_then(|o| parse_u32(o.value()))
                    .unwrap_or(u32::MAX);
                t.ctmark = (t.ctmark & !ctmask) | (t.nfmark & nfmask);
            }
            _ => {}
        }
    }
}

pub(crate) fn terminal_outcome(rule: &Rule<'_>) -> Outcome {
    let Some(target) = &rule.target else {
        return Outcome::Unmatched;
    };
    target_outcome(target.name, |names| {
        (target.options.iter())
            .find(|o| names.contains(&o.name))
            .map(|o| o.value())
    })
}

/// [`terminal_outcome`] of a rule of a [`LightRule`]'s shape.
fn light_outcome(rule: &LightRule<'_>) -> Outcome {
    let Some((name, options)) = rule.target() else {
        return Outcome::Unmatched;
    };
    target_outcome(name, |names| {
        (options.iter())
            .find(|o| names.contains(&o.name))
            .map(|o| o.value())
    })
}

/// [`terminal_outcome`] of a DNAT rule whose first `--to-destination` or `--to` has
/// the first value `to` (`""` for none).
pub(crate) fn dnat_outcome(to: &str) -> Outcome {
    target_outcome("DNAT", |_| Some(to))
}

/// The outcome of the terminal target `name` whose first option of the names given has
/// the first value `find(names)`.
fn target_outcome<'x>(name: &str, find: impl Fn(&[&str]) -> Option<&'x str>) -> Outcome {
    let arg = |names: &[&str]| find(names).map(str::to_string);
    match name {
        "DNAT" => Outcome::Dnat(arg(&crate::model::DNAT_DESTINATION).unwrap_or_default()),
        "SNAT" => Outcome::Verdict(match arg(&["to-source", "to"]) {
            Some(a) => format!("SNAT {a}"),
            None => "SNAT".into(),
        }),
        "REDIRECT" | "MASQUERADE" => Outcome::Verdict(match arg(&["to-ports"]) {
            Some(a) => format!("{name} {a}"),
            None => name.to_string(),
        }),
        "NFQUEUE" => Outcome::Verdict(match arg(&["queue-num", "queue-balance"]) {
            Some(a) => format!("NFQUEUE {a}"),
            None => "NFQUEUE".into(),
        }),
        other => Outcome::Verdict(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{ParseOptions, parse};

    fn walk(text: &str, chain: &str, packet: Packet, mode: Mode) -> Distribution {
        let rs = parse(text, &ParseOptions::default()).expect("parses");
        let g = Graph::build(&rs, false).expect("graph");
        let t = rs.tables.iter().position(|t| t.name == "nat").unwrap_or(0);
        let c = g.chain_index(t, chain).expect("chain");
        evaluate(&g, t, c, packet, mode, true).expect("walk")
    }

    fn probs(d: &Distribution) -> Vec<(String, String)> {
        d.outcomes
            .iter()
            .map(|o| (o.outcome.label(), o.prob.to_string()))
            .collect()
    }

    #[test]
    fn nth_without_fallback_leaks_eight_27ths() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n\
            -A PREROUTING -m statistic --mode nth --every 3 --packet 0 -j DNAT --to-destination 10.0.0.1\n\
            -A PREROUTING -m statistic --mode nth --every 3 --packet 1 -j DNAT --to-destination 10.0.0.2\n\
            -A PREROUTING -m statistic --mode nth --every 3 --packet 2 -j DNAT --to-destination 10.0.0.3\n\
            COMMIT\n";
        let d = walk(text, "PREROUTING", Packet::default(), Mode::Balancer);
        let mut p = probs(&d);
        p.sort();
        assert_eq!(
            p,
            vec![
                ("10.0.0.1".into(), "1/3".into()),
                ("10.0.0.2".into(), "2/9".into()),
                ("10.0.0.3".into(), "4/27".into()),
                ("unmatched".into(), "8/27".into()),
            ]
        );
        assert!(d.total().is_one());
        // In trace mode the end of the built-in chain is its policy.
        let d = walk(text, "PREROUTING", Packet::default(), Mode::Trace);
        assert!(probs(&d).contains(&("policy ACCEPT".into(), "8/27".into())));
    }

    #[test]
    fn inverted_random_and_goto_return() {
        // `! --probability 0.25`: matches 3/4. The goto'd chain's RETURN goes back to the
        // caller of PREROUTING's caller, i.e. ends the walk.
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n:A - [0:0]\n:B - [0:0]\n\
            -A PREROUTING -j A\n\
            -A PREROUTING -j DNAT --to-destination 10.0.0.9\n\
            -A A -m statistic --mode random ! --probability 0.25 -g B\n\
            -A A -j DNAT --to-destination 10.0.0.1\n\
            -A B -j RETURN\n\
            -A B -j DNAT --to-destination 10.0.0.2\n\
            COMMIT\n";
        let d = walk(text, "PREROUTING", Packet::default(), Mode::Trace);
        let mut p = probs(&d);
        p.sort();
        // 3/4 take the goto to B, RETURN from B returns to PREROUTING's next rule (the
        // caller of A), which DNATs to .9; 1/4 DNAT to .1 in A.
        assert_eq!(
            p,
            vec![
                ("10.0.0.1".into(), "1/4".into()),
                ("10.0.0.9".into(), "3/4".into()),
            ]
        );
    }

    #[test]
    fn mark_cascade_outcomes_and_guards() {
        let text = "*mangle\n:PREROUTING ACCEPT [0:0]\n:LB - [0:0]\n\
            -A PREROUTING -j LB\n\
            -A LB -m mark --mark 0x0/0xff00 -m statistic --mode random --probability 0.5 -j MARK --set-xmark 0x100/0xff00\n\
            -A LB -m mark --mark 0x0/0xff00 -j MARK --set-xmark 0x200/0xff00\n\
            COMMIT\n";
        let d = walk(text, "LB", Packet::default(), Mode::Balancer);
        let p = probs(&d);
        assert_eq!(
            p,
            vec![
                ("mark 0x100/0xff00".into(), "1/2".into()),
                ("mark 0x200/0xff00".into(), "1/2".into()),
            ]
        );
    }

    #[test]
    fn mark_rules_on_the_source_apply_only_to_a_known_source() {
        // kube-proxy's endpoint chain: the hairpin mark applies when the client is the
        // endpoint itself; an open source is not bound by a rule that only sets marks.
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n:MASQ - [0:0]\n:SEP - [0:0]\n\
            -A PREROUTING -j SEP\n\
            -A MASQ -j MARK --or-mark 0x4000\n\
            -A SEP -s 10.0.0.5/32 -m comment --comment \"hairpin\" -j MASQ\n\
            -A SEP ! -s 10.0.0.0/24 -j MASQ\n\
            COMMIT\n";
        let outcome = |src: Option<&str>| {
            let p = Packet {
                src: src.map(|s| s.parse().unwrap()),
                ..Packet::default()
            };
            let d = walk(text, "PREROUTING", p, Mode::Balancer);
            assert_eq!(d.outcomes.len(), 1);
            d.outcomes[0].outcome.clone()
        };
        let marked = Outcome::Mark {
            value: 0x4000,
            mask: 0x4000,
        };
        assert_eq!(outcome(None), Outcome::Unmatched);
        assert_eq!(outcome(Some("10.0.0.5")), marked);
        assert_eq!(outcome(Some("10.0.0.6")), Outcome::Unmatched);
        assert_eq!(outcome(Some("10.0.1.6")), marked);
    }

    #[test]
    fn packet_fields_decide_and_bind() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n\
            -A PREROUTING -d 10.0.0.0/8 -p tcp -m tcp --dport 80 -j DNAT --to-destination 1.1.1.1\n\
            -A PREROUTING -d 192.168.0.0/255.255.0.0 -p udp -m multiport --dports 53,5000:5010 -j DNAT --to-destination 2.2.2.2\n\
            -A PREROUTING -m conntrack --ctstate ESTABLISHED -j DROP\n\
            -A PREROUTING -m recent --rcheck --name X -j DROP\n\
            -A PREROUTING -j DNAT --to-destination 3.3.3.3\n\
            COMMIT\n";
        let pk = |d: &str, proto: &str, port: u16| Packet {
            dst: Some(d.parse().unwrap()),
            proto: Some(proto.into()),
            dport: Some(port),
            ..Packet::default()
        };
        let one = |p: Packet| {
            let d = walk(text, "PREROUTING", p, Mode::Trace);
            assert_eq!(d.outcomes.len(), 1);
            d.outcomes[0].outcome.label()
        };
        assert_eq!(one(pk("10.1.2.3", "tcp", 80)), "1.1.1.1");
        assert_eq!(one(pk("10.1.2.3", "tcp", 81)), "3.3.3.3");
        assert_eq!(one(pk("192.168.4.4", "udp", 5005)), "2.2.2.2");
        assert_eq!(one(pk("192.168.4.4", "udp", 5011)), "3.3.3.3");
        // An open packet is bound by the first positive test.
        assert_eq!(one(Packet::default()), "1.1.1.1");
    }

    #[test]
    fn undecidable_matches_are_assumed_and_warned() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n\
            -A PREROUTING -m set --match-set blocked src -j DROP\n\
            -A PREROUTING -j DNAT --to-destination 3.3.3.3\n\
            COMMIT\n";
        let d = walk(text, "PREROUTING", Packet::default(), Mode::Trace);
        assert_eq!(d.outcomes[0].outcome.label(), "DROP");
        assert_eq!(d.warnings.len(), 1);
        assert_eq!(d.warnings[0].line, 3);
    }

    #[test]
    fn branches_that_meet_again_are_merged() {
        // 64 statistic rules each jump to a chain that returns: without merging the walk
        // would have 2^64 branches. The DNAT at the end gets everything.
        let mut text = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:LOGIT - [0:0]\n");
        for _ in 0..64 {
            text.push_str("-A PREROUTING -m statistic --mode random --probability 0.5 -j LOGIT\n");
        }
        text.push_str("-A PREROUTING -j DNAT --to-destination 10.0.0.1\n");
        text.push_str("-A LOGIT -m mark --mark 0x1 -j DROP\n-A LOGIT -j RETURN\nCOMMIT\n");
        let d = walk(&text, "PREROUTING", Packet::default(), Mode::Balancer);
        assert_eq!(probs(&d), vec![("10.0.0.1".into(), "1".into())]);
        assert!(d.steps < 10_000, "{}", d.steps);
    }

    #[test]
    fn cidrs() {
        let a: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(cidr_contains("10.0.0.0/8", a), Some(true));
        assert_eq!(cidr_contains("10.1.2.3", a), Some(true));
        assert_eq!(cidr_contains("10.1.2.0/255.255.255.0", a), Some(true));
        assert_eq!(cidr_contains("11.0.0.0/8", a), Some(false));
        assert_eq!(cidr_contains("0.0.0.0/0", a), Some(true));
        let b: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(cidr_contains("fd00::/64", b), Some(true));
        assert_eq!(cidr_contains("10.0.0.0/8", b), Some(false));
        assert_eq!(cidr_contains("bogus", a), None);
        assert_eq!(cidr_contains("10.1.2.4/32", a), Some(false));
        assert_eq!(cidr_contains("10.1.2.0/31", a), Some(false));
        assert_eq!(cidr_contains("10.1.2.2/31", a), Some(true));
        assert_eq!(cidr_contains("10.1.2.3/33", a), None);
        assert_eq!(cidr_contains("fd00::5/128", b), Some(true));
        assert_eq!(cidr_contains("fd00::4/127", b), Some(true));
        assert_eq!(cidr_contains("fd00::6/127", b), Some(false));
        assert_eq!(cidr_contains("fd00::/ffff:ffff::", b), Some(true));
    }

    /// A kube-proxy style cascade of `n` endpoints in KUBE-SVC-X (`%.10f` of 1/(n−i)),
    /// each a DNAT to `dest(i)`; returns the text and the thresholds q_i.
    fn cascade(n: usize, dest: impl Fn(usize) -> String) -> (String, Vec<u64>) {
        let mut text = String::from(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-X - [0:0]\n-A PREROUTING -j KUBE-SVC-X\n",
        );
        let mut qs = Vec::new();
        for i in 0..n {
            if i + 1 < n {
                let p = format!("{:.10}", 1.0 / (n - i) as f64);
                qs.push(u64::from(
                    statistic::threshold_from_text(&p).expect("threshold"),
                ));
                text.push_str(&format!(
                    "-A KUBE-SVC-X -m statistic --mode random --probability {p} -j DNAT --to-destination {}\n",
                    dest(i)
                ));
            } else {
                text.push_str(&format!(
                    "-A KUBE-SVC-X -j DNAT --to-destination {}\n",
                    dest(i)
                ));
            }
        }
        text.push_str("COMMIT\n");
        (text, qs)
    }

    fn addr(i: usize) -> String {
        format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255)
    }

    #[test]
    fn long_cascade_agrees_with_exact_arithmetic() {
        // Every endpoint of a 600-endpoint cascade, walked (most approximated) and computed
        // exactly on the side: the same f64 and relative deviation, within 1e-12.
        let n = 600;
        let (text, qs) = cascade(n, addr);
        let d = walk(&text, "KUBE-SVC-X", Packet::default(), Mode::Balancer);
        assert_eq!(d.outcomes.len(), n);
        assert!(d.total().is_one());
        let mut rest = Prob::one();
        let mut approximated = 0;
        for (i, o) in d.outcomes.iter().enumerate() {
            assert_eq!(o.outcome.label(), addr(i));
            let exact = match qs.get(i) {
                Some(&q) => {
                    let p = rest.mul_ratio(q, SCALE);
                    rest.mul_ratio_assign(SCALE - q, SCALE);
                    p
                }
                None => rest.clone(),
            };
            match &o.prob {
                CompactProb::Exact(p) => assert_eq!(*p, exact),
                CompactProb::Approx(a) => {
                    approximated += 1;
                    assert!(a.contains(&exact));
                    assert!(a.relative_error_bound() < 1e-12);
                    assert_eq!(a.to_f64_checked(), (exact.to_f64(), true));
                    assert_eq!(
                        a.relative_deviation_checked(n as u64),
                        (exact.relative_deviation(n as u64), true)
                    );
                }
            }
        }
        assert!(approximated > 500, "{approximated}");
    }

    #[test]
    fn twenty_thousand_endpoints_sum_to_exactly_one() {
        let n = 20_000;
        let (text, _) = cascade(n, addr);
        let d = walk(&text, "KUBE-SVC-X", Packet::default(), Mode::Balancer);
        assert_eq!(d.outcomes.len(), n);
        assert!(d.total().is_one());
        let sum: f64 = d.outcomes.iter().map(|o| o.prob.to_f64()).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
        let kept = d
            .outcomes
            .iter()
            .filter(|o| o.prob.exact().is_some())
            .count();
        assert!(kept < 100, "{kept} exact forms kept");
        for o in &d.outcomes {
            assert!(o.prob.approx().relative_error_bound() < 1e-12);
            assert!((o.prob.relative_deviation(n as u64)).abs() < 1e-5);
        }
    }

    #[test]
    fn a_long_cascade_into_one_destination_is_exactly_one() {
        // Every branch reaches the same DNAT: the recorded sum of long weights is
        // approximate, but it is the only approximate outcome, so it is recovered exactly.
        let (text, _) = cascade(300, |_| "10.0.0.1:80".to_string());
        let d = walk(&text, "KUBE-SVC-X", Packet::default(), Mode::Balancer);
        assert_eq!(probs(&d), vec![("10.0.0.1:80".into(), "1".into())]);
        assert!(d.outcomes[0].prob.is_one());
    }

    #[test]
    fn branches_that_differ_in_marks_for_a_while_still_merge() {
        // 40 times: a statistic rule sets a mark, the next rule sets it back for everyone.
        // The branches differ until the second rule and are in one state again after it.
        // A depth-first walk that merges only with waiting branches walked the rest of the
        // chain once per path (2^40); taken in program order, they meet and merge.
        let mut text = String::from("*mangle\n:PREROUTING ACCEPT [0:0]\n:LB - [0:0]\n");
        text.push_str("-A PREROUTING -j LB\n");
        for _ in 0..40 {
            text.push_str(
                "-A LB -m statistic --mode random --probability 0.3 -j MARK --set-xmark 0x1/0xff\n",
            );
            text.push_str("-A LB -j MARK --set-xmark 0x2/0xff\n");
        }
        text.push_str("-A LB -m mark --mark 0x2/0xff -j ACCEPT\nCOMMIT\n");
        let d = walk(&text, "LB", Packet::default(), Mode::Balancer);
        assert_eq!(probs(&d), vec![("ACCEPT".into(), "1".into())]);
        // 2^40 paths lead there (the count saturates).
        assert_eq!(d.outcomes[0].paths, u32::MAX);
        assert!(d.steps < 1_000, "{} rule evaluations", d.steps);
    }

    #[test]
    fn outcomes_are_listed_in_depth_first_order() {
        // The matching branch of the first rule waits for the rest at the second rule, so
        // the walk does not finish the branches in rule order; the outcomes are still
        // listed in it (the order of a depth-first walk, matching branch first).
        let text = "*mangle\n:PREROUTING ACCEPT [0:0]\n:LB - [0:0]\n\
            -A LB -m statistic --mode random --probability 0.25 -j MARK --set-xmark 0x100/0xff00\n\
            -A LB -m mark --mark 0x0/0xff00 -m statistic --mode random --probability 0.5 -j MARK --set-xmark 0x200/0xff00\n\
            -A LB -m mark --mark 0x0/0xff00 -j MARK --set-xmark 0x300/0xff00\n\
            -A LB -m mark --mark 0x300/0xff00 -j DNAT --to-destination 10.0.0.3\n\
            COMMIT\n";
        let d = walk(text, "LB", Packet::default(), Mode::Balancer);
        assert_eq!(
            probs(&d),
            vec![
                ("mark 0x100/0xff00".into(), "1/4".into()),
                ("mark 0x200/0xff00".into(), "3/8".into()),
                ("10.0.0.3".into(), "3/8".into()),
            ]
        );
        let c = |a: &[(bool, u32)]| Choices(Small::Heap(a.to_vec()));
        assert!(c(&[(false, 1)]) < c(&[(true, 1), (false, 1)]));
        assert!(c(&[(true, 3), (false, 1)]) < c(&[(true, 4)]));
        assert!(c(&[(true, 2)]) < c(&[(true, 2), (false, 1)]));
        assert_eq!(
            c(&[(true, 2), (true, 1)]).cmp(&c(&[(true, 3)])),
            Ordering::Equal
        );
    }

    #[test]
    fn too_many_distinct_outcomes_stop_the_walk() {
        // 17 rules that each may set their own bit: 2^17 distinct marks, more than
        // STATE_LIMIT outcomes and waiting branches. The walk stops instead of filling memory.
        let mut text = String::from("*mangle\n:PREROUTING ACCEPT [0:0]\n:LB - [0:0]\n");
        for i in 0..17 {
            text.push_str(&format!(
                "-A LB -m statistic --mode random --probability 0.5 -j MARK --or-mark {:#x}\n",
                1u32 << i
            ));
        }
        text.push_str("COMMIT\n");
        let rs = parse(&text, &ParseOptions::default()).expect("parses");
        let g = Graph::build(&rs, false).expect("graph");
        let c = g.chain_index(0, "LB").expect("chain");
        let e = evaluate(&g, 0, c, Packet::default(), Mode::Balancer, false).unwrap_err();
        assert_eq!(e.limit, STATE_LIMIT as u64);
        assert!(
            e.to_string().contains("outcomes and waiting branches"),
            "{e}"
        );
    }

    /// The rule lines of a one-chain fragment, read as `parse` reads them (leniently:
    /// lines with errors are left out).
    fn rule_lines(text: &str) -> Vec<RuleLine<'_>> {
        let Ok(rs) = parse(text, &ParseOptions { lenient: true }) else {
            return Vec::new();
        };
        (rs.tables.into_iter())
            .flat_map(|t| t.chains)
            .flat_map(|c| c.rules)
            .collect()
    }

    /// A thread at the start of a walk, for `packet`.
    fn thread(packet: Packet) -> Thread {
        Thread::start(0, packet)
    }

    /// What a decision gives: whether the rule applies (and with what share), the
    /// thread's packet afterwards and the warnings.
    type Decided = (Option<Option<(u64, u64)>>, Packet, BTreeSet<(u32, String)>);

    /// Decides a rule for `packet` (mark-only or not) with `decide_on` as the walk does.
    fn decided(
        packet: &Packet,
        decide_on: impl FnOnce(&Thread, &mut Packet, &mut BTreeSet<(u32, String)>) -> Decision,
    ) -> Decided {
        let mut t = thread(packet.clone());
        let mut warned = BTreeSet::new();
        let d = decide(&mut t, &mut Scratch::default(), |t, p| {
            decide_on(t, p, &mut warned)
        });
        let d = match d {
            Decision::No => None,
            Decision::Yes(share) => Some(share),
        };
        (d, (*t.packet).clone(), warned)
    }

    /// Packets of several kinds: protocol open, tcp, udp, another; addresses open or not.
    fn packets() -> Vec<Packet> {
        let mut out = Vec::new();
        for proto in [None, Some("tcp"), Some("udp"), Some("gre")] {
            for dst in [None, Some("10.96.0.1")] {
                out.push(Packet {
                    proto: proto.map(str::to_string),
                    dst: dst.map(|d| d.parse().unwrap()),
                    dport: dst.map(|_| 443),
                    ..Packet::default()
                });
            }
        }
        out
    }

    /// For each rule of `text` whose first reading kept [`RuleLine::dnat`] facts: the
    /// rule is of the light shape the walk would read otherwise, and the facts decide it
    /// and give its outcome exactly as that light reading does, for packets of every
    /// kind; what the facts say of chance is what the rule's options say. The number of
    /// rules with facts.
    fn check_dnat_facts(text: &str) -> usize {
        let mut n = 0;
        for line in rule_lines(text) {
            let rule = line.parse();
            // The first reading's facts (fast path) are those read from the whole rule.
            assert_eq!(line, RuleLine::new(line.line, line.text, &rule));
            let plain = RuleLine::from_parts(line.line, line.text, None, false, false, false)
                .with_facts(crate::model::fixed_decision(&rule), false, None);
            assert_eq!(line.fixed_share(), plain.fixed_share(), "{}", line.text);
            assert_eq!(line.fixed_random(), plain.fixed_random(), "{}", line.text);
            let Some((proto, to)) = line.dnat() else {
                continue;
            };
            n += 1;
            let light = line.light().expect("a light rule");
            assert!(light.matches_always(), "{}", line.text);
            assert_eq!(
                light.target().map(|(name, _)| name),
                Some("DNAT"),
                "{}",
                line.text
            );
            assert_eq!(dnat_outcome(to), light_outcome(&light), "{}", line.text);
            assert_eq!(dnat_outcome(to), terminal_outcome(&rule), "{}", line.text);
            for packet in packets() {
                for mark_only in [false, true] {
                    let a = decided(&packet, |t, p, w| {
                        decide_dnat(line.line, proto, t, mark_only, p, w)
                    });
                    let b = decided(&packet, |t, p, w| decide_light(&light, t, mark_only, p, w));
                    let c = decided(&packet, |t, p, w| decide_on(&rule, t, mark_only, p, w));
                    assert_eq!(a, b, "{} {packet:?}", line.text);
                    assert_eq!(a, c, "{} {packet:?}", line.text);
                }
            }
        }
        n
    }

    #[test]
    fn dnat_facts_are_kept_for_kube_proxy_dnat_rules_only() {
        let kept = |r: &str| {
            let text = format!("-A X {r}\n");
            let n = check_dnat_facts(&text);
            rule_lines(&text)[0]
                .dnat()
                .map(|(p, to)| (p, to.to_string()))
                .filter(|_| n == 1)
        };
        let to = |p: Option<&'static str>, v: &str| Some((p, v.to_string()));
        let kube = "-p tcp -m comment --comment \"team-0148/app-024076-api:https\" -m tcp \
                    -j DNAT --to-destination 10.129.64.196:8443";
        assert_eq!(kept(kube), to(Some("tcp"), "10.129.64.196:8443"));
        assert_eq!(
            kept(&format!("  {kube}  ")),
            to(Some("tcp"), "10.129.64.196:8443")
        );
        assert_eq!(
            kept("-p udp -m udp -j DNAT --to [fd00::5]:8080 --to-destination 1.2.3.4"),
            to(Some("udp"), "[fd00::5]:8080")
        );
        assert_eq!(
            kept("--protocol sctp -j DNAT --random --to-destination \"1.2.3.4:80\""),
            to(Some("sctp"), "1.2.3.4:80")
        );
        assert_eq!(
            kept("-m comment --comment x -j DNAT --to-destination 1.2.3.4"),
            to(None, "1.2.3.4")
        );
        assert_eq!(kept("-p tcp -j DNAT"), to(Some("tcp"), ""));
        assert_eq!(kept("-p tcp -j DNAT --to-destination"), to(Some("tcp"), ""));
        assert_eq!(kept("-p tcp -j DNAT --to \"\""), to(Some("tcp"), ""));
        // As much as a light reading holds: four matches, eight options.
        assert_eq!(
            kept(
                "-m comment --comment a --comment b -m tcp -m udp -m comment --comment c \
                 -j DNAT --random --to 1.2.3.4 --to 5.6.7.8 --random --persistent"
            ),
            to(None, "1.2.3.4")
        );
        // Anything else: the rule is read again.
        for r in [
            "! -p tcp -j DNAT --to-destination 1.2.3.4",
            "-p 6 -j DNAT --to-destination 1.2.3.4",
            "-p TCP -j DNAT --to-destination 1.2.3.4",
            "-p icmp -j DNAT --to-destination 1.2.3.4",
            "-p tcp -d 10.0.0.1 -j DNAT --to-destination 1.2.3.4",
            "-s 10.0.0.1 -j DNAT --to-destination 1.2.3.4",
            "-p tcp -m tcp --dport 80 -j DNAT --to-destination 1.2.3.4",
            "-p tcp --dport 80 -j DNAT --to-destination 1.2.3.4",
            "-m statistic --mode random --probability 0.5 -j DNAT --to-destination 1.2.3.4",
            "-p tcp -j SNAT --to-source 1.2.3.4",
            "-p tcp -g DNAT",
            "-p tcp -j DNAT --to-destination 1.2.3.4 5.6.7.8",
            "-p tcp -m comment --comment \"a\\\"b\" -j DNAT --to-destination 1.2.3.4",
            "-p tcp -j DNAT --to-destination 1.2.3.4 -c 1 2",
            "-p tcp -m comment --comment x -m comment --comment y -m tcp -m udp -m sctp \
             -j DNAT --to-destination 1.2.3.4",
            "-m comment --comment a --comment b -m tcp -m udp -m comment --comment c \
             -j DNAT --random --to 1.2.3.4 --to 5.6.7.8 --random --persistent --random",
        ] {
            assert_eq!(kept(r), None, "{r}");
        }
        let counted = format!("[1:2] -A X {kube}\n");
        assert_eq!(check_dnat_facts(&counted), 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// On rule lines of and near kube-proxy's DNAT shape, the facts the first reading
        /// keeps decide the rule as its light (and whole) reading does.
        #[test]
        fn dnat_facts_decide_as_the_light_reading(
            // (Pieces of the shape come up more often than others, so that about one
            // line in five is of it.)
            core in proptest::collection::vec(
                proptest::sample::select(vec![
                    "-p tcp", "-p tcp", "-p tcp", "-p udp", "-p udp", "-p sctp",
                    "--protocol udp", "-p \"tcp\"", "! -p tcp", "-p TCP", "-p 6", "-p icmp",
                    "-p all", "-p", "-s 10.0.0.1/32", "-d 10.96.0.1/32", "! -s 10.0.0.0/8",
                    "-i eth0", "-f", "! -d 10.96.0.1",
                ]),
                0..2,
            ),
            matches in proptest::collection::vec(
                proptest::sample::select(vec![
                    "-m comment --comment \"team-0148/app-024076-api:https\"",
                    "-m comment --comment \"team-0148/app-024076-api:https\"",
                    "-m comment --comment \"team-0148/app-024076-api:https\"",
                    "-m tcp", "-m tcp", "-m tcp", "-m comment --comment x", "-m comment --comment \"\"", "-m comment",
                    "-m tcp", "-m tcp", "-m udp", "-m comment --comment \"a\\\"b\"",
                    "-m tcp --dport 80", "-m udp ! --dport 53",
                    "-m statistic --mode random --probability 0.5", "-m mark --mark 0x1",
                    "-m statistic", "--dport 80", "-m addrtype",
                ]),
                0..4,
            ),
            target in proptest::sample::select(vec![
                "-j DNAT", "-j DNAT", "-j DNAT", "-j DNAT", "-j DNAT", "-j DNAT", "-j DNAT",
                "-j DNAT", "-j SNAT", "-j ACCEPT", "-g DNAT", "-j REDIRECT", "",
            ]),
            options in proptest::collection::vec(
                proptest::sample::select(vec![
                    "--to-destination 10.129.64.196:8443", "--to-destination 10.129.64.196:8443",
                    "--to 10.0.0.1", "--to-destination [fd00::5]:8080", "--to [fd00::5]:8080",
                    "--to-destination \"1.2.3.4:80\"", "--to-destination", "--to \"\"",
                    "--to-source 1.1.1.1", "--random", "--persistent", "--to-ports 80",
                    "--to-destination 1.2.3.4 5.6.7.8", "! --to-destination 1.2.3.4",
                    "-m tcp",
                ]),
                0..3,
            ),
            counters in proptest::bool::weighted(0.05),
        ) {
            let text = format!(
                "{}-A X {} {} {target} {}\n",
                if counters { "[1:2] " } else { "" },
                core.join(" "),
                matches.join(" "),
                options.join(" "),
            );
            check_dnat_facts(&text);
        }
    }
}
