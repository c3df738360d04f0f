//! Fused elementwise passes on f32 CPU tensors, run on our rayon pool. Each computes exactly the
//! expression the separate tensor ops computed (same f32 operations in the same order, the same libm
//! `exp`), so results are bit-identical; fusing saves passes over memory and keeps candle's own worker
//! pool, which spins between ops, off the cores the GEMMs use.
use super::precision::{with_f32_slice, Precision};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 13;
const PAR_MIN: usize = 1 << 15;

/// candle's f32 SiLU: `v / (1 + exp(-v))`.
#[inline(always)]
pub fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

fn same_shape(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::Internal(format!(
            "elementwise shapes differ: {:?} vs {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok(())
}

/// `f(a_chunk, b_chunk, out_chunk)` over matching chunks of two same-shape tensors (in parallel for
/// large ones), as a new tensor of `a`'s shape.
pub fn zip_chunks(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Result<Tensor> {
    same_shape(a, b)?;
    let v = with_f32_slice(a, |xa| {
        with_f32_slice(b, |xb| {
            let mut out = vec![0f32; xa.len()];
            if xa.len() >= PAR_MIN {
                out.par_chunks_mut(CHUNK)
                    .zip(xa.par_chunks(CHUNK))
                    .zip(xb.par_chunks(CHUNK))
                    .for_each(|((o, x), y)| f(x, y, o));
            } else {
                out.chunks_mut(CHUNK)
                    .zip(xa.chunks(CHUNK))
                    .zip(xb.chunks(CHUNK))
                    .for_each(|((o, x), y)| f(x, y, o));
            }
            out
        })
    })??;
    Ok(Tensor::from_vec(v, a.shape(), &Device::Cpu)?)
}

/// `f(a[i], b[i])` for every element, as a new tensor of `a`'s shape.
pub fn zip_map(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Tensor> {
    zip_chunks(a, b, |x, y, o| {
        super::cpu::vectorised(|| {
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                *o = f(x, y);
            }
        })
    })
}

/// `R(x + y)` (the residual adds).
/// `portable` (or a tensor off the CPU): one op on the tensors' device (`pair_ops`).
pub fn add_round(x: &Tensor, y: &Tensor, p: Precision, portable: bool) -> Result<Tensor> {
    if portable || !x.device().is_cpu() {
        return Ok(super::pair_ops::add_round(x, y, p)?);
    }
    zip_map(x, y, |a, b| p.round_scalar(a + b))
}

/// SwiGLU's middle: `R(R(silu(g)) · u)`.
/// `portable` (or a tensor off the CPU): one op on the tensors' device (`pair_ops`).
pub fn silu_mul_round(g: &Tensor, u: &Tensor, p: Precision, portable: bool) -> Result<Tensor> {
    if portable || !g.device().is_cpu() {
        return Ok(super::pair_ops::silu_mul_round(g, u, p)?);
    }
    zip_chunks(g, u, |g, u, o| {
        super::expf::silu_into(g, o);
        super::cpu::vectorised(|| {
            for (o, &u) in o.iter_mut().zip(u) {
                *o = p.round_scalar(p.round_scalar(*o) * u);
            }
        })
    })
}

/// Row-wise pass over `x` viewed as `[rows, d]`: `f(row_index, x_row, out_row)`.
pub fn map_rows(
    x: &Tensor,
    d: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) -> Result<Tensor> {
    let v = with_f32_slice(x, |xs| {
        let mut out = vec![0f32; xs.len()];
        if xs.len() >= PAR_MIN {
            out.par_chunks_mut(d)
                .zip(xs.par_chunks(d))
                .enumerate()
                .for_each(|(r, (o, x))| f(r, x, o));
        } else {
            out.chunks_mut(d)
                .zip(xs.chunks(d))
                .enumerate()
                .for_each(|(r, (o, x))| f(r, x, o));
        }
        out
    })?;
    Ok(Tensor::from_vec(v, x.shape(), &Device::Cpu)?)
}

/// Row-wise pass over two same-shape tensors viewed as `[rows, d]`: `f(row, a_row, b_row, out_row)`.
pub fn zip_rows(
    a: &Tensor,
    b: &Tensor,
    d: usize,
    f: impl Fn(usize, &[f32], &[f32], &mut [f32]) + Sync,
) -> Result<Tensor> {
    same_shape(a, b)?;
    let v = with_f32_slice(a, |xa| {
        with_f32_slice(b, |xb| {
            let mut out = vec![0f32; xa.len()];
            if xa.len() >= PAR_MIN {
                out.par_chunks_mut(d)
                    .zip(xa.par_chunks(d).zip(xb.par_chunks(d)))
                    .enumerate()
                    .for_each(|(r, (o, (x, y)))| f(r, x, y, o));
            } else {
                out.chunks_mut(d)
                    .zip(xa.chunks(d).zip(xb.chunks(d)))
                    .enumerate()
                    .for_each(|(r, (o, (x, y)))| f(r, x, y, o));
            }
            out
        })
    })??;
    Ok(Tensor::from_vec(v, a.shape(), &Device::Cpu)?)
}
