//! Lexical pieces of a line, written with nom: whitespace, words, quoted strings,
//! `[packets:bytes]` counters and numbers.
//!
//! Quoting follows iptables-restore (`add_param_to_argv` in iptables/xshared.c): a `"`
//! opens a quoted part anywhere in a token; inside it a backslash takes the next
//! character literally (`\"`, `\\`, `\'`); outside quotes a backslash is an ordinary
//! character. Tokens are separated by blanks.

use std::borrow::Cow;

use nom::bytes::complete::take_till;
use nom::character::complete::{anychar, char, digit1};
use nom::error::{ContextError, ErrorKind, ParseError};
use nom::{IResult, Parser};

use crate::model::Counters;

/// The parse error of the line parsers: where it happened and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PErr<'a> {
    /// The input at the point of failure (a suffix of the line).
    pub input: &'a str,
    /// What was expected there, in words.
    pub expected: &'static str,
    /// `context` was applied: outer contexts do not override the innermost one.
    pub has_context: bool,
}

impl<'a> ParseError<&'a str> for PErr<'a> {
    fn from_error_kind(input: &'a str, kind: ErrorKind) -> Self {
        PErr {
            input,
            expected: describe(kind),
            has_context: false,
        }
    }
    fn append(_: &'a str, _: ErrorKind, other: Self) -> Self {
        other
    }
}

/// What a failed nom parser was looking for, in words.
fn describe(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Char => "a particular character",
        ErrorKind::Digit => "a number",
        ErrorKind::Eof => "end of line",
        ErrorKind::Tag => "a keyword",
        ErrorKind::TakeTill1 | ErrorKind::TakeWhile1 => "a word",
        ErrorKind::Space | ErrorKind::MultiSpace => "a blank",
        _ => "something else",
    }
}

impl<'a> ContextError<&'a str> for PErr<'a> {
    fn add_context(input: &'a str, ctx: &'static str, other: Self) -> Self {
        if other.has_context {
            other
        } else {
            PErr {
                input: if other.input.is_empty() {
                    other.input
                } else {
                    input
                },
                expected: ctx,
                has_context: true,
            }
        }
    }
}

pub(crate) type PResult<'a, T> = IResult<&'a str, T, PErr<'a>>;

/// A fatal error at `input` (not retried by alternatives).
pub(crate) fn fail<'a, T>(input: &'a str, expected: &'static str) -> PResult<'a, T> {
    Err(nom::Err::Failure(PErr {
        input,
        expected,
        has_context: true,
    }))
}

/// Blanks between tokens. iptables-restore splits on space and tab; vertical tab,
/// form feed and a stray carriage return are treated as blanks too.
#[inline]
pub(crate) fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\x0b' | '\x0c')
}

#[inline]
pub(crate) fn is_blank_byte(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | 0x0b | 0x0c)
}

/// Scans bytes with nom (`&[u8]` input: a plain byte loop, no UTF-8 decoding) and
/// splits the `&str` at the first byte for which `stop` holds. Every `stop` used here
/// matches ASCII bytes only, so the split is on a character boundary.
#[inline]
fn split_till(i: &str, stop: impl Fn(u8) -> bool) -> (&str, &str) {
    let r: IResult<&[u8], &[u8], nom::error::Error<&[u8]>> = take_till(stop).parse(i.as_bytes());
    split_at(i, r.map_or(0, |(_, taken)| taken.len()))
}

/// `(rest, taken)` for the first `n` bytes of `i`.
#[inline]
fn split_at(i: &str, n: usize) -> (&str, &str) {
    match i.split_at_checked(n) {
        Some((taken, rest)) => (rest, taken),
        None => (i, ""),
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Bytes of `s`, eight at a time, with the offset of each group (little endian).
#[inline]
fn words(s: &[u8]) -> impl Iterator<Item = (usize, u64)> + '_ {
    s.chunks_exact(8).enumerate().map(|(k, c)| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        (k * 8, u64::from_le_bytes(w))
    })
}

/// The first byte at or after `from` for which `stop` holds, among the bytes that
/// `candidates` flags in each group of eight. `candidates` must flag (at least) every
/// byte for which `stop` holds; its lowest flag must be exact (the SWAR tests below are).
#[inline]
fn scan(s: &[u8], candidates: impl Fn(u64) -> u64, stop: impl Fn(u8) -> bool) -> usize {
    for (at, w) in words(s) {
        let mut m = candidates(w);
        while m != 0 {
            let j = at + (m.trailing_zeros() / 8) as usize;
            if stop(s[j]) {
                return j;
            }
            m &= m - 1;
        }
    }
    let tail = s.len() - s.len() % 8;
    s[tail..]
        .iter()
        .position(|&b| stop(b))
        .map_or(s.len(), |p| tail + p)
}

/// Flags bytes below 0x23: blanks, `"`, and (checked afterwards) `!` and controls.
#[inline]
fn below_0x23(w: u64) -> u64 {
    w.wrapping_sub(ONES * 0x23) & !w & HIGHS
}

/// Flags bytes equal to `"` or `\`.
#[inline]
fn quote_or_backslash(w: u64) -> u64 {
    let q = w ^ (ONES * u64::from(b'"'));
    let b = w ^ (ONES * u64::from(b'\\'));
    (q.wrapping_sub(ONES) & !q | b.wrapping_sub(ONES) & !b) & HIGHS
}

#[inline]
fn ends_word(b: u8) -> bool {
    is_blank_byte(b) || b == b'"'
}

/// An unquoted run up to a blank or a quote (possibly empty), eight bytes at a time.
#[inline]
fn bare0(i: &str) -> (&str, &str) {
    split_at(i, scan(i.as_bytes(), below_0x23, ends_word))
}

/// Text inside quotes up to the closing quote or a backslash (possibly empty).
#[inline]
fn quoted_run(i: &str) -> (&str, &str) {
    split_at(
        i,
        scan(i.as_bytes(), quote_or_backslash, |b| {
            b == b'"' || b == b'\\'
        }),
    )
}

/// Like [`split_till`], failing with `kind` when nothing is taken.
#[inline]
fn split_till1(i: &str, stop: impl Fn(u8) -> bool, kind: ErrorKind) -> PResult<'_, &str> {
    let (rest, taken) = split_till(i, stop);
    if taken.is_empty() {
        Err(nom::Err::Error(PErr::from_error_kind(i, kind)))
    } else {
        Ok((rest, taken))
    }
}

pub(crate) fn blank0(i: &str) -> PResult<'_, &str> {
    Ok(split_till(i, |b| !is_blank_byte(b)))
}

pub(crate) fn blank1(i: &str) -> PResult<'_, &str> {
    split_till1(i, |b| !is_blank_byte(b), ErrorKind::Space)
}

/// A run of characters up to the next blank (a chain or table name, a policy).
pub(crate) fn word(i: &str) -> PResult<'_, &str> {
    let (rest, taken) = split_at(i, scan(i.as_bytes(), below_0x23, is_blank_byte));
    if taken.is_empty() {
        Err(nom::Err::Error(PErr::from_error_kind(
            i,
            ErrorKind::TakeTill1,
        )))
    } else {
        Ok((rest, taken))
    }
}

/// A decimal `u64` (counters can be large).
pub(crate) fn number(i: &str) -> PResult<'_, u64> {
    let (rest, digits) = digit1.parse(i)?;
    match digits.parse::<u64>() {
        Ok(n) => Ok((rest, n)),
        Err(_) => fail(i, "a number that fits in 64 bits"),
    }
}

/// `[packets:bytes]`.
pub(crate) fn counters(i: &str) -> PResult<'_, Counters> {
    let (i, (_, packets, _, bytes, _)) =
        (char('['), number, char(':'), number, char(']')).parse(i)?;
    Ok((i, Counters { packets, bytes }))
}

/// What a token is, for the rule grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokKind {
    /// Exactly `!`, unquoted.
    Bang,
    /// Unquoted, starting with `-` followed by a letter or a dash.
    Opt,
    /// Anything else: a value.
    Value,
}

/// One token of a rule line.
#[derive(Debug, Clone)]
pub(crate) struct Tok<'a> {
    /// The token as written, quotes included.
    pub raw: &'a str,
    /// Its text with quotes removed and escapes resolved.
    pub text: Cow<'a, str>,
    pub kind: TokKind,
    /// Byte offset of the token in its line (set by [`tokens`]).
    pub off: usize,
}

/// `"…"`: a quoted part. Borrows when there are no escapes.
fn quoted(i: &str) -> PResult<'_, Cow<'_, str>> {
    let start = i;
    let (i, _) = char('"').parse(i)?;
    let (mut i, plain) = quoted_run(i);
    if let Ok((rest, _)) = char::<_, PErr<'_>>('"').parse(i) {
        return Ok((rest, Cow::Borrowed(plain)));
    }
    let mut s = String::with_capacity(plain.len() + 16);
    s.push_str(plain);
    loop {
        if let Ok((rest, _)) = char::<_, PErr<'_>>('"').parse(i) {
            return Ok((rest, Cow::Owned(s)));
        }
        // At a backslash (or at the end: unterminated).
        let Ok((rest, (_, c))) = (char::<_, PErr<'_>>('\\'), anychar).parse(i) else {
            return fail(start, "a closing quote `\"`");
        };
        s.push(c);
        let (rest, more) = quoted_run(rest);
        s.push_str(more);
        i = rest;
    }
}

/// An unquoted part: up to a blank or a quote.
fn bare(i: &str) -> PResult<'_, &str> {
    let (rest, taken) = bare0(i);
    if taken.is_empty() {
        Err(nom::Err::Error(PErr::from_error_kind(
            i,
            ErrorKind::TakeTill1,
        )))
    } else {
        Ok((rest, taken))
    }
}

/// Splits `body` (a slice of `line`) into tokens, appended to `out` with their byte
/// offsets in `line`.
pub(crate) fn tokens<'a>(
    line: &'a str,
    body: &'a str,
    out: &mut Vec<Tok<'a>>,
) -> Result<(), nom::Err<PErr<'a>>> {
    let base = line.as_ptr() as usize;
    let mut i = body;
    loop {
        let (r, _) = blank0(i)?;
        if r.is_empty() {
            return Ok(());
        }
        let off = (r.as_ptr() as usize).wrapping_sub(base);
        // Fast path: a plain word.
        let (rest, b) = bare0(r);
        if !b.is_empty() && !rest.starts_with('"') {
            out.push(Tok {
                raw: b,
                text: Cow::Borrowed(b),
                kind: classify_bare(b),
                off,
            });
            i = rest;
            continue;
        }
        let (rest, mut t) = token(r)?;
        t.off = off;
        out.push(t);
        i = rest;
    }
}

/// One token: unquoted and quoted parts with no blank between them. The input must not
/// start with a blank.
pub(crate) fn token(i: &str) -> PResult<'_, Tok<'_>> {
    let start = i;
    let first = match bare(i) {
        Ok((rest, b)) => {
            if !rest.starts_with('"') {
                let kind = classify_bare(b);
                return Ok((
                    rest,
                    Tok {
                        raw: b,
                        text: Cow::Borrowed(b),
                        kind,
                        off: 0,
                    },
                ));
            }
            (rest, Cow::Borrowed(b))
        }
        Err(_) => quoted(i)?,
    };
    let (mut i, mut text) = first;
    // More parts follow without a blank: glue them together.
    while !i.is_empty() && !i.starts_with(is_blank) {
        let (rest, part) = if i.starts_with('"') {
            quoted(i)?
        } else {
            let (rest, b) = bare(i)?;
            (rest, Cow::Borrowed(b))
        };
        if text.is_empty() {
            text = part;
        } else {
            text.to_mut().push_str(&part);
        }
        i = rest;
    }
    let raw = &start[..start.len() - i.len()];
    // A quoted token (or one with a quoted part) is always a value: `"!"`, `"-x"`.
    // An unquoted start glued to a quoted part (`--a"b"`) is a value as well.
    Ok((
        i,
        Tok {
            raw,
            text,
            kind: TokKind::Value,
            off: 0,
        },
    ))
}

/// The kind of an unquoted token.
#[inline]
pub(crate) fn classify_bare(b: &str) -> TokKind {
    classify_bare_bytes(b.as_bytes())
}

/// [`classify_bare`] on bytes.
#[inline(always)]
fn classify_bare_bytes(bytes: &[u8]) -> TokKind {
    if bytes == b"!" {
        TokKind::Bang
    } else if bytes.len() >= 2
        && bytes[0] == b'-'
        && (bytes[1].is_ascii_alphabetic() || bytes[1] == b'-')
    {
        TokKind::Opt
    } else {
        TokKind::Value
    }
}

// ---- The fast scanner: the common case in one pass over the bytes. ----

/// A token of [`scan_tokens`] as tests see it: its byte range in the line, quotes included.
/// Its text is the range itself, or the range without its first and last byte when
/// `quoted`.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub start: u32,
    pub end: u32,
    pub kind: TokKind,
    pub quoted: bool,
}

#[cfg(test)]
impl Span {
    /// The token's text (quotes removed) as a byte range of the line.
    #[inline]
    pub fn text_range(&self) -> std::ops::Range<usize> {
        let q = usize::from(self.quoted);
        self.start as usize + q..self.end as usize - q
    }
}

/// Eight bytes of `b` from `i` (which must leave eight bytes), little endian.
#[inline]
fn load8(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

/// The first byte at or after `i` for which `stop` holds, or `b.len()`: a word at a
/// time, the last word (when fewer than eight bytes are left) loaded overlapping the
/// bytes before `i` and masked. `candidates` as for [`scan`].
#[inline(always)]
fn find(
    b: &[u8],
    mut i: usize,
    candidates: impl Fn(u64) -> u64,
    stop: impl Fn(u8) -> bool,
) -> usize {
    let end = b.len();
    while i + 8 <= end {
        let mut m = candidates(load8(b, i));
        while m != 0 {
            let j = i + (m.trailing_zeros() / 8) as usize;
            if stop(b[j]) {
                return j;
            }
            m &= m - 1;
        }
        i += 8;
    }
    if i >= end {
        return end;
    }
    if end >= 8 {
        // The last eight bytes, without those before `i`.
        let base = end - 8;
        let mut m = candidates(load8(b, base)) & (u64::MAX << ((i - base) * 8));
        while m != 0 {
            let j = base + (m.trailing_zeros() / 8) as usize;
            if stop(b[j]) {
                return j;
            }
            m &= m - 1;
        }
        return end;
    }
    b[i..].iter().position(|&c| stop(c)).map_or(end, |p| i + p)
}

/// The end of a run of bytes that are not blanks (a word: chain names, commands).
#[inline]
pub(crate) fn word_end(b: &[u8], i: usize) -> usize {
    find(b, i, below_0x23, is_blank_byte)
}

/// A token of [`scan_tokens`]: a bare value.
pub(crate) const T_VALUE: u64 = 0;
/// A token of [`scan_tokens`]: a quoted value (its range includes the quotes).
pub(crate) const T_QUOTED: u64 = 1;
/// A token of [`scan_tokens`]: an option (`-x…`, `--…`).
pub(crate) const T_OPT: u64 = 2;
/// A token of [`scan_tokens`]: `!`.
pub(crate) const T_BANG: u64 = 3;

/// The fast scanner: splits the bytes of a line from `i` on into tokens as [`tokens`]
/// does, when every token is a plain word or a whole quoted string without
/// backslashes, and gives each token, in order, to `sink` ([`Tokens::token`]): its
/// byte range (quotes included, ending before 1 GiB) and its kind (`T_…`, as
/// [`classify_bare`] tells it). Anything else (a quote glued to a word,
/// an escape, an unterminated quote, a line of 1 GiB or more) gives `None` (tokens
/// before the fault may have been given): [`tokens`] reads such lines (and makes their
/// errors). It stops at once, with `None`, when `sink` gives `None`.
///
/// On x86_64 it scans 64 bytes a step with SSE2 ([`sse2::scan_tokens`]), elsewhere eight
/// bytes a step in a `u64` ([`scan_tokens_swar`]); the two give the same (a property test
/// holds them to each other).
#[inline(always)]
pub(crate) fn scan_tokens(b: &[u8], from: usize, sink: &mut impl Tokens) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    return sse2::scan_tokens(b, from, sink);
    #[cfg(not(target_arch = "x86_64"))]
    scan_tokens_swar(b, from, sink)
}

/// The line feeds of the 64 bytes `c`, bit `i` for byte `i` (SSE2 on x86_64).
#[inline(always)]
fn newline_mask(c: &[u8; 64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    return sse2::newline_mask(c);
    #[cfg(not(target_arch = "x86_64"))]
    c.iter()
        .enumerate()
        .fold(0, |m, (i, &b)| m | (u64::from(b == b'\n') << i))
}

/// The places of the line feeds of a text, in order, found 64 bytes a step as a bit
/// mask: a dump's lines are short (a hundred bytes), and a search per line (memchr)
/// pays its setting up for each.
pub(super) struct Newlines<'a> {
    bytes: &'a [u8],
    /// The block whose line feeds are `mask`, and the next block's start.
    base: usize,
    next: usize,
    mask: u64,
}

impl<'a> Newlines<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Newlines {
            bytes,
            base: 0,
            next: 0,
            mask: 0,
        }
    }
}

impl Iterator for Newlines<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.mask == 0 {
            let rest = self.bytes.get(self.next..).filter(|r| !r.is_empty())?;
            self.mask = match rest.first_chunk::<64>() {
                Some(c) => newline_mask(c),
                None => {
                    // The last bytes, padded with zeros (no line feed).
                    let mut c = [0u8; 64];
                    c[..rest.len()].copy_from_slice(rest);
                    newline_mask(&c)
                }
            };
            self.base = self.next;
            self.next += 64;
        }
        let i = self.mask.trailing_zeros() as usize;
        self.mask &= self.mask - 1;
        Some(self.base + i)
    }
}

/// What takes the tokens of [`scan_tokens`], one by one.
pub(crate) trait Tokens {
    /// The next token: its byte range `s..e` (quotes included) and kind (`T_…`);
    /// `None` stops the scan.
    fn token(&mut self, s: usize, e: usize, kind: u64) -> Option<()>;
}

/// A vector keeps them all.
#[cfg(test)]
impl Tokens for Vec<u64> {
    /// Packed: the start in bits 0–31, the end in bits 32–61, the kind in bits 62–63.
    fn token(&mut self, s: usize, e: usize, kind: u64) -> Option<()> {
        self.push(s as u64 | (e as u64) << 32 | kind << 62);
        Some(())
    }
}

/// The tokens of [`scan_tokens`] written to `out` (cleared first): their number.
#[cfg(test)]
pub(crate) fn split(b: &[u8], from: usize, out: &mut Vec<u64>) -> Option<usize> {
    out.clear();
    scan_tokens(b, from, out)?;
    Some(out.len())
}

/// [`split`] with the portable scanner.
#[cfg(test)]
fn split_swar(b: &[u8], from: usize, out: &mut Vec<u64>) -> Option<usize> {
    out.clear();
    scan_tokens_swar(b, from, out)?;
    Some(out.len())
}

/// [`scan_tokens`], eight bytes a step in a `u64` (SWAR): the portable scanner.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
fn scan_tokens_swar(b: &[u8], from: usize, sink: &mut impl Tokens) -> Option<()> {
    let end = b.len();
    if end >= 1 << 30 {
        return None;
    }
    // One pass over the bytes, a word of eight at a time: every blank ends the token
    // that started after the blank before it (`s`); a quote that starts a token starts
    // a quoted one, read to its closing quote.
    let mut s = from;
    let mut base = from;
    while base < end {
        let (w, mut m, at) = if base + 8 <= end {
            let w = load8(b, base);
            (w, below_0x23(w), base)
        } else if end >= 8 {
            // The last eight bytes, without those before `base`.
            let at = end - 8;
            let w = load8(b, at);
            (w, below_0x23(w) & (u64::MAX << ((base - at) * 8)), at)
        } else {
            let mut x = [0u8; 8];
            x[..end - base].copy_from_slice(&b[base..]);
            // Bytes past the end are 0xFF: never flagged.
            for y in &mut x[end - base..] {
                *y = 0xFF;
            }
            let w = u64::from_le_bytes(x);
            (w, below_0x23(w), base)
        };
        let mut next = at + 8;
        while m != 0 {
            let bit = m.trailing_zeros();
            m &= m - 1;
            let c = (w >> (bit & !7)) as u8;
            let p = at + (bit / 8) as usize;
            if is_blank_byte(c) {
                if s < p {
                    sink.token(s, p, bare_kind(b, s, p))?;
                }
                s = p + 1;
            } else if c == b'"' {
                if s < p {
                    // A quote glued to a word.
                    return None;
                }
                let q = closing_quote(b, p)?;
                sink.token(p, q + 1, T_QUOTED)?;
                // Go on after the quoted token (and the blank after it).
                s = q + 2;
                next = q + 2;
                break;
            }
            // `!` and other controls belong to words.
        }
        base = next;
    }
    if s < end {
        sink.token(s, end, bare_kind(b, s, end))?;
    }
    Some(())
}

/// The closing quote of the quoted token that starts at `p`, when there is one with no
/// backslash before it and a blank (or the end) after it.
#[inline(never)]
fn closing_quote(b: &[u8], p: usize) -> Option<usize> {
    let end = b.len();
    let q = find(b, p + 1, quote_or_backslash, |c| c == b'"' || c == b'\\');
    if q >= end || b[q] != b'"' || (q + 1 < end && !is_blank_byte(b[q + 1])) {
        return None;
    }
    Some(q)
}

/// The kind of the bare token `b[s..e]`, as [`scan_tokens`] gives it.
#[inline(always)]
fn bare_kind(b: &[u8], s: usize, e: usize) -> u64 {
    match b.get(s..e) {
        // `-` and a letter (either case: `| 0x20` lowers it) or a dash.
        Some(&[b'-', c, ..]) if (c | 0x20).wrapping_sub(b'a') < 26 || c == b'-' => T_OPT,
        Some(b"!") => T_BANG,
        _ => T_VALUE,
    }
}

/// The SSE2 scanner of [`scan_tokens`] (SSE2 is part of every x86_64 processor).
#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_min_epu8, _mm_movemask_epi8,
        _mm_or_si128, _mm_set1_epi8, _mm_setzero_si128, _mm_subs_epu8,
    };

    use super::{T_QUOTED, bare_kind};

    /// Bytes of a block of (up to) 64 bytes by class: bit `i` of a mask for the block's
    /// byte `i`.
    #[derive(Clone, Copy)]
    struct Masks {
        /// Blanks (see [`super::is_blank_byte`]).
        blank: u64,
        /// `"`.
        quote: u64,
        /// `\`: only when `quote` has a bit or the block was read for it (`BS`).
        backslash: u64,
    }

    /// Sixteen bytes of `c` from `k`: `k + 16 <= 64`, which the callers' constant
    /// offsets (0, 16, 32, 48) keep.
    #[inline(always)]
    fn load(c: &[u8; 64], k: usize) -> __m128i {
        let lane: &[u8; 16] = c[k..k + 16].try_into().unwrap_or(&[0xFF; 16]);
        // SAFETY: `lane` is 16 readable bytes; `_mm_loadu_si128` needs no alignment,
        // and SSE2 is part of every x86_64 processor.
        unsafe { _mm_loadu_si128(lane.as_ptr().cast()) }
    }

    /// The bytes of `x` equal to `c`, a bit each.
    #[inline(always)]
    fn eq(x: __m128i, c: u8) -> u64 {
        // SAFETY: SSE2 is part of every x86_64 processor; no memory is read.
        u64::from(unsafe { _mm_movemask_epi8(_mm_cmpeq_epi8(x, _mm_set1_epi8(c as i8))) } as u16)
    }

    /// The blanks among the control bytes of `x` (tab, VT, FF, CR), a bit each.
    #[inline(always)]
    fn control_blanks(x: __m128i) -> u64 {
        // SAFETY: SSE2 is part of every x86_64 processor; no memory is read.
        unsafe {
            // 0x0b..=0x0d: where max(x, 0x0b) == min(x, 0x0d).
            let vt_ff_cr = _mm_cmpeq_epi8(
                _mm_max_epu8(x, _mm_set1_epi8(0x0b)),
                _mm_min_epu8(x, _mm_set1_epi8(0x0d)),
            );
            let tab = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'\t' as i8));
            u64::from(_mm_movemask_epi8(_mm_or_si128(tab, vt_ff_cr)) as u16)
        }
    }

    /// Has any of the bytes `xs` a value below 0x20 (bytes from 0x80 are not)?
    #[inline(always)]
    fn any_control(xs: &[__m128i; 4]) -> bool {
        // SAFETY: SSE2 is part of every x86_64 processor; no memory is read.
        unsafe {
            let low = _mm_min_epu8(_mm_min_epu8(xs[0], xs[1]), _mm_min_epu8(xs[2], xs[3]));
            let controls =
                _mm_cmpeq_epi8(_mm_subs_epu8(low, _mm_set1_epi8(0x1f)), _mm_setzero_si128());
            _mm_movemask_epi8(controls) != 0
        }
    }

    /// The line feeds of the 64 bytes `c`, bit `i` for byte `i`.
    #[inline(always)]
    pub(super) fn newline_mask(c: &[u8; 64]) -> u64 {
        eq(load(c, 0), b'\n')
            | eq(load(c, 16), b'\n') << 16
            | eq(load(c, 32), b'\n') << 32
            | eq(load(c, 48), b'\n') << 48
    }

    /// The masks of the 64 bytes `c`; the backslashes when there is a quote, or
    /// always with `BS`.
    #[inline(always)]
    fn masks64<const BS: bool>(c: &[u8; 64]) -> Masks {
        let xs = [load(c, 0), load(c, 16), load(c, 32), load(c, 48)];
        let mut m = Masks {
            blank: 0,
            quote: 0,
            backslash: 0,
        };
        for (k, &x) in [0, 16, 32, 48].into_iter().zip(&xs) {
            m.blank |= eq(x, b' ') << k;
            m.quote |= eq(x, b'"') << k;
            if BS {
                m.backslash |= eq(x, b'\\') << k;
            }
        }
        // Control bytes are rare: the blank ones are sought only when there is one.
        if any_control(&xs) {
            for (k, &x) in [0, 16, 32, 48].into_iter().zip(&xs) {
                m.blank |= control_blanks(x) << k;
            }
        }
        if !BS && m.quote != 0 {
            for (k, &x) in [0, 16, 32, 48].into_iter().zip(&xs) {
                m.backslash |= eq(x, b'\\') << k;
            }
        }
        m
    }

    /// The masks of the bytes of `b` from `base` (`< b.len()`) on, at most 64: bit `i`
    /// for byte `base + i`, none for bytes past the end. Never reads past the end: the
    /// last block is loaded overlapping the bytes before `base` (shifted out), or, in
    /// a line shorter than 64 bytes, copied into a buffer padded with 0xFF (no class).
    #[inline(always)]
    fn masks<const BS: bool>(b: &[u8], base: usize) -> Masks {
        let rest = b.get(base..).unwrap_or_default();
        if let Some(c) = rest.first_chunk::<64>() {
            masks64::<BS>(c)
        } else if let Some(c) = b.last_chunk::<64>() {
            // `base > b.len() - 64`: a shift of 1 to 63.
            let shift = (base + 64 - b.len()) & 63;
            let m = masks64::<BS>(c);
            Masks {
                blank: m.blank >> shift,
                quote: m.quote >> shift,
                backslash: m.backslash >> shift,
            }
        } else {
            let mut c = [0xFF; 64];
            let n = rest.len().min(64);
            c[..n].copy_from_slice(&rest[..n]);
            masks64::<BS>(&c)
        }
    }

    /// The first `"` or `\` at or after `i`, or `b.len()`.
    #[inline(never)]
    fn quote_or_backslash(b: &[u8], mut i: usize) -> usize {
        while i < b.len() {
            let m = masks::<true>(b, i);
            let c = m.quote | m.backslash;
            if c != 0 {
                return i + c.trailing_zeros() as usize;
            }
            i += 64;
        }
        b.len()
    }

    /// [`super::scan_tokens`] with SSE2: the blanks and quotes of 64 bytes a step as bit
    /// masks, walked a bit at a time: a blank ends the token that started after the
    /// blank before it (`s`); a quote that starts a token starts a quoted one, read to
    /// its closing quote (found in the masks, or past them by [`quote_or_backslash`]).
    #[inline(always)]
    pub(super) fn scan_tokens(b: &[u8], from: usize, sink: &mut impl super::Tokens) -> Option<()> {
        let end = b.len();
        if end >= 1 << 30 {
            return None;
        }
        let mut s = from;
        let mut base = from;
        while base < end {
            let k = masks::<false>(b, base);
            let (mut blank, mut quote) = (k.blank, k.quote);
            let mut next = base + 64;
            loop {
                // The blanks before the first quote (all of them when there is none).
                let mut m = blank & !quote & quote.wrapping_sub(1);
                while m != 0 {
                    let p = base + m.trailing_zeros() as usize;
                    if s < p {
                        sink.token(s, p, bare_kind(b, s, p))?;
                    }
                    s = p + 1;
                    m &= m - 1;
                }
                if quote == 0 {
                    break;
                }
                let bit = quote.trailing_zeros();
                let p = base + bit as usize;
                if s < p {
                    // A quote glued to a word.
                    return None;
                }
                // The first quote or backslash after the opening quote.
                let after = (k.quote | k.backslash) & ((u64::MAX << bit) << 1);
                let q = if after != 0 {
                    base + after.trailing_zeros() as usize
                } else {
                    quote_or_backslash(b, base + 64)
                };
                // It must be a quote, with a blank or the end after it.
                if b.get(q) != Some(&b'"')
                    || b.get(q + 1).is_some_and(|&c| !super::is_blank_byte(c))
                {
                    return None;
                }
                sink.token(p, q + 1, T_QUOTED)?;
                // Go on after the quoted token (and the blank after it).
                s = q + 2;
                let skip = s - base;
                if skip >= 64 {
                    next = s;
                    break;
                }
                blank &= u64::MAX << skip;
                quote &= u64::MAX << skip;
            }
            base = next;
        }
        if s < end {
            sink.token(s, end, bare_kind(b, s, end))?;
        }
        Some(())
    }
}

/// [`scan_tokens`] as spans with their kinds (for tests).
#[cfg(test)]
pub(crate) fn fast_tokens(b: &[u8], i: usize, out: &mut Vec<Span>) -> bool {
    let mut toks = Vec::new();
    let Some(n) = split(b, i, &mut toks) else {
        return false;
    };
    for &t in &toks[..n] {
        let (start, end) = (t as u32, (t >> 32) as u32 & 0x3fff_ffff);
        let quoted = b[start as usize] == b'"';
        let kind = if quoted {
            TokKind::Value
        } else {
            classify_bare_bytes(&b[start as usize..end as usize])
        };
        let packed = match kind {
            TokKind::Value if quoted => T_QUOTED,
            TokKind::Value => T_VALUE,
            TokKind::Opt => T_OPT,
            TokKind::Bang => T_BANG,
        };
        assert_eq!(t >> 62, packed, "the packed kind");
        out.push(Span {
            start,
            end,
            kind,
            quoted,
        });
    }
    true
}

/// `[packets:bytes]` at the start of `b`: the counters and the offset after `]`.
/// `None` for anything else (including numbers that do not fit in 64 bits).
pub(crate) fn fast_counters(b: &[u8]) -> Option<(Counters, usize)> {
    fn num(b: &[u8], i: &mut usize) -> Option<u64> {
        let start = *i;
        let mut n: u64 = 0;
        while let Some(&c) = b.get(*i) {
            if !c.is_ascii_digit() {
                break;
            }
            n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            *i += 1;
        }
        (*i > start).then_some(n)
    }
    if b.first() != Some(&b'[') {
        return None;
    }
    let mut i = 1;
    let packets = num(b, &mut i)?;
    if b.get(i) != Some(&b':') {
        return None;
    }
    i += 1;
    let bytes = num(b, &mut i)?;
    if b.get(i) != Some(&b']') {
        return None;
    }
    Some((Counters { packets, bytes }, i + 1))
}

/// The end of the blanks at `i`.
#[inline]
pub(crate) fn skip_blanks(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_blank_byte(b[i]) {
        i += 1;
    }
    i
}

/// Does a value need quotes to be read back as the same single value?
pub(crate) fn needs_quotes(v: &str) -> bool {
    v.is_empty() || v.contains(|c| is_blank(c) || c == '"' || c == '\n') || {
        classify_bare(v) != TokKind::Value
    }
}

/// Appends a value, quoted and escaped when needed.
pub(crate) fn push_value(out: &mut String, v: &str, force_quotes: bool) {
    if force_quotes || needs_quotes(v) {
        out.push('"');
        for c in v.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    } else {
        out.push_str(v);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn tok(s: &str) -> Tok<'_> {
        token(s).unwrap().1
    }

    #[test]
    fn bare_tokens_borrow() {
        let t = tok("10.0.0.0/8 rest");
        assert_eq!(t.text, "10.0.0.0/8");
        assert!(matches!(t.text, Cow::Borrowed(_)));
        assert_eq!(t.kind, TokKind::Value);
        assert_eq!(tok("--dport").kind, TokKind::Opt);
        assert_eq!(tok("-s").kind, TokKind::Opt);
        assert_eq!(tok("!").kind, TokKind::Bang);
        assert_eq!(tok("!foo").kind, TokKind::Value);
        assert_eq!(tok("-1").kind, TokKind::Value);
        assert_eq!(tok("-").kind, TokKind::Value);
        assert_eq!(tok("--").kind, TokKind::Opt);
    }

    #[test]
    fn quoted_tokens() {
        let t = tok("\"ns/svc:http cluster IP\" -j");
        assert_eq!(t.text, "ns/svc:http cluster IP");
        assert!(matches!(t.text, Cow::Borrowed(_)));
        assert_eq!(t.kind, TokKind::Value);
        assert_eq!(tok(r#""a \"b\"""#).text, r#"a "b""#);
        assert_eq!(tok(r#""\"""#).text, "\"");
        assert_eq!(tok(r#""it\'s""#).text, "it's");
        assert_eq!(tok(r#""!#*~%&/()=?""#).text, "!#*~%&/()=?");
        assert_eq!(tok(r#""!""#).kind, TokKind::Value);
        assert_eq!(tok(r#""-x""#).kind, TokKind::Value);
        assert_eq!(tok(r#""""#).text, "");
        assert_eq!(tok(r#"a"b c"d e"#).text, "ab cd");
        assert_eq!(tok(r"a\b").text, r"a\b");
    }

    #[test]
    fn unterminated_quote_points_at_the_quote() {
        let s = "\"abc def";
        let Err(nom::Err::Failure(e)) = token(s) else {
            panic!("expected failure")
        };
        assert_eq!(e.input, s);
        let s = "x\"ab\\";
        let Err(nom::Err::Failure(e)) = token(s) else {
            panic!("expected failure")
        };
        assert_eq!(e.input, "\"ab\\");
    }

    #[test]
    fn word_scanning_matches_a_byte_loop() {
        let samples = [
            "",
            "abc",
            "abcdefgh",
            "abcdefghi jk",
            "!!!!!!!!!!!!!!!!\"x",
            "é!é!é!é!é!\t",
            "0123456789abcdef#",
            "########\x01#\x0b",
            "a\\b\\c\\d\\e\"",
            "quoted text with no end at all",
        ];
        for s in samples {
            for start in 0..s.len() {
                let Some(t) = s.get(start..) else { continue };
                let b = t.as_bytes();
                assert_eq!(
                    scan(b, below_0x23, ends_word),
                    b.iter().position(|&c| ends_word(c)).unwrap_or(b.len()),
                    "{t:?}"
                );
                let qb = |c: u8| c == b'"' || c == b'\\';
                assert_eq!(
                    scan(b, quote_or_backslash, qb),
                    b.iter().position(|&c| qb(c)).unwrap_or(b.len()),
                    "{t:?}"
                );
            }
        }
    }

    /// Bytes the scanners treat specially, and some they must not.
    const SPECIAL: &[u8] = b" \t\x0b\x0c\r\n\x00\x1f\"\"\\!--[a1Z\x7f\x80\xc3\xa9\xff";

    /// A byte string biased towards [`SPECIAL`] bytes, around the 8/16/32/64-byte
    /// boundaries the scanners step by.
    fn soup() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            3 => prop::sample::select(SPECIAL),
            1 => any::<u8>(),
        ];
        let len = prop_oneof![
            prop::sample::select(vec![
                0usize, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129,
            ]),
            0usize..300,
        ];
        len.prop_flat_map(move |n| prop::collection::vec(byte.clone(), n))
    }

    /// A line of words, whole quoted strings and blanks (mostly read by the scanners),
    /// with now and then a byte that makes them give up.
    fn words() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            4 => "[a-z0-9.:/-]{1,20}",
            2 => "-{1,2}[a-z]{0,12}",
            1 => Just("!".to_string()),
            2 => "\"[ a-z!\u{e9}-]{0,70}\"",
            1 => "[ \"\\\\a!\t\u{b}\r\u{e9}]{1,3}",
        ];
        let sep = prop::sample::select(vec![" ", " ", " ", "  ", "\t", "\r", "\u{b}\u{c}", ""]);
        prop::collection::vec((piece, sep), 0..24).prop_map(|parts| {
            parts
                .into_iter()
                .flat_map(|(p, s)| [p, s.to_string()])
                .collect::<String>()
                .into_bytes()
        })
    }

    /// What `scanner` gives for `b` from `from`: the tokens, or `None`.
    fn scan_with(
        scanner: fn(&[u8], usize, &mut Vec<u64>) -> Option<usize>,
        b: &[u8],
        from: usize,
    ) -> Option<Vec<u64>> {
        // Left over from an earlier, longer line: must not show through.
        let mut out = vec![u64::MAX; 7];
        let n = scanner(b, from, &mut out)?;
        Some(out.get(..n).expect("n tokens written").to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// The SIMD scanner gives what the portable one gives.
        #[test]
        fn split_agrees_with_swar(b in prop_oneof![soup(), words()], from in 0usize..400) {
            let from = from % (b.len() + 1);
            prop_assert_eq!(split(&b, from, &mut Vec::new()).map(|_| ()), split_swar(&b, from, &mut Vec::new()).map(|_| ()));
            prop_assert_eq!(scan_with(split, &b, from), scan_with(split_swar, &b, from), "{:?} from {}", String::from_utf8_lossy(&b), from);
        }
    }

    #[test]
    fn split_agrees_with_swar_on_samples() {
        let mut long = "-A KUBE-SVC-X -m comment --comment \"".to_string();
        long.push_str(&"a b ".repeat(40));
        long.push_str("\" -j X");
        let samples = [
            "",
            " ",
            "\"",
            "\"\"",
            "a\"b\"",
            "-A X -m comment --comment \"ns/svc:http cluster IP\" -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-74L62CPFTYE5MRRO -p tcp -m comment --comment \"team-0041/app-020978-api:https\" -m tcp -j DNAT --to-destination 10.129.23.255:8443",
            "\"abc def",
            "\"a\\\"b\"",
            "x\t\x0b\x0c\r\n! -- -1 -a é\u{a0}",
            &long,
        ];
        for s in samples {
            for from in 0..=s.len() {
                let b = s.as_bytes();
                assert_eq!(
                    scan_with(split, b, from),
                    scan_with(split_swar, b, from),
                    "{s:?} from {from}"
                );
            }
        }
    }

    #[test]
    fn counters_parse() {
        let (rest, c) = counters("[402612:15051273] -A").unwrap();
        assert_eq!(rest, " -A");
        assert_eq!(c.packets, 402_612);
        assert_eq!(c.bytes, 15_051_273);
        assert!(counters("[1:99999999999999999999999]").is_err());
        assert!(counters("[1 2]").is_err());
    }

    #[test]
    fn quoting_for_output() {
        let mut s = String::new();
        for v in [
            "plain", "", "a b", "!", "-x", "--y", "-1", "a\"b", r"c\d", "!x",
        ] {
            s.clear();
            push_value(&mut s, v, false);
            let t = tok(&s);
            assert_eq!(t.text, v, "{s}");
            assert_eq!(t.kind, TokKind::Value, "{s}");
            assert_eq!(t.raw.len(), s.len());
        }
    }
}
