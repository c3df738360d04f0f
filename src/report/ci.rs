//! The CI-facing outputs of `qgate run` and `qgate sweep`, after the reports are written: `--junit FILE`
//! and, inside GitHub Actions, the step summary and annotations.
use crate::error::Result;
use crate::gate::outcome::RunSummary;
use std::path::Path;

pub fn write(run: &RunSummary, junit: Option<&Path>) -> Result<()> {
    if let Some(p) = junit {
        super::junit::write(p, run)?;
    }
    super::github::emit(run)
}
