//! Parser for iptables-save, `iptables -S` and grep fragments (being written).
use crate::error::InputError;
use crate::model::{Ruleset, Warning};
use std::borrow::Cow;

/// Options for [`parse`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseOptions {
    /// Skip lines that cannot be parsed, with a warning for each, instead of failing.
    pub lenient: bool,
}

/// Checks that the bytes are text and returns them as `str`.
pub fn decode(bytes: &[u8], lenient: bool) -> Result<(Cow<'_, str>, Vec<Warning>), InputError> {
    let _ = (bytes, lenient);
    unimplemented!("parser being written")
}

/// Parses iptables-save / `iptables -S` / fragment text into a [`Ruleset`].
pub fn parse<'a>(text: &'a str, opts: &ParseOptions) -> Result<Ruleset<'a>, InputError> {
    let _ = (text, opts);
    unimplemented!("parser being written")
}
