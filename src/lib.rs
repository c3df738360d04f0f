//! qgate: decides whether a quantized or converted Qwen3.5-family LLM may ship.
//!
//! Data flows one way: plan → oracle or capture → compare → verdict → report.
pub mod alloc_tuning;
pub mod capture;
pub mod commands;
pub mod error;
pub mod gate;
pub mod import;
pub mod model;
pub mod oracle;
pub mod oracle_cache;
pub mod outputs;
pub mod plan;
pub mod progress;
pub mod quant;
pub mod report;
pub mod shard;
