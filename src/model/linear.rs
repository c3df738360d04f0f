//! Bias-free Linear layers: `R(x · Wᵀ)` with f32 accumulation and one rounding, as HF's GEMMs. On the
//! CPU, in bf16 mode the weight is kept packed as bf16 (`bf16_gemm`: `vdpbf16ps`, or widened per tile);
//! in f32 mode it is kept packed for our f32 FMA kernel (`f32_gemm`) — both on the kernel set in force
//! (`cpu::active`); in f16 mode it is an f32 tensor multiplied by candle.
use super::bf16_gemm::PackedBf16;
use super::cpu;
use super::f32_gemm::PackedF32;
use super::precision::{with_f32_slice, Precision};
use super::round_op::cast;
use crate::error::Result;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

pub enum LinearWeight {
    F32(Tensor),
    Bf16(PackedBf16),
    /// On a GPU in bf16/f16 mode: the weight in that dtype, multiplied by cuBLAS with f32 accumulation
    /// (`CUBLAS_COMPUTE_32F`) and one rounding of each output, as HF's GEMMs.
    Half(Tensor),
    F32Packed(PackedF32),
}

impl LinearWeight {
    /// `w`: `[out, in]`, F32 (already rounded to `prec`) or, for bf16 packing, BF16.
    pub fn new(w: Tensor, prec: Precision) -> Result<LinearWeight> {
        if !w.device().is_cpu() {
            return Ok(match prec.half_dtype() {
                Some(dt) => LinearWeight::Half(w.to_dtype(dt)?.contiguous()?),
                None => LinearWeight::F32(w.to_dtype(candle_core::DType::F32)?.contiguous()?),
            });
        }
        let kernels = cpu::active();
        if prec == Precision::BF16 {
            let (n, k) = w.dims2()?;
            let w = w.contiguous()?;
            let (storage, layout) = w.storage_and_layout();
            let start = layout.start_offset();
            // Pack straight from the tensor's memory (a [vocab, hidden] head is a GiB in f32).
            let packed = match &*storage {
                Storage::Cpu(CpuStorage::F32(v)) => {
                    Some(PackedBf16::pack(&v[start..start + n * k], n, k, kernels))
                }
                Storage::Cpu(CpuStorage::BF16(v)) => {
                    let v = &v[start..start + n * k];
                    Some(PackedBf16::pack_with(n, k, kernels, |j, i| {
                        v[j * k + i].to_bits()
                    }))
                }
                _ => None,
            };
            drop(storage);
            if let Some(p) = packed {
                return Ok(LinearWeight::Bf16(p?));
            }
            let values: Vec<f32> = w
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            return Ok(LinearWeight::Bf16(PackedBf16::pack(
                &values, n, k, kernels,
            )?));
        }
        if prec == Precision::F32 {
            let (n, k) = w.dims2()?;
            let w = w.to_dtype(candle_core::DType::F32)?;
            let packed = with_f32_slice(&w, |v| PackedF32::pack(v, n, k, kernels))??;
            return Ok(LinearWeight::F32Packed(packed));
        }
        Ok(LinearWeight::F32(w.to_dtype(candle_core::DType::F32)?))
    }

    /// Output features.
    pub fn out_features(&self) -> Result<usize> {
        Ok(match self {
            LinearWeight::F32(w) | LinearWeight::Half(w) => w.dim(0)?,
            LinearWeight::Bf16(p) => p.n,
            LinearWeight::F32Packed(p) => p.n,
        })
    }

    /// Row `j` of the weight (`[in]`), for a tied head serving embedding lookups.
    pub fn row(&self, j: usize) -> Result<Vec<f32>> {
        Ok(match self {
            LinearWeight::F32(w) => w.get(j)?.to_vec1()?,
            LinearWeight::Half(w) => w.get(j)?.to_dtype(candle_core::DType::F32)?.to_vec1()?,
            LinearWeight::Bf16(p) => p.row(j),
            LinearWeight::F32Packed(p) => p.row(j),
        })
    }
}

/// `R(x · wᵀ)` for `x: [T, in]` (stored as f32, or as the model dtype: `act_io`), as f32.
pub fn linear(x: &Tensor, w: &LinearWeight, prec: Precision) -> Result<Tensor> {
    linear_to(x, w, prec, DType::F32)
}

/// [`linear`] with the result stored as `out` (`act_io::storage_dtype`). On a GPU in bf16/f16 with `out`
/// the model dtype, cuBLAS's output is returned as written: no cast on either side when `x` is stored in
/// the model dtype too.
pub fn linear_to(x: &Tensor, w: &LinearWeight, prec: Precision, out: DType) -> Result<Tensor> {
    // `cast` is a no-op when the dtype already matches; x holds model-dtype values (rounded upstream),
    // so a cast to the model dtype is exact.
    let y = match w {
        LinearWeight::Half(w) => cast(x, w.dtype())?.matmul(&w.t()?)?,
        LinearWeight::F32(w) => prec.round(&cast(x, DType::F32)?.matmul(&w.t()?)?)?,
        LinearWeight::Bf16(p) => {
            let (m, _) = x.dims2()?;
            // bf16 mode rounds each sum as it is stored (same bits as a rounding pass afterwards).
            let y = with_f32_slice(x, |xs| {
                let mut y = p.matmul_t_rounded(xs, m, prec == Precision::BF16);
                if prec != Precision::BF16 {
                    prec.round_slice(&mut y);
                }
                y
            })?;
            Tensor::from_vec(y, (m, p.n), &Device::Cpu)?
        }
        LinearWeight::F32Packed(p) => {
            let (m, _) = x.dims2()?;
            let mut y = with_f32_slice(x, |xs| p.matmul_t(xs, m))?;
            prec.round_slice(&mut y);
            Tensor::from_vec(y, (m, p.n), &Device::Cpu)?
        }
    };
    Ok(cast(&y, out)?)
}
