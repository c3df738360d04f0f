//! `qgate locate`: where a simulated scheme's error enters. Simulates the scheme, gates it against the
//! oracle (f16 control) for its introduced confident flips, then compares the residual stream after every
//! layer with the unquantized model's at those positions (`quant::locate`). Exit 0 once located (the
//! diagnosis is the output), 2 on bad input.
use super::simulate::{parse_compute, parse_scale_dtype, simulate, SimRequest};
use crate::capture::Capture;
use crate::error::{ExitCode, Result};
use crate::gate::policy::Policy;
use crate::gate::summary::Identity;
use crate::model::weights::resolve_model_dir;
use crate::quant::locate;
use crate::quant::scheme::Scheme;
use crate::report;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (config.json + safetensors), or `Org/Name` in the local Hugging Face cache.
    #[arg(long)]
    pub model: String,
    /// Any qgate capture; its token sequences are the plan.
    #[arg(long)]
    pub plan: PathBuf,
    /// The scheme to diagnose (as `simulate --scheme`: canonical, alias, or a mix such as a `--search` result).
    #[arg(long)]
    pub scheme: String,
    /// The oracle: `bf16`, `f32` or `f16` (run or reuse the cached oracle), or an oracle capture file.
    #[arg(long, default_value = "bf16")]
    pub oracle: String,
    /// Compute precision of the simulation (and of the unquantized reference): f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    pub compute: String,
    /// Scale (and LUT) dtype: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub scale_dtype: String,
    /// Gate policy TOML (default: the built-in gates/release.toml).
    #[arg(long)]
    pub gate: Option<PathBuf>,
    /// Print the result as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Where the models run: cpu, cuda or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn execute(args: Args) -> Result<ExitCode> {
    let policy = Policy::load(args.gate.as_deref())?;
    let compute = parse_compute(&args.compute)?;
    let sd = parse_scale_dtype(&args.scale_dtype)?;
    let scheme = Scheme::parse(&args.scheme)?;
    let model_dir = resolve_model_dir(&args.model)?;
    let plan_cap = Capture::open(&args.plan)?;
    let plan = plan_cap.plan();
    policy.check_against_plan(plan.len()).map_err(|m| {
        crate::error::Error::usage(format!("gate policy does not fit the plan: {m}"))
    })?;
    let device = crate::model::device::parse_device(&args.device)?;
    let resolved = super::oracle_for_plan(&args.oracle, &model_dir, &plan_cap, &device)?;
    let oracle = &resolved.capture;
    let scratch = tempfile::tempdir().map_err(|e| crate::error::io_err(std::env::temp_dir(), e))?;
    let control_path = scratch.path().join("f16.capture.safetensors");
    eprintln!("qgate: simulating the f16 control…");
    let c = simulate(SimRequest {
        model_dir: &model_dir,
        plan: &plan,
        scheme: Scheme::parse("f16")?,
        compute,
        scale_dtype: sd,
        rollout: 0,
        out: &control_path,
        progress: crate::progress::enabled(),
        device: device.clone(),
    })?;
    let control = Capture::open(&c.capture)?;
    let control_id = Identity {
        label: "f16".into(),
        capture: control.path.display().to_string(),
        bundle: None,
        mode: Some("f16".into()),
        size_bytes: Some(c.report.size_bytes()),
        simulation: true,
    };
    eprintln!(
        "qgate: simulating {} and tracing every layer…",
        scheme.label()
    );
    let l = locate::run(locate::Request {
        model_dir: &model_dir,
        plan: &plan,
        oracle,
        provenance: resolved.provenance.clone(),
        control: &control,
        control_id,
        policy: &policy,
        scheme,
        compute,
        scale_dtype: sd,
        scratch: scratch.path(),
        device,
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&l)
                .map_err(|e| crate::error::Error::Internal(e.to_string()))?
        );
    } else {
        print!("{}", report::sensitivity::locate_md(&l));
    }
    eprintln!("qgate: {}", l.note);
    Ok(ExitCode::Pass)
}
