//! The gate: compare candidate captures with an oracle capture and decide.
//!
//! - `kernel`: the hot row loops (decode, softmax sums, KL terms);
//! - `metrics`: per-position metrics;
//! - `compare`: streams rows across candidates (rayon) and checks that plans match;
//! - `margin_rule`: confident flips, tie-flips, control attribution;
//! - `rollout`: greedy rollout comparison;
//! - `stats`: Wilson, clustered SE, McNemar, percentiles;
//! - `policy`: the TOML gate policy;
//! - `summary`: per-candidate figures;
//! - `verdict`: rules in order, symptom flags, prompt validation, exit codes;
//! - `bundle`: Core AI bundle directories and their captures.
pub mod bundle;
pub mod compare;
pub mod kernel;
pub mod margin_rule;
pub mod metrics;
pub mod policy;
pub mod rollout;
pub mod sim_vs_bundle;
pub mod stats;
pub mod summary;
pub mod verdict;
