//! The two RMSNorms of the portable kernels as one op each (one CUDA kernel on a GPU, where the tensor-op
//! version cost eight launches and as many passes over the activations per norm):
//!
//! - [`zero_centred`]: `R((x · inv) · s)` with `s = 1 + w` (HF's `Qwen3_5RMSNorm`);
//! - [`gated`]: `R(R(R(x · inv) · w) · silu(z))` (HF's `Qwen3_5RMSNormGated`: normalised in f32, rounded to
//!   the model dtype, times the weight, rounded, times `silu(z)` in f32, rounded);
//!
//! with `inv = 1 / sqrt(Σx² / D + eps)` per row of the last dimension `D`, as HF's
//! `x * torch.rsqrt(x.pow(2).mean(-1) + eps)` (torch's CPU `rsqrt` is `1 / sqrt`). `R` rounds to the
//! model dtype (identity in f32). On the CPU the squares are summed in order; on a GPU by a block
//! reduction (a different order of f32 additions, at the 1e-7 level).
use super::precision::Precision;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `x`: `[.., D]`, `scale`: `[D]` (`1 + w`). Same shape as `x`, f32.
pub fn zero_centred(x: &Tensor, scale: &Tensor, eps: f64, prec: Precision) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(
        &scale.contiguous()?,
        &ZeroCentred(Norm {
            eps: eps as f32,
            prec,
        }),
    )
}

/// `x`, `z`: `[.., D]` with the same shape, `w`: `[D]`. Same shape as `x`, f32.
pub fn gated(x: &Tensor, z: &Tensor, w: &Tensor, eps: f64, prec: Precision) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &z.contiguous()?,
        &w.contiguous()?,
        &Gated(Norm {
            eps: eps as f32,
            prec,
        }),
    )
}

#[derive(Clone, Copy)]
struct Norm {
    eps: f32,
    prec: Precision,
}

impl Norm {
    /// Rows and their width, after checking that every operand is contiguous f32-shaped as expected.
    fn rows(&self, x: &Layout, z: Option<&Layout>, w: &Layout) -> Result<(usize, usize)> {
        let d = x.shape().dims().last().copied().unwrap_or(0);
        let ok = d > 0
            && x.is_contiguous()
            && w.is_contiguous()
            && w.shape().dims() == [d]
            && z.is_none_or(|z| z.is_contiguous() && z.shape() == x.shape());
        if !ok {
            candle_core::bail!(
                "rms norm: expected contiguous [.., D] operands and a [D] weight, got {:?}, {:?}",
                x.shape(),
                w.shape()
            );
        }
        Ok((x.shape().elem_count() / d, d))
    }

    fn inv(&self, row: &[f32]) -> f32 {
        let mut sum = 0f32;
        for v in row {
            sum += v * v;
        }
        1.0 / (sum / row.len() as f32 + self.eps).sqrt()
    }

    fn cpu(&self, x: &[f32], z: Option<&[f32]>, w: &[f32], rows: usize) -> Vec<f32> {
        let d = w.len();
        let p = self.prec;
        let mut out = vec![0f32; rows * d];
        for r in 0..rows {
            let xr = &x[r * d..(r + 1) * d];
            let inv = self.inv(xr);
            let o = &mut out[r * d..(r + 1) * d];
            match z {
                None => {
                    for ((o, &x), &s) in o.iter_mut().zip(xr).zip(w) {
                        *o = p.round_scalar((x * inv) * s);
                    }
                }
                Some(z) => {
                    let zr = &z[r * d..(r + 1) * d];
                    for (((o, &x), &w), &z) in o.iter_mut().zip(xr).zip(w).zip(zr) {
                        let n = p.round_scalar(x * inv);
                        let n = p.round_scalar(n * w);
                        *o = p.round_scalar(n * (z / (1.0 + (-z).exp())));
                    }
                }
            }
        }
        out
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        z: Option<(&candle_core::CudaStorage, &Layout)>,
        w: (&candle_core::CudaStorage, &Layout),
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (rows, d) = self.rows(x.1, z.map(|z| z.1), w.1)?;
        let dev = x.0.device().clone();
        let xs = super::device::cuda_f32(x.0, x.1)?;
        let ws = super::device::cuda_f32(w.0, w.1)?;
        // The ungated kernel reads `z` never; it gets `x` in that slot.
        let zs = match z {
            Some((s, l)) => super::device::cuda_f32(s, l)?,
            None => super::device::cuda_f32(x.0, x.1)?,
        };
        // SAFETY: every one of the rows·d outputs is written.
        let out = unsafe { dev.alloc::<f32>(rows * d)? };
        let func = dev.get_or_load_custom_func("qgate_rms_norm", "qgate_norms", ptx()?)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (d.clamp(32, 256).div_ceil(32) as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [
            d as i32,
            z.is_some() as i32,
            super::precision::round_code(self.prec),
        ];
        let mut b = func.builder();
        b.arg(&xs);
        b.arg(&zs);
        b.arg(&ws);
        b.arg(&out);
        b.arg(&self.eps);
        for i in &ints {
            b.arg(i);
        }
        // SAFETY: reads rows·d floats of x (and z) and d of w, writes rows·d, as allocated.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            x.1.shape().clone(),
        ))
    }
}

struct ZeroCentred(Norm);

impl CustomOp2 for ZeroCentred {
    fn name(&self) -> &'static str {
        "qgate-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = self.0.rows(l1, None, l2)?;
        let (CpuStorage::F32(x), CpuStorage::F32(s)) = (s1, s2) else {
            candle_core::bail!("rms norm: f32 only");
        };
        let x = &x[l1.start_offset()..l1.start_offset() + rows * d];
        let s = &s[l2.start_offset()..l2.start_offset() + d];
        Ok((
            CpuStorage::F32(self.0.cpu(x, None, s, rows)),
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda((s1, l1), None, (s2, l2))
    }
}

struct Gated(Norm);

impl CustomOp3 for Gated {
    fn name(&self) -> &'static str {
        "qgate-gated-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = self.0.rows(l1, Some(l2), l3)?;
        let (CpuStorage::F32(x), CpuStorage::F32(z), CpuStorage::F32(w)) = (s1, s2, s3) else {
            candle_core::bail!("gated rms norm: f32 only");
        };
        let x = &x[l1.start_offset()..l1.start_offset() + rows * d];
        let z = &z[l2.start_offset()..l2.start_offset() + rows * d];
        let w = &w[l3.start_offset()..l3.start_offset() + d];
        Ok((
            CpuStorage::F32(self.0.cpu(x, Some(z), w, rows)),
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda((s1, l1), Some((s2, l2)), (s3, l3))
    }
}

// One block per row. Explicit _rn intrinsics where the host rounds a product, so none is contracted
// into an FMA; the sum of squares is a block reduction.
#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
extern "C" __global__ void qgate_rms_norm(const float* x, const float* z, const float* w, float* out,
                                          float eps, int d, int gated_norm, int mode) {
    __shared__ float red[32];
    __shared__ float inv_s;
    const long row = blockIdx.x;
    const float* xr = x + row * d;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) acc = fmaf(xr[i], xr[i], acc);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int i = 0; i < (int)(blockDim.x >> 5); ++i) s += red[i];
        inv_s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(s, (float)d), eps)));
    }
    __syncthreads();
    const float inv = inv_s;
    float* o = out + row * d;
    if (!gated_norm) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = rnd(__fmul_rn(__fmul_rn(xr[i], inv), w[i]), mode);
        return;
    }
    const float* zr = z + row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float n = rnd(__fmul_rn(rnd(__fmul_rn(xr[i], inv), mode), w[i]), mode);
        o[i] = rnd(__fmul_rn(n, silu(zr[i])), mode);
    }
}
"#;

/// The kernel's PTX, compiled once per process.
#[cfg(feature = "cuda")]
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx_with_rounding(&PTX, KERNEL, "the RMS-norm kernel")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{max_diff_t as max, noise};
    use candle_core::{Device, D};

    /// The ops against the tensor-op formulas (candle on the CPU), in f32 and bf16.
    #[test]
    fn norms_are_the_formulas() {
        let dev = Device::Cpu;
        let f = |n, seed| -> Vec<f32> { noise(n, seed).iter().map(|x| 2.0 * x).collect() };
        let (rows, d) = (6, 96);
        let x = Tensor::from_vec(f(rows * d, 1), (2, 3, d), &dev).unwrap();
        let z = Tensor::from_vec(f(rows * d, 2), (2, 3, d), &dev).unwrap();
        let w = Tensor::from_vec(f(d, 3), d, &dev).unwrap();
        let eps = 1e-6;
        for prec in [Precision::F32, Precision::BF16] {
            let inv = (x.sqr().unwrap().sum_keepdim(D::Minus1).unwrap() / d as f64)
                .unwrap()
                .affine(1.0, eps)
                .unwrap()
                .sqrt()
                .unwrap()
                .recip()
                .unwrap();
            let normed = x.broadcast_mul(&inv).unwrap();
            let want_zc = prec.round(&normed.broadcast_mul(&w).unwrap()).unwrap();
            let n = prec.round(&normed).unwrap();
            let n = prec.round(&n.broadcast_mul(&w).unwrap()).unwrap();
            let want_g = prec.round(&(n * z.silu().unwrap()).unwrap()).unwrap();
            let got_zc = zero_centred(&x, &w, eps, prec).unwrap();
            let got_g = gated(&x, &z, &w, eps, prec).unwrap();
            // Within one model-dtype ulp of values below 8 (a sum order may move a rounding).
            let tol = if prec == Precision::F32 { 1e-5 } else { 0.04 };
            assert!(
                max(&got_zc, &want_zc) <= tol,
                "{}: zero-centred",
                prec.name()
            );
            assert!(max(&got_g, &want_g) <= tol, "{}: gated", prec.name());
            let zeros = want_g.zeros_like().unwrap();
            assert!(max(&want_g, &zeros) > 0.5, "degenerate test: outputs ~0");
        }
    }
}
