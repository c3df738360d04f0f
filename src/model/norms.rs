//! The two RMSNorm conventions of Qwen3.5: zero-centred `(1 + w)` (input/post-attention/final, q/k norms)
//! and the GDN gated norm with a plain weight, normalised before the SiLU(z) gate.
use super::cpu::vectorised;
use super::ops::{map_rows, zip_rows};
use super::precision::Precision;
use super::weights::WeightStore;
use crate::error::Result;
use candle_core::{Tensor, D};

/// `y = R((x · rsqrt(mean(x²) + eps)) · (1 + w))`, all f32, one rounding.
pub struct RmsNormZeroCentred {
    scale: Vec<f32>, // 1 + w, computed in f32 from the (rounded) stored offset
    scale_t: Tensor, // the same on the weights' device, for the portable kernels
    eps: f64,
    prec: Precision,
    portable: bool,
}

impl RmsNormZeroCentred {
    pub fn new(
        ws: &WeightStore,
        full_name: &str,
        dim: usize,
        eps: f64,
        prec: Precision,
    ) -> Result<Self> {
        let w = ws.load(full_name, &[dim], prec)?;
        let scale_t = (w + 1.0)?;
        Ok(RmsNormZeroCentred {
            scale: scale_t.to_vec1()?,
            scale_t,
            portable: ws.portable_kernels(),
            eps,
            prec,
        })
    }

    /// Normalise over the last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_to(x, candle_core::DType::F32)
    }

    /// `forward`, the result stored as `out` (`act_io::storage_dtype`: the model dtype only on the
    /// portable kernels).
    pub fn forward_to(&self, x: &Tensor, out: candle_core::DType) -> Result<Tensor> {
        if self.portable || !x.device().is_cpu() {
            return Ok(super::norm_ops::zero_centred(
                x,
                &self.scale_t,
                self.eps,
                self.prec,
                out,
            )?);
        }
        let inv = inv_rms(x, self.eps)?;
        let (p, scale) = (self.prec, &self.scale);
        map_rows(x, scale.len(), |r, x, o| {
            let s = inv[r];
            vectorised(|| {
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(scale) {
                    *o = p.round_scalar((x * s) * w);
                }
            })
        })
    }
}

/// `rsqrt(mean(x²) + eps)` of every row of `x` (over the last axis): `1 / sqrt(Σx² / D + eps)`, the row
/// sums candle's.
pub fn inv_rms(x: &Tensor, eps: f64) -> Result<Vec<f32>> {
    // x² on our pool (`v * v`, as candle's sqr); the row sums stay candle's (same summation order).
    let d = x.dim(D::Minus1)?;
    let sq = map_rows(x, d, |_, x, o| {
        vectorised(|| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = v * v;
            }
        })
    })?;
    let ms = sq.mean_keepdim(D::Minus1)?;
    Ok((ms + eps)?.sqrt()?.recip()?.flatten_all()?.to_vec1()?)
}

/// GDN output norm: `n = R(o · inv_rms(o))`, `n = R(w · n)`, `y = R(n · silu_f32(z))` per value head.
pub struct GatedRmsNorm {
    weight: Vec<f32>, // plain scale (HF initialises it to 1)
    weight_t: Tensor, // the same on the weights' device, for the portable kernels
    eps: f64,
    prec: Precision,
    portable: bool,
}

impl GatedRmsNorm {
    pub fn new(
        ws: &WeightStore,
        full_name: &str,
        dim: usize,
        eps: f64,
        prec: Precision,
    ) -> Result<Self> {
        let weight_t = ws.load(full_name, &[dim], prec)?;
        Ok(GatedRmsNorm {
            weight: weight_t.to_vec1()?,
            weight_t,
            portable: ws.portable_kernels(),
            eps,
            prec,
        })
    }

    /// As `forward`, with `o` in another row order: output row `r` (of `z`, `[rows, Dv]`) normalises row
    /// `o_row(r)` of `o` (`[rows, Dv]`). Saves materialising a transposed `o`.
    pub fn forward_gathered(
        &self,
        o: &Tensor,
        z: &Tensor,
        o_row: impl Fn(usize) -> usize + Sync,
    ) -> Result<Tensor> {
        let p = self.prec;
        let inv = inv_rms(o, self.eps)?;
        let w = &self.weight;
        let d = w.len();
        super::precision::with_f32_slice(o, |os| {
            map_rows(z, d, |r, z, out| {
                let orow = o_row(r);
                let s = inv[orow];
                let o = &os[orow * d..(orow + 1) * d];
                super::expf::silu_into(z, out); // silu(z) first, then the norm in place
                vectorised(|| {
                    for ((y, &o), &w) in out.iter_mut().zip(o).zip(w) {
                        let n = p.round_scalar(o * s);
                        let n = p.round_scalar(n * w);
                        *y = p.round_scalar(n * *y);
                    }
                })
            })
        })?
    }

    /// The portable kernels' form: `R(o)` for `o`: `[Hv, T, Dv]` (the delta rule's f32 output, heads
    /// first), `z`: `[T, Hv, Dv]`; the result `[T, Hv, Dv]` stored as `out` (one op, no transposed copy).
    pub fn forward_heads_first(
        &self,
        o: &Tensor,
        z: &Tensor,
        out: candle_core::DType,
    ) -> Result<Tensor> {
        let (p, w) = (self.prec, &self.weight_t);
        Ok(super::norm_ops::gated_heads_first(
            o, z, w, self.eps, p, out,
        )?)
    }

    /// `o`, `z`: `[.., Dv]` with the same shape.
    pub fn forward(&self, o: &Tensor, z: &Tensor) -> Result<Tensor> {
        let p = self.prec;
        if self.portable || !o.device().is_cpu() {
            let f32 = candle_core::DType::F32;
            return Ok(super::norm_ops::gated(
                o,
                z,
                &self.weight_t,
                self.eps,
                p,
                f32,
            )?);
        }
        let inv = inv_rms(o, self.eps)?;
        let w = &self.weight;
        zip_rows(o, z, w.len(), |r, o, z, out| {
            let s = inv[r];
            super::expf::silu_into(z, out);
            vectorised(|| {
                for ((y, &o), &w) in out.iter_mut().zip(o).zip(w) {
                    let n = p.round_scalar(o * s);
                    let n = p.round_scalar(n * w);
                    *y = p.round_scalar(n * *y);
                }
            })
        })
    }
}
