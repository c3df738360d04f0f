//! Errors as values. Every variant knows which exit code it maps to, so `main` stays thin.
use std::path::{Path, PathBuf};

/// Exit code for bad input or usage (the CLI contract: 0 pass, 1 gate failed, 2 bad input, 3 prompt rejected).
pub const EXIT_BAD_INPUT: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the user gave us is missing, malformed or inconsistent.
    #[error("{}: {problem}", path.display())]
    Input { path: PathBuf, problem: String },
    /// The command line asks for something impossible.
    #[error("{0}")]
    Usage(String),
    /// A numerical or internal failure (a bug in qgate, not in the input).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn input(path: impl AsRef<Path>, problem: impl Into<String>) -> Self {
        Error::Input {
            path: path.as_ref().to_path_buf(),
            problem: problem.into(),
        }
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input { .. } | Error::Usage(_) => EXIT_BAD_INPUT,
            Error::Internal(_) => 101,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Internal(format!("tensor op failed: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attach a file path to an I/O error.
pub fn io_err(path: impl AsRef<Path>, e: std::io::Error) -> Error {
    Error::input(path, e.to_string())
}
