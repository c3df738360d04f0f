//! `qgate plan`: tokenize text prompts (optionally through the model's own chat template) into a plan.
use crate::capture::{write_capture, CaptureMeta, SeqData};
use crate::error::{ExitCode, Result};
use crate::model::weights::resolve_model_dir;
use crate::plan::{read_prompts, PromptTokenizer};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (tokenizer.json, tokenizer_config.json / chat_template.jinja), or `Org/Name`.
    #[arg(long)]
    pub model: String,
    /// Prompts: a text file with one prompt per line, or a JSON array of strings.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Render each prompt as a user turn through the model's chat template, with the generation prompt.
    #[arg(long)]
    pub chat: bool,
    /// Output plan (a capture holding only token sequences).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn execute(args: Args) -> Result<ExitCode> {
    crate::outputs::check_capture_out(&args.out, &[args.prompts.as_path()])?;
    let dir = resolve_model_dir(&args.model)?;
    let tok = PromptTokenizer::load(&dir)?;
    let prompts = read_prompts(&args.prompts)?;
    let mut seqs = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let ids = if args.chat {
            tok.encode_chat(p)?
        } else {
            tok.encode_plain(p)?
        };
        if ids.is_empty() {
            return Err(crate::error::Error::input(
                &args.prompts,
                format!("prompt {i} encodes to no tokens (an empty prompt?); a plan sequence needs at least one"),
            ));
        }
        seqs.push(SeqData {
            tokens: ids,
            ..Default::default()
        });
    }
    let mut meta = CaptureMeta::new("plan", "qgate-plan", "none", tok.vocab_size);
    meta.extra.insert("chat_template".into(), args.chat.into());
    meta.extra.insert(
        "prompts_file".into(),
        args.prompts.display().to_string().into(),
    );
    let out = write_capture(&args.out, &meta, &seqs)?;
    let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    eprintln!(
        "qgate: plan of {} sequences / {n} tokens → {}",
        seqs.len(),
        out.display()
    );
    Ok(ExitCode::Pass)
}
