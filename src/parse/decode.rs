//! From bytes to text: binary data and bad encodings are found here, with their line
//! and column.

use std::borrow::Cow;

use crate::error::{InputError, InputErrorKind};
use crate::model::Warning;

/// A control byte that text dumps never contain: NUL and C0 controls other than tab,
/// line feed, vertical tab, form feed, carriage return and escape.
#[inline]
fn is_binary(b: u8) -> bool {
    (b < 9) | ((14..32).contains(&b) & (b != 27))
}

/// Offset of the first binary byte. Scans in blocks without early exit so that the
/// compiler can vectorise the test.
fn find_binary(bytes: &[u8]) -> Option<usize> {
    const BLOCK: usize = 64;
    for (i, block) in bytes.chunks(BLOCK).enumerate() {
        if block.iter().fold(false, |acc, &b| acc | is_binary(b)) {
            return block
                .iter()
                .position(|&b| is_binary(b))
                .map(|p| i * BLOCK + p);
        }
    }
    None
}

/// Large inputs are checked by several threads, in pieces cut after line feeds;
/// `None` when that finds anything wrong (the caller then finds what and where).
fn clean_text(bytes: &[u8]) -> Option<&str> {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 20;
    if bytes.len() < 4 * PIECE || rayon::current_num_threads() < 2 {
        return None;
    }
    let clean = super::pieces_after_newlines(bytes, PIECE)
        .par_iter()
        .all(|p| find_binary(p).is_none() && std::str::from_utf8(p).is_ok());
    // SAFETY: every piece is UTF-8 and each ends after an ASCII byte (a line feed) or at
    // the end of the input, so no character is split: the whole is UTF-8.
    clean.then(|| unsafe { std::str::from_utf8_unchecked(bytes) })
}

/// 1-based line and character column of a byte offset.
fn line_col(bytes: &[u8], pos: usize) -> (u32, u32) {
    let before = &bytes[..pos.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let col = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(col).unwrap_or(u32::MAX),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|b| format!("\\x{b:02x}"))
        .collect()
}

/// Checks that the bytes are text and returns them as `str`.
///
/// A UTF-8 byte order mark is dropped. NUL bytes and other control bytes are a
/// [`InputErrorKind::Binary`] error, UTF-16 text and bytes that are not UTF-8 an
/// [`InputErrorKind::Encoding`] error, each at the line and column of the first bad byte.
/// With `lenient`, bytes that are not UTF-8 are replaced by U+FFFD instead, with one
/// warning per affected line; binary input is still an error.
pub fn decode(bytes: &[u8], lenient: bool) -> Result<(Cow<'_, str>, Vec<Warning>), InputError> {
    if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        return Err(InputError::new(
            InputErrorKind::Encoding,
            1,
            1,
            hex(&bytes[..2]),
            "the input is UTF-16 text (it starts with a UTF-16 byte order mark)",
            "convert it to UTF-8, e.g. `iconv -f UTF-16 -t UTF-8 dump.txt`",
        ));
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if let Some(text) = clean_text(bytes) {
        return Ok((Cow::Borrowed(text), Vec::new()));
    }
    if let Some(pos) = find_binary(bytes) {
        let (line, col) = line_col(bytes, pos);
        let utf16 = bytes[pos] == 0
            && bytes.len() > 3
            && (bytes[..4].iter().filter(|&&b| b == 0).count() == 2);
        return Err(InputError::new(
            InputErrorKind::Binary,
            line,
            col,
            hex(&bytes[pos..pos + 1]),
            if bytes[pos] == 0 {
                "the input is not text: it contains a NUL byte"
            } else {
                "the input is not text: it contains a control byte"
            },
            if utf16 {
                "this may be UTF-16 text; convert it to UTF-8 (`iconv -f UTF-16 -t UTF-8`)"
            } else {
                "give the text output of `iptables-save`, not a binary file"
            },
        ));
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok((Cow::Borrowed(s), Vec::new())),
        Err(e) if !lenient => {
            let pos = e.valid_up_to();
            let (line, col) = line_col(bytes, pos);
            let len = e.error_len().unwrap_or(bytes.len() - pos);
            Err(InputError::new(
                InputErrorKind::Encoding,
                line,
                col,
                hex(&bytes[pos..pos + len]),
                "bytes that are not UTF-8",
                "convert the file to UTF-8 (`iconv -f LATIN1 -t UTF-8`), or use --lenient to replace them",
            ))
        }
        Err(_) => {
            let mut warnings: Vec<Warning> = Vec::new();
            let mut text = String::with_capacity(bytes.len() + 16);
            let mut line: u32 = 1;
            for chunk in bytes.utf8_chunks() {
                let valid = chunk.valid();
                text.push_str(valid);
                line = line.saturating_add(
                    u32::try_from(valid.bytes().filter(|&b| b == b'\n').count())
                        .unwrap_or(u32::MAX),
                );
                let invalid = chunk.invalid();
                if !invalid.is_empty() {
                    text.push('\u{FFFD}');
                    if warnings.last().is_none_or(|w| w.line != line) {
                        warnings.push(Warning::new(
                            line,
                            format!(
                                "bytes that are not UTF-8 ({}) replaced by U+FFFD",
                                hex(invalid)
                            ),
                        ));
                    }
                }
            }
            Ok((Cow::Owned(text), warnings))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_inputs_are_checked_in_pieces_alike() {
        let line = "-A X -m comment --comment \"caf\u{e9} \u{1F600}\" -j Y\n";
        let mut text = line.repeat(200_000).into_bytes();
        assert!(text.len() > 8 << 20);
        let (t, _) = decode(&text, false).unwrap();
        assert_eq!(t.as_bytes(), &text[..]);
        // A bad byte or a control byte deep inside is still found and located.
        let at = text.len() / 2 + 10;
        let line_no = text[..at].iter().filter(|&&b| b == b'\n').count() as u32 + 1;
        let mut bad = text.clone();
        bad[at] = 0xFF;
        let e = decode(&bad, false).unwrap_err();
        assert_eq!((e.kind, e.line), (InputErrorKind::Encoding, line_no));
        text[at] = 0x01;
        let e = decode(&text, false).unwrap_err();
        assert_eq!((e.kind, e.line), (InputErrorKind::Binary, line_no));
    }

    #[test]
    fn text_is_borrowed_and_bom_stripped() {
        let (t, w) = decode(b"\xEF\xBB\xBF*nat\n", false).unwrap();
        assert_eq!(t, "*nat\n");
        assert!(matches!(t, Cow::Borrowed(_)));
        assert!(w.is_empty());
        assert!(decode(b"a\tb\r\n\x0c", false).is_ok());
    }

    #[test]
    fn nul_is_binary_with_position() {
        let e = decode(b"*nat\n:A - [0:0]\n-A A\x00 -j X\n", false).unwrap_err();
        assert_eq!(e.kind, InputErrorKind::Binary);
        assert_eq!((e.line, e.col), (3, 5));
        let e = decode(b"\x7fELF\x02\x01\x01", true).unwrap_err();
        assert_eq!(e.kind, InputErrorKind::Binary);
        assert_eq!((e.line, e.col), (1, 5));
        let e = decode(b"*\x00n\x00a\x00t\x00", false).unwrap_err();
        assert!(e.hint.contains("UTF-16"));
        let e = decode(b"\xFF\xFE*\x00", false).unwrap_err();
        assert_eq!(e.kind, InputErrorKind::Encoding);
    }

    #[test]
    fn invalid_utf8_is_located() {
        let bytes = b"# ok\n-A X -m comment --comment \"caf\xe9\"\n";
        let e = decode(bytes, false).unwrap_err();
        assert_eq!(e.kind, InputErrorKind::Encoding);
        assert_eq!((e.line, e.col), (2, 31));
        assert_eq!(e.text, "\\xe9");
        // A multi-byte character before the bad byte counts as one column.
        let e = decode(
            "é".as_bytes()
                .iter()
                .copied()
                .chain([0xff])
                .collect::<Vec<_>>()
                .as_slice(),
            false,
        )
        .unwrap_err();
        assert_eq!((e.line, e.col), (1, 2));
    }

    #[test]
    fn lenient_replaces_with_a_warning_per_line() {
        let bytes = b"a\xe9\xe9\nb\nc\xff d\xfe\n";
        let (t, w) = decode(bytes, true).unwrap();
        assert_eq!(t, "a\u{FFFD}\u{FFFD}\nb\nc\u{FFFD} d\u{FFFD}\n");
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].line, 1);
        assert_eq!(w[1].line, 3);
    }
}
