//! One module per subcommand: its clap `Args` and an `execute` returning the process exit code.
pub mod import;
pub mod locate;
pub mod merge;
pub mod oracle;
pub mod plan;
pub mod run;
pub mod simulate;
pub mod sweep;

/// The oracle for a model-driven command (`sweep`, `locate`): a dtype computed (or taken from the cache)
/// on `device`, or a capture file, untrusted; refused unless its sequences are `plan_cap`'s.
fn oracle_for_plan(
    oracle: &str,
    model_dir: &std::path::Path,
    plan_cap: &crate::capture::Capture,
    device: &candle_core::Device,
) -> crate::error::Result<crate::oracle_cache::ResolvedOracle> {
    let resolved = crate::oracle_cache::resolve_oracle(
        oracle,
        Some(model_dir),
        None,
        plan_cap,
        device,
        false,
    )?;
    crate::gate::compare::check_same_plan(&resolved.capture, plan_cap)?;
    Ok(resolved)
}
