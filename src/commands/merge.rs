//! `qgate merge --out FILE PARTS…`: join the partial captures of `qgate oracle --shard i/N`.
use crate::capture::Capture;
use crate::error::{ExitCode, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The partial captures written by `qgate oracle --shard i/N`, all N of them, in any order.
    #[arg(required = true, num_args = 1..)]
    pub parts: Vec<PathBuf>,
    /// The whole-plan oracle capture to write (atomically; never one of the parts).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn execute(args: Args) -> Result<ExitCode> {
    let inputs: Vec<&std::path::Path> = args.parts.iter().map(PathBuf::as_path).collect();
    crate::outputs::check_capture_out(&args.out, &inputs)?;
    let parts = args
        .parts
        .iter()
        .map(Capture::open)
        .collect::<Result<Vec<_>>>()?;
    let out = crate::shard::merge(&parts, &args.out)?;
    let seqs: usize = parts.iter().map(Capture::len).sum();
    eprintln!(
        "qgate: merged {} shards ({seqs} sequences) → {}",
        parts.len(),
        out.display()
    );
    Ok(ExitCode::Pass)
}
