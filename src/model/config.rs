//! The decoder configuration, read from `config.json` the way HF 5.23 reads it: flat
//! (`Qwen3_5ForCausalLM`) or VL-wrapped (`text_config`), missing fields taking HF's class defaults.
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Most decoder layers a config may declare.
pub const MAX_LAYERS: usize = 4096;
/// Largest width, head count or expert count a config may declare (2^20).
pub const MAX_DIM: usize = 1 << 20;
/// Largest vocabulary (the same bound as a capture's `vocab_size`, `capture::MAX_VOCAB`).
pub const MAX_VOCAB: usize = 1 << 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    LinearAttention,
    FullAttention,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
}

/// Everything the text decoder's math depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub layer_types: Vec<LayerKind>,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub rms_norm_eps: f64,
    pub linear_conv_kernel_dim: usize,
    pub linear_num_key_heads: usize,
    pub linear_num_value_heads: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    /// Dense SwiGLU width (absent for MoE models).
    pub intermediate_size: Option<usize>,
    pub moe: Option<MoeConfig>,
    pub tie_word_embeddings: bool,
    /// True when the checkpoint is VL-wrapped (tensors under `model.language_model.`).
    pub vl_wrapped: bool,
    pub eos_token_ids: Vec<i64>,
}

impl TextConfig {
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }
    pub fn is_moe(&self) -> bool {
        self.moe.is_some()
    }

    /// Read `config.json` (and `generation_config.json` for EOS ids, if present) from a model directory.
    pub fn from_dir(dir: &Path) -> Result<TextConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::input(&path, format!("cannot read ({e})")))?;
        let root: Value = serde_json::from_str(&text)
            .map_err(|e| Error::input(&path, format!("not valid JSON ({e})")))?;
        let mut cfg = TextConfig::from_json(&root).map_err(|p| Error::input(&path, p))?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(gen_text) = std::fs::read_to_string(&gen_path) {
            let gen: Value = serde_json::from_str(&gen_text)
                .map_err(|e| Error::input(&gen_path, format!("not valid JSON ({e})")))?;
            for id in eos_ids(gen.get("eos_token_id")) {
                if !cfg.eos_token_ids.contains(&id) {
                    cfg.eos_token_ids.push(id);
                }
            }
        }
        Ok(cfg)
    }

    /// Interpret a parsed `config.json`. Errors are plain problems; the caller names the file.
    pub fn from_json(root: &Value) -> std::result::Result<TextConfig, String> {
        let top_type = root.get("model_type").and_then(Value::as_str).unwrap_or("");
        let (text, vl_wrapped) = match root.get("text_config") {
            Some(t) if t.is_object() => (t, true),
            _ => (root, false),
        };
        let model_type = text
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or(top_type)
            .to_string();
        let moe = match model_type.as_str() {
            "qwen3_5" | "qwen3_5_text" => false,
            "qwen3_5_moe" | "qwen3_5_moe_text" => true,
            "" => return Err("no `model_type` field".into()),
            other => {
                return Err(format!(
                    "unsupported model_type `{other}` (qgate's oracle supports qwen3_5, qwen3_5_text, qwen3_5_moe, qwen3_5_moe_text)"
                ))
            }
        };
        // HF class defaults (Qwen3_5TextConfig / Qwen3_5MoeTextConfig, transformers 5.23).
        let d = |dense: usize, moe_v: usize| if moe { moe_v } else { dense };
        let u = |key: &str, default: usize| -> std::result::Result<usize, String> {
            match text.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                    format!("field `{key}` must be a non-negative integer, found {v}")
                }),
            }
        };
        let f = |obj: &Value, key: &str, default: f64| -> std::result::Result<f64, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| format!("field `{key}` must be a number, found {v}")),
            }
        };
        let num_hidden_layers = u("num_hidden_layers", d(32, 40))?;
        // Bounded before the default `layer_types` list is built from it.
        if num_hidden_layers > MAX_LAYERS {
            return Err(format!(
                "num_hidden_layers {num_hidden_layers} is larger than qgate accepts ({MAX_LAYERS})"
            ));
        }
        let layer_types = match text.get("layer_types") {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some("linear_attention") => Ok(LayerKind::LinearAttention),
                    Some("full_attention") => Ok(LayerKind::FullAttention),
                    _ => Err(format!("layer_types[{i}] is {v}, expected \"linear_attention\" or \"full_attention\"")),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            Some(Value::Null) | None => {
                let interval = u("full_attention_interval", 4)?;
                if interval == 0 {
                    return Err("full_attention_interval is 0".into());
                }
                (0..num_hidden_layers)
                    .map(|i| {
                        if (i + 1) % interval == 0 {
                            LayerKind::FullAttention
                        } else {
                            LayerKind::LinearAttention
                        }
                    })
                    .collect()
            }
            Some(v) => return Err(format!("layer_types must be a list, found {v}")),
        };
        if layer_types.len() != num_hidden_layers {
            return Err(format!(
                "layer_types has {} entries but num_hidden_layers is {num_hidden_layers}",
                layer_types.len()
            ));
        }
        // rope_parameters wins over legacy top-level rope_theta / partial_rotary_factor.
        let rope = text.get("rope_parameters").filter(|v| v.is_object());
        if let Some(t) = rope
            .and_then(|r| r.get("rope_type"))
            .and_then(Value::as_str)
        {
            if t != "default" {
                return Err(format!(
                    "rope_type `{t}` is not supported (only \"default\")"
                ));
            }
        }
        let legacy_theta = f(text, "rope_theta", 10000.0)?;
        let legacy_prf = f(text, "partial_rotary_factor", 0.25)?;
        let (rope_theta, partial_rotary_factor) = match rope {
            Some(r) => (
                f(r, "rope_theta", legacy_theta)?,
                f(r, "partial_rotary_factor", legacy_prf)?,
            ),
            None => (legacy_theta, legacy_prf),
        };
        if text.get("attention_bias").and_then(Value::as_bool) == Some(true) {
            return Err(
                "attention_bias = true is not supported (no published Qwen3.5 uses it)".into(),
            );
        }
        if let Some(act) = text.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(format!("hidden_act `{act}` is not supported (only silu)"));
            }
        }
        let moe_cfg = if moe {
            Some(MoeConfig {
                num_experts: u("num_experts", 256)?,
                num_experts_per_tok: u("num_experts_per_tok", 8)?,
                moe_intermediate_size: u("moe_intermediate_size", 512)?,
                shared_expert_intermediate_size: u("shared_expert_intermediate_size", 512)?,
            })
        } else {
            None
        };
        // The VL wrapper ties by its top-level flag; ForCausalLM by the text config's (§7.4).
        let tie_src = if vl_wrapped { root } else { text };
        let tie_word_embeddings = tie_src
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut eos_token_ids = eos_ids(text.get("eos_token_id"));
        for id in eos_ids(root.get("eos_token_id")) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let cfg = TextConfig {
            model_type,
            vocab_size: u("vocab_size", 248320)?,
            hidden_size: u("hidden_size", d(4096, 2048))?,
            num_hidden_layers,
            layer_types,
            num_attention_heads: u("num_attention_heads", 16)?,
            num_key_value_heads: u("num_key_value_heads", d(4, 2))?,
            head_dim: u("head_dim", 256)?,
            rope_theta,
            partial_rotary_factor,
            rms_norm_eps: f(text, "rms_norm_eps", 1e-6)?,
            linear_conv_kernel_dim: u("linear_conv_kernel_dim", 4)?,
            linear_num_key_heads: u("linear_num_key_heads", 16)?,
            linear_num_value_heads: u("linear_num_value_heads", 32)?,
            linear_key_head_dim: u("linear_key_head_dim", 128)?,
            linear_value_head_dim: u("linear_value_head_dim", 128)?,
            intermediate_size: if moe {
                None
            } else {
                Some(u("intermediate_size", 12288)?)
            },
            moe: moe_cfg,
            tie_word_embeddings,
            vl_wrapped,
            eos_token_ids,
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let nz = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("linear_conv_kernel_dim", self.linear_conv_kernel_dim),
            ("linear_num_key_heads", self.linear_num_key_heads),
            ("linear_num_value_heads", self.linear_num_value_heads),
            ("linear_key_head_dim", self.linear_key_head_dim),
            ("linear_value_head_dim", self.linear_value_head_dim),
        ];
        for (k, v) in nz {
            if v == 0 {
                return Err(format!("field `{k}` is 0"));
            }
        }
        // Bounds on declared sizes, so that no product of them (buffer sizes, expected tensor shapes)
        // can overflow or ask for absurd memory before the checkpoint's real shapes are compared.
        let mut sizes = nz[1..].to_vec();
        sizes.push(("intermediate_size", self.intermediate_size.unwrap_or(0)));
        if let Some(m) = &self.moe {
            sizes.extend([
                ("num_experts", m.num_experts),
                ("moe_intermediate_size", m.moe_intermediate_size),
                (
                    "shared_expert_intermediate_size",
                    m.shared_expert_intermediate_size,
                ),
            ]);
        }
        for (k, v) in sizes {
            if v > MAX_DIM {
                return Err(format!(
                    "field `{k}` = {v} is larger than qgate accepts ({MAX_DIM})"
                ));
            }
        }
        if self.vocab_size > MAX_VOCAB {
            return Err(format!(
                "field `vocab_size` = {} is larger than qgate accepts ({MAX_VOCAB})",
                self.vocab_size
            ));
        }
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0) {
            return Err(format!(
                "partial_rotary_factor {} must be in (0, 1]",
                self.partial_rotary_factor
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!(
                "rope_theta {} must be a number > 0",
                self.rope_theta
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!(
                "rms_norm_eps {} must be a number >= 0",
                self.rms_norm_eps
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self
            .linear_num_value_heads
            .is_multiple_of(self.linear_num_key_heads)
        {
            return Err(format!(
                "linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
                self.linear_num_value_heads, self.linear_num_key_heads
            ));
        }
        let rd = self.rotary_dim();
        if !rd.is_multiple_of(2) || rd > self.head_dim {
            return Err(format!(
                "rotary dim {rd} (head_dim × partial_rotary_factor) must be even and ≤ head_dim"
            ));
        }
        if let Some(m) = &self.moe {
            if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_experts {
                return Err(format!(
                    "num_experts_per_tok {} must be in 1..={}",
                    m.num_experts_per_tok, m.num_experts
                ));
            }
        }
        Ok(())
    }
}

fn eos_ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vl_wrapper_ties_by_top_level_flag_and_layer_types_win() {
        let root = json!({
            "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "tie_word_embeddings": true,
            "text_config": {"model_type": "qwen3_5_text", "tie_word_embeddings": false, "num_hidden_layers": 3,
                            "full_attention_interval": 2,
                            "layer_types": ["full_attention", "linear_attention", "linear_attention"]}
        });
        let c = TextConfig::from_json(&root).unwrap();
        assert!(c.tie_word_embeddings && c.vl_wrapped);
        assert_eq!(c.layer_types[0], LayerKind::FullAttention);
        assert_eq!(c.layer_types[1], LayerKind::LinearAttention);
        // HF class defaults for missing fields
        assert_eq!(
            (
                c.head_dim,
                c.rope_theta,
                c.partial_rotary_factor,
                c.hidden_size
            ),
            (256, 10000.0, 0.25, 4096)
        );
    }

    #[test]
    fn flat_causal_lm_uses_its_own_tie_flag_and_interval() {
        let root = json!({"model_type": "qwen3_5_moe_text", "num_hidden_layers": 8, "tie_word_embeddings": false,
                          "rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.5}, "rope_theta": 5.0});
        let c = TextConfig::from_json(&root).unwrap();
        assert!(!c.tie_word_embeddings && c.is_moe());
        let full: Vec<usize> = (0..8)
            .filter(|&i| c.layer_types[i] == LayerKind::FullAttention)
            .collect();
        assert_eq!(full, vec![3, 7]);
        assert_eq!((c.rope_theta, c.partial_rotary_factor), (1e7, 0.5));
        assert_eq!(c.moe.as_ref().unwrap().num_experts, 256);
    }

    #[test]
    fn unknown_model_type_is_named() {
        let e = TextConfig::from_json(&json!({"model_type": "llama"})).unwrap_err();
        assert!(e.contains("llama"), "{e}");
    }
}
