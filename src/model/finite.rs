//! The oracle refuses non-finite numbers. The residual stream is checked after the embedding, after
//! every decoder layer and after the final norm, and the logits after the head; the first stage that
//! holds a NaN or an infinity is reported (exit 2) with the stored weight that caused it when one does.
//! The checks only read the values: every number the oracle produces is unchanged.
//!
//! On the host kernels each stage is checked at once (one pass over `[T, H]`, a fraction of a percent of
//! the layer's own work). The portable kernels (`device`: a GPU, or the CPU behind the portable flag)
//! keep one scalar per stage on the device (`Σ x·0`: 0 when every value is finite, NaN otherwise, never
//! an overflow) and read them back once per forward call, so a GPU never waits on the host mid-forward.
use super::config::{LayerKind, TextConfig};
use super::precision::{with_f32_slice, Precision};
use super::weights::WeightStore;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use std::path::PathBuf;

/// Where in the forward pass a value is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Embedding,
    /// The output of decoder layer `l` (0-based, as in the tensor names).
    Layer(usize),
    FinalNorm,
    Head,
}

/// What a non-finite value is reported against: the checkpoint directory, and whether the weights were
/// transformed as they loaded (the quantization simulator).
#[derive(Debug, Clone)]
pub struct Origin {
    pub dir: PathBuf,
    pub transformed: bool,
    pub prec: Precision,
}

impl Origin {
    pub fn of(ws: &WeightStore, prec: Precision) -> Origin {
        Origin {
            dir: ws.dir.clone(),
            transformed: ws.has_transform(),
            prec,
        }
    }

    /// The one-line error for non-finite values first seen at `stage`: names the stage, the stored
    /// weights of that stage that hold NaN/Inf (read from `ws`, or from the checkpoint reopened), and
    /// what is broken.
    pub fn error(&self, cfg: &TextConfig, ws: Option<&WeightStore>, stage: Stage) -> Error {
        let reopened;
        let ws = match ws {
            Some(ws) => Some(ws),
            None => {
                reopened = WeightStore::open(&self.dir).ok();
                reopened.as_ref()
            }
        };
        let prefix = ws
            .map(|w| w.decoder_prefix.clone())
            .unwrap_or_else(|| "model.".into());
        let embed = format!("{prefix}embed_tokens.weight");
        let (what, names): (String, Vec<String>) = match stage {
            Stage::Embedding => (format!("the embedding (`{embed}`)"), vec![embed]),
            Stage::Layer(l) => {
                let kind = match cfg.layer_types.get(l) {
                    Some(LayerKind::FullAttention) => "full_attention",
                    Some(LayerKind::LinearAttention) => "linear_attention",
                    None => "?",
                };
                (
                    format!(
                        "layer {l} of {} (0-based; {kind}, `{prefix}layers.{l}.*`)",
                        cfg.layer_types.len()
                    ),
                    vec![format!("{prefix}layers.{l}.")],
                )
            }
            Stage::FinalNorm => {
                let n = format!("{prefix}norm.weight");
                (format!("the final norm (`{n}`)"), vec![n])
            }
            Stage::Head => {
                let head = if ws.is_some_and(|w| w.contains("lm_head.weight")) {
                    "lm_head.weight".to_string()
                } else {
                    embed
                };
                (format!("the head (`{head}`)"), vec![head])
            }
        };
        let bad = ws
            .map(|w| {
                w.nonfinite_tensors(|n| {
                    names.iter().any(|p| {
                        if p.ends_with('.') {
                            n.starts_with(p.as_str())
                        } else {
                            n == p
                        }
                    })
                })
            })
            .unwrap_or_default();
        let (cause, verdict) = match bad.split_first() {
            Some(((name, v), rest)) => {
                let more = match rest.len() {
                    0 => String::new(),
                    1 => format!(" (and `{}`)", rest[0].0),
                    n => format!(" (and {n} more tensors)"),
                };
                (
                    format!("; the checkpoint's `{name}` holds {v}{more}"),
                    "the checkpoint is broken",
                )
            }
            None if self.transformed => (
                "; no stored weight of it is NaN/Inf, so the fake quantization made them".to_string(),
                "the simulated quantization is broken",
            ),
            None => (
                format!(
                    "; no stored weight of it is NaN/Inf, so the values overflowed in {} arithmetic",
                    self.prec.name()
                ),
                "the model cannot run in this precision",
            ),
        };
        Error::input(
            &self.dir,
            format!(
                "non-finite values (NaN/Inf) first appear in the output of {what}{cause} — {verdict}; nothing written"
            ),
        )
    }
}

/// Checks the stages of one forward call in order; `deferred` (portable kernels) keeps device-side
/// probes until `finish`.
pub struct FiniteCheck<'a> {
    deferred: bool,
    probes: Vec<(Stage, Tensor)>,
    report: &'a dyn Fn(Stage) -> Error,
}

impl<'a> FiniteCheck<'a> {
    pub fn new(deferred: bool, report: &'a dyn Fn(Stage) -> Error) -> Self {
        FiniteCheck {
            deferred,
            probes: Vec::new(),
            report,
        }
    }

    /// Check `x` as the output of `stage` (stages in forward order).
    pub fn check(&mut self, stage: Stage, x: &Tensor) -> Result<()> {
        if self.deferred {
            // x·0 is 0 for every finite x and NaN for NaN/±Inf; the sum is 0 exactly when all are finite.
            let probe = x.to_dtype(DType::F32)?.affine(0.0, 0.0)?.sum_all()?;
            self.probes.push((stage, probe));
            return Ok(());
        }
        if all_finite(x)? {
            Ok(())
        } else {
            Err((self.report)(stage))
        }
    }

    /// Read the deferred probes back (one transfer) and report the first stage that was not finite.
    pub fn finish(self) -> Result<()> {
        if self.probes.is_empty() {
            return Ok(());
        }
        let (stages, probes): (Vec<Stage>, Vec<Tensor>) = self.probes.into_iter().unzip();
        let sums: Vec<f32> = Tensor::stack(&probes, 0)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1()?;
        match stages.iter().zip(&sums).find(|(_, &s)| s != 0.0) {
            Some((&stage, _)) => Err((self.report)(stage)),
            None => Ok(()),
        }
    }
}

/// Whether every element of `x` is finite (no copy for a contiguous f32 CPU tensor).
pub fn all_finite(x: &Tensor) -> Result<bool> {
    use rayon::prelude::*;
    // |bits| below the exponent-all-ones pattern: finite. The max over a chunk vectorises.
    fn chunk_ok(c: &[f32]) -> bool {
        c.iter()
            .map(|v| v.to_bits() & 0x7FFF_FFFF)
            .max()
            .unwrap_or(0)
            < 0x7F80_0000
    }
    const CHUNK: usize = 1 << 14;
    Ok(with_f32_slice(x, |v| {
        if v.len() >= 1 << 20 {
            v.par_chunks(CHUNK).all(chunk_ok)
        } else {
            v.chunks(CHUNK).all(chunk_ok)
        }
    })?)
}
