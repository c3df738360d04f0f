//! The Qwen3.5 / Qwen3.5-MoE text decoder, exact to HF transformers 5.23.0 (eager attention, torch
//! fallbacks for the causal conv and the delta rule), in f32, bf16 or f16 rounding.
pub mod act_io;
pub mod attention;
pub mod attn_softmax;
pub mod bf16_gemm;
pub mod chunk_scan;
pub mod config;
pub mod cpu;
pub mod delta_chunk_prep;
pub mod delta_rule;
pub mod delta_rule_portable;
pub mod device;
pub mod expf;
pub mod f32_gemm;
pub mod finite;
pub mod gated_deltanet;
pub mod gdn_prep;
pub mod linear;
pub mod matmul_acc;
pub mod mlp;
pub mod moe;
#[doc(hidden)]
pub mod noise;
pub mod norm_ops;
pub mod norms;
pub mod ops;
pub mod pair_ops;
pub mod precision;
pub mod rope;
pub mod round_op;
pub mod solve_tril;
pub mod streaming;
pub mod strided_copy;
#[cfg(test)]
mod test_util;
pub mod torch_topk;
pub mod weights;

use crate::error::{Error, Result};
use attention::{GatedAttention, KvCache};
use candle_core::{Device, Tensor};
use config::{LayerKind, TextConfig};
use finite::{FiniteCheck, Origin, Stage};
use gated_deltanet::{GatedDeltaNet, GdnCache};
use mlp::{linear, LinearWeight, Mlp};
use moe::SparseMoe;
use norms::RmsNormZeroCentred;
use precision::Precision;
use rope::Rope;
use std::path::Path;
use weights::WeightStore;

enum Mixer {
    Attention(GatedAttention),
    DeltaNet(GatedDeltaNet),
}

enum FeedForward {
    Dense(Mlp),
    Moe(SparseMoe),
}

impl Mixer {
    /// Layer `l`'s token mixer (gated attention or gated DeltaNet).
    fn load(cfg: &TextConfig, ws: &WeightStore, l: usize, prec: Precision) -> Result<Mixer> {
        let pre = ws.decoder_name(&format!("layers.{l}."));
        let kind = cfg
            .layer_types
            .get(l)
            .ok_or_else(|| Error::Internal(format!("layer {l} is beyond layer_types")))?;
        Ok(match kind {
            LayerKind::FullAttention => Mixer::Attention(GatedAttention::new(
                cfg,
                ws,
                &format!("{pre}self_attn."),
                prec,
            )?),
            LayerKind::LinearAttention => Mixer::DeltaNet(GatedDeltaNet::new(
                cfg,
                ws,
                &format!("{pre}linear_attn."),
                prec,
            )?),
        })
    }

    fn empty_cache(&self) -> LayerCache {
        match self {
            Mixer::Attention(_) => LayerCache::Attention(KvCache::default()),
            Mixer::DeltaNet(g) => LayerCache::DeltaNet(g.empty_cache()),
        }
    }

    fn forward(&self, h: &Tensor, rope: &Rope, lc: &mut LayerCache) -> Result<Tensor> {
        match (self, lc) {
            (Mixer::Attention(a), LayerCache::Attention(kv)) => a.forward(h, rope, kv),
            (Mixer::DeltaNet(g), LayerCache::DeltaNet(gc)) => g.forward(h, gc),
            _ => Err(Error::Internal(
                "cache does not match the layer kinds".into(),
            )),
        }
    }
}

impl FeedForward {
    /// Layer `l`'s feed-forward block; `lazy_experts`: a MoE block without its experts (streaming).
    fn load(
        cfg: &TextConfig,
        ws: &WeightStore,
        l: usize,
        prec: Precision,
        lazy_experts: bool,
    ) -> Result<FeedForward> {
        let pre = ws.decoder_name(&format!("layers.{l}.mlp."));
        let h = cfg.hidden_size;
        Ok(match (&cfg.moe, cfg.intermediate_size) {
            (Some(m), _) if lazy_experts => {
                FeedForward::Moe(SparseMoe::new_lazy(ws, &pre, h, m, prec)?)
            }
            (Some(m), _) => FeedForward::Moe(SparseMoe::new(ws, &pre, h, m, prec)?),
            (None, Some(i)) => FeedForward::Dense(Mlp::new(ws, &pre, h, i, prec)?),
            (None, None) => {
                return Err(Error::Internal(
                    "dense config without intermediate_size".into(),
                ))
            }
        })
    }

    /// `h` stored as f32 or the model dtype; the result as `h` (dense) or f32 (MoE, which works in f32).
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(m) => m.forward_to(h, h.dtype()),
            FeedForward::Moe(m) => m.forward(&round_op::cast(h, candle_core::DType::F32)?),
        }
    }
}

/// Layer `l`'s `input_layernorm` or `post_attention_layernorm`.
fn layer_norm(
    cfg: &TextConfig,
    ws: &WeightStore,
    l: usize,
    which: &str,
    prec: Precision,
) -> Result<RmsNormZeroCentred> {
    RmsNormZeroCentred::new(
        ws,
        &ws.decoder_name(&format!("layers.{l}.{which}.weight")),
        cfg.hidden_size,
        cfg.rms_norm_eps,
        prec,
    )
}

struct DecoderLayer {
    input_norm: RmsNormZeroCentred,
    mixer: Mixer,
    post_norm: RmsNormZeroCentred,
    ffn: FeedForward,
}

/// One decoder layer loaded on its own (`Model::load_layer`), to run in place of layer `index`.
pub struct LayerSlot {
    index: usize,
    layer: DecoderLayer,
}

impl LayerSlot {
    pub fn index(&self) -> usize {
        self.index
    }
}

/// Per-layer state carried from one call to the next (teacher-forced prefill, then single steps).
pub enum LayerCache {
    Attention(KvCache),
    DeltaNet(GdnCache),
}

#[derive(Default)]
pub struct Cache {
    layers: Vec<LayerCache>,
    pub seen: usize,
}

pub struct Model {
    pub cfg: TextConfig,
    pub prec: Precision,
    /// `None` when tied to a packed bf16 head: lookups then read the head's rows (one copy, not two).
    embed: Option<Tensor>,
    layers: Vec<DecoderLayer>,
    norm: RmsNormZeroCentred,
    /// The head (the embedding itself when tied).
    head: LinearWeight,
    rope: Rope,
    /// The portable (tensor-op) kernels (`device`).
    portable: bool,
    /// Rows per head block, overriding [`head_block_rows`] (tests: blocks on the CPU).
    head_block_rows: Option<usize>,
    /// The checkpoint, for reporting non-finite values (`finite`).
    origin: Origin,
}

impl Model {
    pub fn load(dir: &Path, prec: Precision) -> Result<Model> {
        Model::load_on(dir, prec, &Device::Cpu, false)
    }

    /// Load onto `dev`; `portable`: the tensor-op kernels even on the CPU (see `device`).
    pub fn load_on(dir: &Path, prec: Precision, dev: &Device, portable: bool) -> Result<Model> {
        let cfg = TextConfig::from_dir(dir)?;
        let mut ws = WeightStore::open(dir)?;
        // Positioned reads: the checkpoint passes through the page cache, not our resident set.
        ws.set_streaming(true);
        ws.set_device(dev);
        ws.set_portable_kernels(portable);
        Model::from_store(cfg, &ws, prec)
    }

    pub fn from_store(cfg: TextConfig, ws: &WeightStore, prec: Precision) -> Result<Model> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let eps = cfg.rms_norm_eps;
        // The embedding serves lookups (and a tied head): kept in the model dtype, which is exact and
        // half the memory of f32 in bf16/f16 mode.
        let embed = ws.load_decoder_native("embed_tokens.weight", &[v, h], prec)?;
        let norm = RmsNormZeroCentred::new(ws, &ws.decoder_name("norm.weight"), h, eps, prec)?;
        let has_head = ws.contains("lm_head.weight");
        let lm_head = if cfg.tie_word_embeddings && !has_head {
            if ws.untie_head() {
                // the simulator's head scheme: the shipped recipe clones the tied embedding first
                Some(load_head_weight(ws, v, h, prec)?)
            } else {
                None
            }
        } else if !cfg.tie_word_embeddings && !has_head {
            return Err(Error::input(
                &ws.primary,
                "missing tensor `lm_head.weight` (config says tie_word_embeddings = false)",
            ));
        } else {
            let head = load_head_weight(ws, v, h, prec)?;
            if cfg.tie_word_embeddings && !ws.untie_head() {
                // HF: a tied config with a differing stored head is not tied (it warns).
                let f32 = candle_core::DType::F32;
                let (head32, embed32) = (head.to_dtype(f32)?, embed.to_dtype(f32)?);
                let same = (&head32 - &embed32)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
                if same {
                    None
                } else {
                    eprintln!("qgate: warning: tie_word_embeddings is set but lm_head.weight differs from the embedding; using lm_head.weight as HF does");
                    Some(head)
                }
            } else {
                Some(head)
            }
        };
        let rope = Rope::new(cfg.rope_theta, cfg.rotary_dim(), prec);
        // The head in the form its matmul uses; a tied head is the embedding (shared, in f32 mode).
        let tied = lm_head.is_none();
        let head = match lm_head {
            Some(w) => LinearWeight::new(w, prec)?,
            None if prec == Precision::F16 && embed.device().is_cpu() => {
                LinearWeight::new(embed.to_dtype(candle_core::DType::F32)?, prec)?
            }
            None => LinearWeight::new(embed.clone(), prec)?,
        };
        // A packed tied head serves the embedding lookups itself (one copy of the table).
        let embed = match (&head, tied) {
            (LinearWeight::Bf16(_) | LinearWeight::F32Packed(_), true) => {
                drop(embed); // now, not at the end of this function (after the layers are loaded)
                None
            }
            _ => Some(embed),
        };
        if tied && embed.is_none() {
            // the f32/bf16 table just packed into the head: give its memory back before the layers
            crate::alloc_tuning::release_freed_memory();
        }
        // The layers after the head: packing a tied f32 head copies the table, and that transient
        // copy then coexists with the embedding only, not with every layer's weights as well.
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.layer_types.len() {
            layers.push(DecoderLayer {
                input_norm: layer_norm(&cfg, ws, l, "input_layernorm", prec)?,
                mixer: Mixer::load(&cfg, ws, l, prec)?,
                post_norm: layer_norm(&cfg, ws, l, "post_attention_layernorm", prec)?,
                ffn: FeedForward::load(&cfg, ws, l, prec, false)?,
            });
        }
        Ok(Model {
            cfg,
            prec,
            embed,
            layers,
            norm,
            head,
            rope,
            portable: ws.portable_kernels(),
            head_block_rows: None,
            origin: Origin::of(ws, prec),
        })
    }

    pub fn new_cache(&self) -> Cache {
        let layers = self.layers.iter().map(|l| l.mixer.empty_cache()).collect();
        Cache { layers, seen: 0 }
    }

    /// Run `tokens` (positions `cache.seen ..`) through the decoder; returns logits `[T, V]` (f32 holding
    /// model-dtype values). An empty cache takes HF's prefill path (chunked delta rule); a single token
    /// after a prefill takes the recurrent path. Non-finite values anywhere are an error naming the
    /// first stage that produced them (`finite`).
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache) -> Result<Tensor> {
        let report = |stage| self.nonfinite(stage);
        let mut check = FiniteCheck::new(self.portable, &report);
        let hidden = self.hidden_states_checked(tokens, cache, None, &mut check)?;
        let logits = self.logits(&hidden)?;
        check.check(Stage::Head, &logits)?;
        check.finish()?;
        Ok(logits)
    }

    /// `forward` with the logits in the dtype the head's product writes them (on a GPU in bf16/f16 the
    /// model dtype: the values `forward` returns widened to f32, at half the memory; else f32), as blocks
    /// of consecutive rows in order (their concatenation is the `[T, V]` logits; on the CPU one block;
    /// see [`Model::logits_native_blocks`]). What the oracle stores: a bf16 capture holds exactly these
    /// values.
    pub fn forward_native_blocks(&self, tokens: &[u32], cache: &mut Cache) -> Result<Vec<Tensor>> {
        let report = |stage| self.nonfinite(stage);
        let mut check = FiniteCheck::new(self.portable, &report);
        let hidden = self.hidden_states_checked(tokens, cache, None, &mut check)?;
        if !hidden.device().is_cpu() && tokens.len() <= RELEASE_BEFORE_HEAD_MAX_T {
            device::release_pool_memory(hidden.device())?;
        }
        let blocks = self.logits_native_blocks(&hidden)?;
        for b in &blocks {
            check.check(Stage::Head, b)?;
        }
        check.finish()?;
        Ok(blocks)
    }

    /// Final-normed hidden states `[T, H]`.
    pub fn hidden_states(&self, tokens: &[u32], cache: &mut Cache) -> Result<Tensor> {
        self.hidden_states_traced(tokens, cache, None)
    }

    /// As `hidden_states`, also recording the residual stream after every layer (HF's
    /// `output_hidden_states` order minus the embedding) into `trace`, for layer-by-layer comparison.
    pub fn hidden_states_traced(
        &self,
        tokens: &[u32],
        cache: &mut Cache,
        trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let report = |stage| self.nonfinite(stage);
        let mut check = FiniteCheck::new(self.portable, &report);
        let hidden = self.hidden_states_checked(tokens, cache, trace, &mut check)?;
        check.finish()?;
        Ok(hidden)
    }

    /// The error for non-finite values first seen at `stage`.
    fn nonfinite(&self, stage: Stage) -> Error {
        self.origin.error(&self.cfg, None, stage)
    }

    fn hidden_states_checked(
        &self,
        tokens: &[u32],
        cache: &mut Cache,
        mut trace: Option<&mut Vec<Tensor>>,
        check: &mut FiniteCheck,
    ) -> Result<Tensor> {
        let v = self.cfg.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::usage(format!(
                "token id {bad} is outside the model's vocabulary of {v}"
            )));
        }
        let mut x = self.embed_tokens(tokens)?;
        check.check(Stage::Embedding, &x)?;
        for (l, lc) in cache.layers.iter_mut().enumerate() {
            x = self.layer_forward(l, &x, lc)?;
            check.check(Stage::Layer(l), &x)?;
            if let Some(t) = trace.as_deref_mut() {
                t.push(x.clone());
            }
        }
        cache.seen += tokens.len();
        let hidden = self.norm.forward(&x)?;
        check.check(Stage::FinalNorm, &hidden)?;
        Ok(hidden)
    }

    /// The embedding rows of `tokens` as f32 `[T, H]` (the residual stream entering layer 0). Ids must
    /// lie in the vocabulary (`forward` checks them).
    pub fn embed_tokens(&self, tokens: &[u32]) -> Result<Tensor> {
        let v = self.cfg.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::usage(format!(
                "token id {bad} is outside the model's vocabulary of {v}"
            )));
        }
        Ok(match (&self.embed, &self.head) {
            (Some(e), _) => e
                .index_select(&Tensor::new(tokens, e.device())?, 0)?
                .to_dtype(candle_core::DType::F32)?,
            (None, LinearWeight::Bf16(p)) => {
                let rows: Vec<f32> = tokens.iter().flat_map(|&t| p.row(t as usize)).collect();
                Tensor::from_vec(rows, (tokens.len(), p.k), &Device::Cpu)?
            }
            (None, LinearWeight::F32Packed(p)) => {
                let rows: Vec<f32> = tokens.iter().flat_map(|&t| p.row(t as usize)).collect();
                Tensor::from_vec(rows, (tokens.len(), p.k), &Device::Cpu)?
            }
            (None, LinearWeight::F32(_) | LinearWeight::Half(_)) => {
                return Err(Error::Internal("no embedding kept for an f32 head".into()))
            }
        })
    }

    /// Layers `from..` of a teacher-forced prefill on the residual stream `x` entering layer `from`
    /// (from a fresh cache: `caches` are the whole model's, only layers `from..` are used). `replace`:
    /// run this layer in place of the model's own at its index (the sensitivity map loads one part
    /// quantized). `trace` receives the residual stream after every layer run. Returns the residual
    /// stream after the last layer (before the final norm): with the same inputs, the numbers of the
    /// full forward, bit for bit (`tests/layer_range.rs`).
    pub fn forward_layers(
        &self,
        from: usize,
        x: &Tensor,
        cache: &mut Cache,
        replace: Option<&LayerSlot>,
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let n = self.layers.len();
        if from > n || cache.layers.len() != n {
            return Err(Error::Internal(format!(
                "layer range {from}.. of a {n}-layer model"
            )));
        }
        let mut x = x.clone();
        for (l, lc) in cache.layers.iter_mut().enumerate().skip(from) {
            let layer = match replace {
                Some(r) if r.index == l => &r.layer,
                _ => &self.layers[l],
            };
            x = self.run_layer(layer, &x, lc)?;
            if let Some(t) = trace.as_deref_mut() {
                t.push(x.clone());
            }
        }
        Ok(x)
    }

    /// The final norm: residual stream after the last layer → the head's input.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// Layer `l` loaded from `ws` (whose transform may quantize it), to run in place of the model's own
    /// (`forward_layers`' `replace`).
    pub fn load_layer(&self, ws: &WeightStore, l: usize) -> Result<LayerSlot> {
        let (cfg, prec) = (&self.cfg, self.prec);
        Ok(LayerSlot {
            index: l,
            layer: DecoderLayer {
                input_norm: layer_norm(cfg, ws, l, "input_layernorm", prec)?,
                mixer: Mixer::load(cfg, ws, l, prec)?,
                post_norm: layer_norm(cfg, ws, l, "post_attention_layernorm", prec)?,
                ffn: FeedForward::load(cfg, ws, l, prec, false)?,
            },
        })
    }

    /// The head loaded from `ws` as its own weight (`lm_head.weight`, or a tied model's embedding
    /// loaded under that name, as the simulator unties a quantized head), for `logits_with`.
    pub fn load_head(&self, ws: &WeightStore) -> Result<LinearWeight> {
        let (v, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        LinearWeight::new(load_head_weight(ws, v, h, self.prec)?, self.prec)
    }

    /// The logits of final-normed hidden states through another head (`load_head`).
    pub fn logits_with(&self, hidden: &Tensor, head: &LinearWeight) -> Result<Tensor> {
        linear(hidden, head, self.prec)
    }

    /// One decoder layer on the residual stream `x: [T, H]` (pre-norm mixer and feed-forward, each added
    /// back with one rounding). Public so tests can feed HF's own layer inputs.
    pub fn layer_forward(&self, l: usize, x: &Tensor, lc: &mut LayerCache) -> Result<Tensor> {
        let layer = self
            .layers
            .get(l)
            .ok_or_else(|| Error::Internal(format!("no layer {l}")))?;
        self.run_layer(layer, x, lc)
    }

    fn run_layer(&self, layer: &DecoderLayer, x: &Tensor, lc: &mut LayerCache) -> Result<Tensor> {
        Ok(self.run_layer_halves(layer, x, lc)?.1)
    }

    /// One layer, returning the residual stream after the mixer and after the feed-forward block.
    fn run_layer_halves(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        lc: &mut LayerCache,
    ) -> Result<(Tensor, Tensor)> {
        let p = self.prec;
        // The residual stream stays f32; the normed inputs of the products and the products' outputs
        // are stored in the model dtype on the portable kernels (`act_io`).
        let io = act_io::storage_dtype(p, self.portable);
        let h = layer.input_norm.forward_to(x, io)?;
        let y = layer.mixer.forward(&h, &self.rope, lc)?;
        let x = ops::add_round(x, &y, p, self.portable)?;
        let h = layer.post_norm.forward_to(&x, io)?;
        let y = layer.ffn.forward(&h)?;
        let out = ops::add_round(&x, &y, p, self.portable)?;
        Ok((x, out))
    }

    /// A teacher-forced prefill from a fresh cache, returning per layer the residual stream after its
    /// mixer (attention / Gated DeltaNet) and after its feed-forward block (`qgate locate` tells the two
    /// apart). Same arithmetic as `forward`.
    pub fn forward_layers_halves(
        &self,
        x: &Tensor,
        cache: &mut Cache,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let mut x = x.clone();
        let mut out = Vec::with_capacity(self.layers.len());
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let (mid, next) = self.run_layer_halves(layer, &x, lc)?;
            out.push((mid, next.clone()));
            x = next;
        }
        Ok(out)
    }

    /// The per-layer caches, for driving `layer_forward` directly.
    pub fn layer_caches(cache: &mut Cache) -> &mut [LayerCache] {
        &mut cache.layers
    }

    /// The head: `R(x · Wᵀ)` over the whole vocabulary.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        linear(hidden, &self.head, self.prec)
    }

    /// `logits_native` in blocks of consecutive rows, in order. On a GPU the `[T, V]` logits are the
    /// largest tensor of a forward (1.9 GB at bf16 T = 4,096 for a 248,320 vocabulary); as one allocation
    /// they fit in none of the memory the decoder body freed, so the pool grows by all of it. Blocks of
    /// [`head_block_rows`] fit in that freed memory: on an H200 (with the pool kept, `device.rs`) the
    /// device's peak fell from 6.3 to 4.5 GB at bf16 T = 4,096 and from 17.9 to 10.6 GB at T = 16,384
    /// (BENCHMARKS.md, eighth session). cuBLAS wrote the blocks bit-identical to one product there
    /// (`examples/gpu_ops_check.rs`); a row's sum runs over the hidden size only.
    pub fn logits_native_blocks(&self, hidden: &Tensor) -> Result<Vec<Tensor>> {
        let t = hidden.dim(0)?;
        let rows = match (self.head_block_rows, hidden.device()) {
            (Some(rows), _) => rows,
            (None, Device::Cpu) => t,
            (None, _) => head_block_rows(t, self.cfg.vocab_size, self.head_dtype_size()),
        };
        self.logits_native_rows(hidden, rows)
    }

    /// Compute the head in blocks of `rows` rows on every device (tests: the GPU's block path on the CPU).
    #[doc(hidden)]
    pub fn set_head_block_rows(&mut self, rows: usize) {
        self.head_block_rows = Some(rows.max(1));
    }

    /// `logits_native` computed `rows` rows at a time.
    fn logits_native_rows(&self, hidden: &Tensor, rows: usize) -> Result<Vec<Tensor>> {
        let t = hidden.dim(0)?;
        let rows = rows.max(1);
        let mut blocks = Vec::with_capacity(t.div_ceil(rows));
        for r0 in (0..t).step_by(rows) {
            blocks.push(self.logits_native(&hidden.narrow(0, r0, rows.min(t - r0))?)?);
        }
        Ok(blocks)
    }

    /// Bytes per logit as `logits_native` writes them: the model dtype's for a 16-bit head, else f32's.
    fn head_dtype_size(&self) -> usize {
        match &self.head {
            linear::LinearWeight::Half(w) => w.dtype().size_in_bytes(),
            _ => 4,
        }
    }

    /// `logits` in the dtype the head's product writes them (`forward_native_blocks`'s head): the model dtype on
    /// a GPU in bf16/f16, else f32.
    pub fn logits_native(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.head {
            linear::LinearWeight::Half(w) => {
                Ok(round_op::cast(hidden, w.dtype())?.matmul(&w.t()?)?)
            }
            _ => self.logits(hidden),
        }
    }
}

/// The head's `[v, h]` weight as its own tensor: `lm_head.weight`, or the embedding loaded under that
/// name (a tied model whose head the simulator unties), in the dtype the device keeps it
/// ([`WeightStore::upload_dtype`]).
fn load_head_weight(ws: &WeightStore, v: usize, h: usize, prec: Precision) -> Result<Tensor> {
    let dt = ws.upload_dtype(prec);
    if ws.contains("lm_head.weight") {
        ws.load_in("lm_head.weight", &[v, h], prec, dt)
    } else {
        let embed = ws.decoder_name("embed_tokens.weight");
        ws.load_as_in(&embed, "lm_head.weight", &[v, h], prec, dt)
    }
}

/// Plans up to this many positions release the GPU pool's free memory between the body and the head
/// ([`device::release_pool_memory`]): there the logits outweigh the activations. On an H200 (0.8B
/// shapes) the device's peak at T = 512 fell from 2,577 to 2,513 MiB in bf16 and from 4,401 to
/// 4,177–4,241 in f32, below transformers' 2,565 and 4,225; it costs a synchronisation and mapping the
/// body's memory again each forward (5–17 % at T = 512–1,024; BENCHMARKS.md, tenth session). Longer
/// plans skip it: 3–7 % slower at T = 4,096, where the row-blocked head already keeps the peak below
/// both peers'.
const RELEASE_BEFORE_HEAD_MAX_T: usize = 1024;

/// Rows per head block on a GPU: blocks of at most 128 MiB of logits, and at least 256 rows (each block's
/// product reads the whole head matrix once, so fewer rows would make it bound by that read); `t` rows
/// (one block) when the whole `[t, v]` is under the bound.
pub fn head_block_rows(t: usize, v: usize, bytes: usize) -> usize {
    const MAX_BYTES: usize = 128 << 20;
    const MIN_ROWS: usize = 256;
    let fit = MAX_BYTES / (v.max(1) * bytes.max(1));
    fit.max(MIN_ROWS).min(t.max(1))
}

/// Index of the largest value, the first one on ties (torch.argmax).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] || (row[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod head_block_tests {
    use super::*;

    #[test]
    fn head_blocks_bound_the_logits() {
        // 0.8B head in bf16: 128 MiB / (248,320 · 2 B) = 270 rows → 270; f32: 135 → the 256-row floor.
        assert_eq!(head_block_rows(4096, 248_320, 2), 270);
        assert_eq!(head_block_rows(4096, 248_320, 4), 256);
        // a short plan or a small vocabulary: one block
        assert_eq!(head_block_rows(100, 248_320, 2), 100);
        assert_eq!(head_block_rows(4096, 1000, 4), 4096);
        assert_eq!(head_block_rows(0, 0, 0), 1);
    }

    #[test]
    fn head_in_row_blocks_is_the_one_product() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/dense-gva-untied");
        for (prec, portable) in [
            (Precision::F32, true),
            (Precision::BF16, true),
            (Precision::BF16, false),
        ] {
            let m = Model::load_on(&dir, prec, &Device::Cpu, portable).unwrap();
            let ids: Vec<u32> = (0..23u32)
                .map(|i| (i * 37 + 5) % m.cfg.vocab_size as u32)
                .collect();
            let hidden = m.hidden_states(&ids, &mut m.new_cache()).unwrap();
            let one = m.logits_native(&hidden).unwrap();
            for rows in [1, 5, 22, 23, 64] {
                let blocks = m.logits_native_rows(&hidden, rows).unwrap();
                assert_eq!(blocks.len(), 23usize.div_ceil(rows));
                let got = Tensor::cat(&blocks, 0).unwrap();
                assert!(
                    test_util::bits(&got) == test_util::bits(&one),
                    "{} portable {portable}: {rows}-row blocks differ from one product",
                    prec.name()
                );
            }
            // the CPU runs one block
            assert_eq!(m.logits_native_blocks(&hidden).unwrap().len(), 1);
        }
    }
}
