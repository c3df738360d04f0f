//! The two RMSNorm conventions of Qwen3.5: zero-centred `(1 + w)` (input/post-attention/final, q/k norms)
//! and the GDN gated norm with a plain weight, normalised before the SiLU(z) gate.
use super::precision::Precision;
use super::weights::WeightStore;
use crate::error::Result;
use candle_core::{Tensor, D};

/// `y = R((x · rsqrt(mean(x²) + eps)) · (1 + w))`, all f32, one rounding.
pub struct RmsNormZeroCentred {
    scale: Tensor, // 1 + w, computed in f32 from the (rounded) stored offset
    eps: f64,
    prec: Precision,
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
        Ok(RmsNormZeroCentred {
            scale: (w + 1.0)?,
            eps,
            prec,
        })
    }

    /// Normalise over the last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let normed = normalise(x, self.eps)?;
        Ok(self.prec.round(&normed.broadcast_mul(&self.scale)?)?)
    }
}

/// `x · rsqrt(mean(x²) + eps)` over the last axis, in f32.
pub fn normalise(x: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?)
}

/// GDN output norm: `n = R(normalise(o))`, `n = R(w · n)`, `y = R(n · silu_f32(z))` per value head.
pub struct GatedRmsNorm {
    weight: Tensor, // plain scale (HF initialises it to 1)
    eps: f64,
    prec: Precision,
}

impl GatedRmsNorm {
    pub fn new(
        ws: &WeightStore,
        full_name: &str,
        dim: usize,
        eps: f64,
        prec: Precision,
    ) -> Result<Self> {
        Ok(GatedRmsNorm {
            weight: ws.load(full_name, &[dim], prec)?,
            eps,
            prec,
        })
    }

    /// `o`, `z`: `[.., Dv]` with the same shape.
    pub fn forward(&self, o: &Tensor, z: &Tensor) -> Result<Tensor> {
        let p = self.prec;
        let n = p.round(&normalise(o, self.eps)?)?;
        let n = p.round(&n.broadcast_mul(&self.weight)?)?;
        Ok(p.round(&(n * z.silu()?)?)?)
    }
}
