//! Typed errors. Every input error carries the 1-based line and column it refers to,
//! the offending text, what was wrong and what would fix it.

use std::fmt;

/// What kind of input problem an [`InputError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputErrorKind {
    /// The input is not text: NUL bytes or other binary data.
    Binary,
    /// Bytes that are not UTF-8.
    Encoding,
    /// Nothing to analyse: no rules at all.
    Empty,
    /// A token or line that does not fit the grammar.
    Syntax,
    /// An option value out of range or malformed (a probability above 1, `--every 0`).
    Value,
    /// Structure that iptables-restore would reject: a rule outside any table, a table
    /// without COMMIT, a chain declared twice.
    Structure,
    /// A loop in the chain graph.
    Loop,
    /// A jump to a chain that a full dump does not declare.
    UndeclaredChain,
}

/// A problem with the input, located at a line and column (both 1-based; column 0 when
/// the problem concerns the whole line or the whole input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InputError {
    pub kind: InputErrorKind,
    pub line: u32,
    pub col: u32,
    /// The offending text (a token, or the start of the line), possibly shortened.
    pub text: String,
    /// What is wrong, or what was expected.
    pub message: String,
    /// What would fix it.
    pub hint: String,
}

impl InputError {
    pub fn new(
        kind: InputErrorKind,
        line: u32,
        col: u32,
        text: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        let mut text: String = text.into();
        if text.chars().count() > 80 {
            text = text.chars().take(77).collect::<String>() + "...";
        }
        Self {
            kind,
            line,
            col,
            text,
            message: message.into(),
            hint: hint.into(),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if self.col > 0 {
            write!(f, ", column {}", self.col)?;
        }
        write!(f, ": {}", self.message)?;
        if !self.text.is_empty() {
            write!(f, " (at `{}`)", self.text.escape_debug())?;
        }
        if !self.hint.is_empty() {
            write!(f, "\n  hint: {}", self.hint)?;
        }
        Ok(())
    }
}

/// Everything that can go wrong in lbaudit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Input(#[from] InputError),
    /// An input error rendered with the input's name and the offending line.
    #[error("{rendered}")]
    Located { error: InputError, rendered: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// The process exit code for this error: 2 for usage, input and I/O errors.
    pub fn exit_code(&self) -> i32 {
        2
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
