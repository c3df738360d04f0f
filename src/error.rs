//! Errors as values. Every variant knows which exit code it maps to, so `main` stays thin.
use std::path::{Path, PathBuf};

/// Exit code for bad input or usage (the CLI contract: 0 pass, 1 gate failed, 2 bad input, 3 prompt rejected).
pub const EXIT_BAD_INPUT: i32 = 2;

/// The process exit code of every command: 0 pass, 1 gate failed, 2 bad input or usage, 3 prompt rejected
/// (101 only for an internal error, a bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Pass,
    GateFailed,
    BadInput,
    PromptRejected,
    Internal,
}

impl ExitCode {
    pub fn code(self) -> i32 {
        match self {
            ExitCode::Pass => 0,
            ExitCode::GateFailed => 1,
            ExitCode::BadInput => 2,
            ExitCode::PromptRejected => 3,
            ExitCode::Internal => 101,
        }
    }
}

impl serde::Serialize for ExitCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_i32(self.code())
    }
}

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
        self.exit().code()
    }
    pub fn exit(&self) -> ExitCode {
        match self {
            Error::Input { .. } | Error::Usage(_) => ExitCode::BadInput,
            Error::Internal(_) => ExitCode::Internal,
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
