//! `qgate oracle`: run the HF-exact oracle over a plan and write a capture.
use crate::capture::Capture;
use crate::error::{Error, Result};
use crate::model::precision::Precision;
use crate::model::weights::resolve_model_dir;
use crate::oracle::{run_oracle, OracleRequest};
use std::io::IsTerminal;
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
}

pub fn execute(args: Args) -> Result<i32> {
    let precision = Precision::parse(&args.dtype).ok_or_else(|| {
        Error::usage(format!(
            "--dtype `{}`: expected f32, bf16 or f16",
            args.dtype
        ))
    })?;
    let model_dir = resolve_model_dir(&args.model)?;
    let plan = Capture::open(&args.plan)?.plan();
    let out = run_oracle(&OracleRequest {
        model_dir: &model_dir,
        precision,
        plan: &plan,
        rollout: args.rollout,
        out: &args.out,
        progress: std::io::stderr().is_terminal(),
    })?;
    let positions: usize = plan.iter().map(Vec::len).sum();
    eprintln!(
        "qgate: oracle {} over {} sequences / {} positions → {}",
        precision.name(),
        plan.len(),
        positions,
        out.display()
    );
    Ok(0)
}
