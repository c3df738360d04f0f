//! Layer-streamed execution for models that do not fit in memory (27B dense, 35B-A3B MoE in f32).
//!
//! Teacher forcing knows every token up front, so the decoder runs layer by layer over all sequences:
//! build one layer's blocks from the checkpoint (converted to f32 and rounded exactly as `Model::load`
//! does), push every sequence's hidden states through them (each sequence keeps its own per-layer cache
//! for rollouts), drop the weights, next layer. The head runs in vocabulary chunks and hands each
//! `[T, chunk]` block to a sink. Every block is called with the same inputs and shapes as in the
//! in-memory `Model`, so the results are bit-identical to it.
//!
//! Weights come from a `Loader`: with prefetch (the default) one background thread reads and converts the
//! next block (a layer's mixer or feed-forward, a group of routed experts, a head chunk) while the current
//! one computes, handing blocks over one at a time in queue order.
//!
//! Memory: the block being computed and at most one finished block waiting (without prefetch only the
//! first), i.e. for the 27B an MLP (1.07 GB f32) plus a mixer, or two head chunks; the hidden states
//! `[T, H]` of every sequence and their caches.
use super::config::TextConfig;
use super::finite::{FiniteCheck, Origin, Stage};
use super::linear::LinearWeight;
use super::moe::Expert;
use super::norms::RmsNormZeroCentred;
use super::ops::add_round;
use super::precision::Precision;
use super::rope::Rope;
use super::weights::WeightStore;
use super::{layer_norm, Cache, FeedForward, LayerCache, Mixer};
use crate::error::{Error, Result};
use crate::model::mlp::linear;
use candle_core::Tensor;
use std::sync::mpsc;
use std::time::Instant;

/// Default rows of the head converted at a time (32768 × 5120 f32 = 640 MiB for the 27B).
pub const DEFAULT_HEAD_CHUNK: usize = 32768;

/// The smallest head chunk that gemm (candle's CPU matmul) computes with the same kernel as the whole
/// head. gemm 0.19 picks its kernel from the output shape: `m·n ≤ 256` takes a horizontal dot-product
/// kernel, a single row (`m = 1`, after its transpose) the row-major gemv, anything else the packed
/// micro-kernel whose depth blocking depends on `k` alone (unless `m, n ≤ 64`). Each kernel sums in its
/// own order, so a chunk must stay in the kernel the full `[T, V]` product uses: with more than 256
/// columns it does, for every `T`, and each output element is then independent of the chunk's extent.
/// Smaller chunks (the last one, or tiny vocabularies in tests) are padded with zero rows up to this.
const GEMM_SAFE_COLUMNS: usize = 257;

/// Where one layer's time went: reading + converting weights, and everything else.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerTiming {
    /// Reading + converting this layer's weights (on the prefetch thread, overlapped with compute,
    /// when prefetching).
    pub load_s: f64,
    /// Time the compute thread waited for weights: all of `load_s` without prefetch, the part that
    /// was not overlapped with it.
    pub wait_s: f64,
    /// The token mixer's forward (attention or DeltaNet) over all sequences.
    pub mixer_s: f64,
    pub total_s: f64,
}

pub struct Streamer<'a> {
    pub cfg: &'a TextConfig,
    ws: &'a WeightStore,
    prec: Precision,
    rope: Rope,
    norm: RmsNormZeroCentred,
    head_name: String,
    embed_name: String,
    head_rows: usize,
    prefetch: bool,
    /// The checkpoint, for reporting non-finite values (`finite`).
    origin: Origin,
}

impl<'a> Streamer<'a> {
    /// `head_rows`: vocabulary rows of the head per chunk (≥ 1).
    pub fn new(
        cfg: &'a TextConfig,
        ws: &'a WeightStore,
        prec: Precision,
        head_rows: usize,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed_name = ws.decoder_name("embed_tokens.weight");
        // As `Model::from_store`: a stored head is used whenever present (a tied config with an identical
        // head gives the same values either way), the embedding when tied without one.
        let head_name = if ws.contains("lm_head.weight") {
            "lm_head.weight".to_string()
        } else if cfg.tie_word_embeddings {
            embed_name.clone()
        } else {
            return Err(Error::input(
                &ws.primary,
                "missing tensor `lm_head.weight` (config says tie_word_embeddings = false)",
            ));
        };
        let norm = RmsNormZeroCentred::new(
            ws,
            &ws.decoder_name("norm.weight"),
            h,
            cfg.rms_norm_eps,
            prec,
        )?;
        Ok(Streamer {
            cfg,
            ws,
            prec,
            rope: Rope::new(cfg.rope_theta, cfg.rotary_dim(), prec),
            norm,
            head_name,
            embed_name,
            // A vocabulary of at most 256 runs as one chunk (see GEMM_SAFE_COLUMNS).
            head_rows: if cfg.vocab_size < GEMM_SAFE_COLUMNS {
                cfg.vocab_size.max(1)
            } else {
                head_rows.max(1)
            },
            prefetch: true,
            origin: Origin::of(ws, prec),
        })
    }

    /// The error for non-finite values first seen at `stage`.
    fn nonfinite(&self, stage: Stage) -> crate::error::Error {
        self.origin.error(self.cfg, Some(self.ws), stage)
    }

    /// A check of one streamed stage (or the stages of one `layers` call) in order.
    fn finite_check<'r>(
        &self,
        report: &'r dyn Fn(Stage) -> crate::error::Error,
    ) -> FiniteCheck<'r> {
        FiniteCheck::new(self.ws.portable_kernels(), report)
    }

    /// Load the next layer's weights (and the next head chunk) on a background thread while the
    /// current one computes (default on). The results are the same either way; off, everything runs
    /// on the calling thread, one block after another.
    pub fn set_prefetch(&mut self, on: bool) {
        self.prefetch = on;
    }

    /// Number of head chunks over the vocabulary.
    pub fn head_chunks(&self) -> usize {
        self.cfg.vocab_size.div_ceil(self.head_rows)
    }

    /// Embedding rows of `tokens` `[T, H]`, converting only those rows.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let (v, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::usage(format!(
                "token id {bad} is outside the model's vocabulary of {v}"
            )));
        }
        let rows = tokens
            .iter()
            .map(|&t| {
                self.ws
                    .load_rows(&self.embed_name, &[v, h], t as usize, 1, self.prec)
            })
            .collect::<Result<Vec<_>>>()?;
        let x = Tensor::cat(&rows, 0)?;
        let report = |stage| self.nonfinite(stage);
        let mut check = self.finite_check(&report);
        check.check(Stage::Embedding, &x)?;
        check.finish()?;
        Ok(x)
    }

    /// Push every sequence's residual stream `xs[s]` (`[T_s, H]`, positions `caches[s].seen ..`) through
    /// all decoder layers, one layer's weights in memory at a time (plus the next block being prefetched,
    /// see `set_prefetch`). With `keep`, `caches[s]` holds the per-layer caches afterwards (an empty
    /// cache grows one layer at a time); without, the per-layer caches are dropped with their layer.
    /// `on_layer(l, timing)` is called after each layer.
    pub fn layers(
        &self,
        xs: &mut [Tensor],
        caches: &mut [Cache],
        keep: bool,
        on_layer: &mut dyn FnMut(usize, LayerTiming),
    ) -> Result<()> {
        if xs.len() != caches.len() {
            return Err(Error::Internal("one cache per sequence expected".into()));
        }
        let report = |stage| self.nonfinite(stage);
        let mut check = self.finite_check(&report);
        with_loader(self.prefetch, |ld| {
            self.layers_with(ld, xs, caches, keep, on_layer, &mut check)
        })?;
        check.finish()?;
        for (x, cache) in xs.iter().zip(caches.iter_mut()) {
            cache.seen += x.dim(0)?;
        }
        Ok(())
    }

    /// Queue layer `l`'s two blocks (norm + mixer, norm + feed-forward without its experts).
    fn submit_layer(&self, ld: &mut Loader<'a>, l: usize) {
        let (cfg, ws, p) = (self.cfg, self.ws, self.prec);
        if l >= cfg.layer_types.len() {
            return;
        }
        ld.submit(Box::new(move || {
            Ok(Block::Mixer(
                layer_norm(cfg, ws, l, "input_layernorm", p)?,
                Mixer::load(cfg, ws, l, p)?,
            ))
        }));
        ld.submit(Box::new(move || {
            Ok(Block::Ffn(
                layer_norm(cfg, ws, l, "post_attention_layernorm", p)?,
                FeedForward::load(cfg, ws, l, p, true)?,
            ))
        }));
    }

    fn layers_with(
        &self,
        ld: &mut Loader<'a>,
        xs: &mut [Tensor],
        caches: &mut [Cache],
        keep: bool,
        on_layer: &mut dyn FnMut(usize, LayerTiming),
        check: &mut FiniteCheck,
    ) -> Result<()> {
        let p = self.prec;
        // As the in-memory layer (`Model::run_layer_halves`): the residual stream stays f32, the normed
        // inputs and the products' outputs are stored in the model dtype on the portable kernels.
        let portable = self.ws.portable_kernels();
        let io = super::act_io::storage_dtype(p, portable);
        self.submit_layer(ld, 0);
        for l in 0..self.cfg.layer_types.len() {
            let start = Instant::now();
            let mut tm = LayerTiming::default();
            // Token mixer.
            let Block::Mixer(input_norm, mixer) = ld.next(&mut tm)? else {
                return Err(Error::Internal("loader out of order (mixer)".into()));
            };
            let t = Instant::now();
            let mut scratch: Vec<LayerCache> = Vec::new();
            for (x, cache) in xs.iter_mut().zip(caches.iter_mut()) {
                let lc = if keep && cache.layers.len() > l {
                    &mut cache.layers[l]
                } else if keep && cache.layers.len() == l {
                    cache.layers.push(mixer.empty_cache());
                    &mut cache.layers[l]
                } else if keep {
                    return Err(Error::Internal(format!(
                        "cache has {} layers at layer {l}",
                        cache.layers.len()
                    )));
                } else {
                    scratch.push(mixer.empty_cache());
                    let n = scratch.len() - 1;
                    &mut scratch[n]
                };
                let h = input_norm.forward_to(x, io)?;
                let y = mixer.forward(&h, &self.rope, lc)?;
                *x = add_round(x, &y, p, portable)?;
            }
            drop(mixer);
            drop(scratch);
            tm.mixer_s = t.elapsed().as_secs_f64();
            // Feed-forward.
            let Block::Ffn(post_norm, ffn) = ld.next(&mut tm)? else {
                return Err(Error::Internal("loader out of order (feed-forward)".into()));
            };
            let hs = xs
                .iter()
                .map(|x| post_norm.forward_to(x, io))
                .collect::<Result<Vec<_>>>()?;
            let ys = match &ffn {
                FeedForward::Dense(m) => {
                    self.submit_layer(ld, l + 1);
                    hs.iter().map(|h| m.forward(h)).collect::<Result<_>>()?
                }
                FeedForward::Moe(m) => {
                    // Route every sequence, then convert each routed expert once (in groups, one read per
                    // group of a fused bank) and apply it to every sequence that uses it; unrouted
                    // experts are never read. The next layer is queued behind the experts.
                    let mut routes = hs.iter().map(|h| m.route(h)).collect::<Result<Vec<_>>>()?;
                    let mut needed: Vec<usize> = routes.iter().flat_map(|r| r.experts()).collect();
                    needed.sort_unstable();
                    needed.dedup();
                    let src = m.source();
                    let groups = src.groups(&needed, EXPERT_GROUP_BYTES);
                    let n_groups = groups.len();
                    for g in groups {
                        let (src, ws) = (src.clone(), self.ws);
                        ld.submit(Box::new(move || Ok(Block::Experts(src.load(ws, &g)?))));
                    }
                    self.submit_layer(ld, l + 1);
                    for _ in 0..n_groups {
                        let Block::Experts(experts) = ld.next(&mut tm)? else {
                            return Err(Error::Internal("loader out of order (experts)".into()));
                        };
                        for (x, expert) in &experts {
                            for (h, r) in hs.iter().zip(routes.iter_mut()) {
                                m.apply_expert(h, r, *x, expert)?;
                            }
                        }
                    }
                    hs.iter()
                        .zip(routes)
                        .map(|(h, r)| m.finish(h, r))
                        .collect::<Result<Vec<_>>>()?
                }
            };
            drop(ffn);
            for (x, y) in xs.iter_mut().zip(ys) {
                *x = add_round(x, &y, p, portable)?;
                check.check(Stage::Layer(l), x)?;
            }
            tm.total_s = start.elapsed().as_secs_f64();
            on_layer(l, tm);
        }
        Ok(())
    }

    /// The final norm of each residual stream.
    pub fn final_norm(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let report = |stage| self.nonfinite(stage);
        let mut check = self.finite_check(&report);
        let hidden = xs
            .iter()
            .map(|x| {
                let h = self.norm.forward(x)?;
                check.check(Stage::FinalNorm, &h)?;
                Ok(h)
            })
            .collect::<Result<Vec<_>>>()?;
        check.finish()?;
        Ok(hidden)
    }

    /// The head over the vocabulary in chunks: for each chunk (ascending) and each sequence,
    /// `sink(s, first_column, logits [T_s, chunk])` with `R(hidden · W_chunkᵀ)`. With prefetch, the next
    /// chunk is read and converted while one multiplies (two chunks in memory).
    pub fn head(
        &self,
        hidden: &[Tensor],
        sink: &mut dyn FnMut(usize, usize, &Tensor) -> Result<()>,
        on_chunk: &mut dyn FnMut(usize),
    ) -> Result<()> {
        let report = |stage| self.nonfinite(stage);
        with_loader(self.prefetch, |ld| {
            for c in 0..self.head_chunks() {
                ld.submit(Box::new(move || self.head_chunk(c)));
            }
            let v = self.cfg.vocab_size;
            for c in 0..self.head_chunks() {
                let first = c * self.head_rows;
                let n = self.head_rows.min(v - first);
                let Block::Head(w, pad) = ld.next(&mut LayerTiming::default())? else {
                    return Err(Error::Internal("loader out of order (head)".into()));
                };
                for (s, x) in hidden.iter().enumerate() {
                    let logits = linear(x, &w, self.prec)?;
                    let logits = if pad > 0 {
                        logits.narrow(1, 0, n)?.contiguous()?
                    } else {
                        logits
                    };
                    // Checked before the sink sees it (one probe read back per chunk on a device).
                    let mut check = self.finite_check(&report);
                    check.check(Stage::Head, &logits)?;
                    check.finish()?;
                    sink(s, first, &logits)?;
                }
                drop(w);
                on_chunk(c);
            }
            Ok(())
        })
    }

    /// Head chunk `c` in the form its matmul uses, and the zero rows padded to it.
    fn head_chunk(&self, c: usize) -> Result<Block> {
        let (v, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let first = c * self.head_rows;
        let n = self.head_rows.min(v - first);
        let mut w = self
            .ws
            .load_rows(&self.head_name, &[v, h], first, n, self.prec)?;
        // Keep the kernel of the whole-vocabulary product (see GEMM_SAFE_COLUMNS); a vocabulary
        // this small runs as one chunk anyway.
        let pad = if v >= GEMM_SAFE_COLUMNS && n < GEMM_SAFE_COLUMNS {
            GEMM_SAFE_COLUMNS - n
        } else {
            0
        };
        if pad > 0 {
            w = Tensor::cat(&[&w, &Tensor::zeros((pad, h), w.dtype(), w.device())?], 0)?;
        }
        Ok(Block::Head(
            super::linear::LinearWeight::new(w, self.prec)?,
            pad,
        ))
    }
}

/// Expert weights (f32) converted per loading job of a MoE layer.
const EXPERT_GROUP_BYTES: usize = 96 << 20;

/// One unit of weights the loader hands over, in the order they were queued.
enum Block {
    /// `input_layernorm` and the token mixer.
    Mixer(RmsNormZeroCentred, Mixer),
    /// `post_attention_layernorm` and the feed-forward block (a MoE block without its experts).
    Ffn(RmsNormZeroCentred, FeedForward),
    /// Routed experts of the current MoE block, by index.
    Experts(Vec<(usize, Expert)>),
    /// One head chunk and its zero padding rows.
    Head(LinearWeight, usize),
}

type Job<'a> = Box<dyn FnOnce() -> Result<Block> + Send + 'a>;
/// A loaded block and the seconds its loading took.
type Loaded = Result<(Block, f64)>;

/// Loads blocks in queue order: on the calling thread when they are asked for (no prefetch), or on one
/// background thread that works one block ahead of the consumer.
///
/// Memory bound: the background thread hands each block over through a rendezvous channel, so it holds
/// at most one finished block (the next) while the consumer works on the current one; it does not start
/// the block after that until the next one has been taken.
struct Loader<'a> {
    queue: std::collections::VecDeque<Job<'a>>,
    background: Option<(mpsc::Sender<Job<'a>>, mpsc::Receiver<Loaded>)>,
}

impl<'a> Loader<'a> {
    fn submit(&mut self, job: Job<'a>) {
        match &self.background {
            Some((tx, _)) => {
                // A send fails only when the thread has ended (after a panic); `next` reports it.
                let _ = tx.send(job);
            }
            None => self.queue.push_back(job),
        }
    }

    /// The next block; adds the loading time to `tm.load_s` and the time the caller waited for it to
    /// `tm.wait_s` (the same without prefetch).
    fn next(&mut self, tm: &mut LayerTiming) -> Result<Block> {
        let t = Instant::now();
        let (block, load_s) = match &self.background {
            Some((_, rx)) => rx.recv().map_err(|_| {
                Error::Internal("the weight prefetch thread stopped unexpectedly".into())
            })??,
            None => {
                let job = self
                    .queue
                    .pop_front()
                    .ok_or_else(|| Error::Internal("no weights queued".into()))?;
                (job()?, t.elapsed().as_secs_f64())
            }
        };
        tm.load_s += load_s;
        tm.wait_s += t.elapsed().as_secs_f64();
        Ok(block)
    }
}

/// Run `f` with a loader; with `prefetch`, one background thread (with its own one-thread rayon pool,
/// so that conversions never queue work on the compute threads) loads the queued blocks.
fn with_loader<'a, R>(prefetch: bool, f: impl FnOnce(&mut Loader<'a>) -> Result<R>) -> Result<R> {
    if !prefetch {
        return f(&mut Loader {
            queue: Default::default(),
            background: None,
        });
    }
    std::thread::scope(|scope| {
        let (job_tx, job_rx) = mpsc::channel::<Job<'a>>();
        let (block_tx, block_rx) = mpsc::sync_channel::<Loaded>(0);
        std::thread::Builder::new()
            .name("qgate-prefetch".into())
            .spawn_scoped(scope, move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(|_| "qgate-prefetch-pool".into())
                    .build()
                    .ok();
                for job in job_rx {
                    let t = Instant::now();
                    let r = match &pool {
                        Some(pool) => pool.install(job),
                        None => job(),
                    };
                    let r = r.map(|b| (b, t.elapsed().as_secs_f64()));
                    if block_tx.send(r).is_err() {
                        break; // the consumer is gone (an error): stop loading
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the prefetch thread ({e})")))?;
        let mut loader = Loader {
            queue: Default::default(),
            background: Some((job_tx, block_rx)),
        };
        let r = f(&mut loader);
        // Close both channels before the scope joins the thread: it stops after its current job.
        drop(loader);
        r
    })
}

/// Bytes the in-memory oracle needs for this checkpoint and plan: every decoder tensor in f32, one
/// sequence's logits (`[T, V]` f32 twice: the tensor and its copy), its caches and the largest transient
/// activations.
pub fn in_memory_footprint(cfg: &TextConfig, ws: &WeightStore, max_len: usize) -> u64 {
    weights_f32_bytes(ws) + activation_bytes(cfg, max_len)
}

/// The decoder's tensors (embedding, layers, norm, head) as f32.
pub fn weights_f32_bytes(ws: &WeightStore) -> u64 {
    ws.names()
        .filter(|n| n.starts_with(&ws.decoder_prefix) || *n == "lm_head.weight")
        .filter_map(|n| ws.shape(n))
        .map(|s| s.iter().product::<usize>() as u64 * 4)
        .sum()
}

/// Activations of one sequence of `t` positions in the in-memory path (an estimate on the safe side).
pub fn activation_bytes(cfg: &TextConfig, t: usize) -> u64 {
    let t = t as u64;
    let v = cfg.vocab_size as u64;
    let h = cfg.hidden_size as u64;
    let full = cfg
        .layer_types
        .iter()
        .filter(|k| **k == super::config::LayerKind::FullAttention)
        .count() as u64;
    let linear_layers = cfg.layer_types.len() as u64 - full;
    let kv = full * t * 2 * (cfg.num_key_value_heads * cfg.head_dim) as u64 * 4;
    let state = linear_layers
        * (cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim) as u64
        * 4;
    let ffn = cfg.intermediate_size.unwrap_or(0).max(
        cfg.moe
            .as_ref()
            .map(|m| {
                m.moe_intermediate_size
                    .max(m.shared_expert_intermediate_size)
            })
            .unwrap_or(0),
    ) as u64;
    let scores = cfg.num_attention_heads as u64 * t * t * 4 * 3;
    let wide = t * (ffn.max(2 * cfg.num_attention_heads as u64 * cfg.head_dim as u64) + h) * 4 * 4;
    2 * t * v * 4 + kv + state + scores + wide
}
