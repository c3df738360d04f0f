//! From text prompts to a plan: the model's own `tokenizer.json` (tokenizers crate) and its own chat
//! template rendered with a real Jinja engine (minijinja with Python compatibility, configured like HF's
//! sandbox: trim_blocks, lstrip_blocks, loop controls, `raise_exception`).
use crate::error::{io_err, Error, Result};
use crate::model::config::TextConfig;
use minijinja::{Environment, ErrorKind, Value};
use std::path::Path;

pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    tokenizer_path: std::path::PathBuf,
    chat_template: Option<(String, std::path::PathBuf)>,
    special: serde_json::Map<String, serde_json::Value>,
    pub vocab_size: usize,
}

impl PromptTokenizer {
    pub fn load(dir: &Path) -> Result<PromptTokenizer> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::input(&tokenizer_path, format!("cannot load tokenizer ({e})")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| Error::input(&cfg_path, format!("not valid JSON ({e})")))?,
            Err(_) => serde_json::Value::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if let Ok(t) = std::fs::read_to_string(&jinja_path) {
            Some((t, jinja_path))
        } else {
            match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some((s.clone(), cfg_path.clone())),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|e| e.get("template")?.as_str())
                    .map(|s| (s.to_string(), cfg_path.clone())),
                _ => None,
            }
        };
        let mut special = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            let v = match cfg.get(key) {
                Some(serde_json::Value::String(s)) => serde_json::Value::String(s.clone()),
                Some(obj) if obj.get("content").is_some() => obj["content"].clone(),
                _ => serde_json::Value::Null,
            };
            special.insert(key.to_string(), v);
        }
        let vocab_size = match TextConfig::from_dir(dir) {
            Ok(c) => c.vocab_size,
            Err(_) => tokenizer.get_vocab_size(true),
        };
        Ok(PromptTokenizer {
            tokenizer,
            tokenizer_path,
            chat_template,
            special,
            vocab_size,
        })
    }

    /// What `tokenizer(prompt)` gives in HF (special tokens per the tokenizer's post-processor).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<i64>> {
        self.encode(text, true)
    }

    /// What `apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
    /// tokenize=True)` gives in HF: the rendered text tokenized without adding special tokens.
    pub fn encode_chat(&self, prompt: &str) -> Result<Vec<i64>> {
        let text = self.render_chat(prompt)?;
        self.encode(&text, false)
    }

    pub fn render_chat(&self, prompt: &str) -> Result<String> {
        let Some((template, source)) = &self.chat_template else {
            return Err(Error::input(
                &self.tokenizer_path,
                "--chat needs a chat template (chat_template.jinja or `chat_template` in tokenizer_config.json); none found",
            ));
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::input(source, format!("chat template does not parse ({e})")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::input(source, e.to_string()))?;
        let mut ctx = self.special.clone();
        ctx.insert(
            "messages".into(),
            serde_json::json!([{ "role": "user", "content": prompt }]),
        );
        ctx.insert("add_generation_prompt".into(), true.into());
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| Error::input(source, format!("chat template failed to render ({e})")))
    }

    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        let enc = self.tokenizer.encode(text, add_special).map_err(|e| {
            Error::input(&self.tokenizer_path, format!("tokenization failed ({e})"))
        })?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }
}

/// Prompts from a file: a JSON array of strings, or one prompt per non-empty line.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let prompts: Vec<String> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| {
            Error::input(
                path,
                format!("looks like JSON but is not an array of strings ({e})"),
            )
        })?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    };
    if prompts.is_empty() {
        return Err(Error::input(path, "no prompts"));
    }
    Ok(prompts)
}

/// `t` pseudo-random token ids below `vocab` (xorshift64, fixed seed): the synthetic plan of the
/// benchmarks, the same sequence in every run.
pub fn random_token_ids(t: usize, vocab: usize) -> Vec<u32> {
    let v = vocab.max(1) as u64;
    let mut x = 0x9E3779B97F4A7C15u64;
    (0..t)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % v) as u32
        })
        .collect()
}
