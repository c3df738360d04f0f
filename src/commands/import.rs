//! `qgate import --from npz|llm-runner|transcript FILE... --out CAPTURE [--plan PLAN]`.
use crate::error::{ExitCode, Result};
use crate::import::{import, Format, ImportOptions, TranscriptSide};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input format: `npz` (numpy .npz archives, or .npy logits with --plan), `llm-runner`
    /// (`--raw-tokens … --save-logits … --save-logits-length full|K` JSON, one file per sequence in plan
    /// order), `transcript` (`coreai-gate-transcript/1` / `coreai-verify-transcript/1`, one per sequence).
    #[arg(long = "from", value_enum)]
    pub from: Format,
    /// Input files.
    #[arg(required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// The capture to write (`.capture.safetensors`); written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Plan (or any capture) whose token sequences the input must match; also supplies the vocab size.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Label stored in the capture (default: from the input file name).
    #[arg(long)]
    pub label: Option<String>,
    /// Vocabulary size, required when the input has no full logits rows and no --plan is given.
    #[arg(long = "vocab-size")]
    pub vocab_size: Option<usize>,
    /// tokenizer.json used to re-tokenize transcripts that record only text.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Which side of a transcript becomes the rollout.
    #[arg(long = "transcript-side", value_enum, default_value = "engine")]
    pub transcript_side: TranscriptSide,
}

pub fn execute(args: Args) -> Result<ExitCode> {
    let inputs: Vec<&std::path::Path> = args
        .files
        .iter()
        .map(|p| p.as_path())
        .chain(args.plan.as_deref())
        .collect();
    crate::outputs::check_capture_out(&args.out, &inputs)?;
    let opts = ImportOptions {
        format: args.from,
        files: args.files,
        out: args.out,
        plan: args.plan,
        label: args.label,
        vocab_size: args.vocab_size,
        tokenizer: args.tokenizer,
        transcript_side: args.transcript_side,
    };
    let s = import(&opts)?;
    println!(
        "qgate import: wrote {} ({} sequences, {} tokens, {} rows, dtype {}, vocab {})",
        s.out.display(),
        s.sequences,
        s.tokens,
        s.rows,
        s.dtype,
        s.vocab_size
    );
    Ok(ExitCode::Pass)
}
