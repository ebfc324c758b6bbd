//! Parser for `iptables-save` / `ip6tables-save` output (legacy and nft, with or
//! without `-c`), `iptables -S` output (with or without `-v`) and grep fragments.
//!
//! The parser works line by line. Each line is read with nom parsers (`lex`, `line`)
//! into a table header, a chain declaration, a rule (`rule`), `COMMIT`, a comment or a
//! blank. A rule is checked in full (every error is found here) but kept as a
//! [`RuleLine`]: its text and a summary (target, flags); [`reparse`] reads its options
//! again when an analysis needs them. Consecutive rules of one chain are gathered into
//! one vector. A small state machine (`build`) then files these, in input order, into
//! tables and chains. Lines are independent, so large inputs are read by several
//! threads, each taking the next piece; the filing is sequential (in order, by the
//! thread that brings the piece due next) and the result the same for any number of
//! threads. Strings borrow from the input; only quoted strings with escapes are
//! copied.
//!
//! Forms recognised:
//! - `*table` … `COMMIT` blocks with `:CHAIN POLICY [p:b]` declarations ([`Format::Save`](crate::model::Format::Save));
//! - `-P CHAIN POLICY`, `-N CHAIN`, `-A CHAIN …` lines without a table ([`Format::Spec`](crate::model::Format::Spec));
//! - bare `-A` lines ([`Format::Fragment`](crate::model::Format::Fragment)). Without a table header the rules are put in
//!   one assumed table, `nat` or `filter` (see [`assumed_table`]), with a warning.

mod build;
mod decode;
mod fast;
mod lex;
mod line;
mod rule;
mod save;

#[cfg(test)]
mod proptests;

use rayon::prelude::*;

use crate::error::InputError;
use crate::model::{Rule, RuleLine, Ruleset, Table};

pub use decode::decode;
pub use save::to_save;

use build::Builder;
use line::{Item, Line, parse_line};
use rule::{LineCtx, Scratch};

/// Options for [`parse`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseOptions {
    /// Skip lines that cannot be parsed, with a warning for each, instead of failing.
    pub lenient: bool,
}

/// The table that rules without a header are assumed to be in: `nat` when any rule
/// has a NAT target, jumps to a kube-proxy service, endpoint or masquerade-mark chain,
/// or uses `-m statistic`; `filter` otherwise.
pub fn assumed_table(t: &Table<'_>) -> &'static str {
    let nat = t.chains.iter().flat_map(|c| &c.rules).any(|r| {
        r.statistic()
            || r.target().is_some_and(|t| {
                matches!(t.name, "DNAT" | "SNAT" | "MASQUERADE" | "REDIRECT")
                    || t.name.starts_with("KUBE-SVC-")
                    || t.name.starts_with("KUBE-SVL-")
                    || t.name.starts_with("KUBE-SEP-")
                    || t.name.starts_with("KUBE-MARK-MASQ")
            })
    });
    if nat { "nat" } else { "filter" }
}

/// Inputs at least this long are read by several threads (rayon's pool; set
/// `RAYON_NUM_THREADS=1` for one). The result does not depend on the number of threads.
const PARALLEL_MIN: usize = 1 << 20;

/// What a worker read from a stretch of lines, in order.
enum Entry<'a> {
    /// Consecutive rules of one chain.
    Rules {
        chain: &'a str,
        rules: Vec<RuleLine<'a>>,
        v6: bool,
    },
    /// Any other line, except blanks. For a chain declaration, `hash` is what the
    /// chain index files its name by ([`Builder::name_hash`]), worked out by the
    /// reading thread rather than by the sequential filing; 0 otherwise.
    Line {
        line: u32,
        item: Item<'a>,
        hash: u64,
    },
    /// A line that could not be read.
    Error(Box<InputError>),
}

/// Hands a run of consecutive rules of one chain to `sink`, in a vector of its exact
/// size.
fn flush_run<'a, E>(
    sink: &mut impl FnMut(Entry<'a>) -> Result<(), E>,
    run: &mut Vec<RuleLine<'a>>,
    chain: &'a str,
    v6: &mut bool,
) -> Result<(), E> {
    if run.is_empty() {
        return Ok(());
    }
    let mut rules = Vec::with_capacity(run.len());
    rules.append(run);
    sink(Entry::Rules {
        chain,
        rules,
        v6: std::mem::take(v6),
    })
}

/// Reads the lines of `text`, the first of which is line `first`, handing what it reads
/// to `sink` in order. Stops at the first error of `sink` (which decides whether a bad
/// line is fatal). Returns the number of lines read.
fn read_lines<'a, E>(
    text: &'a str,
    first: u32,
    sink: &mut impl FnMut(Entry<'a>) -> Result<(), E>,
) -> Result<u32, E> {
    let mut sc = Scratch::default();
    let mut run: Vec<RuleLine<'a>> = Vec::new();
    let mut chain_of_run: &'a str = "";
    let mut v6 = false;
    let mut no = first;
    for line in lines(text) {
        let read = match line::fast_line(line) {
            Some(line::Fast::Rule { chain, summary }) => {
                if chain_of_run != chain {
                    flush_run(sink, &mut run, chain_of_run, &mut v6)?;
                    chain_of_run = chain;
                }
                v6 |= summary.v6;
                run.push(summary.rule_line(no, line));
                no = no.saturating_add(1);
                continue;
            }
            Some(line::Fast::Item(item)) => Ok(Line::Other(item)),
            None => line::parse_line_nom(&LineCtx::new(line, no), &mut sc, false),
        };
        match read {
            Ok(Line::Other(Item::Blank)) => {}
            Ok(Line::Summary { chain, summary }) => {
                if chain_of_run != chain {
                    flush_run(sink, &mut run, chain_of_run, &mut v6)?;
                    chain_of_run = chain;
                }
                v6 |= summary.v6;
                run.push(summary.rule_line(no, line));
            }
            Ok(Line::Rule { chain, rule }) => {
                // (Not given when asking for summaries; kept for completeness.)
                if chain_of_run != chain {
                    flush_run(sink, &mut run, chain_of_run, &mut v6)?;
                    chain_of_run = chain;
                }
                v6 |= build::rule_is_v6(&rule);
                run.push(RuleLine::new(no, line, &rule));
            }
            Ok(Line::Other(item)) => {
                flush_run(sink, &mut run, chain_of_run, &mut v6)?;
                let hash = match &item {
                    Item::Decl { name, .. } => Builder::name_hash(name),
                    _ => 0,
                };
                sink(Entry::Line {
                    line: no,
                    item,
                    hash,
                })?;
            }
            Err(e) => {
                flush_run(sink, &mut run, chain_of_run, &mut v6)?;
                sink(Entry::Error(Box::new(e)))?;
            }
        }
        no = no.saturating_add(1);
    }
    flush_run(sink, &mut run, chain_of_run, &mut v6)?;
    Ok(no - first)
}

/// The lines of `text` as [`str::lines`] gives them (cut at line feeds, a carriage
/// return before a line feed removed, no empty line after a final line feed), the line
/// feeds found 64 bytes a step ([`lex::Newlines`]): a 60 MB dump has half a million
/// lines, and `str::lines` looks for each end a machine word at a time.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut feeds = lex::Newlines::new(bytes);
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        // (Cut at ASCII bytes: character boundaries.)
        let line = match feeds.next() {
            Some(end) => {
                let line = &text[start..end];
                start = end + 1;
                line.strip_suffix('\r').unwrap_or(line)
            }
            // The last line, without a line feed, keeps a carriage return.
            None => {
                let line = &text[start..];
                start = bytes.len();
                line
            }
        };
        Some(line)
    })
}

thread_local! {
    /// The fast path's buffers of [`reparse`] on this thread.
    static FAST: std::cell::RefCell<fast::FastBufs> = std::cell::RefCell::default();
}

/// `f` with this thread's fast-path buffers (`None` should they be in use already).
fn with_fast_bufs<T>(f: impl FnOnce(&mut fast::FastBufs) -> Option<T>) -> Option<T> {
    FAST.with(|bufs| f(&mut *bufs.try_borrow_mut().ok()?))
}

/// Reads line `no`, the text of a rule line that was read before without error, into
/// its [`Rule`]. (Should the text not read as a rule, which cannot happen for the text
/// of a [`RuleLine`], the rule is empty.)
pub fn reparse(text: &str, no: u32) -> Rule<'_> {
    let ctx = LineCtx::new(text, no);
    let fast = with_fast_bufs(|bufs| line::fast_rule_line(&ctx, bufs));
    if let Some(rule) = fast {
        return rule;
    }
    let mut sc = Scratch::take();
    let read = parse_line(&ctx, &mut sc, true);
    sc.give_back();
    match read {
        Ok(Line::Rule { rule, .. }) => rule,
        _ => {
            debug_assert!(false, "line {no} read differently the second time: {text}");
            Rule {
                line: no,
                counters: None,
                core: Vec::new(),
                matches: Vec::new(),
                target: None,
            }
        }
    }
}

/// Reads line `no`, the text of a rule line read before without error, into `rule` as
/// a [`LightRule`](crate::model::LightRule) when it is of that shape (what [`reparse`]
/// gives for it, read without allocating); `false` otherwise.
pub fn light_into<'a>(text: &'a str, no: u32, rule: &mut crate::model::LightRule<'a>) -> bool {
    line::fast_light(text, no, rule).is_some()
}

/// The comment of line `no`, the text of a rule line read before without error: what
/// `reparse(text, no).comment()` gives, mostly without building the rule.
pub fn rule_comment(text: &str, no: u32) -> Option<std::borrow::Cow<'_, str>> {
    let fast = line::fast_comment(text);
    match fast {
        Some(c) => c.map(std::borrow::Cow::Borrowed),
        None => reparse(text, no)
            .comment()
            .map(|c| std::borrow::Cow::Owned(c.to_string())),
    }
}

/// Files one entry.
fn apply<'a>(b: &mut Builder<'a>, e: Entry<'a>) -> Result<(), InputError> {
    match e {
        Entry::Rules { chain, rules, v6 } => b.rules(chain, rules, v6),
        Entry::Line { line, item, hash } => b.apply(item, line, hash),
        Entry::Error(e) => b.fail(*e),
    }
}

/// What a first quick look at a piece of text finds: its number of lines (as
/// `str::lines` counts them) and, for sizing the chain lists, the chain declarations
/// (`:CHAIN …`, `-N`, `-P` lines) before its first `*table` line and after each one.
struct Outline {
    lines: u32,
    decls: Vec<usize>,
}

fn outline(text: &str) -> Outline {
    let mut decls = vec![0usize];
    let mut count = 0usize;
    for line in lines(text) {
        count += 1;
        let body = line.as_bytes().trim_ascii_start();
        match body.first() {
            Some(b':') => *decls.last_mut().expect("non-empty") += 1,
            Some(b'*') => decls.push(0),
            Some(b'-') if body.starts_with(b"-N") || body.starts_with(b"-P") => {
                *decls.last_mut().expect("non-empty") += 1;
            }
            _ => {}
        }
    }
    Outline {
        lines: u32::try_from(count).unwrap_or(u32::MAX),
        decls,
    }
}

/// Cuts `bytes` into pieces that end after the first line feed at or past `size` bytes
/// into them (the last piece: at the end).
fn pieces_after_newlines(bytes: &[u8], size: usize) -> Vec<&[u8]> {
    let mut pieces = Vec::with_capacity(bytes.len() / size.max(1) + 1);
    let mut rest = bytes;
    while !rest.is_empty() {
        let cut = rest
            .get(size..)
            .and_then(|tail| tail.iter().position(|&b| b == b'\n'))
            .map_or(rest.len(), |p| size + p + 1);
        let (piece, tail) = rest.split_at(cut);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// Cuts `text` into about `n` pieces that end after a line feed.
fn split_lines(text: &str, n: usize) -> Vec<&str> {
    let mut rest = text;
    pieces_after_newlines(text.as_bytes(), text.len() / n.max(1) + 1)
        .into_iter()
        .map(|p| {
            // A piece ends after a line feed or at the end: a character boundary.
            let (piece, tail) = rest.split_at_checked(p.len()).unwrap_or((rest, ""));
            rest = tail;
            piece
        })
        .collect()
}

/// Parses iptables-save / `iptables -S` / fragment text into a [`Ruleset`].
///
/// Errors carry the line and column of the problem. With `opts.lenient`, lines that
/// cannot be read are skipped with a warning each; an input with nothing to read is an
/// error in both modes. Large inputs are read by several threads.
pub fn parse<'a>(text: &'a str, opts: &ParseOptions) -> Result<Ruleset<'a>, InputError> {
    let threads = rayon::current_num_threads();
    let pieces = if text.len() >= PARALLEL_MIN && threads > 1 {
        threads * 32
    } else {
        1
    };
    parse_in(text, opts, pieces)
}

/// [`parse`], reading the text in about `pieces` pieces in parallel.
fn parse_in<'a>(
    text: &'a str,
    opts: &ParseOptions,
    pieces: usize,
) -> Result<Ruleset<'a>, InputError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lenient = opts.lenient;
    if pieces <= 1 {
        // One thread: file each line as it is read.
        let mut b = Builder::new(lenient, Vec::new());
        let lines = read_lines(text, 1, &mut |e| apply(&mut b, e))?;
        return b.finish(lines);
    }
    let pieces = split_lines(text, pieces);
    let outlines: Vec<Outline> = pieces.par_iter().map(|p| outline(p)).collect();
    let mut firsts = Vec::with_capacity(pieces.len());
    let mut next: u32 = 1;
    // Declarations per table (the first entry: before any `*table` line), so that each
    // table's chain list is allocated once.
    let mut sizes = vec![0usize];
    for o in &outlines {
        firsts.push(next);
        next = next.saturating_add(o.lines);
        *sizes.last_mut().expect("non-empty") += o.decls[0];
        sizes.extend_from_slice(&o.decls[1..]);
    }
    let lines = next - 1;
    let b = Builder::new(lenient, sizes);
    // Each thread reads the next unread piece, in order, and leaves what it read for
    // the filing, which is sequential: the thread that brings the piece due next files
    // it and any read after it, while the other threads go on reading. Without
    // `lenient` a piece stops at its first bad line, which is all the filing can get
    // to; pieces read beyond a fatal error are dropped unfiled.
    let threads = rayon::current_num_threads().max(1);
    let filing = Filing::new(b, pieces.len(), threads);
    let read = |i: usize| -> Vec<Entry<'a>> {
        // About one entry per two lines where rules are (runs of one chain's rules are
        // one entry), and one per declaration: pieces of declarations would otherwise
        // grow their vector, copying it.
        let decls: usize = outlines[i].decls.iter().sum();
        let mut out = filing.spare_entries(outlines[i].lines as usize / 2 + decls);
        let _ = read_lines(pieces[i], firsts[i], &mut |e| {
            let fatal = !lenient && matches!(e, Entry::Error(_));
            out.push(e);
            if fatal { Err(()) } else { Ok(()) }
        });
        out
    };
    let work = || {
        while let Some(i) = filing.take_piece() {
            filing.deposit(i, read(i));
        }
    };
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| work());
        }
        work();
    });
    filing.finish(lines)
}

/// The sequential filing of [`parse_in`]'s pieces, fed by the threads that read them
/// (in any order) and done in order.
struct Filing<'a> {
    /// The next piece to be read.
    next_read: std::sync::atomic::AtomicUsize,
    /// Set when the filing failed: no more pieces are read.
    failed: std::sync::atomic::AtomicBool,
    /// What was read and not filed yet, by piece, and the next piece to file.
    read: std::sync::Mutex<(Vec<Option<Vec<Entry<'a>>>>, usize)>,
    /// Signalled when the filing takes a piece or fails.
    progress: std::sync::Condvar,
    /// How many pieces may be read beyond the next to file: a bound on what waits.
    ahead: usize,
    /// The builder, the next piece to file and the filing's error; held by the thread
    /// that files.
    filer: std::sync::Mutex<(Builder<'a>, usize, Result<(), InputError>)>,
    /// Filed pieces' vectors, emptied, for the next pieces to read into: a piece's
    /// entries take hundreds of kilobytes, and a fresh vector for each piece had its
    /// pages faulted in again once the allocator had handed the last ones back (about
    /// 2,300 of the 18,000 page faults of a run on the 60 MB benchmark dump).
    spare: std::sync::Mutex<Vec<Vec<Entry<'a>>>>,
}

impl<'a> Filing<'a> {
    fn new(b: Builder<'a>, pieces: usize, threads: usize) -> Self {
        Filing {
            next_read: 0.into(),
            failed: false.into(),
            read: std::sync::Mutex::new(((0..pieces).map(|_| None).collect(), 0)),
            progress: std::sync::Condvar::new(),
            ahead: threads,
            filer: std::sync::Mutex::new((b, 0, Ok(()))),
            spare: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// An empty vector with room for `n` entries, a filed piece's when one is spare.
    fn spare_entries(&self, n: usize) -> Vec<Entry<'a>> {
        let mut v = lock(&self.spare).pop().unwrap_or_default();
        v.reserve(n);
        v
    }

    /// The next piece to read, if any is left and the filing has not failed; waits
    /// while it is too far ahead of the filing (the reader of every piece before it
    /// goes on, so the filing does).
    fn take_piece(&self) -> Option<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        let i = self.next_read.fetch_add(1, Relaxed);
        let mut read = lock(&self.read);
        while !self.failed.load(Relaxed) && i < read.0.len() && i >= read.1 + self.ahead {
            read = (self.progress.wait(read)).unwrap_or_else(|e| e.into_inner());
        }
        (!self.failed.load(Relaxed) && i < read.0.len()).then_some(i)
    }

    /// Leaves piece `i`'s entries, then files every piece that is due, unless another
    /// thread is filing (it will file them).
    fn deposit(&self, i: usize, entries: Vec<Entry<'a>>) {
        lock(&self.read).0[i] = Some(entries);
        loop {
            let Ok(mut filer) = self.filer.try_lock() else {
                return;
            };
            let (b, next, result) = &mut *filer;
            while result.is_ok() {
                let mut entries = {
                    let mut read = lock(&self.read);
                    let Some(entries) = read.0.get_mut(*next).and_then(Option::take) else {
                        break;
                    };
                    *next += 1;
                    read.1 = *next;
                    entries
                };
                self.progress.notify_all();
                *result = file_entries(b, &mut entries);
                lock(&self.spare).push(entries);
            }
            if result.is_err() {
                let _read = lock(&self.read);
                self.failed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.progress.notify_all();
                return;
            }
            let due = *next;
            drop(filer);
            // A piece left while this thread held the filer found it busy: file it.
            if !lock(&self.read).0.get(due).is_some_and(Option::is_some) {
                return;
            }
        }
    }

    /// The ruleset, once every piece is read and filed (or the filing's error).
    fn finish(self, lines: u32) -> Result<Ruleset<'a>, InputError> {
        let (read, _) = self.read.into_inner().unwrap_or_else(|e| e.into_inner());
        let (mut b, next, result) = self.filer.into_inner().unwrap_or_else(|e| e.into_inner());
        result?;
        // (Every piece is filed by the thread that brought it or the filer then.)
        for mut entries in read.into_iter().skip(next).flatten() {
            file_entries(&mut b, &mut entries)?;
        }
        b.finish(lines)
    }
}

/// Files a piece's entries in order (leaving `entries` empty), each declaration's
/// place in the chain index asked for [`DECLS_AHEAD`] declarations before it is filed,
/// so that those cache misses overlap.
fn file_entries<'a>(b: &mut Builder<'a>, entries: &mut Vec<Entry<'a>>) -> Result<(), InputError> {
    let decl = |e: &Entry<'a>| match e {
        Entry::Line {
            item: Item::Decl { .. },
            hash,
            ..
        } => Some(*hash),
        _ => None,
    };
    let hashes: Vec<u64> = entries.iter().filter_map(decl).collect();
    for &hash in hashes.iter().take(DECLS_AHEAD) {
        b.prefetch_decl(hash);
    }
    let mut ahead = hashes.iter().skip(DECLS_AHEAD);
    // (Drained: the emptied vector is kept for another piece.)
    for e in entries.drain(..) {
        if decl(&e).is_some()
            && let Some(&hash) = ahead.next()
        {
            b.prefetch_decl(hash);
        }
        apply(b, e)?;
    }
    Ok(())
}

/// How many declarations ahead [`file_entries`] asks for their places.
const DECLS_AHEAD: usize = 8;

/// Locks `m`, whether or not another thread panicked holding it.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Do two rulesets have the same tables, chains and rules, ignoring line and column
/// numbers (declared or not still counts), the input format and the warnings?
pub fn same_rules(a: &Ruleset<'_>, b: &Ruleset<'_>) -> bool {
    a.tables.len() == b.tables.len()
        && a.tables.iter().zip(&b.tables).all(|(x, y)| {
            x.name == y.name
                && (x.line.is_none() || y.line.is_none() || x.committed == y.committed)
                && x.chains.len() == y.chains.len()
                && x.chains.iter().zip(&y.chains).all(|(c, d)| {
                    c.name == d.name
                        && c.policy == d.policy
                        && c.policy_counters == d.policy_counters
                        && c.declared_line.is_some() == d.declared_line.is_some()
                        && c.rules.len() == d.rules.len()
                        && c.rules
                            .iter()
                            .zip(&d.rules)
                            .all(|(r, s)| rules_equal(&r.parse(), &s.parse()))
                })
        })
}

/// Do two rules have the same counters, options and target, ignoring line and column
/// numbers?
pub fn rules_equal(a: &Rule<'_>, b: &Rule<'_>) -> bool {
    fn opts_eq(a: &[crate::model::Opt<'_>], b: &[crate::model::Opt<'_>]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.name == y.name && x.negated == y.negated && x.values == y.values)
    }
    {
        a.counters == b.counters
            && opts_eq(&a.core, &b.core)
            && a.matches.len() == b.matches.len()
            && a.matches.iter().zip(&b.matches).all(|(x, y)| {
                x.module == y.module && x.implicit == y.implicit && opts_eq(&x.options, &y.options)
            })
            && match (&a.target, &b.target) {
                (None, None) => true,
                (Some(x), Some(y)) => {
                    x.jump == y.jump && x.name == y.name && opts_eq(&x.options, &y.options)
                }
                _ => false,
            }
    }
}

#[cfg(test)]
mod tests;
