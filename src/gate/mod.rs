//! The gate: compare candidate captures with an oracle capture and decide. Data flows one way:
//! `compare` → `summary` → `verdict` → `outcome`; reports format the outcome and never decide again.
//!
//! - `decision`: the decisions as types (status, rule, symptom kind, exit code);
//! - `kernel`: the hot row loops (decode, softmax sums, KL terms);
//! - `metrics`: per-position metrics;
//! - `compare`: streams rows across candidates (rayon) and checks that plans match;
//! - `margin_rule`: confident flips, tie-flips, control attribution;
//! - `rollout`: greedy rollout comparison;
//! - `symptoms`: craters, collapse, degenerate repetition;
//! - `stats`: Wilson, clustered SE, McNemar, percentiles;
//! - `policy`: the TOML gate policy;
//! - `provenance`: where an oracle capture came from; `roles`: oracle ≠ candidate, the control earns its role;
//! - `summary`: per-candidate figures (coverage included);
//! - `verdict`: rules in order, prompt validation, ship decision, exit codes;
//! - `evaluate`: the pipeline of `qgate run`; `ladder`: what `qgate sweep` decides from it;
//! - `outcome`: what summary.json holds;
//! - `bundle`: Core AI bundle directories and their captures; `sim_vs_bundle`: simulation vs bundle pairs.
pub mod bundle;
pub mod compare;
pub mod decision;
pub mod evaluate;
pub mod kernel;
pub mod ladder;
pub mod margin_rule;
pub mod metrics;
pub mod outcome;
pub mod policy;
pub mod provenance;
pub mod roles;
pub mod rollout;
pub mod rows;
pub mod sim_vs_bundle;
pub mod stats;
pub mod summary;
pub mod symptoms;
pub mod verdict;
