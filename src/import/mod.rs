//! `qgate import`: turn other tools' outputs into a `qgate-capture/1` file.
//!
//! Every importer exposes its input as a list of sequences that can be loaded one at a time
//! ([`SeqSource`]). The capture is written in two passes so that memory stays bounded by one sequence:
//! pass 1 loads and validates every sequence and records its shape, pass 2 loads each again and streams
//! it into a [`CaptureWriter`] (temp file + rename: an error never leaves a partial capture).
//!
//! Formats (facts in `shared/reference/coreai_formats.md`):
//! - [`npz`]: numpy archives `seq{i}_tokens`, `seq{i}_logits`, …, or bare `.npy` logits with `--plan`;
//! - [`llm_runner`]: Apple `llm-runner --raw-tokens F --save-logits OUT --save-logits-length full|K` JSON;
//! - [`transcript`]: the zoo's `coreai-gate-transcript/1` and `coreai-verify-transcript/1` records.
use crate::capture::{Capture, CaptureMeta, CaptureWriter, FloatKind, TensorSpec, MAX_VOCAB};
use crate::error::{io_err, Error, Result};
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub mod llm_runner;
pub mod npz;
pub mod transcript;

/// The foreign formats `qgate import --from` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Npz,
    LlmRunner,
    Transcript,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Npz => "npz",
            Format::LlmRunner => "llm-runner",
            Format::Transcript => "transcript",
        }
    }
}

/// Which side of a transcript becomes the capture's rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TranscriptSide {
    /// The engine's (bundle's) generated ids: the candidate.
    #[default]
    Engine,
    /// The oracle's greedy ids recorded in the transcript.
    Oracle,
}

/// Everything an import needs, independent of the command line.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub format: Format,
    pub files: Vec<PathBuf>,
    pub out: PathBuf,
    pub plan: Option<PathBuf>,
    pub label: Option<String>,
    pub vocab_size: Option<usize>,
    pub tokenizer: Option<PathBuf>,
    pub transcript_side: TranscriptSide,
}

impl ImportOptions {
    pub fn new(format: Format, files: Vec<PathBuf>, out: impl Into<PathBuf>) -> Self {
        ImportOptions {
            format,
            files,
            out: out.into(),
            plan: None,
            label: None,
            vocab_size: None,
            tokenizer: None,
            transcript_side: TranscriptSide::Engine,
        }
    }
}

/// Logits rows of one sequence, kept as the little-endian bytes of their on-disk kind.
#[derive(Debug, Clone)]
pub struct RowBytes {
    pub rows: usize,
    pub vocab: usize,
    pub kind: FloatKind,
    pub bytes: Vec<u8>,
}

/// Top-k rows of one sequence.
#[derive(Debug, Clone)]
pub struct TopRows {
    pub rows: usize,
    pub k: usize,
    pub ids: Vec<i64>,
    pub logits: Vec<f32>,
}

/// One imported sequence, in memory.
#[derive(Debug, Clone, Default)]
pub struct SeqBytes {
    pub tokens: Vec<i64>,
    pub logits: Option<RowBytes>,
    pub top: Option<TopRows>,
    pub argmax: Option<Vec<i64>>,
    pub rollout: Option<Vec<i64>>,
}

impl SeqBytes {
    /// The tensor layout this sequence needs, in the order [`write_seq`] writes it.
    fn specs(&self, i: usize) -> Vec<TensorSpec> {
        let mut v = vec![TensorSpec::new(
            format!("seq.{i}.tokens"),
            Dtype::I64,
            &[self.tokens.len()],
        )];
        if let Some(l) = &self.logits {
            v.push(TensorSpec::new(
                format!("seq.{i}.logits"),
                l.kind.dtype(),
                &[l.rows, l.vocab],
            ));
        }
        if let Some(t) = &self.top {
            v.push(TensorSpec::new(
                format!("seq.{i}.top_ids"),
                Dtype::I64,
                &[t.rows, t.k],
            ));
            v.push(TensorSpec::new(
                format!("seq.{i}.top_logits"),
                Dtype::F32,
                &[t.rows, t.k],
            ));
        }
        if let Some(a) = &self.argmax {
            v.push(TensorSpec::new(
                format!("seq.{i}.argmax"),
                Dtype::I64,
                &[a.len()],
            ));
        }
        if let Some(g) = &self.rollout {
            v.push(TensorSpec::new(
                format!("seq.{i}.rollout"),
                Dtype::I64,
                &[g.len()],
            ));
        }
        v
    }

    fn write(&self, w: &mut CaptureWriter) -> Result<()> {
        w.write_i64(&self.tokens)?;
        if let Some(l) = &self.logits {
            w.write_bytes(&l.bytes)?;
        }
        if let Some(t) = &self.top {
            w.write_i64(&t.ids)?;
            w.write_f32(&t.logits)?;
        }
        if let Some(a) = &self.argmax {
            w.write_i64(a)?;
        }
        if let Some(g) = &self.rollout {
            w.write_i64(g)?;
        }
        Ok(())
    }

    /// Every id in `0..vocab` and top-k no wider than the vocabulary (what `Capture::open` requires).
    fn check_vocab(&self, path: &Path, vocab: usize) -> Result<()> {
        check_ids(path, "tokens", &self.tokens, Some(vocab))?;
        if let Some(t) = &self.top {
            if t.k > vocab {
                return Err(Error::input(
                    path,
                    format!(
                        "top-k rows of {} entries but the vocab size is {vocab}",
                        t.k
                    ),
                ));
            }
            check_ids(path, "top_ids", &t.ids, Some(vocab))?;
        }
        if let Some(a) = &self.argmax {
            check_ids(path, "argmax", a, Some(vocab))?;
        }
        if let Some(g) = &self.rollout {
            check_ids(path, "rollout", g, Some(vocab))?;
        }
        Ok(())
    }

    /// Rows of per-position data (logits, top-k or argmax).
    pub fn rows(&self) -> usize {
        if let Some(l) = &self.logits {
            l.rows
        } else if let Some(t) = &self.top {
            t.rows
        } else if let Some(a) = &self.argmax {
            a.len()
        } else {
            0
        }
    }
}

/// A foreign input seen as a list of sequences that can be loaded (again) one at a time.
pub trait SeqSource {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Load and validate sequence `i`. Errors name the file and the problem.
    fn load(&mut self, i: usize) -> Result<SeqBytes>;
    /// The file sequence `i` comes from (for error messages).
    fn file_of(&self, i: usize) -> &Path;
    /// Format-specific facts for the capture metadata (`import` object).
    fn notes(&self) -> serde_json::Map<String, serde_json::Value>;
    /// Name of the runtime that produced the data (`meta.runtime`).
    fn runtime(&self) -> String;
}

/// The plan given with `--plan`: token sequences plus its declared vocab size.
pub struct Plan {
    pub path: PathBuf,
    pub seqs: Vec<Vec<i64>>,
    pub vocab_size: usize,
}

impl Plan {
    pub fn open(path: &Path) -> Result<Plan> {
        let c = Capture::open(path)?;
        Ok(Plan {
            path: path.to_path_buf(),
            seqs: c.plan(),
            vocab_size: c.meta.vocab_size,
        })
    }
}

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub out: PathBuf,
    pub sequences: usize,
    pub rows: usize,
    pub tokens: usize,
    pub dtype: String,
    pub vocab_size: usize,
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn default_label(files: &[PathBuf]) -> String {
    let stem = |p: &Path| {
        let mut name = p
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        // strip known suffixes (`.capture.safetensors`, `.logits.json`, `.npz`, …), keep dots inside names
        const SUFFIXES: [&str; 7] = [
            ".json",
            ".npz",
            ".npy",
            ".safetensors",
            ".capture",
            ".logits",
            ".transcript",
        ];
        while let Some(s) = SUFFIXES
            .iter()
            .find(|s| name.len() > s.len() && name.to_ascii_lowercase().ends_with(*s))
        {
            name.truncate(name.len() - s.len());
        }
        name
    };
    if files.len() > 1 {
        if let Some(dir) = files[0]
            .parent()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
        {
            if !dir.is_empty() {
                return dir;
            }
        }
    }
    let s = files.first().map(|p| stem(p)).unwrap_or_default();
    if s.is_empty() {
        "imported".to_string()
    } else {
        s
    }
}

/// Check an id lies in `[0, vocab)`; `what` names the array in the message.
pub(crate) fn check_ids(path: &Path, what: &str, ids: &[i64], vocab: Option<usize>) -> Result<()> {
    for (j, &id) in ids.iter().enumerate() {
        if id < 0 {
            return Err(Error::input(
                path,
                format!("{what}[{j}] = {id} is negative"),
            ));
        }
        if let Some(v) = vocab {
            if id as u64 >= v as u64 {
                return Err(Error::input(
                    path,
                    format!("{what}[{j}] = {id} is outside the vocabulary (vocab_size {v})"),
                ));
            }
        }
    }
    Ok(())
}

/// Run an import: open the source, validate everything, write the capture atomically.
pub fn import(opts: &ImportOptions) -> Result<ImportSummary> {
    if opts.files.is_empty() {
        return Err(Error::usage("qgate import: no input files given"));
    }
    for f in &opts.files {
        if f == &opts.out {
            return Err(Error::usage(format!(
                "qgate import: --out {} is also an input file",
                f.display()
            )));
        }
    }
    if opts.vocab_size == Some(0) {
        return Err(Error::usage("--vocab-size must be at least 1"));
    }
    if let Some(v) = opts.vocab_size.filter(|&v| v > MAX_VOCAB) {
        return Err(Error::usage(format!(
            "--vocab-size {v} is larger than a capture may declare ({MAX_VOCAB})"
        )));
    }
    let plan = match &opts.plan {
        Some(p) => Some(Plan::open(p)?),
        None => None,
    };
    if let (Some(p), Some(v)) = (&plan, opts.vocab_size) {
        if p.vocab_size != v {
            return Err(Error::usage(format!(
                "--vocab-size {v} disagrees with the plan {} (vocab_size {})",
                p.path.display(),
                p.vocab_size
            )));
        }
    }
    let known_vocab = opts.vocab_size.or(plan.as_ref().map(|p| p.vocab_size));
    let mut source: Box<dyn SeqSource> = match opts.format {
        Format::Npz => Box::new(npz::NpzSource::open(
            &opts.files,
            plan.as_ref(),
            known_vocab,
        )?),
        Format::LlmRunner => Box::new(llm_runner::LlmRunnerSource::open(
            &opts.files,
            plan.as_ref(),
            known_vocab,
        )?),
        Format::Transcript => Box::new(transcript::TranscriptSource::open(
            &opts.files,
            plan.as_ref(),
            known_vocab,
            opts.tokenizer.as_deref(),
            opts.transcript_side,
        )?),
    };
    if source.is_empty() {
        return Err(Error::input(&opts.files[0], "no sequences found"));
    }

    // Pass 1: load and validate every sequence, collect the layout.
    let mut specs = Vec::new();
    let mut shapes = Vec::new();
    let mut vocab: Option<(usize, usize)> = None; // (vocab, seq it came from)
    let mut kind: Option<(FloatKind, usize)> = None;
    let (mut rows_total, mut tokens_total) = (0usize, 0usize);
    let mut any_top = false;
    for i in 0..source.len() {
        let s = source.load(i)?;
        let file = source.file_of(i).to_path_buf();
        if let Some(l) = &s.logits {
            if l.vocab > MAX_VOCAB {
                return Err(Error::input(
                    &file,
                    format!(
                        "rows of {} values: larger than a capture's vocabulary may be ({MAX_VOCAB})",
                        l.vocab
                    ),
                ));
            }
            match vocab {
                Some((v, j)) if v != l.vocab => {
                    return Err(Error::input(
                        &file,
                        format!(
                            "inconsistent rows: {} values per row, but sequence {j} has {v}",
                            l.vocab
                        ),
                    ))
                }
                _ => vocab = Some((l.vocab, i)),
            }
            match kind {
                Some((k, j)) if k != l.kind => {
                    return Err(Error::input(
                        &file,
                        format!(
                            "inconsistent rows: {} logits, but sequence {j} has {}",
                            kind_name(l.kind),
                            kind_name(k)
                        ),
                    ))
                }
                _ => kind = Some((l.kind, i)),
            }
        }
        any_top |= s.top.is_some();
        rows_total += s.rows();
        tokens_total += s.tokens.len();
        let sp = s.specs(i);
        shapes.push(sp.iter().map(|t| t.shape.clone()).collect::<Vec<_>>());
        specs.extend(sp);
    }
    let vocab_size = match (vocab.map(|v| v.0), known_vocab) {
        (Some(v), Some(k)) if v != k => {
            return Err(Error::input(
                source.file_of(0),
                format!("rows have {v} values but the vocab size is {k} (from --vocab-size or the plan)"),
            ))
        }
        (Some(v), _) => v,
        (None, Some(k)) => k,
        (None, None) => {
            return Err(Error::usage(
                "the input carries no full logits rows, so the vocab size cannot be inferred: pass --vocab-size N or --plan PLAN",
            ))
        }
    };
    let dtype = match (kind, any_top) {
        (Some((k, _)), _) => kind_name(k).to_string(),
        (None, true) => "f32".to_string(),
        (None, false) => "none".to_string(),
    };

    let label = opts
        .label
        .clone()
        .unwrap_or_else(|| default_label(&opts.files));
    let mut meta = CaptureMeta::new(&label, &source.runtime(), &dtype, vocab_size);
    let mut from = Vec::new();
    for f in &opts.files {
        from.push(serde_json::json!({
            "file": f.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            "sha256": sha256_file(f)?,
        }));
    }
    meta.extra
        .insert("imported_from".into(), serde_json::Value::Array(from));
    let mut notes = source.notes();
    notes.insert("format".into(), opts.format.name().into());
    notes.insert("qgate_version".into(), env!("CARGO_PKG_VERSION").into());
    if let Some(p) = &plan {
        notes.insert(
            "plan".into(),
            serde_json::json!({
                "file": p.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
                "sha256": sha256_file(&p.path)?,
            }),
        );
    }
    meta.extra
        .insert("import".into(), serde_json::Value::Object(notes));

    // Pass 2: stream each sequence into the writer (temp file, renamed on success).
    let mut w = CaptureWriter::create(&opts.out, &meta, &specs)?;
    for (i, shape) in shapes.iter().enumerate() {
        let s = source.load(i)?;
        let again: Vec<_> = s.specs(i).into_iter().map(|t| t.shape).collect();
        if &again != shape {
            return Err(Error::input(
                source.file_of(i),
                "the file changed while it was being imported",
            ));
        }
        // The vocabulary is settled only after pass 1 (a sequence without logits could not be checked
        // against it then): hold every id and K to it, so the capture written here always opens.
        s.check_vocab(source.file_of(i), vocab_size)?;
        s.write(&mut w)?;
    }
    let out = w.finish()?;
    Ok(ImportSummary {
        out,
        sequences: shapes.len(),
        rows: rows_total,
        tokens: tokens_total,
        dtype,
        vocab_size,
    })
}

pub(crate) fn kind_name(k: FloatKind) -> &'static str {
    match k {
        FloatKind::F32 => "f32",
        FloatKind::F16 => "f16",
        FloatKind::BF16 => "bf16",
    }
}

/// File name for messages and metadata.
pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Compare a sequence's tokens with the plan's; on a mismatch say where.
pub(crate) fn check_plan_tokens(path: &Path, plan: &Plan, i: usize, tokens: &[i64]) -> Result<()> {
    let Some(want) = plan.seqs.get(i) else {
        return Err(Error::input(
            path,
            format!(
                "sequence {i} has no counterpart in the plan {} ({} sequences)",
                plan.path.display(),
                plan.seqs.len()
            ),
        ));
    };
    if want.as_slice() == tokens {
        return Ok(());
    }
    let d = want
        .iter()
        .zip(tokens)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(tokens.len()));
    let show = |v: &[i64]| {
        v.get(d)
            .map(|t| t.to_string())
            .unwrap_or_else(|| "(end)".into())
    };
    Err(Error::input(
        path,
        format!(
            "tokens differ from plan sequence {i}: {} tokens vs the plan's {}, first difference at position {d} ({} vs the plan's {})",
            tokens.len(),
            want.len(),
            show(tokens),
            show(want)
        ),
    ))
}
