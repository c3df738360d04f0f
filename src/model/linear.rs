//! Bias-free Linear layers: `R(x · Wᵀ)` with f32 accumulation and one rounding, as HF's GEMMs. In bf16
//! mode on CPUs with AVX-512-BF16 the weight is kept packed as bf16 and multiplied with `vdpbf16ps`
//! (`bf16_gemm`); otherwise it is an f32 tensor multiplied by candle.
use super::bf16_gemm::{self, PackedBf16};
use super::precision::Precision;
use crate::error::Result;
use candle_core::{CpuStorage, Device, Storage, Tensor};

pub enum LinearWeight {
    F32(Tensor),
    Bf16(PackedBf16),
}

impl LinearWeight {
    /// `w`: `[out, in]` f32 (already rounded to `prec`).
    pub fn new(w: Tensor, prec: Precision) -> Result<LinearWeight> {
        if prec == Precision::BF16 && bf16_gemm::available() {
            let (n, k) = w.dims2()?;
            let w = w.contiguous()?;
            let (storage, layout) = w.storage_and_layout();
            // Pack straight from the tensor's memory (a [vocab, hidden] head is a GiB in f32).
            if let Storage::Cpu(CpuStorage::F32(values)) = &*storage {
                let start = layout.start_offset();
                return Ok(LinearWeight::Bf16(PackedBf16::pack(
                    &values[start..start + n * k],
                    n,
                    k,
                )));
            }
            drop(storage);
            let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
            return Ok(LinearWeight::Bf16(PackedBf16::pack(&values, n, k)));
        }
        Ok(LinearWeight::F32(w))
    }
}

/// `R(x · wᵀ)` for `x: [T, in]`.
pub fn linear(x: &Tensor, w: &LinearWeight, prec: Precision) -> Result<Tensor> {
    match w {
        LinearWeight::F32(w) => Ok(prec.round(&x.matmul(&w.t()?)?)?),
        LinearWeight::Bf16(p) => {
            let (m, _) = x.dims2()?;
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let mut y = p.matmul_t(&xs, m);
            prec.round_slice(&mut y); // in place: no extra copies of a [T, vocab] head output
            Ok(Tensor::from_vec(y, (m, p.n), &Device::Cpu)?)
        }
    }
}
