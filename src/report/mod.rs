//! Reports of a `qgate run`: report.md, positions.csv, summary.json, positions.svg, written to a temporary
//! directory and renamed into place (never a half-written report directory).
pub mod ci;
pub mod csv;
pub mod github;
pub mod json;
pub mod junit;
pub mod markdown;
pub mod plot;
pub mod sensitivity;
pub mod terminal;
pub mod tokens;
pub mod write;
