//! Gated full attention: per-head [query | gate] split of `q_proj`, q/k zero-centred norms, partial RoPE,
//! GQA, eager softmax attention with HF's bf16 rounding points, sigmoid output gate.
use super::config::TextConfig;
use super::mlp::{linear, LinearWeight};
use super::norms::RmsNormZeroCentred;
use super::precision::Precision;
use super::rope::Rope;
use super::device::{matmul_rounded, standard_layout};
use super::weights::WeightStore;
use crate::error::Result;
use candle_core::{Device, Tensor, D};

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
        let total = start + t;

        // GQA: kv head j serves query heads j*g .. j*g+g-1.
        let groups = nh / nkv;
        let q = q.reshape((nkv, groups * t, hd))?;
        let scale = (hd as f64).powf(-0.5);
        let scores = matmul_rounded(&q, &k_all.t()?, p)?; // R(q·kᵀ)
        let scores = p.round(&(scores * scale)?)?; // R(· hd^-0.5)
        let scores = scores.reshape((nkv, groups, t, total))?;
        let probs = if self.portable {
            masked_softmax_portable(&scores, start)?
        } else {
            masked_softmax(&scores, start)?
        };
        let probs = p.round(&probs)?;
        let probs = probs.reshape((nkv, groups * t, total))?;
        let o = matmul_rounded(&probs, &v_all, p)?; // [nkv, g*T, hd]
        let o = standard_layout(&o.reshape((nh, t, hd))?.transpose(0, 1)?)?.reshape((t, nh * hd))?;
        let sig = p.round(&sigmoid(&gate)?)?;
        let o = p.round(&(o * sig)?)?;
        linear(&o, &self.o_proj, p)
    }
}

/// Row-wise f32 softmax with a causal mask: query row i (absolute position start+i) sees keys 0..=start+i.
fn masked_softmax(scores: &Tensor, start: usize) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let (t, total) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let mut v: Vec<f32> = scores.flatten_all()?.to_vec1()?;
    for (r, row) in v.chunks_exact_mut(total).enumerate() {
        let visible = start + (r % t) + 1;
        let (seen, hidden) = row.split_at_mut(visible);
        let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in seen.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in seen.iter_mut() {
            *x /= sum;
        }
        hidden.iter_mut().for_each(|x| *x = 0.0);
    }
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// `masked_softmax` as tensor ops on the scores' device: masked entries get -inf (exp → 0), so the
/// maximum and the sum run over the visible keys only, as HF's eager softmax in f32.
fn masked_softmax_portable(scores: &Tensor, start: usize) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let (t, total) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    // Built on the device: 0 where key c ≤ start + r, else f32::MIN (HF's additive mask value; its
    // exp underflows to exactly 0 as -inf's would).
    let dev = scores.device();
    let rows = Tensor::arange(start as u32, (start + t) as u32, dev)?.reshape((t, 1))?;
    let cols = Tensor::arange(0u32, total as u32, dev)?.reshape((1, total))?;
    let visible = cols.broadcast_le(&rows)?.to_dtype(candle_core::DType::F32)?;
    let mask = visible.affine(-(f32::MIN as f64), f32::MIN as f64)?;
    let s = scores.broadcast_add(&mask)?;
    let max = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// `1 / (1 + exp(-x))` in f32, as torch.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}
