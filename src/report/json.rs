//! summary.json: the run summary, schema `qgate-report/1` (field names are stable; add, never rename).
use crate::error::{Error, Result};
use crate::gate::outcome::RunSummary;

pub fn render(s: &RunSummary) -> Result<String> {
    serde_json::to_string_pretty(s)
        .map(|mut t| {
            t.push('\n');
            t
        })
        .map_err(|e| Error::Internal(format!("summary.json: {e}")))
}
