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

/// A token of [`split`] as tests see it: its byte range in the line, quotes included.
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

/// A token of [`split`]: a bare value.
pub(crate) const T_VALUE: u64 = 0;
/// A token of [`split`]: a quoted value (its range includes the quotes).
pub(crate) const T_QUOTED: u64 = 1;
/// A token of [`split`]: an option (`-x…`, `--…`).
pub(crate) const T_OPT: u64 = 2;
/// A token of [`split`]: `!`.
pub(crate) const T_BANG: u64 = 3;

/// The fast scanner: splits the bytes of a line from `i` on into tokens as [`tokens`]
/// does, when every token is a plain word or a whole quoted string without
/// backslashes: the number of tokens, written to `out` packed in a `u64` each:
/// its start in bits 0–31, its end in bits 32–61 (quotes included), its kind (`T_…`,
/// as [`classify_bare`] tells it) in bits 62–63. Anything else (a quote glued to a
/// word, an escape, an unterminated quote, a line of 1 GiB or more) gives `None`:
/// [`tokens`] reads such lines (and makes their errors).
pub(crate) fn split(b: &[u8], from: usize, out: &mut Vec<u64>) -> Option<usize> {
    let end = b.len();
    if end >= 1 << 30 {
        return None;
    }
    out.clear();
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
                    out.push(bare_token(b, s, p));
                }
                s = p + 1;
            } else if c == b'"' {
                if s < p {
                    // A quote glued to a word.
                    return None;
                }
                let q = closing_quote(b, p)?;
                out.push(p as u64 | ((q + 1) as u64) << 32 | T_QUOTED << 62);
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
        out.push(bare_token(b, s, end));
    }
    Some(out.len())
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

/// The bare token `b[s..e]`, packed as [`split`] gives it.
#[inline(always)]
fn bare_token(b: &[u8], s: usize, e: usize) -> u64 {
    let kind = match b[s] {
        // `-` and a letter (either case: `| 0x20` lowers it) or a dash.
        b'-' if e - s >= 2 && ((b[s + 1] | 0x20).wrapping_sub(b'a') < 26 || b[s + 1] == b'-') => {
            T_OPT
        }
        b'!' if e - s == 1 => T_BANG,
        _ => T_VALUE,
    };
    s as u64 | (e as u64) << 32 | kind << 62
}

/// [`split`] as spans with their kinds (for tests).
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
