//! Apple `llm-runner --raw-tokens F --save-logits OUT --save-logits-length full|K` files
//! (continuation-evaluation schema, `coreai_formats.md` §1.3–§1.5, §1.7).
//!
//! For an input of T tokens the runner writes `context_tokens = [tokens[0]]`,
//! `continuation_tokens = tokens[1:]` and T−1 `positions`; `positions[j]` holds capture row `C_j` (the
//! logits after `tokens[0..=j]`, target `tokens[j+1]`). The row after the last token is computed and
//! discarded, so an imported sequence has T−1 rows. The capture tool (issue 4) appends one extra token to
//! make the last real row appear: with `--plan`, a file holding the plan sequence plus one token is
//! imported as the plan sequence with all T rows.
//!
//! Rows are `logits_base64`: the raw bytes of the engine's logits, fp16 little-endian on Apple silicon
//! (f32 on x86_64 macOS), standard base64 with padding; or `top_k: [{token_id, token, logit}]`.
use super::{
    check_ids, check_plan_tokens, file_name, Plan, RowBytes, SeqBytes, SeqSource, TopRows,
};
use crate::capture::FloatKind;
use crate::error::{io_err, Error, Result};
use base64::Engine as _;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct EvalFile {
    context_tokens: Option<Vec<i64>>,
    continuation_tokens: Option<Vec<i64>>,
    positions: Option<Vec<Position>>,
    /// Present in the generation schemas (§1.6), which this importer refuses.
    tokens: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Position {
    index: Option<i64>,
    target_token: Option<i64>,
    logits_base64: Option<String>,
    top_k: Option<Vec<TopK>>,
}

#[derive(Deserialize)]
struct TopK {
    token_id: i64,
    logit: f32,
}

/// One parsed and validated evaluation file.
pub struct EvalSeq {
    /// `context_tokens + continuation_tokens` (T tokens).
    pub tokens: Vec<i64>,
    pub rows: Rows,
    /// True when the vocab size was unknown and the rows were taken as fp16 by assumption.
    pub fp16_assumed: bool,
}

pub enum Rows {
    Full(RowBytes),
    TopK(TopRows),
}

/// Parse one continuation-evaluation JSON document. `vocab` (when known) decides whether a row of
/// 2·V bytes is fp16 or 4·V bytes is f32; otherwise rows are taken as fp16 (Apple silicon).
/// Errors are one-line problems, without the path.
pub fn parse(bytes: &[u8], vocab: Option<usize>) -> std::result::Result<EvalSeq, String> {
    let f: EvalFile =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid llm-runner JSON ({e})"))?;
    let Some(positions) = f.positions else {
        if f.tokens.is_some() {
            return Err("this is llm-runner's generation schema (`tokens` entries, written without --raw-tokens); \
                        its rows are sampled, not teacher-forced, and cannot be aligned: rerun with --raw-tokens F --save-logits OUT --save-logits-length full".into());
        }
        return Err("not an llm-runner continuation-evaluation file (no `positions` array)".into());
    };
    let context = f
        .context_tokens
        .ok_or("no `context_tokens` (not a continuation-evaluation file)")?;
    let cont = f
        .continuation_tokens
        .ok_or("no `continuation_tokens` (not a continuation-evaluation file)")?;
    if context.len() != 1 {
        return Err(format!(
            "`context_tokens` has {} tokens; raw-token evaluation (--raw-tokens) always has exactly 1 \
             (a --continuation text-mode file starts its rows after the context and cannot fill capture rows from 0)",
            context.len()
        ));
    }
    if cont.is_empty() {
        return Err(
            "`continuation_tokens` is empty (raw-token evaluation needs at least 2 tokens)".into(),
        );
    }
    let mut tokens = context;
    tokens.extend_from_slice(&cont);
    check_ids_str("tokens", &tokens, vocab)?;
    if positions.len() != cont.len() {
        return Err(format!(
            "{} positions for {} continuation tokens (expected one position per continuation token)",
            positions.len(),
            cont.len()
        ));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let full = positions[0].logits_base64.is_some();
    let mut out_bytes: Vec<u8> = Vec::new();
    let mut row_len: Option<usize> = None;
    let mut top_ids: Vec<i64> = Vec::new();
    let mut top_logits: Vec<f32> = Vec::new();
    let mut k: Option<usize> = None;
    for (j, p) in positions.iter().enumerate() {
        if let Some(ix) = p.index {
            if ix != j as i64 {
                return Err(format!("positions[{j}] has index {ix}, expected {j}"));
            }
        }
        if let Some(t) = p.target_token {
            if t != cont[j] {
                return Err(format!(
                    "positions[{j}].target_token {t} is not continuation_tokens[{j}] = {}",
                    cont[j]
                ));
            }
        }
        if full {
            let Some(s) = &p.logits_base64 else {
                return Err(format!(
                    "inconsistent rows: positions[{j}] has no `logits_base64` but positions[0] has"
                ));
            };
            let row = b64
                .decode(s.as_bytes())
                .map_err(|e| format!("positions[{j}].logits_base64 is not valid base64 ({e})"))?;
            if row.is_empty() {
                return Err(format!("positions[{j}].logits_base64 is empty"));
            }
            match row_len {
                None => row_len = Some(row.len()),
                Some(n) if n != row.len() => {
                    return Err(format!(
                        "inconsistent rows: positions[{j}] has {} bytes but positions[0] has {n}",
                        row.len()
                    ))
                }
                _ => {}
            }
            // No up-front `reserve(row_len × positions)`: a large first row followed by many empty
            // positions would ask for far more memory than the file holds before the mismatch is seen.
            out_bytes.extend_from_slice(&row);
        } else {
            let Some(top) = &p.top_k else {
                return Err(format!(
                    "positions[{j}] has neither `logits_base64` nor `top_k` (pass --save-logits-length full or an integer)"
                ));
            };
            if p.logits_base64.is_some() {
                return Err(format!(
                    "inconsistent rows: positions[{j}] has `logits_base64` but positions[0] has not"
                ));
            }
            match k {
                None if top.is_empty() => {
                    return Err(format!("positions[{j}].top_k is empty"));
                }
                None => k = Some(top.len()),
                Some(k0) if k0 != top.len() => {
                    return Err(format!(
                        "inconsistent rows: positions[{j}] has {} top-k entries but positions[0] has {k0}",
                        top.len()
                    ))
                }
                _ => {}
            }
            for (e, t) in top.iter().enumerate() {
                if t.token_id < 0 || vocab.is_some_and(|v| t.token_id as u64 >= v as u64) {
                    return Err(format!(
                        "positions[{j}].top_k[{e}].token_id {} is outside the vocabulary",
                        t.token_id
                    ));
                }
                top_ids.push(t.token_id);
                top_logits.push(t.logit);
            }
        }
    }
    let rows = positions.len();
    if full {
        let n = row_len.unwrap_or(0);
        let (kind, v) = match vocab {
            Some(v) if n == 2 * v => (FloatKind::F16, v),
            Some(v) if n == 4 * v => (FloatKind::F32, v),
            Some(v) => {
                return Err(format!(
                    "row length does not match the vocabulary: {n} bytes per row is neither {v} fp16 nor {v} f32 values (vocab_size {v})"
                ))
            }
            None if !n.is_multiple_of(2) => {
                return Err(format!(
                    "row length {n} bytes is not a whole number of fp16 values"
                ))
            }
            None => (FloatKind::F16, n / 2),
        };
        Ok(EvalSeq {
            tokens,
            fp16_assumed: vocab.is_none(),
            rows: Rows::Full(RowBytes {
                rows,
                vocab: v,
                kind,
                bytes: out_bytes,
            }),
        })
    } else {
        Ok(EvalSeq {
            tokens,
            fp16_assumed: false,
            rows: Rows::TopK(TopRows {
                rows,
                k: k.unwrap_or(0),
                ids: top_ids,
                logits: top_logits,
            }),
        })
    }
}

fn check_ids_str(what: &str, ids: &[i64], vocab: Option<usize>) -> std::result::Result<(), String> {
    check_ids(Path::new(""), what, ids, vocab).map_err(|e| match e {
        Error::Input { problem, .. } => problem,
        other => other.to_string(),
    })
}

/// One file per sequence, in plan order.
pub struct LlmRunnerSource {
    files: Vec<PathBuf>,
    plan: Option<Plan>,
    vocab: Option<usize>,
    extra_token_dropped: Vec<bool>,
    fp16_assumed: bool,
}

impl LlmRunnerSource {
    pub fn open(files: &[PathBuf], plan: Option<&Plan>, vocab: Option<usize>) -> Result<Self> {
        if let Some(p) = plan {
            if p.seqs.len() != files.len() {
                return Err(Error::usage(format!(
                    "the plan {} has {} sequences but {} llm-runner files were given (one file per sequence, in plan order)",
                    p.path.display(),
                    p.seqs.len(),
                    files.len()
                )));
            }
        }
        Ok(LlmRunnerSource {
            files: files.to_vec(),
            plan: plan.map(|p| Plan {
                path: p.path.clone(),
                seqs: p.seqs.clone(),
                vocab_size: p.vocab_size,
            }),
            vocab,
            extra_token_dropped: vec![false; files.len()],
            fp16_assumed: false,
        })
    }
}

impl SeqSource for LlmRunnerSource {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn file_of(&self, i: usize) -> &Path {
        &self.files[i]
    }
    fn runtime(&self) -> String {
        "llm-runner".into()
    }
    fn load(&mut self, i: usize) -> Result<SeqBytes> {
        let path = &self.files[i];
        let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
        let ev = parse(&bytes, self.vocab).map_err(|p| Error::input(path, p))?;
        let EvalSeq {
            mut tokens,
            rows,
            fp16_assumed,
        } = ev;
        self.fp16_assumed |= fp16_assumed;
        if let Some(plan) = &self.plan {
            let want = &plan.seqs[i];
            if tokens.len() == want.len() + 1 && tokens[..want.len()] == want[..] {
                // The capture tool's extra token: keep the plan's tokens and all T rows.
                tokens.truncate(want.len());
                self.extra_token_dropped[i] = true;
            } else {
                check_plan_tokens(path, plan, i, &tokens).map_err(|e| match e {
                    Error::Input { path, problem } => Error::Input {
                        path,
                        problem: format!(
                            "{problem} (expected the plan sequence itself, or the plan sequence plus the one token \
                             the capture tool appends so that llm-runner emits the last plan row)"
                        ),
                    },
                    other => other,
                })?;
                self.extra_token_dropped[i] = false;
            }
        }
        // rows ≤ tokens always holds: T tokens, T−1 rows (or T after the extra token was dropped).
        let mut s = SeqBytes {
            tokens,
            ..Default::default()
        };
        match rows {
            Rows::Full(r) => s.logits = Some(r),
            Rows::TopK(t) => s.top = Some(t),
        }
        Ok(s)
    }
    fn notes(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "rows".into(),
            "positions[j] of each file is capture row j; llm-runner discards the row after the last input token".into(),
        );
        m.insert(
            "row_encoding".into(),
            "logits_base64: raw little-endian logits (fp16 on Apple silicon), standard base64"
                .into(),
        );
        if self.fp16_assumed {
            m.insert(
                "row_dtype".into(),
                "assumed fp16 (Apple silicon): no --vocab-size or --plan to tell fp16 from f32 rows".into(),
            );
        }
        m.insert(
            "files".into(),
            serde_json::Value::Array(
                self.files
                    .iter()
                    .zip(&self.extra_token_dropped)
                    .map(|(f, d)| {
                        serde_json::json!({"file": file_name(f), "extra_token_dropped": d})
                    })
                    .collect(),
            ),
        );
        m
    }
}
