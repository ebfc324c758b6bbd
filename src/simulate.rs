//! Monte-Carlo simulation: new connections walked one by one through the real chain
//! graph with the kernel's own decision procedure (not samples of the computed
//! distribution).
//!
//! # How
//!
//! The part of a balancer's table that its traffic can reach is compiled into a flat
//! [`Program`]: one instruction per rule that can change the outcome, laid out chain
//! after chain, each with its conditions decided in advance wherever they are fixed for
//! the connection, the kernel form of its `-m statistic` / `-m mark` / `-m connmark` /
//! `-m recent` matches (integer threshold, nth counter index, mark and mask, recent table
//! index) and its target resolved to a program counter, an outcome index or a list of
//! mark operations. The hot loop does no string work and no allocation: a connection is
//! a program counter, a packet-state index, the two marks and a call stack whose
//! capacity is the graph's depth.
//!
//! # Semantics (the exact evaluator's, connection by connection)
//!
//! - Traversal is [`eval`]'s in [`Mode::Balancer`](crate::eval::Mode::Balancer): from the
//!   start of the balancer's chain, with the balancer's [`Packet`];
//!   `-j` pushes a return point, `-g` does not, `RETURN` or the end of a chain goes back
//!   to the caller; leaving the start chain gives the mark outcome if a `MARK`/`CONNMARK`
//!   target changed the mark, [`Outcome::Unmatched`] otherwise. Rules whose target cannot
//!   change the outcome are skipped (as the evaluator skips them), but they are still
//!   counted in [`SimResult::rule_evaluations`], which counts every rule the kernel
//!   would traverse.
//! - Conditions on the connection (addresses, ports, protocol, interfaces, conntrack
//!   state, addrtype, …) are decided exactly as the evaluator decides them, including
//!   its *binding* of open packet fields by the first positive test (never by a rule
//!   that only sets marks: such a rule does not apply) and its assumptions for
//!   undecidable tests. The reachable packet states are enumerated when compiling,
//!   so the decision is a table look-up (usually of a single entry).
//! - `--mode random`: each connection that reaches the match draws
//!   `rng.next_u32() & 0x7FFF_FFFF` and matches iff it is `< threshold` (`!`: `>=`), as
//!   `xt_statistic` does with `get_random_u32()`.
//! - `--mode nth --every N --packet P`: each match has its own counter, set at "table
//!   load" (the start of a run) to `N - 1 - P`; each connection that reaches the match
//!   does `count = (count == N - 1) ? 0 : count + 1` and matches iff the new count is 0
//!   (`!`: iff it is not), so the k-th arrival (0-based) matches iff `k ≡ P (mod N)`.
//!   Counters only see this balancer's simulated traffic.
//! - A rule's fixed conditions are decided first (the kernel checks `-s -d -p -i -o`
//!   before any `-m` match). Its runtime matches (statistic, mark, connmark, recent) are
//!   then evaluated in the order written, stopping at the first that fails; a runtime
//!   match written after a fixed condition that fails is not reached (it draws nothing
//!   and advances no counter). So a match is *reached* when every condition before it in
//!   the rule passed.
//! - Packet binding follows the evaluator: a rule whose fixed conditions bind an open
//!   field keeps the binding when only its statistic match fails (the evaluator's
//!   non-matching branch keeps it), and drops it when a mark or recent match fails.
//! - Marks: `MARK` and `CONNMARK` targets and `-m mark` / `-m connmark` tests behave as in
//!   the evaluator; every connection starts with nfmark = ctmark = 0.
//! - `-m recent` (session affinity), as `xt_recent` does it: tables are per `--name`
//!   (default `DEFAULT`) and keyed by the client (`--rsource`, the default) or by the
//!   destination (`--rdest`, which is the same for every simulated connection, so one
//!   shared record per name). `--set` creates or refreshes the record and matches (`!`:
//!   never matches, but still sets); `--rcheck` and `--update` match iff a record exists
//!   with at least `--hitcount` time stamps (at most 20 are kept, `ip_pkt_list_tot`);
//!   `--update` adds a stamp when it matches; `--remove` matches iff a record existed and
//!   deletes it. **Records never expire within a run**: `--seconds` and `--reap` are read
//!   but a run is taken to last less than `--seconds` (kube-proxy uses 10800 s).
//!   `--mask` and `--rttl` are ignored (clients are distinct addresses).
//! - Clients: with [`SimOptions::clients`] `= Some(K)` each connection comes from a client
//!   drawn uniformly from `0..K` (one `next_u64` per connection, before any rule draws;
//!   Lemire's multiply-shift with rejection, so exactly uniform). With `None` every
//!   connection is a new client: it sees only the records it set itself earlier in the
//!   same walk, so `--rcheck` on the records of earlier connections never matches.
//!
//! # Reproducibility
//!
//! The generator is [`GENERATOR`] (`rand::rngs::Xoshiro256PlusPlus`, a fixed algorithm,
//! not `StdRng`). Connections are run in fixed batches of [`BATCH`]; batch `b` of the
//! balancer with index `i` uses `Xoshiro256PlusPlus::seed_from_u64(batch_seed(seed, i,
//! b))` (see [`batch_seed`]). Batches of balancers without shared state run in parallel
//! with rayon and their counts are summed, so results are identical bit for bit for any
//! thread count.
//!
//! **Dependent batches.** nth counters, `--rdest` recent records and the client tables
//! (`clients = Some(K)`) carry state from one connection to the next. A balancer whose
//! program has nth matches or `--rdest` recent matches, or any balancer simulated with
//! `clients = Some(K)`, runs its batches sequentially in one thread (same per-batch
//! seeds, state carried over): still deterministic, only not parallel within that
//! balancer ([`simulate_all`] still runs different balancers in parallel).

use crate::balance::Balancer;
use crate::eval::{self, Outcome, Packet, core_test, parse_u32, static_test, terminal_outcome};
use crate::graph::{Graph, TableGraph, TargetRef};
use crate::model::{Match, Rule};
use crate::statistic::{self, Statistic};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use rustc_hash::FxHashMap as HashMap;

/// The random number generator, by the name of its algorithm.
pub const GENERATOR: &str = "xoshiro256++";

/// Connections per batch; batch `b` has its own seed (see [`batch_seed`]).
pub const BATCH: u64 = 65_536;

/// Most time stamps `xt_recent` keeps per record (`ip_pkt_list_tot`, default 20).
const RECENT_STAMPS: u8 = 20;

/// What to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimOptions {
    /// New connections per balancer.
    pub connections: u64,
    pub seed: u64,
    /// `Some(K)`: each connection comes from one of K clients, drawn uniformly (session
    /// affinity can then recognise returning clients). `None`: every connection is a new
    /// client. The tables take `4 + (number of --name tables)` bytes per client and are
    /// allocated up front, so callers should bound K (`Some(0)` is taken as 1).
    pub clients: Option<u64>,
}

/// The result of simulating one balancer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SimResult {
    /// Connections per endpoint, indexed like [`Balancer::endpoints`].
    pub counts: Vec<u64>,
    /// Connections that left the balancer with no outcome.
    pub unmatched: u64,
    /// Connections whose outcome is not among the exact evaluator's endpoints (should be
    /// 0; non-zero means the simulator and the evaluator disagree).
    pub other: u64,
    /// Rules traversed, summed over connections (rules skipped because they cannot change
    /// the outcome included, as the kernel traverses them too).
    pub rule_evaluations: u64,
    /// 31-bit random draws made by `--mode random` matches.
    pub random_draws: u64,
    /// The number of clients, as given.
    pub clients: Option<u64>,
    /// With clients: the largest share of all connections that a single endpoint got
    /// (`max(counts) / connections`; a fair split gives about `1 / endpoints`). With few
    /// clients and session affinity this is far above the fair share even when every
    /// client's first choice is fair, because a client's connections all follow it.
    pub per_client_max_share: Option<f64>,
    /// With clients: connections from a client that had connected before in the run.
    pub returning_connections: Option<u64>,
    /// With clients: returning connections that got the same outcome as the same client's
    /// previous connection (equal to `returning_connections` when affinity holds
    /// perfectly; about `1 / endpoints` of it without affinity).
    pub same_outcome_connections: Option<u64>,
    /// The batches ran one after the other because state is carried between connections
    /// (nth counters, recent records, clients).
    pub sequential: bool,
}

/// The seed of batch `batch` of the balancer with index `balancer`:
/// `splitmix64(splitmix64(splitmix64(seed) ^ balancer) ^ batch)`, where `splitmix64(x)`
/// is SplitMix64's output function applied to `x + 0x9E3779B97F4A7C15`. The generator of
/// the batch is `Xoshiro256PlusPlus::seed_from_u64` of this value.
pub fn batch_seed(seed: u64, balancer: u64, batch: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed) ^ balancer) ^ batch)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Simulates `opts.connections` new connections through `balancer`. `balancer_index`
/// only selects the random streams (see [`batch_seed`]).
pub fn simulate(
    graph: &Graph<'_, '_>,
    balancer: &Balancer,
    balancer_index: u64,
    opts: &SimOptions,
) -> SimResult {
    let program = Program::compile(graph, balancer);
    program.run(balancer_index, opts)
}

/// Simulates every balancer (`balancers[i]` with balancer index `i`), in parallel over
/// balancers and, where batches are independent, over batches. Deterministic.
pub fn simulate_all(
    graph: &Graph<'_, '_>,
    balancers: &[Balancer],
    opts: &SimOptions,
) -> Vec<SimResult> {
    balancers
        .par_iter()
        .enumerate()
        .map(|(i, b)| simulate(graph, b, i as u64, opts))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The compiled program.

/// The fixed part of a rule's conditions, for one packet state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decision {
    /// How many of the rule's runtime matches are reached (evaluated in order) before a
    /// fixed condition fails; all of them when none fails.
    reach: u16,
    /// Do the fixed conditions pass?
    pass: bool,
    /// The packet state after the rule's bindings (when `pass`).
    next: u32,
}

/// `Decision::next` for a rule that binds nothing in any state it is reached in.
const KEEP: u32 = u32::MAX;

impl Decision {
    /// The packet state after the rule's bindings, from state `ps`.
    #[inline(always)]
    fn state_after(self, ps: u32) -> u32 {
        if self.next == KEEP { ps } else { self.next }
    }
}

/// A match decided per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rt {
    Random {
        threshold: u32,
        inverted: bool,
    },
    Nth {
        counter: u32,
        /// N - 1, as the kernel stores `every`.
        last: u32,
        inverted: bool,
    },
    Mark {
        ct: bool,
        value: u32,
        mask: u32,
        negated: bool,
    },
    Recent {
        op: RecentOp,
        table: u32,
        dest: bool,
        hits: u8,
        inverted: bool,
    },
}

impl Rt {
    fn is_statistic(self) -> bool {
        matches!(self, Rt::Random { .. } | Rt::Nth { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecentOp {
    Set,
    Check,
    Update,
    Remove,
}

/// A `MARK` / `CONNMARK` target option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkOp {
    NfXset { value: u32, mask: u32 },
    NfSet { value: u32, mask: u32 },
    NfAnd(u32),
    NfOr(u32),
    NfXor(u32),
    CtXset { value: u32, mask: u32 },
    CtSet { value: u32, mask: u32 },
    Restore { nfmask: u32, ctmask: u32 },
    Save { nfmask: u32, ctmask: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tgt {
    /// `-j CHAIN`: push the return point, go to this program counter.
    Jump(u32),
    /// `-g CHAIN`.
    Goto(u32),
    /// `RETURN` (with the rule's bindings).
    Return,
    /// The end of a chain (no bindings).
    End,
    /// A terminating target: this outcome index.
    Terminal(u32),
    /// `MARK` / `CONNMARK`: these operations, then the next rule.
    Mark { start: u32, len: u32 },
}

/// How an instruction is run. The common forms (a rule reached in one packet state
/// only, whose fixed conditions pass, with no runtime match or a single `--mode random`
/// match) carry their target, so that running them is a single dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// The end of a chain: back to the caller (no bindings).
    End,
    /// Always applies (state `dec.next`), then its target.
    Jump(u32),
    Goto(u32),
    Return,
    Terminal(u32),
    Mark {
        start: u32,
        len: u32,
    },
    /// Applies when the random draw matches; state `dec.next` either way.
    RandomJump {
        threshold: u32,
        inverted: bool,
        to: u32,
    },
    RandomGoto {
        threshold: u32,
        inverted: bool,
        to: u32,
    },
    RandomReturn {
        threshold: u32,
        inverted: bool,
    },
    RandomTerminal {
        threshold: u32,
        inverted: bool,
        outcome: u32,
    },
    RandomMark {
        threshold: u32,
        inverted: bool,
        start: u32,
        len: u32,
    },
    /// Anything else: conditions by `Runner::general`, then `Instr::target`.
    General,
}

#[derive(Debug, Clone, Copy)]
struct Instr {
    op: Op,
    /// The decision when the rule is reached in one packet state only (`multi_len == 0`).
    dec: Decision,
    /// Otherwise: `decisions[multi_start..multi_start + multi_len]`, sorted by state.
    multi_start: u32,
    multi_len: u32,
    /// The rule's runtime matches start at `rt[rt_start]`.
    rt_start: u32,
    /// Rules traversed by reaching this instruction: skipped rules before it, plus itself.
    cost: u32,
    /// `RandomTerminal` only: rules traversed after a match, on the way to the verdict
    /// (a fused fixed path, see `fuse_fixed_paths`).
    hit_cost: u32,
    target: Tgt,
}

/// One balancer's part of its table, compiled.
#[derive(Debug, Clone)]
pub struct Program {
    instrs: Vec<Instr>,
    decisions: Vec<(u32, Decision)>,
    rt: Vec<Rt>,
    mark_ops: Vec<MarkOp>,
    /// Initial nth counters, one per nth match.
    nth_init: Vec<u32>,
    /// Recent tables (one per `--name`).
    recent_tables: usize,
    has_recent: bool,
    has_rdest: bool,
    /// Deepest call stack.
    depth: usize,
    /// `(nfmark, mask)` of mark outcomes, sorted, with their outcome index.
    mark_outcomes: Vec<((u32, u32), u32)>,
    endpoints: usize,
}

impl Program {
    /// Compiles the part of `balancer`'s table that its traffic can reach.
    // Not inlined, so that profiles show what compiling costs.
    #[inline(never)]
    pub fn compile(graph: &Graph<'_, '_>, balancer: &Balancer) -> Program {
        // The thread's work space, emptied by `Compiler::new`; a fresh one in the
        // (unexpected) case that it is in use.
        WORK.with(|w| match w.try_borrow_mut() {
            Ok(mut w) => Compiler::new(graph, balancer, &mut w).compile(),
            Err(_) => Compiler::new(graph, balancer, &mut Work::default()).compile(),
        })
    }

    /// Number of instructions (rules that can change the outcome, plus one per chain end).
    pub fn len(&self) -> usize {
        self.instrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instrs.is_empty()
    }

    /// Do connections share state (so that batches must run in order)?
    pub fn stateful(&self, clients: Option<u64>) -> bool {
        !self.nth_init.is_empty() || self.has_rdest || clients.is_some()
    }

    fn unmatched_index(&self) -> u32 {
        self.endpoints as u32
    }

    fn other_index(&self) -> u32 {
        self.endpoints as u32 + 1
    }

    /// Runs `opts.connections` connections.
    pub fn run(&self, balancer_index: u64, opts: &SimOptions) -> SimResult {
        let n = opts.connections;
        let batches = n.div_ceil(BATCH);
        let size = |b: u64| BATCH.min(n - b * BATCH);
        let clients = opts.clients.map(|k| k.max(1));
        let sequential = self.stateful(clients);
        let acc = if sequential {
            let mut runner = Runner::new(self, clients);
            for b in 0..batches {
                let mut rng =
                    Xoshiro256PlusPlus::seed_from_u64(batch_seed(opts.seed, balancer_index, b));
                runner.run(&mut rng, size(b));
            }
            runner.acc
        } else {
            (0..batches)
                .into_par_iter()
                .map(|b| {
                    let mut runner = Runner::new(self, clients);
                    let mut rng =
                        Xoshiro256PlusPlus::seed_from_u64(batch_seed(opts.seed, balancer_index, b));
                    runner.run(&mut rng, size(b));
                    runner.acc
                })
                .reduce(|| Acc::new(self.endpoints + 2), Acc::merge)
        };
        let counts = acc.counts[..self.endpoints].to_vec();
        let max = counts.iter().copied().max().unwrap_or(0);
        SimResult {
            unmatched: acc.counts[self.endpoints],
            other: acc.counts[self.endpoints + 1],
            counts,
            rule_evaluations: acc.evaluations,
            random_draws: acc.draws,
            clients: opts.clients,
            per_client_max_share: opts
                .clients
                .map(|_| if n == 0 { 0.0 } else { max as f64 / n as f64 }),
            returning_connections: opts.clients.map(|_| acc.returning),
            same_outcome_connections: opts.clients.map(|_| acc.same),
            sequential,
        }
    }
}

#[derive(Debug, Clone)]
struct Acc {
    /// Per outcome index: endpoints, then unmatched, then other.
    counts: Vec<u64>,
    evaluations: u64,
    draws: u64,
    returning: u64,
    same: u64,
}

impl Acc {
    fn new(outcomes: usize) -> Acc {
        Acc {
            counts: vec![0; outcomes],
            evaluations: 0,
            draws: 0,
            returning: 0,
            same: 0,
        }
    }

    fn merge(mut self, other: Acc) -> Acc {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.evaluations += other.evaluations;
        self.draws += other.draws;
        self.returning += other.returning;
        self.same += other.same;
        self
    }
}

/// The state of a run: counters, recent tables, clients, and the reused call stack.
struct Runner<'p> {
    prog: &'p Program,
    /// The call stack, `depth + 1` long.
    stack: Vec<u32>,
    dynamic: Dynamic,
    /// Per client: the outcome of its last connection (`u32::MAX`: none yet).
    last: Vec<u32>,
    clients: Option<u64>,
    acc: Acc,
}

/// State that runtime matches read and change.
struct Dynamic {
    nth: Vec<u32>,
    /// Per recent table: one record per client (`[table * per_table + client]`), or with
    /// no clients one record per table for the current connection only.
    recent_src: Vec<u8>,
    per_table: usize,
    /// Per recent table: the record of the (single) destination.
    recent_dst: Vec<u8>,
}

impl<'p> Runner<'p> {
    fn new(prog: &'p Program, clients: Option<u64>) -> Runner<'p> {
        let per_table = clients.map_or(1, |k| k as usize);
        Runner {
            prog,
            stack: vec![0; prog.depth + 1],
            dynamic: Dynamic {
                nth: prog.nth_init.clone(),
                recent_src: if prog.has_recent {
                    vec![0; prog.recent_tables * per_table]
                } else {
                    Vec::new()
                },
                per_table,
                recent_dst: vec![0; prog.recent_tables],
            },
            last: clients.map_or_else(Vec::new, |k| vec![u32::MAX; k as usize]),
            clients,
            acc: Acc::new(prog.endpoints + 2),
        }
    }

    fn run(&mut self, rng: &mut Xoshiro256PlusPlus, connections: u64) {
        // A local copy, so that the generator's state can live in registers.
        let mut local = rng.clone();
        match self.clients {
            None => {
                for _ in 0..connections {
                    if self.prog.has_recent {
                        // A new client: no records of its own yet.
                        self.dynamic.recent_src.fill(0);
                    }
                    let o = self.connection(&mut local, 0);
                    self.acc.counts[o as usize] += 1;
                }
            }
            Some(k) => {
                for _ in 0..connections {
                    let client = uniform(&mut local, k) as usize;
                    let o = self.connection(&mut local, client);
                    self.acc.counts[o as usize] += 1;
                    let last = &mut self.last[client];
                    if *last != u32::MAX {
                        self.acc.returning += 1;
                        if *last == o {
                            self.acc.same += 1;
                        }
                    }
                    *last = o;
                }
            }
        }
        *rng = local;
    }

    /// One connection: returns its outcome index.
    #[inline]
    fn connection(&mut self, rng: &mut Xoshiro256PlusPlus, client: usize) -> u32 {
        let prog = self.prog;
        let instrs = &prog.instrs[..];
        let mut pc = 0usize;
        let mut ps = 0u32;
        let mut marks = Marks::default();
        let mut evaluations = 0u64;
        let mut draws = 0u64;
        // The call stack: `stack[..sp]`; its length is the graph's depth + 1, so that a
        // jump may write its return point before knowing whether it is taken.
        let stack = &mut self.stack[..];
        let mut sp = 0usize;
        macro_rules! back {
            () => {
                if sp == 0 {
                    break prog.end_outcome(marks.nf, marks.mask);
                }
                sp -= 1;
                pc = stack[sp] as usize;
            };
        }
        macro_rules! draw {
            ($ins:expr, $threshold:expr, $inverted:expr) => {{
                draws += 1;
                ps = $ins.dec.state_after(ps);
                random_match(rng.next_u32(), $threshold, $inverted)
            }};
        }
        let outcome = 'walk: loop {
            let ins = &instrs[pc];
            evaluations += u64::from(ins.cost);
            match ins.op {
                Op::RandomJump {
                    mut threshold,
                    mut inverted,
                    mut to,
                } => {
                    // A cascade: run consecutive random jumps in this tight loop. "No match"
                    // is a branch (well predicted in long cascades), not a conditional move,
                    // so that the next draws can start early.
                    let mut ins = ins;
                    loop {
                        if draw!(ins, threshold, inverted) {
                            stack[sp] = pc as u32 + 1;
                            sp += 1;
                            pc = to as usize;
                            break;
                        }
                        pc += 1;
                        let next = &instrs[pc];
                        let Op::RandomJump {
                            threshold: t,
                            inverted: i,
                            to: o,
                        } = next.op
                        else {
                            // The outer loop fetches it (and counts it).
                            break;
                        };
                        evaluations += u64::from(next.cost);
                        ins = next;
                        (threshold, inverted, to) = (t, i, o);
                    }
                }
                Op::RandomGoto {
                    threshold,
                    inverted,
                    to,
                } => {
                    let m = draw!(ins, threshold, inverted);
                    pc = if m { to as usize } else { pc + 1 };
                }
                Op::RandomReturn {
                    threshold,
                    inverted,
                } => {
                    if draw!(ins, threshold, inverted) {
                        back!();
                    } else {
                        pc += 1;
                    }
                }
                Op::RandomTerminal {
                    mut threshold,
                    mut inverted,
                    mut outcome,
                } => {
                    // The same tight loop for a cascade whose rules lead straight to verdicts.
                    let mut ins = ins;
                    loop {
                        if draw!(ins, threshold, inverted) {
                            evaluations += u64::from(ins.hit_cost);
                            break 'walk outcome;
                        }
                        pc += 1;
                        let next = &instrs[pc];
                        let Op::RandomTerminal {
                            threshold: t,
                            inverted: i,
                            outcome: o,
                        } = next.op
                        else {
                            break;
                        };
                        evaluations += u64::from(next.cost);
                        ins = next;
                        (threshold, inverted, outcome) = (t, i, o);
                    }
                }
                Op::RandomMark {
                    threshold,
                    inverted,
                    start,
                    len,
                } => {
                    if draw!(ins, threshold, inverted) {
                        marks.apply_all(&prog.mark_ops[start as usize..(start + len) as usize]);
                    }
                    pc += 1;
                }
                Op::Jump(to) => {
                    ps = ins.dec.state_after(ps);
                    stack[sp] = pc as u32 + 1;
                    sp += 1;
                    pc = to as usize;
                }
                Op::Goto(to) => {
                    ps = ins.dec.state_after(ps);
                    pc = to as usize;
                }
                Op::Return => {
                    ps = ins.dec.state_after(ps);
                    back!();
                }
                Op::End => {
                    back!();
                }
                Op::Terminal(o) => break o,
                Op::Mark { start, len } => {
                    ps = ins.dec.state_after(ps);
                    marks.apply_all(&prog.mark_ops[start as usize..(start + len) as usize]);
                    pc += 1;
                }
                Op::General => {
                    if !general(
                        prog,
                        &mut self.dynamic,
                        ins,
                        &mut ps,
                        rng,
                        client,
                        &marks,
                        &mut draws,
                    ) {
                        pc += 1;
                        continue;
                    }
                    match ins.target {
                        Tgt::Jump(to) => {
                            stack[sp] = pc as u32 + 1;
                            sp += 1;
                            pc = to as usize;
                        }
                        Tgt::Goto(to) => pc = to as usize,
                        Tgt::Return | Tgt::End => {
                            back!();
                        }
                        Tgt::Terminal(o) => break o,
                        Tgt::Mark { start, len } => {
                            marks.apply_all(&prog.mark_ops[start as usize..(start + len) as usize]);
                            pc += 1;
                        }
                    }
                }
            }
        };
        self.acc.evaluations += evaluations;
        self.acc.draws += draws;
        outcome
    }
}

/// A rule in the general form: looks up the fixed decision for packet state `ps`,
/// evaluates the runtime matches it reaches in order, and updates `ps`. Returns
/// whether the rule matched.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn general(
    prog: &Program,
    dynamic: &mut Dynamic,
    ins: &Instr,
    ps: &mut u32,
    rng: &mut Xoshiro256PlusPlus,
    client: usize,
    marks: &Marks,
    draws: &mut u64,
) -> bool {
    let d = if ins.multi_len == 0 {
        ins.dec
    } else {
        prog.lookup(ins, *ps)
    };
    let mut keep_binding = d.pass;
    let start = ins.rt_start as usize;
    for &rt in &prog.rt[start..start + usize::from(d.reach)] {
        let m = match rt {
            Rt::Random {
                threshold,
                inverted,
            } => {
                *draws += 1;
                random_match(rng.next_u32(), threshold, inverted)
            }
            Rt::Nth {
                counter,
                last,
                inverted,
            } => {
                let c = &mut dynamic.nth[counter as usize];
                *c = if *c == last { 0 } else { *c + 1 };
                (*c == 0) != inverted
            }
            Rt::Mark {
                ct,
                value,
                mask,
                negated,
            } => {
                let m = if ct { marks.ct } else { marks.nf };
                let r = ((m & mask) == value) != negated;
                keep_binding &= r;
                r
            }
            Rt::Recent {
                op,
                table,
                dest,
                hits,
                inverted,
            } => {
                let slot = if dest {
                    &mut dynamic.recent_dst[table as usize]
                } else {
                    &mut dynamic.recent_src[table as usize * dynamic.per_table + client]
                };
                let r = recent(slot, op, hits, inverted);
                keep_binding &= r;
                r
            }
        };
        if !m {
            if keep_binding {
                // Only a statistic match failed: the evaluator's non-matching branch
                // keeps the rule's bindings.
                *ps = d.state_after(*ps);
            }
            return false;
        }
    }
    if d.pass {
        *ps = d.state_after(*ps);
    }
    d.pass
}

/// A connection's marks: nfmark, ctmark, and the OR of the masks MARK targets used.
#[derive(Debug, Clone, Copy, Default)]
struct Marks {
    nf: u32,
    ct: u32,
    mask: u32,
}

impl Marks {
    #[inline]
    fn apply_all(&mut self, ops: &[MarkOp]) {
        for &op in ops {
            self.apply(op);
        }
    }

    /// A `MARK` / `CONNMARK` operation, exactly as the evaluator applies it.
    #[inline]
    fn apply(&mut self, op: MarkOp) {
        match op {
            MarkOp::NfXset { value, mask } => {
                self.nf = (self.nf & !mask) ^ value;
                self.mask |= mask;
            }
            MarkOp::NfSet { value, mask } => {
                self.nf = (self.nf & !mask) | value;
                self.mask |= mask;
            }
            MarkOp::NfAnd(x) => {
                self.nf &= x;
                self.mask |= !x;
            }
            MarkOp::NfOr(x) => {
                self.nf |= x;
                self.mask |= x;
            }
            MarkOp::NfXor(x) => {
                self.nf ^= x;
                self.mask |= x;
            }
            MarkOp::CtXset { value, mask } => self.ct = (self.ct & !mask) ^ value,
            MarkOp::CtSet { value, mask } => self.ct = (self.ct & !mask) | value,
            MarkOp::Restore { nfmask, ctmask } => {
                let new = (self.nf & !nfmask) | (self.ct & ctmask);
                if new != self.nf {
                    self.mask |= nfmask;
                }
                self.nf = new;
            }
            MarkOp::Save { nfmask, ctmask } => {
                self.ct = (self.ct & !ctmask) | (self.nf & nfmask);
            }
        }
    }
}

impl Program {
    #[cold]
    fn lookup(&self, ins: &Instr, ps: u32) -> Decision {
        let s = ins.multi_start as usize;
        let table = &self.decisions[s..s + ins.multi_len as usize];
        match table.binary_search_by_key(&ps, |&(state, _)| state) {
            Ok(i) => table[i].1,
            // Unreachable: compilation enumerates every state that reaches a rule.
            Err(_) => Decision {
                reach: 0,
                pass: false,
                next: ps,
            },
        }
    }

    fn end_outcome(&self, nfmark: u32, mark_mask: u32) -> u32 {
        if mark_mask == 0 {
            return self.unmatched_index();
        }
        match self
            .mark_outcomes
            .binary_search_by_key(&(nfmark, mark_mask), |&(k, _)| k)
        {
            Ok(i) => self.mark_outcomes[i].1,
            Err(_) => self.other_index(),
        }
    }
}

/// `xt_statistic` random mode: `(get_random_u32() & 0x7FFFFFFF) < probability`, inverted
/// by `!`.
#[inline(always)]
fn random_match(draw: u32, threshold: u32, inverted: bool) -> bool {
    ((draw & 0x7FFF_FFFF) < threshold) != inverted
}

/// `xt_recent` on one record (0: none; otherwise the number of time stamps).
#[inline]
fn recent(slot: &mut u8, op: RecentOp, hits: u8, inverted: bool) -> bool {
    let stamps = *slot;
    match op {
        RecentOp::Set => {
            *slot = stamps.saturating_add(1).min(RECENT_STAMPS);
            !inverted
        }
        _ if stamps == 0 => inverted,
        RecentOp::Remove => {
            *slot = 0;
            !inverted
        }
        RecentOp::Check | RecentOp::Update => {
            let r = (stamps >= hits.max(1)) != inverted;
            if op == RecentOp::Update && r {
                *slot = stamps.saturating_add(1).min(RECENT_STAMPS);
            }
            r
        }
    }
}

/// A uniform number in `0..k` (k >= 1) from `next_u64`: Lemire's multiply-shift with
/// rejection of the biased low range.
#[inline]
fn uniform(rng: &mut Xoshiro256PlusPlus, k: u64) -> u64 {
    let mut m = u128::from(rng.next_u64()) * u128::from(k);
    if (m as u64) < k {
        let t = k.wrapping_neg() % k;
        while (m as u64) < t {
            m = u128::from(rng.next_u64()) * u128::from(k);
        }
    }
    (m >> 64) as u64
}

// ---------------------------------------------------------------------------------------
// Compilation.
//
// A balancer's reachable part is small (a kube-proxy service: one chain with k statistic
// jumps to k endpoint chains of 2 rules), so the compiler keeps everything in a few flat
// vectors indexed by *local* numbers: chains in the order first entered, their rules'
// slots one after the other, packet states in the order first met. Small look-ups
// (chain to local number, packet to state) are linear scans until there are more than
// [`FEW`] entries, then hash maps.

/// Up to this many chains or packet states, look-ups are linear scans.
const FEW: usize = 8;

/// "None" in the compiler's `u32` indices.
const NONE: u32 = u32::MAX;

/// One condition of a rule, in the order the kernel checks them. Options are named by
/// their place in the rule, which the compiler keeps once read.
#[derive(Debug, Clone, Copy)]
enum Cond {
    /// `-s -d -p -i -o -f`: `rule.core[i]`.
    Core(u32),
    /// An option of a match decided from the packet: `rule.matches[m].options[o]`.
    Static(u32, u32),
    /// Always passes (a statistic match the evaluator ignores, recent bookkeeping, …).
    Pass,
    /// Cannot be decided: assumed to match (not on mark-only rules).
    Undecided,
    /// Decided per connection.
    Runtime(Rt),
    /// `-p P` of a rule whose first reading kept it with the DNAT destination (see
    /// [`crate::model::RuleLine::dnat`]): the rule is not read again.
    Proto(&'static str),
}

/// A rule's decisions, one per packet state that reaches it, by state. Most rules are
/// reached in one state only: that one is kept inline.
#[derive(Debug, Default)]
struct Decisions {
    /// The only decision while `many` is empty.
    one: Option<(u32, Decision)>,
    /// All of them, sorted by state, once there are two or more.
    many: Vec<(u32, Decision)>,
}

impl Decisions {
    fn get(&self, x: u32) -> Option<Decision> {
        if self.many.is_empty() {
            self.one.filter(|&(s, _)| s == x).map(|(_, d)| d)
        } else {
            self.many
                .binary_search_by_key(&x, |&(s, _)| s)
                .ok()
                .map(|i| self.many[i].1)
        }
    }

    /// Adds the decision for state `x` (not there yet).
    fn insert(&mut self, x: u32, d: Decision) {
        if self.many.is_empty() {
            match self.one.take() {
                None => {
                    self.one = Some((x, d));
                    return;
                }
                Some(first) => self.many.push(first),
            }
        }
        let i = self.many.partition_point(|&(s, _)| s < x);
        self.many.insert(i, (x, d));
    }

    /// All decisions, sorted by state.
    fn as_slice(&self) -> &[(u32, Decision)] {
        if self.many.is_empty() {
            self.one.as_slice()
        } else {
            &self.many
        }
    }
}

/// What the compiler knows of one rule of a chain entered.
#[derive(Debug)]
struct Slot {
    decisions: Decisions,
    /// Its conditions: `conds[cond_start..cond_start + cond_len]` (`cond_len == NONE`:
    /// not worked out yet).
    cond_start: u32,
    cond_len: u32,
    /// The rule read again: `rules[rule]` (`NONE`: not read).
    rule: u32,
    /// Does it get an instruction (reached, and it can do something)? Set by the layout.
    emitted: bool,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            decisions: Decisions::default(),
            cond_start: 0,
            cond_len: NONE,
            rule: NONE,
            emitted: false,
        }
    }
}

/// A chain entered by the walk.
#[derive(Debug)]
struct Entered {
    /// Its index in the table.
    chain: usize,
    /// Rule `r`'s slot is `slots[slot + r]`.
    slot: usize,
    rules: usize,
    /// The first entry state explored, with the states in which the chain is then left
    /// (`exit_sets[start..start + len]`); entries in other states are in `memo_more`.
    memo: Option<(u32, u32, u32)>,
    /// The layout: the program counter of its first instruction.
    pc: u32,
    /// The layout: the chains its instructions jump or go to, `calls[calls_start..calls_end]`.
    calls_start: usize,
    calls_end: usize,
    /// Deepest call stack below it (`usize::MAX`: not known yet).
    depth: usize,
}

/// One chain being walked by `Compiler::explore`. Its state sets are sorted and
/// deduplicated when they are read (`cur`, the exits); `next` and `exits` collect.
struct Frame {
    /// Local number of the chain.
    chain: usize,
    /// The entry state.
    state: u32,
    /// The rule being decided, for the states `cur[k..]`.
    rule: usize,
    cur: Vec<u32>,
    k: usize,
    /// States reaching the next rule.
    next: Vec<u32>,
    /// States in which the chain is left by RETURN (or, through a goto, by the end of
    /// another chain).
    exits: Vec<u32>,
}

/// The compiler's work space. Each thread keeps one from a balancer to the next (see
/// [`Program::compile`]), so that compiling a small balancer allocates little more than
/// its program.
#[derive(Default)]
struct Work {
    /// Packet states in the order first met (state 0: the balancer's packet).
    states: Vec<Packet>,
    /// `states` by value, once there are more than `FEW`.
    state_ix: HashMap<Packet, u32>,
    /// Work space of `decide`, so that deciding a rule does not allocate.
    scratch: Packet,
    before: Packet,
    /// Chains in the order first entered: local number `i` is `chains[i]`.
    chains: Vec<Entered>,
    /// Local numbers by chain, once there are more than `FEW` chains.
    chain_ix: HashMap<usize, u32>,
    /// Per chain entered, per rule.
    slots: Vec<Slot>,
    conds: Vec<Cond>,
    /// Exit state sets of explored (chain, entry state) pairs, one after the other.
    exit_sets: Vec<u32>,
    /// (local chain, entry state) -> `(start, len)` in `exit_sets`, for entries other
    /// than each chain's first (`Entered::memo`).
    memo_more: HashMap<(u32, u32), (u32, u32)>,
    /// The frames of `explore`, and state set buffers of finished ones for new ones.
    frames: Vec<Frame>,
    spare: Vec<Vec<u32>>,
    /// Chains entered that instructions jump (`false`) or go (`true`) to, chain after
    /// chain (`Entered::calls_start`), and the walk of `depth` over them: (local chain,
    /// next call, deepest so far).
    calls: Vec<(usize, bool)>,
    depth_stack: Vec<(usize, usize, usize)>,
    /// `fuse_fixed_paths`' memo and stack.
    paths: Vec<Option<Path>>,
    path_stack: Vec<usize>,
}

/// A work space that grew past this many slots, states or chains is dropped after its
/// balancer rather than kept by its thread.
const KEEP_WORK: usize = 1 << 14;

impl Work {
    /// Empties the work space for a balancer whose packet is `packet` (state 0).
    fn start(&mut self, packet: &Packet) {
        // State 0 reuses the strings of the last balancer's.
        self.states.truncate(1);
        match self.states.first_mut() {
            Some(s) => s.clone_from(packet),
            None => self.states.push(packet.clone()),
        }
        self.state_ix.clear();
        self.chains.clear();
        self.chain_ix.clear();
        self.slots.clear();
        self.conds.clear();
        self.exit_sets.clear();
        self.memo_more.clear();
        for f in self.frames.drain(..) {
            self.spare.extend([f.cur, f.next, f.exits]);
        }
        self.calls.clear();
        self.depth_stack.clear();
    }

    /// Too large to keep?
    fn large(&self) -> bool {
        self.slots.capacity() > KEEP_WORK
            || self.states.len() > KEEP_WORK
            || self.chains.capacity() > KEEP_WORK
            || self.conds.capacity() > KEEP_WORK
            || self.exit_sets.capacity() > KEEP_WORK
            || self.paths.capacity() > KEEP_WORK
            || self.spare.len() > KEEP_WORK
    }
}

thread_local! {
    static WORK: std::cell::RefCell<Work> = std::cell::RefCell::new(Work::default());
}

struct Compiler<'g, 'r, 'a, 'w> {
    graph: &'g Graph<'r, 'a>,
    tg: &'g TableGraph,
    balancer: &'g Balancer,
    table: usize,
    w: &'w mut Work,
    /// Rules read again (the ruleset keeps only their text), each once.
    rules: Vec<Rule<'a>>,
    nth_init: Vec<u32>,
    recent: RecentTables,
    /// Endpoint index by outcome (the first endpoint with it), built when a large
    /// balancer first needs it.
    endpoint_ix: Option<HashMap<&'g Outcome, u32>>,
}

/// The conditions of `rule` in the kernel's order, appended to `conds`; nth counters
/// and recent tables are numbered here.
fn rule_conds(
    rule: &Rule<'_>,
    conds: &mut Vec<Cond>,
    nth_init: &mut Vec<u32>,
    recent: &mut RecentTables,
) {
    for i in 0..rule.core.len() {
        conds.push(Cond::Core(i as u32));
    }
    for (mi, m) in rule.matches.iter().enumerate() {
        match m.module {
            "statistic" => conds.push(match statistic::from_match(m) {
                Ok(Statistic::Random {
                    threshold,
                    inverted,
                }) => Cond::Runtime(Rt::Random {
                    threshold,
                    inverted,
                }),
                Ok(Statistic::Nth {
                    every,
                    packet,
                    inverted,
                }) => {
                    let counter = nth_init.len() as u32;
                    // iptables: every = N - 1, count = every - packet.
                    nth_init.push(every - 1 - packet);
                    Cond::Runtime(Rt::Nth {
                        counter,
                        last: every - 1,
                        inverted,
                    })
                }
                // The evaluator ignores an invalid statistic match (with a warning).
                Err(_) => Cond::Pass,
            }),
            "mark" | "connmark" => {
                for o in &m.options {
                    conds.push(match (o.name, eval::parse_mark(o.value())) {
                        ("mark", Some((value, mask))) => Cond::Runtime(Rt::Mark {
                            ct: m.module == "connmark",
                            value,
                            mask,
                            negated: o.negated,
                        }),
                        _ => Cond::Undecided,
                    });
                }
            }
            "recent" => conds.push(recent.cond(m)),
            _ => {
                for oi in 0..m.options.len() {
                    conds.push(Cond::Static(mi as u32, oi as u32));
                }
            }
        }
    }
}

/// The `-m recent` tables of a program, numbered in the order first named.
#[derive(Debug, Default)]
struct RecentTables {
    names: HashMap<String, u32>,
    has_rdest: bool,
}

impl RecentTables {
    fn cond(&mut self, m: &Match<'_>) -> Cond {
        let mut op = None;
        let mut name = "DEFAULT".to_string();
        let mut dest = false;
        let mut hits = 0u8;
        let mut unknown = false;
        for o in &m.options {
            match o.name {
                "set" => op = op.or(Some((RecentOp::Set, o.negated))),
                "rcheck" => op = op.or(Some((RecentOp::Check, o.negated))),
                "update" => op = op.or(Some((RecentOp::Update, o.negated))),
                "remove" => op = op.or(Some((RecentOp::Remove, o.negated))),
                "name" => name = o.value().to_string(),
                "rdest" => dest = true,
                "rsource" => dest = false,
                "hitcount" => hits = o.value().parse::<u8>().unwrap_or(0).min(RECENT_STAMPS),
                "seconds" | "reap" | "mask" | "rttl" => {}
                _ => unknown = true,
            }
        }
        let Some((op, inverted)) = op else {
            return if unknown { Cond::Undecided } else { Cond::Pass };
        };
        let next = self.names.len() as u32;
        let table = *self.names.entry(name).or_insert(next);
        self.has_rdest |= dest;
        Cond::Runtime(Rt::Recent {
            op,
            table,
            dest,
            hits,
            inverted,
        })
    }
}

impl<'g, 'r, 'a, 'w> Compiler<'g, 'r, 'a, 'w> {
    fn new(graph: &'g Graph<'r, 'a>, balancer: &'g Balancer, w: &'w mut Work) -> Self {
        let table = balancer.table_index;
        w.start(&balancer.packet);
        Compiler {
            graph,
            tg: &graph.tables[table],
            balancer,
            table,
            w,
            // A kube-proxy balancer reads one rule per endpoint (its DNAT).
            rules: Vec::with_capacity(balancer.endpoints.len().clamp(1, 1024)),
            nth_init: Vec::new(),
            recent: RecentTables::default(),
            endpoint_ix: None,
        }
    }

    /// The state number of packet `p` (a new one if it was not met before).
    fn intern(&mut self, p: &Packet) -> u32 {
        let found = if self.w.states.len() <= FEW {
            self.w.states.iter().position(|s| s == p).map(|i| i as u32)
        } else {
            self.w.state_ix.get(p).copied()
        };
        if let Some(i) = found {
            return i;
        }
        let i = self.w.states.len() as u32;
        self.w.states.push(p.clone());
        if self.w.states.len() > FEW {
            if self.w.state_ix.is_empty() {
                for (j, s) in self.w.states.iter().enumerate() {
                    self.w.state_ix.insert(s.clone(), j as u32);
                }
            } else {
                self.w.state_ix.insert(p.clone(), i);
            }
        }
        i
    }

    /// The local number of chain `c`, if it was entered.
    fn local(&self, c: usize) -> Option<usize> {
        if self.w.chains.len() <= FEW {
            self.w.chains.iter().position(|e| e.chain == c)
        } else {
            self.w.chain_ix.get(&c).map(|&l| l as usize)
        }
    }

    /// The local number of chain `c`, entering it (in the order first entered) if new.
    fn enter(&mut self, c: usize) -> usize {
        if let Some(l) = self.local(c) {
            return l;
        }
        let l = self.w.chains.len();
        let rules = self.graph.chain(self.table, c).rules.len();
        self.w.chains.push(Entered {
            chain: c,
            slot: self.w.slots.len(),
            rules,
            memo: None,
            pc: 0,
            calls_start: 0,
            calls_end: 0,
            depth: usize::MAX,
        });
        self.w
            .slots
            .extend(std::iter::repeat_with(Slot::new).take(rules));
        if self.w.chains.len() > FEW {
            if self.w.chain_ix.is_empty() {
                for (j, e) in self.w.chains.iter().enumerate() {
                    self.w.chain_ix.insert(e.chain, j as u32);
                }
            } else {
                self.w.chain_ix.insert(c, l as u32);
            }
        }
        l
    }

    /// The states in which chain `c` is left when entered in state `s`, if explored:
    /// `exit_sets[start..start + len]`.
    fn exits(&self, c: usize, s: u32) -> Option<(usize, usize)> {
        let l = self.local(c)?;
        match self.w.chains[l].memo {
            Some((state, start, len)) if state == s => Some((start as usize, len as usize)),
            Some(_) => self
                .w
                .memo_more
                .get(&(l as u32, s))
                .map(|&(start, len)| (start as usize, len as usize)),
            None => None,
        }
    }

    /// Records the exits (sorted, deduplicated) of local chain `l` entered in state `s`.
    fn memoize(&mut self, l: usize, s: u32, exits: &[u32]) {
        let start = self.w.exit_sets.len() as u32;
        self.w.exit_sets.extend_from_slice(exits);
        let len = exits.len() as u32;
        let e = &mut self.w.chains[l];
        if e.memo.is_none() {
            e.memo = Some((s, start, len));
        } else {
            self.w.memo_more.insert((l as u32, s), (start, len));
        }
    }

    /// A state set buffer, empty.
    fn buffer(&mut self) -> Vec<u32> {
        let mut v = self.w.spare.pop().unwrap_or_default();
        v.clear();
        v
    }

    /// Can this rule's target change the outcome? (The evaluator skips the others.)
    fn relevant(&self, target: TargetRef) -> bool {
        match target {
            TargetRef::None | TargetRef::Continue | TargetRef::Missing => false,
            TargetRef::Chain { chain, .. } => {
                self.tg.may_terminate[chain] || self.tg.may_mark[chain]
            }
            _ => true,
        }
    }

    fn mark_only(&self, target: TargetRef) -> bool {
        match target {
            TargetRef::Mark => true,
            TargetRef::Chain { chain, .. } => !self.tg.may_terminate[chain],
            _ => false,
        }
    }

    /// Rule `r` of chain `c` (slot `slot`) read again, once: its index in `rules`.
    fn read(&mut self, slot: usize, c: usize, r: usize) -> usize {
        if self.w.slots[slot].rule == NONE {
            let rule = self.graph.chain(self.table, c).rules[r].parse();
            self.w.slots[slot].rule = self.rules.len() as u32;
            self.rules.push(rule);
        }
        self.w.slots[slot].rule as usize
    }

    /// Works out the conditions of rule `r` of chain `c` (slot `slot`) in the kernel's
    /// order, once; runtime matches get their counters and tables here.
    fn conds(&mut self, slot: usize, c: usize, r: usize) {
        if self.w.slots[slot].cond_len != NONE {
            return;
        }
        let start = self.w.conds.len();
        // A rule that only chance decides, as its first reading found: no need to read
        // it again (its comments are conditions that always hold).
        let line = &self.graph.chain(self.table, c).rules[r];
        if let Some(fixed) = line.fixed_random() {
            if let Some((threshold, inverted)) = fixed {
                self.w.conds.push(Cond::Runtime(Rt::Random {
                    threshold,
                    inverted,
                }));
            }
        } else if let Some((proto, _)) = line.dnat() {
            // Nor a DNAT rule whose matches always match (comments, which are conditions
            // that always hold, and modules without options) and whose only core option
            // is `-p`, as its first reading found.
            self.w.conds.extend(proto.map(Cond::Proto));
        } else {
            let i = self.read(slot, c, r);
            rule_conds(
                &self.rules[i],
                &mut self.w.conds,
                &mut self.nth_init,
                &mut self.recent,
            );
        }
        let s = &mut self.w.slots[slot];
        s.cond_start = start as u32;
        s.cond_len = (self.w.conds.len() - start) as u32;
    }

    /// The fixed part of the conditions of the rule in slot `slot` (worked out) for
    /// packet state `x`, as the evaluator's `decide` does it (bindings are tentative
    /// until every fixed condition passed).
    fn decide(&mut self, slot: usize, x: u32, mark_only: bool) -> Decision {
        let w = &mut *self.w;
        let s = &w.slots[slot];
        let conds = &w.conds[s.cond_start as usize..(s.cond_start + s.cond_len) as usize];
        let fail = |reach| Decision {
            reach,
            pass: false,
            next: x,
        };
        // Only runtime matches and conditions that always pass: nothing to test, and
        // the packet stays as it is.
        if conds
            .iter()
            .all(|c| matches!(c, Cond::Pass | Cond::Runtime(_)))
        {
            let reach = conds
                .iter()
                .filter(|c| matches!(c, Cond::Runtime(_)))
                .count() as u16;
            return Decision {
                reach,
                pass: true,
                next: x,
            };
        }
        // Any other condition but `Proto` came from reading the rule.
        let rule = self.rules.get(s.rule as usize);
        let packet = &mut w.scratch;
        packet.clone_from(&w.states[x as usize]);
        let mut reach: u16 = 0;
        for cond in conds {
            let r = match *cond {
                Cond::Core(i) => {
                    let o = rule.and_then(|rule| rule.core.get(i as usize));
                    if mark_only {
                        w.before.clone_from(packet);
                    }
                    o.and_then(|o| core_test(o, packet))
                }
                Cond::Static(m, i) => {
                    let m = rule.and_then(|rule| rule.matches.get(m as usize));
                    let o = m.and_then(|m| Some((m.module, m.options.get(i as usize)?)));
                    if mark_only {
                        w.before.clone_from(packet);
                    }
                    o.and_then(|(module, o)| static_test(module, o, packet))
                }
                Cond::Proto(proto) => {
                    if mark_only {
                        w.before.clone_from(packet);
                    }
                    eval::core_test_parts("p", false, proto, packet)
                }
                Cond::Pass => Some(true),
                Cond::Undecided => None,
                Cond::Runtime(_) => {
                    reach += 1;
                    Some(true)
                }
            };
            // The evaluator: a rule that only sets marks never binds an open field
            // (kube-proxy's `-s <endpoint>/32 -j KUBE-MARK-MASQ` says nothing about who
            // connects); it does not apply.
            if mark_only
                && matches!(cond, Cond::Core(_) | Cond::Static(..) | Cond::Proto(_))
                && w.before != *packet
            {
                return fail(reach);
            }
            match r {
                Some(true) => {}
                Some(false) => return fail(reach),
                // The evaluator: a mark-only rule with an undecidable condition does not
                // apply; any other rule is assumed to match.
                None if mark_only => return fail(reach),
                None => {}
            }
        }
        let next = if w.scratch == w.states[x as usize] {
            x
        } else {
            let p = std::mem::take(&mut self.w.scratch);
            let next = self.intern(&p);
            self.w.scratch = p;
            next
        };
        Decision {
            reach,
            pass: true,
            next,
        }
    }

    /// The decision of rule `r` of chain `c` (slot `slot`) for state `x` (computed once).
    fn decision(&mut self, slot: usize, c: usize, r: usize, x: u32, mark_only: bool) -> Decision {
        if let Some(d) = self.w.slots[slot].decisions.get(x) {
            return d;
        }
        // As the evaluator (it fails before any runtime match).
        let d = if mark_only
            && eval::mark_rule_never_applies(
                &self.graph.chain(self.table, c).rules[r],
                &self.w.states[x as usize],
            ) {
            Decision {
                reach: 0,
                pass: false,
                next: x,
            }
        } else {
            self.conds(slot, c, r);
            self.decide(slot, x, mark_only)
        };
        self.w.slots[slot].decisions.insert(x, d);
        d
    }

    /// Enters chain `c` in state `s` (a new frame of `explore`).
    fn frame(&mut self, c: usize, s: u32) -> Frame {
        let chain = self.enter(c);
        let mut cur = self.buffer();
        cur.push(s);
        Frame {
            chain,
            state: s,
            rule: 0,
            cur,
            k: 0,
            next: self.buffer(),
            exits: self.buffer(),
        }
    }

    /// Walks every path from the start chain in the balancer's packet state, over sets of
    /// packet states: records each rule's decision for every state that reaches it, and
    /// for every (chain, entry state) the states in which the chain can be left (end of
    /// chain or RETURN). Iterative (an explicit stack of frames), so chains nested
    /// 100,000 deep are fine; memoized per (chain, entry state).
    fn explore(&mut self, start: usize) {
        let first = self.frame(start, 0);
        let mut stack = std::mem::take(&mut self.w.frames);
        stack.push(first);
        while let Some(f) = stack.last_mut() {
            let (c, slot0, rules) = {
                let e = &self.w.chains[f.chain];
                (e.chain, e.slot, e.rules)
            };
            if f.rule >= rules || (f.k == 0 && f.cur.is_empty()) {
                // Left by its end, in the states that reach it.
                let Frame {
                    chain,
                    state,
                    cur,
                    next,
                    mut exits,
                    ..
                } = stack.pop().expect("non-empty");
                exits.extend_from_slice(&cur);
                exits.sort_unstable();
                exits.dedup();
                self.memoize(chain, state, &exits);
                self.w.spare.extend([cur, next, exits]);
                continue;
            }
            let r = f.rule;
            if f.k == f.cur.len() {
                // Every state reaching rule r is done: on to the next rule.
                std::mem::swap(&mut f.cur, &mut f.next);
                f.next.clear();
                f.cur.sort_unstable();
                f.cur.dedup();
                f.k = 0;
                f.rule += 1;
                continue;
            }
            let target = self.tg.target(c, r);
            if !self.relevant(target) {
                f.next.extend_from_slice(&f.cur);
                f.k = f.cur.len();
                continue;
            }
            let x = f.cur[f.k];
            let mark_only = self.mark_only(target);
            let slot = slot0 + r;
            let d = self.decision(slot, c, r, x, mark_only);
            if !d.pass {
                f.next.push(x);
                f.k += 1;
                continue;
            }
            // The runtime matches may fail: a statistic failure keeps the bindings, a
            // mark or recent failure does not.
            let s = &self.w.slots[slot];
            for cond in &self.w.conds[s.cond_start as usize..(s.cond_start + s.cond_len) as usize] {
                if let Cond::Runtime(rt) = cond {
                    f.next.push(if rt.is_statistic() { d.next } else { x });
                }
            }
            match target {
                TargetRef::Chain { chain, goto } => {
                    let Some((start, len)) = self.exits(chain, d.next) else {
                        // Explore the callee first; this state is done when we are back.
                        let callee = self.frame(chain, d.next);
                        stack.push(callee);
                        continue;
                    };
                    let out = &self.w.exit_sets[start..start + len];
                    if goto {
                        f.exits.extend_from_slice(out);
                    } else {
                        f.next.extend_from_slice(out);
                    }
                }
                TargetRef::Return => f.exits.push(d.next),
                TargetRef::Mark => f.next.push(d.next),
                _ => {}
            }
            f.k += 1;
        }
        self.w.frames = stack;
    }

    /// The index of the first endpoint whose outcome is `o` (`other` if none).
    fn endpoint_index(&mut self, o: &Outcome, other: u32) -> u32 {
        let balancer: &'g Balancer = self.balancer;
        let endpoints = &balancer.endpoints;
        if endpoints.len() <= FEW {
            return endpoints
                .iter()
                .position(|e| e.outcome == *o)
                .map_or(other, |i| i as u32);
        }
        let ix = self.endpoint_ix.get_or_insert_with(|| {
            let mut ix = HashMap::default();
            ix.reserve(endpoints.len());
            for (i, e) in endpoints.iter().enumerate() {
                ix.entry(&e.outcome).or_insert(i as u32);
            }
            ix
        });
        ix.get(o).copied().unwrap_or(other)
    }

    /// Deepest call stack below the start chain (jumps push, gotos do not), by an
    /// iterative depth-first walk over the chains entered and the calls between them
    /// that the layout recorded (rules that get an instruction, in order).
    fn depth(&mut self) -> usize {
        let w = &mut *self.w;
        // The start chain is the first entered.
        let mut stack = std::mem::take(&mut w.depth_stack);
        stack.push((0, w.chains[0].calls_start, 0));
        while let Some(&(l, i, best)) = stack.last() {
            if i == w.chains[l].calls_end {
                w.chains[l].depth = best;
                stack.pop();
                continue;
            }
            let (callee, goto) = w.calls[i];
            let d = w.chains[callee].depth;
            if d == usize::MAX {
                stack.push((callee, w.chains[callee].calls_start, 0));
                continue;
            }
            *stack.last_mut().expect("non-empty") = (l, i + 1, best.max(d + usize::from(!goto)));
        }
        w.depth_stack = stack;
        w.chains[0].depth
    }

    fn compile(mut self) -> Program {
        let start = self.balancer.chain_index;
        self.explore(start);
        // Outcome indices.
        let endpoints = self.balancer.endpoints.len();
        let other = endpoints as u32 + 1;
        let mut mark_outcomes: Vec<((u32, u32), u32)> = self
            .balancer
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e.outcome {
                Outcome::Mark { value, mask } => Some(((value, mask), i as u32)),
                _ => None,
            })
            .collect();
        mark_outcomes.sort_unstable();
        // Layout: chains in the order first entered, each followed by its End; a rule
        // gets an instruction when it is reached and can do something.
        let mut pc = 0u32;
        for e in &mut self.w.chains {
            e.pc = pc;
            for s in &mut self.w.slots[e.slot..e.slot + e.rules] {
                s.emitted = s
                    .decisions
                    .as_slice()
                    .iter()
                    .any(|(_, d)| d.pass || d.reach > 0);
                pc += u32::from(s.emitted);
            }
            pc += 1;
        }
        let mut instrs = Vec::with_capacity(pc as usize);
        let mut decisions = Vec::new();
        let mut rt = Vec::new();
        let mut mark_ops = Vec::new();
        for l in 0..self.w.chains.len() {
            let (c, slot0, rules) = {
                let e = &self.w.chains[l];
                (e.chain, e.slot, e.rules)
            };
            let mut cost = 0u32;
            self.w.chains[l].calls_start = self.w.calls.len();
            for r in 0..rules {
                cost += 1;
                let slot = slot0 + r;
                let s = &self.w.slots[slot];
                if !s.emitted {
                    continue;
                }
                let dm = s.decisions.as_slice();
                let first = dm[0].1;
                let (dec, multi_start, multi_len) = if dm.len() == 1 {
                    (first, 0, 0)
                } else if dm
                    .iter()
                    .all(|&(x, d)| d.next == x && (d.reach, d.pass) == (first.reach, first.pass))
                {
                    // The same for every state, and binds nothing (KUBE-MARK-MASQ's rule
                    // reached from every endpoint's hairpin rule): no look-up needed.
                    (
                        Decision {
                            next: KEEP,
                            ..first
                        },
                        0,
                        0,
                    )
                } else {
                    let start = decisions.len() as u32;
                    decisions.extend_from_slice(dm);
                    (first, start, dm.len() as u32)
                };
                let rt_start = rt.len() as u32;
                if s.cond_len != NONE {
                    let conds =
                        &self.w.conds[s.cond_start as usize..(s.cond_start + s.cond_len) as usize];
                    rt.extend(conds.iter().filter_map(|k| match k {
                        Cond::Runtime(x) => Some(*x),
                        _ => None,
                    }));
                }
                let target = match self.tg.target(c, r) {
                    // A chain never entered belongs to a rule that never matches.
                    TargetRef::Chain { chain, goto } => {
                        let to = match self.local(chain) {
                            Some(callee) => {
                                self.w.calls.push((callee, goto));
                                self.w.chains[callee].pc
                            }
                            None => 0,
                        };
                        if goto { Tgt::Goto(to) } else { Tgt::Jump(to) }
                    }
                    TargetRef::Return => Tgt::Return,
                    TargetRef::Terminal => {
                        let line = &self.graph.chain(self.table, c).rules[r];
                        let o = match line.dnat() {
                            Some((_, to)) => eval::dnat_outcome(to),
                            None => {
                                let i = self.read(slot, c, r);
                                terminal_outcome(&self.rules[i])
                            }
                        };
                        Tgt::Terminal(self.endpoint_index(&o, other))
                    }
                    TargetRef::Mark => {
                        let i = self.read(slot, c, r);
                        let start = mark_ops.len() as u32;
                        mark_ops.extend(compile_mark(&self.rules[i]));
                        Tgt::Mark {
                            start,
                            len: mark_ops.len() as u32 - start,
                        }
                    }
                    // Not relevant, so never emitted.
                    TargetRef::None | TargetRef::Continue | TargetRef::Missing => Tgt::End,
                };
                let runtime = &rt[rt_start as usize..];
                let fixed = multi_len == 0 && dec.pass;
                let op = match (fixed, dec.reach, runtime.first(), target) {
                    (true, 0, _, Tgt::Jump(to)) => Op::Jump(to),
                    (true, 0, _, Tgt::Goto(to)) => Op::Goto(to),
                    (true, 0, _, Tgt::Return) => Op::Return,
                    (true, 0, _, Tgt::Terminal(o)) => Op::Terminal(o),
                    (true, 0, _, Tgt::Mark { start, len }) => Op::Mark { start, len },
                    (
                        true,
                        1,
                        Some(&Rt::Random {
                            threshold,
                            inverted,
                        }),
                        target,
                    ) if runtime.len() == 1 => match target {
                        Tgt::Jump(to) => Op::RandomJump {
                            threshold,
                            inverted,
                            to,
                        },
                        Tgt::Goto(to) => Op::RandomGoto {
                            threshold,
                            inverted,
                            to,
                        },
                        Tgt::Return => Op::RandomReturn {
                            threshold,
                            inverted,
                        },
                        Tgt::Terminal(outcome) => Op::RandomTerminal {
                            threshold,
                            inverted,
                            outcome,
                        },
                        Tgt::Mark { start, len } => Op::RandomMark {
                            threshold,
                            inverted,
                            start,
                            len,
                        },
                        Tgt::End => Op::General,
                    },
                    _ => Op::General,
                };
                instrs.push(Instr {
                    op,
                    dec,
                    multi_start,
                    multi_len,
                    rt_start,
                    cost,
                    hit_cost: 0,
                    target,
                });
                cost = 0;
            }
            instrs.push(Instr {
                op: Op::End,
                dec: Decision {
                    reach: 0,
                    pass: true,
                    next: 0,
                },
                multi_start: 0,
                multi_len: 0,
                rt_start: rt.len() as u32,
                cost,
                hit_cost: 0,
                target: Tgt::End,
            });
            self.w.chains[l].calls_end = self.w.calls.len();
        }
        fuse_fixed_paths(&mut instrs, &mut self.w.paths, &mut self.w.path_stack);
        let depth = self.depth();
        let has_recent = rt.iter().any(|x| matches!(x, Rt::Recent { .. }));
        if self.w.large() {
            *self.w = Work::default();
        }
        Program {
            instrs,
            decisions,
            rt,
            mark_ops,
            nth_init: self.nth_init,
            recent_tables: self.recent.names.len(),
            has_recent,
            has_rdest: self.recent.has_rdest,
            depth,
            mark_outcomes,
            endpoints,
        }
    }
}

/// Where the fixed instructions from a program counter lead (`fuse_fixed_paths`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// To this verdict, through this many rules.
    Verdict(u32, u32),
    /// Back to the caller of the current frame, through this many rules.
    Back(u32),
    /// To a runtime decision (or a mark outcome).
    Open,
}

/// Where instructions that always apply lead, without any runtime decision, to a
/// terminating target (a kube-proxy endpoint chain: hairpin rule, KUBE-MARK-MASQ and
/// its MARK rule, back, DNAT), replaces the first of them by that terminal outcome with
/// the summed rule count. Marks and bindings made on the way cannot matter after a
/// verdict, so the result is unchanged; only the dispatches are saved. `memo` and
/// `stack` are work space (their contents are replaced).
fn fuse_fixed_paths(instrs: &mut [Instr], memo: &mut Vec<Option<Path>>, stack: &mut Vec<usize>) {
    let n = instrs.len();
    memo.clear();
    memo.resize(n, None);
    // Iterative, with the dependencies (the callee's start, the next instruction) first:
    // the graph is acyclic, so this ends, and deep chains do not overflow the stack.
    stack.clear();
    for root in 0..n {
        if memo[root].is_some() {
            continue;
        }
        // Most instructions need nothing else: no walk for them.
        let cost = instrs[root].cost;
        memo[root] = match instrs[root].op {
            Op::Terminal(o) => Some(Path::Verdict(o, cost)),
            Op::Return | Op::End => Some(Path::Back(cost)),
            Op::Mark { .. } | Op::Goto(_) | Op::Jump(_) => None,
            _ => Some(Path::Open),
        };
        if memo[root].is_some() {
            continue;
        }
        stack.push(root);
        while let Some(&pc) = stack.last() {
            if memo[pc].is_some() {
                stack.pop();
                continue;
            }
            let cost = instrs[pc].cost;
            let then = |p: Option<Path>, more: u32| -> Option<Path> {
                Some(match p? {
                    Path::Verdict(o, c) => Path::Verdict(o, c.saturating_add(more)),
                    Path::Back(c) => Path::Back(c.saturating_add(more)),
                    Path::Open => Path::Open,
                })
            };
            let path = match instrs[pc].op {
                Op::Terminal(o) => Some(Path::Verdict(o, cost)),
                Op::Return | Op::End => Some(Path::Back(cost)),
                Op::Mark { .. } => then(memo[pc + 1], cost),
                Op::Goto(to) => then(memo[to as usize], cost),
                Op::Jump(to) => match memo[to as usize] {
                    None => None,
                    Some(Path::Back(c)) => then(memo[pc + 1], cost.saturating_add(c)),
                    callee => then(callee, cost),
                },
                _ => Some(Path::Open),
            };
            match path {
                Some(p) => memo[pc] = Some(p),
                None => {
                    // Needs a dependency first.
                    let dep = match instrs[pc].op {
                        Op::Mark { .. } => pc + 1,
                        Op::Goto(to) => to as usize,
                        Op::Jump(to) if memo[to as usize].is_none() => to as usize,
                        _ => pc + 1,
                    };
                    stack.push(dep);
                }
            }
        }
    }
    let verdict = |pc: usize| match memo[pc] {
        Some(Path::Verdict(o, c)) => Some((o, c)),
        _ => None,
    };
    for (pc, ins) in instrs.iter_mut().enumerate() {
        match ins.op {
            Op::Jump(_) | Op::Goto(_) | Op::Mark { .. } => {
                if let Some((o, c)) = verdict(pc) {
                    ins.op = Op::Terminal(o);
                    ins.cost = c;
                }
            }
            // Random jumps into such paths become random verdicts.
            Op::RandomJump {
                threshold,
                inverted,
                to,
            } => {
                if let Some((outcome, c)) = verdict(to as usize) {
                    ins.op = Op::RandomTerminal {
                        threshold,
                        inverted,
                        outcome,
                    };
                    ins.hit_cost = c;
                }
            }
            _ => {}
        }
    }
}

fn compile_mark(rule: &Rule<'_>) -> Vec<MarkOp> {
    let Some(target) = &rule.target else {
        return Vec::new();
    };
    let masks = || {
        let get = |n: &str| {
            target
                .opt(n)
                .and_then(|o| parse_u32(o.value()))
                .unwrap_or(u32::MAX)
        };
        (get("nfmask"), get("ctmask"))
    };
    let mut ops = Vec::new();
    for o in &target.options {
        let v = o.value();
        let op = match (target.name, o.name) {
            ("MARK", "set-xmark") => {
                eval::parse_mark(v).map(|(value, mask)| MarkOp::NfXset { value, mask })
            }
            ("MARK", "set-mark") => {
                eval::parse_mark(v).map(|(value, mask)| MarkOp::NfSet { value, mask })
            }
            ("MARK", "and-mark") => parse_u32(v).map(MarkOp::NfAnd),
            ("MARK", "or-mark") => parse_u32(v).map(MarkOp::NfOr),
            ("MARK", "xor-mark") => parse_u32(v).map(MarkOp::NfXor),
            ("CONNMARK", "set-xmark") => {
                eval::parse_mark(v).map(|(value, mask)| MarkOp::CtXset { value, mask })
            }
            ("CONNMARK", "set-mark") => {
                eval::parse_mark(v).map(|(value, mask)| MarkOp::CtSet { value, mask })
            }
            ("CONNMARK", "restore-mark") => {
                let (nfmask, ctmask) = masks();
                Some(MarkOp::Restore { nfmask, ctmask })
            }
            ("CONNMARK", "save-mark") => {
                let (nfmask, ctmask) = masks();
                Some(MarkOp::Save { nfmask, ctmask })
            }
            _ => None,
        };
        ops.extend(op);
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance;
    use crate::model::Ruleset;
    use crate::parse::{ParseOptions, parse};

    fn ruleset(text: &str) -> Ruleset<'_> {
        parse(text, &ParseOptions::default()).expect("parses")
    }

    /// Parses, builds the graph, finds the balancers, and runs `f` on them.
    fn with_balancers<T>(text: &str, f: impl FnOnce(&Graph<'_, '_>, &[Balancer]) -> T) -> T {
        let rs = ruleset(text);
        let graph = Graph::build(&rs, false).expect("graph");
        let balancers = balance::find(&graph);
        f(&graph, &balancers)
    }

    fn opts(connections: u64, seed: u64) -> SimOptions {
        SimOptions {
            connections,
            seed,
            clients: None,
        }
    }

    /// Index of the endpoint DNATting to `dest`.
    fn ep(b: &Balancer, dest: &str) -> usize {
        b.endpoints
            .iter()
            .position(|e| e.outcome == Outcome::Dnat(dest.to_string()))
            .unwrap_or_else(|| panic!("no endpoint {dest}"))
    }

    const ROUND_ROBIN: &str = "*nat
:PREROUTING ACCEPT [0:0]
:LB - [0:0]
-A PREROUTING -d 10.0.0.1/32 -p tcp -m tcp --dport 80 -j LB
-A LB -m statistic --mode nth --every 3 --packet 0 -j DNAT --to-destination 10.1.0.1:80
-A LB -m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 10.1.0.2:80
-A LB -j DNAT --to-destination 10.1.0.3:80
COMMIT
";

    #[test]
    fn nth_round_robin_is_exact() {
        with_balancers(ROUND_ROBIN, |g, bs| {
            assert_eq!(bs.len(), 1);
            let b = &bs[0];
            assert_eq!(b.endpoints.len(), 3);
            for k in [1u64, 7, 100_000] {
                let r = simulate(g, b, 0, &opts(3 * k, 1));
                assert_eq!(r.counts, vec![k; 3], "k = {k}");
                assert_eq!((r.unmatched, r.other, r.random_draws), (0, 0, 0));
                assert!(r.sequential);
            }
            // The order is round robin: 1, 2, 3, 1, 2, …
            for n in 1..=6u64 {
                let r = simulate(g, b, 0, &opts(n, 1));
                let want: Vec<u64> = (0..3u64).map(|i| (n + 2 - i) / 3).collect();
                assert_eq!(r.counts, want, "n = {n}");
            }
        });
    }

    /// The kernel's counters, written out plainly: per rule `(every, packet)`.
    fn kernel_nth(rules: &[(u32, u32)], connections: u64) -> (Vec<u64>, u64) {
        let mut count: Vec<u32> = rules.iter().map(|&(n, p)| n - 1 - p).collect();
        let mut hits = vec![0u64; rules.len()];
        let mut unmatched = 0;
        'conn: for _ in 0..connections {
            for (i, &(n, _)) in rules.iter().enumerate() {
                count[i] = if count[i] == n - 1 { 0 } else { count[i] + 1 };
                if count[i] == 0 {
                    hits[i] += 1;
                    continue 'conn;
                }
            }
            unmatched += 1;
        }
        (hits, unmatched)
    }

    #[test]
    fn nth_without_fallback_leaks_deterministically() {
        let text = "*nat
:PREROUTING ACCEPT [0:0]
:LB - [0:0]
-A PREROUTING -d 10.0.0.1/32 -j LB
-A LB -m statistic --mode nth --every 3 --packet 0 -j DNAT --to-destination 10.1.0.1:80
-A LB -m statistic --mode nth --every 3 --packet 1 -j DNAT --to-destination 10.1.0.2:80
-A LB -m statistic --mode nth --every 3 --packet 2 -j DNAT --to-destination 10.1.0.3:80
COMMIT
";
        with_balancers(text, |g, bs| {
            let b = &bs[0];
            let idx = [
                ep(b, "10.1.0.1:80"),
                ep(b, "10.1.0.2:80"),
                ep(b, "10.1.0.3:80"),
            ];
            // 27 connections: 9, 6, 4 and 8 unmatched (1/3, 2/9, 4/27, 8/27).
            let r = simulate(g, b, 0, &opts(27_000, 5));
            assert_eq!(idx.map(|i| r.counts[i]), [9_000, 6_000, 4_000]);
            assert_eq!(r.unmatched, 8_000);
            for n in [1u64, 2, 5, 10, 26, 100, 65_537, 200_003] {
                let r = simulate(g, b, 3, &opts(n, 9));
                let (hits, unmatched) = kernel_nth(&[(3, 0), (3, 1), (3, 2)], n);
                assert_eq!(idx.map(|i| r.counts[i]).to_vec(), hits, "n = {n}");
                assert_eq!(r.unmatched, unmatched);
                assert_eq!(r.other, 0);
                // Three rules per unmatched connection, 1..3 for the others.
                assert!(r.rule_evaluations >= n && r.rule_evaluations <= 3 * n);
            }
        });
    }

    const CASCADE_2: &str = "*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAA1 - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAA2 - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d 172.30.0.10/32 -p tcp -m comment --comment \"ns/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SVC-AAAAAAAAAAAAAAAA ! -s 10.244.0.0/16 -d 172.30.0.10/32 -p tcp -m comment --comment \"ns/web:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment \"ns/web:http -> 10.244.1.5:8080\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-AAAAAAAAAAAAAAA1
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment \"ns/web:http -> 10.244.2.6:8080\" -j KUBE-SEP-AAAAAAAAAAAAAAA2
-A KUBE-SEP-AAAAAAAAAAAAAAA1 -s 10.244.1.5/32 -m comment --comment \"ns/web:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-AAAAAAAAAAAAAAA1 -p tcp -m comment --comment \"ns/web:http\" -m tcp -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SEP-AAAAAAAAAAAAAAA2 -s 10.244.2.6/32 -m comment --comment \"ns/web:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-AAAAAAAAAAAAAAA2 -p tcp -m comment --comment \"ns/web:http\" -m tcp -j DNAT --to-destination 10.244.2.6:8080
COMMIT
";

    /// |count - n p| <= 5 sigma of the binomial.
    fn within_5_sigma(count: u64, n: u64, p: f64) -> bool {
        let mean = n as f64 * p;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        (count as f64 - mean).abs() <= 5.0 * sd.max(1.0)
    }

    #[test]
    fn half_cascade_is_binomial() {
        with_balancers(CASCADE_2, |g, bs| {
            assert_eq!(bs.len(), 1);
            let b = &bs[0];
            let n = 1_000_000;
            let r = simulate(g, b, 0, &opts(n, 42));
            assert_eq!(r.counts.iter().sum::<u64>(), n);
            assert_eq!((r.unmatched, r.other), (0, 0));
            assert!(!r.sequential);
            for &c in &r.counts {
                assert!(within_5_sigma(c, n, 0.5), "{:?}", r.counts);
            }
            // One draw per connection, at the single statistic rule.
            assert_eq!(r.random_draws, n);
            // KUBE-SVC: masq rule, statistic rule (+ the fallback rule for the second
            // endpoint); KUBE-SEP: the hairpin rule (mark-only, so it binds no source
            // and does not apply, as in the evaluator), then DNAT.
            let (c1, c2) = (
                r.counts[ep(b, "10.244.1.5:8080")],
                r.counts[ep(b, "10.244.2.6:8080")],
            );
            assert_eq!(r.rule_evaluations, 4 * c1 + 5 * c2);
        });
    }

    #[test]
    fn same_result_for_any_thread_count() {
        with_balancers(CASCADE_2, |g, bs| {
            // Five batches, the last one partial.
            let o = opts(4 * BATCH + 123, 7);
            let run = |threads: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool")
                    .install(|| (simulate(g, &bs[0], 3, &o), simulate_all(g, bs, &o)))
            };
            let (one, all_one) = run(1);
            let (two, all_two) = run(2);
            let (four, all_four) = run(4);
            assert_eq!(one, two);
            assert_eq!(one, four);
            assert_eq!(all_one, all_two);
            assert_eq!(all_one, all_four);
            assert_eq!(one.counts.iter().sum::<u64>(), o.connections);
            // simulate_all uses the slice index as balancer index.
            assert_eq!(all_one[0], simulate(g, &bs[0], 0, &o));
            // Another seed or balancer index gives other streams.
            assert_ne!(one.counts, simulate(g, &bs[0], 4, &o).counts);
            assert_ne!(
                one.counts,
                simulate(g, &bs[0], 3, &opts(o.connections, 8)).counts
            );
        });
    }

    #[test]
    fn threshold_zero_never_and_full_always() {
        let text = "*nat
:PREROUTING ACCEPT [0:0]
:LB - [0:0]
-A PREROUTING -j LB
-A LB -m statistic --mode random --probability 0 -j DNAT --to-destination 10.1.0.1:80
-A LB -m statistic --mode random ! --probability 1 -j DNAT --to-destination 10.1.0.2:80
-A LB -m statistic --mode random --probability 1 -j DNAT --to-destination 10.1.0.3:80
-A LB -j DNAT --to-destination 10.1.0.4:80
COMMIT
";
        with_balancers(text, |g, bs| {
            let b = &bs[0];
            let n = 300_000;
            let r = simulate(g, b, 0, &opts(n, 11));
            let count = |d: &str| {
                b.endpoints
                    .iter()
                    .position(|e| e.outcome == Outcome::Dnat(d.to_string()))
                    .map_or(0, |i| r.counts[i])
            };
            assert_eq!(count("10.1.0.1:80"), 0);
            assert_eq!(count("10.1.0.2:80"), 0);
            assert_eq!(count("10.1.0.3:80"), n);
            assert_eq!(count("10.1.0.4:80"), 0);
            assert_eq!((r.unmatched, r.other), (0, 0));
            assert_eq!(r.random_draws, 3 * n);
        });
        // The comparison itself, at the extremes of the 31-bit draw.
        for draw in [0u32, 1, 0x3FFF_FFFF, 0x7FFF_FFFF, 0x8000_0000, u32::MAX] {
            assert!(!random_match(draw, 0, false), "q = 0 never matches");
            assert!(random_match(draw, 0, true));
            assert!(
                random_match(draw, 1 << 31, false),
                "q = 2^31 always matches"
            );
            assert!(!random_match(draw, 1 << 31, true));
        }
        // The top bit is masked off: 0x8000_0000 is a draw of 0.
        assert!(random_match(0x8000_0000, 1, false));
        assert!(!random_match(0x7FFF_FFFF, 0x7FFF_FFFF, false));
        assert!(random_match(0x7FFF_FFFE, 0x7FFF_FFFF, false));
    }

    /// Every endpoint's count is within 5 sigma of its exact probability, and nothing
    /// falls outside the evaluator's outcomes.
    fn agrees_with_eval(g: &Graph<'_, '_>, bs: &[Balancer], n: u64, seed: u64) {
        for r in simulate_all(g, bs, &opts(n, seed)).iter().zip(bs) {
            let (r, b) = r;
            assert_eq!(r.other, 0, "{}", b.name);
            for (e, &c) in b.endpoints.iter().zip(&r.counts) {
                let p = e.prob.to_f64();
                assert!(
                    within_5_sigma(c, n, p),
                    "{} {}: {c} of {n}, p = {p}",
                    b.name,
                    e.outcome.label()
                );
            }
            let p = b.unmatched.to_f64();
            assert!(within_5_sigma(r.unmatched, n, p), "{}: unmatched", b.name);
        }
    }

    #[test]
    fn tree_with_goto_and_return_matches_eval() {
        let text = "*nat
:PREROUTING ACCEPT [0:0]
:LB - [0:0]
:A - [0:0]
:B - [0:0]
:C - [0:0]
-A PREROUTING -d 10.0.0.1/32 -j LB
-A LB -m statistic --mode random --probability 0.50000000000 -j A
-A LB -j B
-A LB -j DNAT --to-destination 10.1.0.3:80
-A A -m statistic --mode random --probability 0.25000000000 -g C
-A A -j DNAT --to-destination 10.1.0.1:80
-A B -m statistic --mode random ! --probability 0.75000000000 -j RETURN
-A B -j DNAT --to-destination 10.1.0.2:80
-A C -j LOG
-A C -j DNAT --to-destination 10.1.0.4:80
COMMIT
";
        with_balancers(text, |g, bs| {
            let lb = bs.iter().find(|b| b.chain == "LB").expect("LB");
            assert_eq!(lb.endpoints.len(), 4);
            agrees_with_eval(g, bs, 400_000, 3);
            let r = simulate(g, lb, 0, &opts(400_000, 3));
            let share = |d: &str| r.counts[ep(lb, d)] as f64 / 400_000.0;
            assert!((share("10.1.0.4:80") - 0.125).abs() < 0.005);
            assert!((share("10.1.0.3:80") - 0.125).abs() < 0.005);
        });
    }

    #[test]
    fn marks_are_outcomes() {
        let text = "*mangle
:PREROUTING ACCEPT [0:0]
:mwan3_policy_balanced - [0:0]
-A PREROUTING -i br-lan -j mwan3_policy_balanced
-A mwan3_policy_balanced -m mark --mark 0x0/0x3f00 -m statistic --mode random --probability 0.25000000000 -j MARK --set-xmark 0x100/0x3f00
-A mwan3_policy_balanced -m mark --mark 0x0/0x3f00 -m statistic --mode random --probability 0.33333333349 -j MARK --set-xmark 0x200/0x3f00
-A mwan3_policy_balanced -m mark --mark 0x0/0x3f00 -j MARK --set-xmark 0x300/0x3f00
COMMIT
";
        with_balancers(text, |g, bs| {
            let b = &bs[0];
            assert_eq!(b.endpoints.len(), 3);
            assert!(
                b.endpoints
                    .iter()
                    .all(|e| matches!(e.outcome, Outcome::Mark { .. }))
            );
            agrees_with_eval(g, bs, 400_000, 5);
            let r = simulate(g, b, 0, &opts(400_000, 5));
            assert_eq!(r.counts.iter().sum::<u64>(), 400_000);
            // Rules after the one that set the mark are traversed but fail their mark test.
            assert_eq!(r.rule_evaluations, 3 * 400_000);
        });
    }

    #[test]
    fn bindings_depend_on_the_path() {
        // SUB binds -s 10.0.0.1 (as the evaluator does) and half the time returns, so
        // LB's -s 10.0.0.2 rule cannot match afterwards; without SUB it binds 10.0.0.2
        // and matches. KUBE-MARK-MASQ-like mark-only rules bind nothing (and so do not
        // apply to an open source).
        let text = "*nat
:PREROUTING ACCEPT [0:0]
:LB - [0:0]
:SUB - [0:0]
:SUB2 - [0:0]
:MASQ - [0:0]
-A PREROUTING -j LB
-A LB -m statistic --mode random --probability 0.50000000000 -j SUB
-A LB -s 10.0.0.2/32 -j DNAT --to-destination 10.1.0.1:80
-A LB -j DNAT --to-destination 10.1.0.2:80
-A SUB -s 10.0.0.3/32 -j MASQ
-A SUB -s 10.0.0.1/32 -j SUB2
-A SUB2 -m statistic --mode random --probability 0.50000000000 -j RETURN
-A SUB2 -j DNAT --to-destination 10.1.0.3:80
-A MASQ -j MARK --set-xmark 0x4000/0x4000
COMMIT
";
        with_balancers(text, |g, bs| {
            let b = bs.iter().find(|b| b.chain == "LB").expect("LB");
            let prog = Program::compile(g, b);
            assert!(prog.instrs.iter().any(|i| i.multi_len == 2), "{prog:?}");
            agrees_with_eval(g, bs, 200_000, 1);
            let r = simulate(g, b, 0, &opts(200_000, 1));
            assert_eq!(b.endpoints.len(), 3);
            assert!(b.endpoints.iter().all(|e| e.outcome != Outcome::Unmatched));
            for (d, p) in [
                ("10.1.0.1:80", 0.5),
                ("10.1.0.2:80", 0.25),
                ("10.1.0.3:80", 0.25),
            ] {
                assert!(within_5_sigma(r.counts[ep(b, d)], 200_000, p), "{d}");
            }
        });
    }

    const AFFINITY: &str = "*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAA1 - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAA2 - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAA3 - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d 172.30.0.10/32 -p tcp -m comment --comment \"ns/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment \"ns/web:http -> 10.244.1.5:8080\" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-AAAAAAAAAAAAAAA1 --mask 255.255.255.255 --rsource -j KUBE-SEP-AAAAAAAAAAAAAAA1
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment \"ns/web:http -> 10.244.2.6:8080\" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-AAAAAAAAAAAAAAA2 --mask 255.255.255.255 --rsource -j KUBE-SEP-AAAAAAAAAAAAAAA2
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment \"ns/web:http -> 10.244.3.7:8080\" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-AAAAAAAAAAAAAAA3 --mask 255.255.255.255 --rsource -j KUBE-SEP-AAAAAAAAAAAAAAA3
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment \"ns/web:http -> 10.244.1.5:8080\" -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-AAAAAAAAAAAAAAA1
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment \"ns/web:http -> 10.244.2.6:8080\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-AAAAAAAAAAAAAAA2
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment \"ns/web:http -> 10.244.3.7:8080\" -j KUBE-SEP-AAAAAAAAAAAAAAA3
-A KUBE-SEP-AAAAAAAAAAAAAAA1 -s 10.244.1.5/32 -m comment --comment \"ns/web:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-AAAAAAAAAAAAAAA1 -p tcp -m comment --comment \"ns/web:http\" -m recent --set --name KUBE-SEP-AAAAAAAAAAAAAAA1 --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SEP-AAAAAAAAAAAAAAA2 -s 10.244.2.6/32 -m comment --comment \"ns/web:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-AAAAAAAAAAAAAAA2 -p tcp -m comment --comment \"ns/web:http\" -m recent --set --name KUBE-SEP-AAAAAAAAAAAAAAA2 --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.2.6:8080
-A KUBE-SEP-AAAAAAAAAAAAAAA3 -s 10.244.3.7/32 -m comment --comment \"ns/web:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-AAAAAAAAAAAAAAA3 -p tcp -m comment --comment \"ns/web:http\" -m recent --set --name KUBE-SEP-AAAAAAAAAAAAAAA3 --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.3.7:8080
COMMIT
";

    #[test]
    fn session_affinity_follows_clients() {
        with_balancers(AFFINITY, |g, bs| {
            let b = &bs[0];
            assert!(b.affinity.is_some());
            assert_eq!(b.endpoints.len(), 3);
            let n = 300_000;
            // New clients only: the plain cascade, in parallel.
            let r = simulate(g, b, 0, &opts(n, 2));
            assert!(!r.sequential);
            assert_eq!((r.unmatched, r.other), (0, 0));
            agrees_with_eval(g, bs, n, 2);
            assert_eq!(r.per_client_max_share, None);
            // One client: all its connections go where its first one went.
            let one = simulate(
                g,
                b,
                0,
                &SimOptions {
                    clients: Some(1),
                    ..opts(n, 2)
                },
            );
            assert!(one.sequential);
            assert_eq!(one.counts.iter().filter(|&&c| c > 0).count(), 1);
            assert_eq!(one.per_client_max_share, Some(1.0));
            assert_eq!(one.returning_connections, Some(n - 1));
            assert_eq!(one.same_outcome_connections, Some(n - 1));
            // Returning clients take the rcheck rules: no draws for them.
            assert!((1..=2).contains(&one.random_draws), "{}", one.random_draws);
            // Many clients: each sticks; loads follow the clients' first choices.
            let k = 1_000;
            let many = simulate(
                g,
                b,
                0,
                &SimOptions {
                    clients: Some(k),
                    ..opts(n, 2)
                },
            );
            assert_eq!(many.counts.iter().sum::<u64>(), n);
            assert_eq!(many.returning_connections, many.same_outcome_connections);
            assert!(many.returning_connections.unwrap() >= n - k);
            let share = many.per_client_max_share.unwrap();
            assert!(share > 1.0 / 3.0 && share < 0.5, "{share}");
            // Deterministic.
            assert_eq!(
                many,
                simulate(
                    g,
                    b,
                    0,
                    &SimOptions {
                        clients: Some(k),
                        ..opts(n, 2)
                    }
                )
            );
        });
    }

    #[test]
    fn recent_follows_xt_recent() {
        let mut slot = 0u8;
        assert!(!recent(&mut slot, RecentOp::Check, 0, false));
        assert!(recent(&mut slot, RecentOp::Check, 0, true));
        assert!(!recent(&mut slot, RecentOp::Remove, 0, false));
        assert!(recent(&mut slot, RecentOp::Set, 0, false));
        assert!(recent(&mut slot, RecentOp::Check, 0, false));
        assert!(!recent(&mut slot, RecentOp::Check, 2, false));
        assert!(!recent(&mut slot, RecentOp::Update, 2, false));
        assert!(recent(&mut slot, RecentOp::Update, 1, false));
        assert_eq!(slot, 2);
        assert!(recent(&mut slot, RecentOp::Check, 2, false));
        assert!(!recent(&mut slot, RecentOp::Set, 0, true));
        assert_eq!(slot, 3);
        for _ in 0..30 {
            recent(&mut slot, RecentOp::Set, 0, false);
        }
        assert_eq!(slot, RECENT_STAMPS);
        assert!(recent(&mut slot, RecentOp::Remove, 0, false));
        assert_eq!(slot, 0);
    }

    #[test]
    fn uniform_clients_are_uniform() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        let mut c = [0u64; 3];
        for _ in 0..300_000 {
            c[uniform(&mut rng, 3) as usize] += 1;
        }
        assert!(c.iter().all(|&x| within_5_sigma(x, 300_000, 1.0 / 3.0)));
        assert_eq!(uniform(&mut rng, 1), 0);
    }

    #[test]
    fn zero_connections() {
        with_balancers(CASCADE_2, |g, bs| {
            let r = simulate(g, &bs[0], 0, &opts(0, 0));
            assert_eq!(r.counts, vec![0, 0]);
            assert_eq!(r.rule_evaluations, 0);
        });
    }

    /// Every fixture dump: each balancer's simulated counts agree with the exact
    /// evaluator's probabilities, and no connection ends outside its outcomes.
    #[test]
    fn fixtures_agree_with_eval() {
        let mut checked = 0;
        for (path, text) in crate::testing::fixture_texts() {
            let lenient = ParseOptions { lenient: true };
            let Ok(rs) = parse(&text, &lenient) else {
                continue;
            };
            let Ok(graph) = Graph::build(&rs, true) else {
                continue;
            };
            let balancers = balance::find(&graph);
            let o = opts(20_000, 17);
            for (b, r) in balancers.iter().zip(simulate_all(&graph, &balancers, &o)) {
                let name = format!("{path}: {} ({})", b.name, b.chain);
                assert_eq!(r.other, 0, "{name}");
                assert_eq!(
                    r.counts.iter().sum::<u64>() + r.unmatched,
                    o.connections,
                    "{name}"
                );
                if b.endpoints.is_empty() && b.unmatched.is_zero() {
                    continue; // the evaluator gave up
                }
                for (e, &c) in b.endpoints.iter().zip(&r.counts) {
                    let p = e.prob.to_f64();
                    assert!(
                        within_5_sigma(c, o.connections, p),
                        "{name} {}: {c}, p = {p}",
                        e.outcome.label()
                    );
                }
                checked += 1;
            }
        }
        assert!(checked > 0);
    }

    #[test]
    fn chains_nested_100000_deep() {
        let n = 100_000;
        let mut text = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:LB - [0:0]\n");
        for i in 0..n {
            text.push_str(&format!(":C{i} - [0:0]\n"));
        }
        text.push_str("-A PREROUTING -j LB\n");
        text.push_str("-A LB -m statistic --mode random --probability 0.5 -j C0\n");
        text.push_str("-A LB -j DNAT --to-destination 10.0.0.2:80\n");
        for i in 0..n - 1 {
            text.push_str(&format!("-A C{i} -j C{}\n", i + 1));
        }
        text.push_str(&format!(
            "-A C{} -j DNAT --to-destination 10.0.0.1:80\nCOMMIT\n",
            n - 1
        ));
        with_balancers(&text, |g, bs| {
            let b = bs.iter().find(|b| b.chain == "LB").expect("LB");
            // In a rayon worker (small stack), as simulate_all runs it.
            let r = simulate_all(g, std::slice::from_ref(b), &opts(2_000, 4)).remove(0);
            let (c1, c2) = (
                r.counts[ep(b, "10.0.0.1:80")],
                r.counts[ep(b, "10.0.0.2:80")],
            );
            assert_eq!(c1 + c2, 2_000);
            assert!(within_5_sigma(c1, 2_000, 0.5));
            // LB's statistic rule, then 100,000 jumping rules down to the DNAT.
            assert_eq!(r.rule_evaluations, (1 + n) * c1 + 2 * c2);
            let prog = Program::compile(g, b);
            assert_eq!(prog.depth, n as usize);
        });
    }
}
