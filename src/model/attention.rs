//! Gated full attention: per-head [query | gate] split of `q_proj`, q/k zero-centred norms, partial RoPE,
//! GQA, eager softmax attention with HF's bf16 rounding points, sigmoid output gate.
use super::config::TextConfig;
use super::device::{matmul_model_dtype, matmul_rounded, standard_layout};
use super::mlp::{linear, LinearWeight};
use super::norms::RmsNormZeroCentred;
use super::precision::Precision;
use super::rope::Rope;
use super::weights::WeightStore;
use crate::error::Result;
use candle_core::{Tensor, D};

/// Post-RoPE keys and values of the positions seen so far, `[nkv, T, hd]` each.
#[derive(Default)]
pub struct KvCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.k.as_ref().and_then(|k| k.dim(1).ok()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct GatedAttention {
    q_proj: LinearWeight,
    k_proj: LinearWeight,
    v_proj: LinearWeight,
    o_proj: LinearWeight,
    q_norm: RmsNormZeroCentred,
    k_norm: RmsNormZeroCentred,
    nh: usize,
    nkv: usize,
    hd: usize,
    prec: Precision,
    portable: bool,
}

impl GatedAttention {
    /// `prefix`: full name prefix ending in `self_attn.`.
    pub fn new(cfg: &TextConfig, ws: &WeightStore, prefix: &str, prec: Precision) -> Result<Self> {
        let (h, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps;
        Ok(GatedAttention {
            q_proj: ws.load_linear(&format!("{prefix}q_proj.weight"), &[nh * 2 * hd, h], prec)?,
            k_proj: ws.load_linear(&format!("{prefix}k_proj.weight"), &[nkv * hd, h], prec)?,
            v_proj: ws.load_linear(&format!("{prefix}v_proj.weight"), &[nkv * hd, h], prec)?,
            o_proj: ws.load_linear(&format!("{prefix}o_proj.weight"), &[h, nh * hd], prec)?,
            q_norm: RmsNormZeroCentred::new(ws, &format!("{prefix}q_norm.weight"), hd, eps, prec)?,
            k_norm: RmsNormZeroCentred::new(ws, &format!("{prefix}k_norm.weight"), hd, eps, prec)?,
            nh,
            nkv,
            hd,
            prec,
            portable: ws.portable_kernels(),
        })
    }

    /// `h: [T, H]` for positions `cache.len() .. cache.len()+T`; appends this step's k/v to the cache.
    pub fn forward(&self, h: &Tensor, rope: &Rope, cache: &mut KvCache) -> Result<Tensor> {
        let p = self.prec;
        let (t, _) = h.dims2()?;
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let start = cache.len();

        let qg = linear(h, &self.q_proj, p)?.reshape((t, nh, 2 * hd))?;
        let q = qg.narrow(D::Minus1, 0, hd)?;
        let gate = qg
            .narrow(D::Minus1, hd, hd)?
            .contiguous()?
            .reshape((t, nh * hd))?;
        let q = standard_layout(&self.q_norm.forward(&q.contiguous()?)?.transpose(0, 1)?)?; // [nh, T, hd]
        let k = linear(h, &self.k_proj, p)?.reshape((t, nkv, hd))?;
        let k = standard_layout(&self.k_norm.forward(&k)?.transpose(0, 1)?)?; // [nkv, T, hd]
        let v = standard_layout(
            &linear(h, &self.v_proj, p)?
                .reshape((t, nkv, hd))?
                .transpose(0, 1)?,
        )?;

        let (cos, sin) = rope.tables(start, t, h.device())?;
        let q = standard_layout(&rope.apply(&q, &cos, &sin)?)?;
        let k = standard_layout(&rope.apply(&k, &cos, &sin)?)?;

        let (k_all, v_all) = match (&cache.k, &cache.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
            _ => (k, v),
        };
        cache.k = Some(k_all.clone());
        cache.v = Some(v_all.clone());

        // GQA: kv head j serves query heads j*g .. j*g+g-1.
        let groups = nh / nkv;
        let q = q.reshape((nkv, groups * t, hd))?;
        let scale = (hd as f64).powf(-0.5);
        let o = if self.portable {
            // R(q·kᵀ) in the dtype the product rounds to (cuBLAS writes bf16/f16 on a GPU), then one op:
            // R(· hd^-0.5), the causal mask, the f32 softmax, R.
            let scores = matmul_model_dtype(&q, &k_all.t()?, p)?;
            let probs =
                super::attn_softmax::scaled_masked_softmax(&scores, t, start, scale as f32, p)?;
            let o = matmul_rounded(&probs, &v_all, p)?; // [nkv, g*T, hd]
            standard_layout(&o.reshape((nh, t, hd))?.transpose(0, 1)?)?.reshape((t, nh * hd))?
        } else {
            // R(q·kᵀ), R(· hd^-0.5), masked softmax, R: one pass per score row.
            let scores = q.matmul(&k_all.t()?)?;
            let probs = scaled_masked_softmax(&scores, t, start, scale, p)?;
            let o = p.round(&probs.matmul(&v_all)?)?; // [nkv, g*T, hd]
            o.reshape((nh, t, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((t, nh * hd))?
        };
        let o = if self.portable {
            // R(o · R(sigmoid(gate))): one op.
            super::pair_ops::sigmoid_gate_round(&o, &gate, p)?
        } else {
            let sig = p.round(&sigmoid(&gate)?)?;
            p.round(&(o * sig)?)?
        };
        linear(&o, &self.o_proj, p)
    }
}

/// Rows of `scores` (`[.., total]`, row r = query position `start + r % t`): `s = R(R(x) · scale)`
/// (as `R(x)` then candle's `· scale`, i.e. `x · (scale as f32) + 0`), then an f32 softmax over the
/// visible keys `0 ..= start + r % t` (max, `exp(s − max)` summed in order, divide), zeros after, and
/// `R` of the result. Rows run in parallel; each row's arithmetic is sequential as before.
fn scaled_masked_softmax(
    scores: &Tensor,
    t: usize,
    start: usize,
    scale: f64,
    p: Precision,
) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let total = dims[dims.len() - 1];
    let (mul, add) = (scale as f32, 0f32);
    let row = |r: usize, x: &[f32], out: &mut [f32]| {
        let visible = start + (r % t) + 1;
        super::cpu::vectorised(|| {
            for (o, &x) in out.iter_mut().zip(x) {
                *o = p.round_scalar(p.round_scalar(x) * mul + add);
            }
            let seen = &mut out[..visible];
            let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in seen.iter_mut() {
                *x -= max;
            }
        });
        let (seen, hidden) = out.split_at_mut(visible);
        super::expf::exp_in_place(seen);
        super::cpu::vectorised(|| {
            let mut sum = 0f32;
            for x in seen.iter() {
                sum += *x; // in order (not vectorised: a reordered sum would change bits)
            }
            for x in seen.iter_mut() {
                *x = p.round_scalar(*x / sum);
            }
            hidden.iter_mut().for_each(|x| *x = 0.0);
        })
    };
    super::ops::map_rows(scores, total, row)
}

/// `1 / (1 + exp(-x))` in f32, as torch.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}
