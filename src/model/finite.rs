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
            let probe = nonfinite_probe(x)?;
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

/// A scalar on `x`'s device that is 0 exactly when every value of `x` is finite. On a GPU one kernel
/// counts the non-finite values in place (no temporary the size of `x`: for the logits of a long plan
/// that is GiBs); elsewhere `Σ x·0` (0 for every finite x, NaN for NaN/±Inf).
pub fn nonfinite_probe(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return Ok(x.to_dtype(DType::F32)?.affine(0.0, 0.0)?.sum_all()?);
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&NonFiniteCount)?)
}

struct NonFiniteCount;

impl candle_core::CustomOp1 for NonFiniteCount {
    fn name(&self) -> &'static str {
        "qgate-nonfinite-count"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as C;
        let (o, n) = (l.start_offset(), l.shape().elem_count());
        let count = match s {
            C::F32(v) => v[o..o + n].iter().filter(|x| !x.is_finite()).count(),
            C::BF16(v) => v[o..o + n].iter().filter(|x| !x.is_finite()).count(),
            C::F16(v) => v[o..o + n].iter().filter(|x| !x.is_finite()).count(),
            _ => candle_core::bail!("nonfinite_probe: float tensor expected"),
        };
        Ok((C::F32(vec![count as f32]), candle_core::Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let n = l.shape().elem_count();
        let dev = s.device().clone();
        let name = match s.dtype() {
            DType::F32 => "qgate_nonfinite_f32",
            DType::BF16 => "qgate_nonfinite_bf16",
            DType::F16 => "qgate_nonfinite_f16",
            d => candle_core::bail!("nonfinite_probe: no kernel for {d:?}"),
        };
        let func = dev.get_or_load_custom_func(name, "qgate_nonfinite", probe_ptx()?)?;
        let out = dev.alloc_zeros::<f32>(1)?;
        let blocks = (n.div_ceil(256 * 8)).clamp(1, 2048) as u32;
        // Elements before the first 16-byte boundary (allocations are at least 256-byte aligned).
        let size = s.dtype().size_in_bytes();
        let head = (((16 - (l.start_offset() * size) % 16) % 16) / size).min(n) as u64;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n64 = n as u64;
        macro_rules! launch {
            ($ty:ty) => {{
                let x = s.as_cuda_slice::<$ty>()?.slice(l.start_offset()..);
                let mut b = func.builder();
                b.arg(&x);
                b.arg(&n64);
                b.arg(&head);
                b.arg(&out);
                // SAFETY: reads n elements of x, adds into the one zeroed float of out.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match s.dtype() {
            DType::F32 => launch!(f32),
            DType::BF16 => launch!(half::bf16),
            _ => launch!(half::f16),
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            candle_core::Shape::from(()),
        ))
    }
}

#[cfg(feature = "cuda")]
const PROBE_KERNEL: &str = r#"
// Grid-stride count of non-finite values: the first `head` elements one by one (up to the first 16-byte
// boundary), then 16-byte vectors, then the tail. BADW counts the bad elements packed in a 32-bit word.
#define COUNT(NAME, TY, PER, BAD, BADW)                                                             \
extern "C" __global__ void NAME(const TY* x, unsigned long long n, unsigned long long head, float* out) { \
    float c = 0.0f;                                                                                \
    const unsigned long long tid = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;      \
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;                  \
    if (tid < head) { TY v = x[tid]; c += (BAD) ? 1.0f : 0.0f; }                                   \
    const unsigned long long nv = (n - head) / PER;                                                \
    const uint4* xv = (const uint4*)(x + head);                                                    \
    for (unsigned long long i = tid; i < nv; i += stride) {                                        \
        const uint4 q = xv[i];                                                                     \
        c += (float)(BADW(q.x) + BADW(q.y) + BADW(q.z) + BADW(q.w));                               \
    }                                                                                              \
    for (unsigned long long i = head + nv * PER + tid; i < n; i += stride) {                       \
        TY v = x[i]; c += (BAD) ? 1.0f : 0.0f;                                                     \
    }                                                                                              \
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffff, c, o);                       \
    if ((threadIdx.x & 31) == 0 && c != 0.0f) atomicAdd(out, c);                                   \
}
#define W32(w) ((int)(((w) & 0x7f800000u) == 0x7f800000u))
#define WBF16(w) ((int)(((w) & 0x7f80u) == 0x7f80u) + (int)(((w) & 0x7f800000u) == 0x7f800000u))
#define WF16(w) ((int)(((w) & 0x7c00u) == 0x7c00u) + (int)(((w) & 0x7c000000u) == 0x7c000000u))
COUNT(qgate_nonfinite_f32, unsigned int, 4, (v & 0x7f800000u) == 0x7f800000u, W32)
COUNT(qgate_nonfinite_bf16, unsigned short, 8, (v & 0x7f80u) == 0x7f80u, WBF16)
COUNT(qgate_nonfinite_f16, unsigned short, 8, (v & 0x7c00u) == 0x7c00u, WF16)
"#;

/// The kernels' PTX, compiled once per process.
#[cfg(feature = "cuda")]
fn probe_ptx() -> candle_core::Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx(&PTX, PROBE_KERNEL, "the finiteness probe")
}
