//! Gated full attention: per-head [query | gate] split of `q_proj`, q/k zero-centred norms, partial RoPE,
//! GQA, eager softmax attention with HF's bf16 rounding points, sigmoid output gate.
use super::config::TextConfig;
use super::device::{matmul_model_dtype, standard_layout};
use super::mlp::{linear, linear_to, LinearWeight};
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

    /// Appends this step's `[nkv, T, hd]` keys and values; returns all of them so far.
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k_all, v_all) = match (&self.k, &self.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
            _ => (k, v),
        };
        self.k = Some(k_all.clone());
        self.v = Some(v_all.clone());
        Ok((k_all, v_all))
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
        if self.portable {
            return self.forward_portable(h, rope, cache);
        }
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
        let (k_all, v_all) = cache.append(k, v)?;

        // GQA: kv head j serves query heads j*g .. j*g+g-1.
        let groups = nh / nkv;
        let q = q.reshape((nkv, groups * t, hd))?;
        let scale = (hd as f64).powf(-0.5);
        // R(q·kᵀ), R(· hd^-0.5), masked softmax, R: one pass per score row.
        let scores = q.matmul(&k_all.t()?)?;
        let probs = scaled_masked_softmax(&scores, t, start, scale, p)?;
        let o = p.round(&probs.matmul(&v_all)?)?; // [nkv, g*T, hd]
        let o = o
            .reshape((nh, t, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, nh * hd))?;
        let sig = p.round(&sigmoid(&gate)?)?;
        let o = p.round(&(o * sig)?)?;
        linear(&o, &self.o_proj, p)
    }

    /// The portable kernels' path (every GPU run): the same values as [`Self::forward`], with the
    /// activations stored in the model dtype (`act_io`), RoPE as one op writing the GQA layout, and the
    /// attention over blocks of query positions ([`blocked`]): the scores never exceed one block's rows,
    /// and the keys after a block's last position (masked: exactly zero weight) are never multiplied.
    fn forward_portable(&self, h: &Tensor, rope: &Rope, cache: &mut KvCache) -> Result<Tensor> {
        let p = self.prec;
        let io = super::act_io::storage_dtype(p, true);
        let (t, _) = h.dims2()?;
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let groups = nh / nkv;
        let start = cache.len();

        let qg = linear_to(h, &self.q_proj, p, io)?.reshape((t, nh, 2 * hd))?;
        let q = self
            .q_norm
            .forward_to(&standard_layout(&qg.narrow(D::Minus1, 0, hd)?)?, io)?; // [T, nh, hd]
        let gate = standard_layout(&qg.narrow(D::Minus1, hd, hd)?)?.reshape((t, nh * hd))?;
        let k = linear_to(h, &self.k_proj, p, io)?.reshape((t, nkv, hd))?;
        let k = self.k_norm.forward_to(&k, io)?; // [T, nkv, hd]
        let v = standard_layout(
            &linear_to(h, &self.v_proj, p, io)?
                .reshape((t, nkv, hd))?
                .transpose(0, 1)?,
        )?; // [nkv, T, hd]

        let (cos, sin) = rope.tables(start, t, h.device())?;
        // q: [nkv, T·g, hd], rows (position, group); k: [nkv, T, hd].
        let q = super::rope::rotate_grouped(&q, &cos, &sin, groups, p, io)?.reshape((
            nkv,
            t * groups,
            hd,
        ))?;
        let k = super::rope::rotate_grouped(&k, &cos, &sin, 1, p, io)?.reshape((nkv, t, hd))?;
        let (k_all, v_all) = cache.append(k, v)?;

        let scale = (hd as f64).powf(-0.5) as f32;
        let block = query_block(t, start + t, nh);
        let o = blocked(&q, &k_all, &v_all, t, groups, start, scale, p, block)?;
        // R(o · R(sigmoid(gate))): one op.
        let o = super::pair_ops::sigmoid_gate_round(&o, &gate, p)?;
        linear(&o, &self.o_proj, p)
    }
}

/// Query positions a block of [`blocked`]: 1,024, fewer where one block's scores (`heads` rows a
/// position, `keys` columns) would pass 2²⁷ values (256 MiB in bf16), at least 64.
pub fn query_block(t: usize, keys: usize, heads: usize) -> usize {
    const MAX_SCORES: usize = 1 << 27;
    let fit = MAX_SCORES / (heads * keys).max(1);
    fit.clamp(64, 1024).min(t.max(1))
}

/// Eager attention over blocks of `block` query positions. `q`: `[nkv, T·g, hd]` with rows (position,
/// group) for positions `start..start+T`; `k`, `v`: `[nkv, start+T, hd]`. Each block takes the keys up to
/// its last position: `R(q·kᵀ)` (kept in the model dtype on a GPU), one op for `R(· scale)`, the causal
/// mask, the f32 softmax and `R`, then `R(p·v)`. A masked key's weight is exactly 0 (`exp` of the dtype's
/// minimum, as HF), so leaving it out of a block changes no value. Returns `[T, nkv·g·hd]`.
#[allow(clippy::too_many_arguments)]
pub fn blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    groups: usize,
    start: usize,
    scale: f32,
    p: Precision,
    block: usize,
) -> Result<Tensor> {
    let (nkv, _, hd) = q.dims3()?;
    let block = block.max(1);
    // The last block first: its scores are the largest (it sees the most keys), so each later block's
    // scores fit in memory the pool already holds instead of growing it block by block.
    let mut outs = Vec::with_capacity(t.div_ceil(block));
    for q0 in (0..t).step_by(block).rev() {
        let n = block.min(t - q0);
        let keys = start + q0 + n;
        let qb = q.narrow(1, q0 * groups, n * groups)?;
        let (kb, vb) = (k.narrow(1, 0, keys)?, v.narrow(1, 0, keys)?);
        let scores = matmul_model_dtype(&qb, &kb.t()?, p)?; // [nkv, n·g, keys]
        let probs =
            super::attn_softmax::scaled_masked_softmax(&scores, n, groups, start + q0, scale, p)?;
        outs.push(matmul_model_dtype(&probs, &vb, p)?); // [nkv, n·g, hd]
    }
    outs.reverse();
    let o = match outs.len() {
        1 => outs.swap_remove(0),
        _ => Tensor::cat(&outs, 1)?,
    };
    // [nkv, T, g, hd] → [T, nkv·g·hd]: head j·g + gi of position t.
    Ok(
        standard_layout(&o.reshape((nkv, t, groups, hd))?.transpose(0, 1)?)?
            .reshape((t, nkv * groups * hd))?,
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{max_diff_t, noise};
    use candle_core::Device;

    /// Blocks of query positions give the one-block result: every block size, with a cached prefix
    /// (`start > 0`) and GQA groups, in f32 and bf16.
    #[test]
    fn blocked_attention_is_one_block() {
        let dev = Device::Cpu;
        let (nkv, g, hd, t, start) = (2, 3, 8, 11, 4);
        for p in [Precision::F32, Precision::BF16] {
            let mk = |n: usize, rows: usize, seed| {
                p.round(&Tensor::from_vec(noise(n, seed), (nkv, rows, hd), &dev).unwrap())
                    .unwrap()
            };
            let q = mk(nkv * t * g * hd, t * g, 1);
            let k = mk(nkv * (start + t) * hd, start + t, 2);
            let v = mk(nkv * (start + t) * hd, start + t, 3);
            let one = blocked(&q, &k, &v, t, g, start, 0.35, p, t).unwrap();
            assert_eq!(one.dims(), [t, nkv * g * hd]);
            for block in [1, 2, 4, 7, 10] {
                let got = blocked(&q, &k, &v, t, g, start, 0.35, p, block).unwrap();
                // The host GEMM's sums may group differently by shape: ≤ an f32 ulp before R.
                let tol = if p == Precision::F32 { 1e-6 } else { 1e-2 };
                let d = max_diff_t(&got, &one);
                assert!(d <= tol, "{} block {block}: {d}", p.name());
            }
            // Not degenerate: the causal mask matters (a shorter prefix changes the first rows).
            let fewer = blocked(
                &q,
                &k.narrow(1, 1, start + t - 1).unwrap(),
                &v.narrow(1, 1, start + t - 1).unwrap(),
                t,
                g,
                start - 1,
                0.35,
                p,
                t,
            )
            .unwrap();
            let d = max_diff_t(&fewer, &one);
            assert!(d > 5e-2, "{d}");
        }
    }

    #[test]
    fn query_block_bounds_the_scores() {
        assert_eq!(query_block(512, 512, 8), 512);
        assert_eq!(query_block(4096, 4096, 8), 1024);
        // 27B-like: 24 heads over 16,384 keys → 341 positions keep a block under 2²⁷ scores.
        let b = query_block(16384, 16384, 24);
        assert!(b * 24 * 16384 <= 1 << 27 && b >= 64, "{b}");
        assert_eq!(query_block(10, 10, 1), 10);
    }
}
