//! `qgate oracle`: run the HF-exact oracle over a plan and write a capture.
use crate::capture::Capture;
use crate::error::{Error, ExitCode, Result};
use crate::model::precision::Precision;
use crate::model::weights::resolve_model_dir;
use crate::oracle::{run_oracle, ExecOptions, OracleRequest};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (config.json + safetensors), or `Org/Name` in the local Hugging Face cache.
    #[arg(long)]
    pub model: String,
    /// Compute precision: f32, bf16 (HF's bf16 rounding points) or f16 (the fp16 control).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Any qgate capture; its token sequences are the plan.
    #[arg(long)]
    pub plan: PathBuf,
    /// Output capture file.
    #[arg(long)]
    pub out: PathBuf,
    /// Greedy continuation length per sequence (stops early after an EOS token).
    #[arg(long, default_value_t = 16)]
    pub rollout: usize,
    /// Memory budget (`8GiB`, `24G`, `6000MB`): above it the oracle streams layers from disk instead of
    /// loading the whole model. Default: three quarters of physical memory.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// Always stream layers (one layer's weights in memory at a time; same numbers).
    #[arg(long, conflicts_with = "no_stream")]
    pub stream: bool,
    /// Never stream: load the whole model even above the memory budget.
    #[arg(long)]
    pub no_stream: bool,
    /// Where to run: cpu, cuda or cuda:N (a build with the `cuda` feature; scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU kernels: auto (the fastest this CPU runs), avx512, avx2 or portable (plain Rust, any CPU).
    /// Forcing a set this CPU cannot run is an error. Same numbers on every set (see README).
    #[arg(long, default_value = "auto", value_name = "KERNELS")]
    pub kernels: String,
    /// When streaming, load each layer's weights on the computing thread instead of prefetching the
    /// next layer on a background thread (same numbers, less memory, slower; for benchmarks).
    #[arg(long)]
    pub no_prefetch: bool,
}

pub fn execute(args: Args) -> Result<ExitCode> {
    crate::model::cpu::select_arg(&args.kernels)?;
    crate::outputs::check_capture_out(&args.out, &[args.plan.as_path()])?;
    let precision = Precision::parse(&args.dtype).ok_or_else(|| {
        Error::usage(format!(
            "--dtype `{}`: expected f32, bf16 or f16",
            args.dtype
        ))
    })?;
    let mut exec = ExecOptions::from_args(
        crate::model::device::parse_device(&args.device)?,
        args.max_memory.as_deref(),
        args.stream,
        args.no_stream,
    )?;
    exec.prefetch = !args.no_prefetch;
    let model_dir = resolve_model_dir(&args.model)?;
    let plan = Capture::open(&args.plan)?.plan();
    let out = run_oracle(&OracleRequest {
        model_dir: &model_dir,
        precision,
        plan: &plan,
        rollout: args.rollout,
        out: &args.out,
        progress: crate::progress::enabled(),
        exec,
    })?;
    let positions: usize = plan.iter().map(Vec::len).sum();
    eprintln!(
        "qgate: oracle {} on {} over {} sequences / {} positions → {}",
        precision.name(),
        args.device,
        plan.len(),
        positions,
        out.display()
    );
    Ok(ExitCode::Pass)
}
