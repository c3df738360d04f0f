//! Partial rotary embedding (text-only mRoPE ≡ 1-D RoPE): fp32 inverse frequencies and angles,
//! tables rounded to the model dtype, NeoX rotate-half on the first `rd` dims of each head.
use super::precision::Precision;
use crate::error::Result;
use candle_core::{Device, Tensor, D};

/// The last sin/cos tables made and what they were made for: (start, T, device, sin, cos).
type LastTables = (usize, usize, candle_core::DeviceLocation, Tensor, Tensor);

pub struct Rope {
    inv_freq: Vec<f32>,
    rotary_dim: usize,
    prec: Precision,
    /// The last tables made, keyed by (start, T, device): every attention layer of a forward asks for the
    /// same ones, and at T = 4096 each set is ~0.5M sin/cos on the host.
    last: std::sync::Mutex<Option<LastTables>>,
}

impl Rope {
    pub fn new(theta: f64, rotary_dim: usize, prec: Precision) -> Rope {
        // HF: 1.0 / (base ** (arange(0, dim, 2, float32) / dim)), all in fp32.
        let base = theta as f32;
        let inv_freq = (0..rotary_dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / rotary_dim as f32))
            .collect();
        Rope {
            inv_freq,
            rotary_dim,
            prec,
            last: std::sync::Mutex::new(None),
        }
    }

    /// `(cos, sin)` tables `[T, rd]` for positions `start..start+t`, rounded to the model dtype, on `dev`
    /// (computed on the host: a few KB per call).
    pub fn tables(&self, start: usize, t: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let loc = dev.location();
        if let Ok(last) = self.last.lock() {
            if let Some((s0, t0, l0, c, s)) = last.as_ref() {
                if (*s0, *t0, *l0) == (start, t, loc) {
                    return Ok((c.clone(), s.clone()));
                }
            }
        }
        let half = self.rotary_dim / 2;
        let mut cos = Vec::with_capacity(t * self.rotary_dim);
        let mut sin = Vec::with_capacity(t * self.rotary_dim);
        for p in start..start + t {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            cos.extend(angles.iter().map(|a| a.cos()));
            sin.extend(angles.iter().map(|a| a.sin()));
            // emb = cat(freqs, freqs): the second half repeats the first
            let at = cos.len() - half;
            cos.extend_from_within(at..);
            sin.extend_from_within(at..);
        }
        let mut cos_t = Tensor::from_vec(cos, (t, self.rotary_dim), &Device::Cpu)?;
        let mut sin_t = Tensor::from_vec(sin, (t, self.rotary_dim), &Device::Cpu)?;
        cos_t = self.prec.round(&cos_t)?;
        sin_t = self.prec.round(&sin_t)?;
        let (cos_t, sin_t) = (cos_t.to_device(dev)?, sin_t.to_device(dev)?);
        if let Ok(mut last) = self.last.lock() {
            *last = Some((start, t, loc, cos_t.clone(), sin_t.clone()));
        }
        Ok((cos_t, sin_t))
    }

    /// Apply to `x: [heads, T, hd]` with tables `[T, rd]`: `R(R(x·cos) + R(rot(x)·sin))` on the rotary slice.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let p = self.prec;
        let rd = self.rotary_dim;
        let hd = x.dim(D::Minus1)?;
        let x_rot = x.narrow(D::Minus1, 0, rd)?;
        let x1 = x_rot.narrow(D::Minus1, 0, rd / 2)?;
        let x2 = x_rot.narrow(D::Minus1, rd / 2, rd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let a = p.round(&x_rot.broadcast_mul(cos)?)?;
        let b = p.round(&rotated.broadcast_mul(sin)?)?;
        let out = p.round(&(a + b)?)?;
        if rd == hd {
            Ok(out)
        } else {
            Ok(Tensor::cat(
                &[&out, &x.narrow(D::Minus1, rd, hd - rd)?],
                D::Minus1,
            )?)
        }
    }
}
