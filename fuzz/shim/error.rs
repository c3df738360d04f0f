//! Stand-in for `src/error.rs` in the fuzz build: the same API minus the candle conversion.
//! Keep in step with `src/error.rs` (a drift shows up as a compile error here).
#![allow(dead_code)]
use std::path::{Path, PathBuf};

pub const EXIT_BAD_INPUT: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {problem}", path.display())]
    Input { path: PathBuf, problem: String },
    #[error("{0}")]
    Usage(String),
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

pub type Result<T> = std::result::Result<T, Error>;

pub fn io_err(path: impl AsRef<Path>, e: std::io::Error) -> Error {
    Error::input(path, e.to_string())
}
