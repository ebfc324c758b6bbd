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

/// What one pass over the bytes found: the offset of the first binary byte, and
/// whether every byte before it is ASCII.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scan {
    binary: Option<usize>,
    ascii: bool,
}

/// Is every byte of the block printable ASCII or a line feed (what nearly every block
/// of a dump is)? No early exit, so that the compiler tests many bytes an instruction.
#[inline(always)]
fn plain(block: &[u8]) -> bool {
    block
        .iter()
        .fold(true, |ok, &b| ok & (((b as i8) >= 0x20) | (b == b'\n')))
}

/// Finds the first binary byte and whether the bytes are ASCII, in one pass: blocks of
/// plain text are passed over many bytes an instruction, the others (a tab, a carriage
/// return, non-ASCII text, a binary byte) are looked at byte by byte.
fn scan(bytes: &[u8]) -> Scan {
    const BLOCK: usize = 64;
    let mut ascii = true;
    let mut blocks = bytes.chunks_exact(BLOCK);
    let mut at = 0;
    for block in blocks.by_ref() {
        if !plain(block) {
            if let Some(p) = block.iter().position(|&b| is_binary(b)) {
                return Scan {
                    binary: Some(at + p),
                    ascii: ascii && block[..p].is_ascii(),
                };
            }
            ascii &= block.is_ascii();
        }
        at += BLOCK;
    }
    let rest = blocks.remainder();
    let binary = rest.iter().position(|&b| is_binary(b));
    Scan {
        binary: binary.map(|p| at + p),
        ascii: ascii && rest[..binary.unwrap_or(rest.len())].is_ascii(),
    }
}

/// The bytes as text, `found` being their [`scan`] without a binary byte: checked for
/// UTF-8 only when some byte is not ASCII.
fn utf8(bytes: &[u8], found: Scan) -> Result<&str, std::str::Utf8Error> {
    debug_assert_eq!(found, scan(bytes));
    if found.ascii && found.binary.is_none() {
        // SAFETY: `scan` saw every byte and found each below 0x80: ASCII is UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes)
}

/// The bytes as text when they have no binary byte and are UTF-8.
fn text_of(bytes: &[u8]) -> Option<&str> {
    let found = scan(bytes);
    if found.binary.is_some() {
        return None;
    }
    utf8(bytes, found).ok()
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
        .all(|p| text_of(p).is_some());
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
    let found = scan(bytes);
    if let Some(pos) = found.binary {
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
    match utf8(bytes, found) {
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

    /// The byte-by-byte search for a binary byte that `scan` replaced.
    fn old_find_binary(bytes: &[u8]) -> Option<usize> {
        bytes.iter().position(|&b| is_binary(b))
    }

    /// Text bytes with the odd ones mixed in: plain runs longer than a block, line feeds,
    /// carriage returns, tabs, NUL and other control bytes, DEL, pieces of UTF-8
    /// characters (é, U+2028) and any byte at all.
    fn odd_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            20 => proptest::collection::vec(b' '..=b'~', 0..150),
            4 => Just(vec![b'\n']),
            2 => Just(b"\r\n".to_vec()),
            1 => Just(vec![b'\t']),
            1 => Just(vec![0u8]),
            1 => (0u8..32).prop_map(|b| vec![b]),
            1 => Just(vec![0x7f]),
            2 => Just("\u{e9}".as_bytes().to_vec()),
            2 => Just("\u{2028}".as_bytes().to_vec()),
            1 => Just(vec![0xe2, 0x80]),
            2 => any::<u8>().prop_map(|b| vec![b]),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|p| p.concat())
    }

    proptest::proptest! {
        /// One pass finds what the byte-by-byte search and `str::from_utf8` found, and
        /// `decode` reads the bytes alike.
        #[test]
        fn scan_is_the_byte_by_byte_search(bytes in odd_bytes(), at in 0usize..2000) {
            let binary = old_find_binary(&bytes);
            let found = scan(&bytes);
            proptest::prop_assert_eq!(found.binary, binary);
            let before = &bytes[..binary.unwrap_or(bytes.len())];
            proptest::prop_assert_eq!(found.ascii, before.is_ascii());
            let utf8_ok = std::str::from_utf8(&bytes).ok();
            proptest::prop_assert_eq!(text_of(&bytes), utf8_ok.filter(|_| binary.is_none()));
            if binary.is_none() {
                proptest::prop_assert_eq!(utf8(&bytes, found), std::str::from_utf8(&bytes));
            }
            // Long inputs too: the odd bytes behind a long plain run.
            let mut long = vec![b'x'; at + 1];
            long.extend_from_slice(&bytes);
            let found = scan(&long);
            proptest::prop_assert_eq!(found.binary, old_find_binary(&long));
            for lenient in [false, true] {
                match (decode(&long, lenient), old_find_binary(&long)) {
                    (Err(e), Some(pos)) => {
                        proptest::prop_assert_eq!(e.kind, InputErrorKind::Binary);
                        proptest::prop_assert_eq!((e.line, e.col), line_col(&long, pos));
                    }
                    (r, None) => match (r, std::str::from_utf8(&long)) {
                        (Ok((t, w)), Ok(s)) => {
                            proptest::prop_assert_eq!(t.as_ref(), s);
                            proptest::prop_assert!(w.is_empty());
                        }
                        (Ok((t, _)), Err(_)) => {
                            proptest::prop_assert!(lenient);
                            proptest::prop_assert_eq!(t, String::from_utf8_lossy(&long));
                        }
                        (Err(e), Err(u)) => {
                            proptest::prop_assert!(!lenient);
                            proptest::prop_assert_eq!(e.kind, InputErrorKind::Encoding);
                            let pos = u.valid_up_to();
                            proptest::prop_assert_eq!((e.line, e.col), line_col(&long, pos));
                        }
                        (Err(e), Ok(_)) => proptest::prop_assert!(false, "{e:?}"),
                    },
                    (Ok(_), Some(pos)) => proptest::prop_assert!(false, "binary at {pos}"),
                }
            }
        }
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
