//! The zoo's transcripts (`coreai_formats.md` §2) as rollout-only captures: one file per sequence,
//! `input_ids` as the tokens and the engine's generated ids as the rollout (`--transcript-side oracle`
//! takes the oracle's ids instead).
//!
//! - `coreai-gate-transcript/1`: engine ids are `engine.gen_ids` when the gate recorded them (only when the
//!   engine text differs from the oracle's); otherwise only `engine.gen_text` exists and is re-tokenised
//!   with `--tokenizer` (`add_special_tokens = false`, as the gate does). Oracle ids: `oracle.gen_ids`
//!   (EOS never included).
//! - `coreai-verify-transcript/1`: only `bundle_text` exists for the engine (re-tokenised likewise);
//!   oracle ids: `oracle_ids` (EOS included when the oracle stopped).
//!
//! Re-tokenisation is recorded in the capture metadata.
use super::{check_ids, check_plan_tokens, file_name, Plan, SeqBytes, SeqSource, TranscriptSide};
use crate::error::{io_err, Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub const GATE_SCHEMA: &str = "coreai-gate-transcript/1";
pub const VERIFY_SCHEMA: &str = "coreai-verify-transcript/1";

/// One transcript reduced to what a capture holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TranscriptSeq {
    pub schema: String,
    pub tokens: Vec<i64>,
    pub rollout: Vec<i64>,
    /// How the rollout ids were obtained (for the metadata).
    pub rollout_source: String,
    pub retokenized: bool,
}

fn ids(v: &Value, what: &str) -> std::result::Result<Vec<i64>, String> {
    let arr = v
        .as_array()
        .ok_or_else(|| format!("`{what}` is not an array of token ids"))?;
    arr.iter()
        .enumerate()
        .map(|(j, x)| {
            x.as_i64()
                .ok_or_else(|| format!("`{what}[{j}]` is not an integer token id"))
        })
        .collect()
}

/// Parse one transcript. `tokenize(text, add_special_tokens)` is called only where ids are not recorded;
/// it returns `None` when no tokenizer was given.
/// `tokenize(text, add_special_tokens)`: `None` when no tokenizer was given.
pub type Tokenize<'a> = dyn FnMut(&str, bool) -> Option<std::result::Result<Vec<i64>, String>> + 'a;

pub fn parse(
    bytes: &[u8],
    side: TranscriptSide,
    tokenize: &mut Tokenize<'_>,
) -> std::result::Result<TranscriptSeq, String> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid transcript JSON ({e})"))?;
    let obj = v
        .as_object()
        .ok_or("not a transcript (the JSON is not an object)")?;
    let schema = match obj.get("schema") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("`schema` is not a string".into()),
        None => {
            return Err(format!(
                "no `schema` key: not a `{GATE_SCHEMA}` or `{VERIFY_SCHEMA}` record"
            ))
        }
    };
    if schema != GATE_SCHEMA && schema != VERIFY_SCHEMA {
        return Err(format!(
            "unknown transcript schema `{schema}` (this qgate reads `{GATE_SCHEMA}` and `{VERIFY_SCHEMA}`)"
        ));
    }
    let mut retokenized = false;
    let no_tok = |what: &str| {
        format!("{what}: pass --tokenizer tokenizer.json (the model's tokenizer) to re-tokenize it")
    };
    let tokens = match obj.get("input_ids") {
        Some(x) => ids(x, "input_ids")?,
        None => {
            let prompt = match obj
                .get("protocol")
                .and_then(|p| p.get("prompt"))
                .or(obj.get("prompt"))
            {
                Some(Value::String(s)) => s.clone(),
                _ => return Err("no `input_ids` and no prompt text".into()),
            };
            retokenized = true;
            match tokenize(&prompt, true) {
                Some(r) => r?,
                None => return Err(no_tok("no `input_ids`, only the prompt text is recorded")),
            }
        }
    };
    if tokens.is_empty() {
        return Err("`input_ids` is empty".into());
    }
    let field = |path: &[&str]| -> Option<&Value> {
        let mut cur = &v;
        for k in path {
            cur = cur.get(k)?;
        }
        Some(cur)
    };
    let gate = schema == GATE_SCHEMA;
    let (rollout, source) = match (side, gate) {
        (TranscriptSide::Oracle, true) => {
            let x = field(&["oracle", "gen_ids"]).ok_or("no `oracle.gen_ids`")?;
            (ids(x, "oracle.gen_ids")?, "oracle.gen_ids".to_string())
        }
        (TranscriptSide::Oracle, false) => {
            let x = field(&["oracle_ids"]).ok_or("no `oracle_ids`")?;
            (ids(x, "oracle_ids")?, "oracle_ids".to_string())
        }
        (TranscriptSide::Engine, true) => match field(&["engine", "gen_ids"]) {
            Some(x) => (
                ids(x, "engine.gen_ids")?,
                "engine.gen_ids (the gate's re-tokenisation of the engine text)".to_string(),
            ),
            None => {
                let text = match field(&["engine", "gen_text"]) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => {
                        return Err("the transcript has no engine output (`engine.gen_text` is null: an ERROR record)".into())
                    }
                    Some(_) => return Err("`engine.gen_text` is not a string".into()),
                };
                retokenized = true;
                match tokenize(&text, false) {
                    Some(r) => (
                        r?,
                        "engine.gen_text re-tokenized by qgate (add_special_tokens=false)"
                            .to_string(),
                    ),
                    None => {
                        return Err(no_tok(
                            "the engine's ids are not recorded, only `engine.gen_text`",
                        ))
                    }
                }
            }
        },
        (TranscriptSide::Engine, false) => {
            let text =
                match field(&["bundle_text"]) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => return Err(
                        "the transcript has no engine output (`bundle_text` is null or missing)"
                            .into(),
                    ),
                    Some(_) => return Err("`bundle_text` is not a string".into()),
                };
            retokenized = true;
            match tokenize(&text, false) {
                Some(r) => (
                    r?,
                    "bundle_text re-tokenized by qgate (add_special_tokens=false)".to_string(),
                ),
                None => {
                    return Err(no_tok(
                        "the engine's ids are not recorded, only `bundle_text`",
                    ))
                }
            }
        }
    };
    Ok(TranscriptSeq {
        schema,
        tokens,
        rollout,
        rollout_source: source,
        retokenized,
    })
}

pub struct TranscriptSource {
    files: Vec<PathBuf>,
    plan: Option<Plan>,
    vocab: Option<usize>,
    tokenizer: Option<(PathBuf, tokenizers::Tokenizer)>,
    side: TranscriptSide,
    seen: Vec<Option<TranscriptSeq>>,
}

impl TranscriptSource {
    pub fn open(
        files: &[PathBuf],
        plan: Option<&Plan>,
        vocab: Option<usize>,
        tokenizer: Option<&Path>,
        side: TranscriptSide,
    ) -> Result<Self> {
        if let Some(p) = plan {
            if p.seqs.len() != files.len() {
                return Err(Error::usage(format!(
                    "the plan {} has {} sequences but {} transcripts were given (one per sequence, in plan order)",
                    p.path.display(),
                    p.seqs.len(),
                    files.len()
                )));
            }
        }
        let tokenizer = match tokenizer {
            Some(t) => {
                let tok = tokenizers::Tokenizer::from_file(t)
                    .map_err(|e| Error::input(t, format!("not a readable tokenizer.json ({e})")))?;
                Some((t.to_path_buf(), tok))
            }
            None => None,
        };
        Ok(TranscriptSource {
            files: files.to_vec(),
            plan: plan.map(|p| Plan {
                path: p.path.clone(),
                seqs: p.seqs.clone(),
                vocab_size: p.vocab_size,
            }),
            vocab,
            tokenizer,
            side,
            seen: vec![None; files.len()],
        })
    }
}

impl SeqSource for TranscriptSource {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn file_of(&self, i: usize) -> &Path {
        &self.files[i]
    }
    fn runtime(&self) -> String {
        match self.side {
            TranscriptSide::Engine => "llm-runner (from transcript)".into(),
            TranscriptSide::Oracle => "oracle (from transcript)".into(),
        }
    }
    fn load(&mut self, i: usize) -> Result<SeqBytes> {
        let path = self.files[i].clone();
        let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        let tok = self.tokenizer.as_ref().map(|(_, t)| t);
        let mut tokenize = |text: &str, special: bool| {
            tok.map(|t| {
                t.encode(text, special)
                    .map(|e| e.get_ids().iter().map(|&x| x as i64).collect())
                    .map_err(|e| format!("re-tokenizing failed ({e})"))
            })
        };
        let t = parse(&bytes, self.side, &mut tokenize).map_err(|p| Error::input(&path, p))?;
        check_ids(&path, "input_ids", &t.tokens, self.vocab)?;
        check_ids(&path, "rollout", &t.rollout, self.vocab)?;
        if let Some(p) = &self.plan {
            check_plan_tokens(&path, p, i, &t.tokens)?;
        }
        let s = SeqBytes {
            tokens: t.tokens.clone(),
            rollout: Some(t.rollout.clone()),
            ..Default::default()
        };
        self.seen[i] = Some(t);
        Ok(s)
    }
    fn notes(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "side".into(),
            match self.side {
                TranscriptSide::Engine => "engine",
                TranscriptSide::Oracle => "oracle",
            }
            .into(),
        );
        let any_retok = self.seen.iter().flatten().any(|t| t.retokenized);
        m.insert("retokenized".into(), any_retok.into());
        if let (true, Some((p, _))) = (any_retok, &self.tokenizer) {
            let sha = super::sha256_file(p).unwrap_or_default();
            m.insert(
                "tokenizer".into(),
                serde_json::json!({"file": file_name(p), "sha256": sha}),
            );
        }
        m.insert(
            "files".into(),
            serde_json::Value::Array(
                self.files
                    .iter()
                    .zip(&self.seen)
                    .map(|(f, t)| {
                        serde_json::json!({
                            "file": file_name(f),
                            "schema": t.as_ref().map(|t| t.schema.clone()),
                            "rollout_from": t.as_ref().map(|t| t.rollout_source.clone()),
                            "retokenized": t.as_ref().map(|t| t.retokenized),
                        })
                    })
                    .collect(),
            ),
        );
        m
    }
}
