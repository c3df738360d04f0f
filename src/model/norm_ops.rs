//! The two RMSNorms of the portable kernels as one op each (one CUDA kernel on a GPU, where the tensor-op
//! version cost eight launches and as many passes over the activations per norm):
//!
//! - [`zero_centred`]: `R((x · inv) · s)` with `s = 1 + w` (HF's `Qwen3_5RMSNorm`);
//! - [`gated`]: `R(R(R(x · inv) · w) · silu(z))` (HF's `Qwen3_5RMSNormGated`: normalised in f32, rounded to
//!   the model dtype, times the weight, rounded, times `silu(z)` in f32, rounded);
//!
//! with `inv = 1 / sqrt(Σx² / D + eps)` per row of the last dimension `D`, as HF's
//! `x * torch.rsqrt(x.pow(2).mean(-1) + eps)` (torch's CPU `rsqrt` is `1 / sqrt`). `R` rounds to the
//! model dtype (identity in f32). On the CPU the squares are summed in order; on a GPU by a warp
//! reduction (a different order of f32 additions, at the 1e-7 level). `x` and `z` may be stored as f32,
//! bf16 or f16 (`act_io`); the weights are f32; the result is stored as `out`.
use super::act_io;
use super::precision::Precision;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `x`: `[.., D]`, `scale`: `[D]` (`1 + w`). Same shape as `x`, stored as `out`.
pub fn zero_centred(
    x: &Tensor,
    scale: &Tensor,
    eps: f64,
    prec: Precision,
    out: DType,
) -> Result<Tensor> {
    let norm = Norm::new(eps, prec, out, None);
    x.contiguous()?
        .apply_op2_no_bwd(&scale.contiguous()?, &ZeroCentred(norm))
}

/// `x`, `z`: `[.., D]` with the same shape, `w`: `[D]`. Same shape as `x`, stored as `out`.
pub fn gated(
    x: &Tensor,
    z: &Tensor,
    w: &Tensor,
    eps: f64,
    prec: Precision,
    out: DType,
) -> Result<Tensor> {
    let norm = Norm::new(eps, prec, out, None);
    x.contiguous()?
        .apply_op3_no_bwd(&z.contiguous()?, &w.contiguous()?, &Gated(norm))
}

/// [`gated`] of `R(x)` for `x`: `[H, T, D]` (heads first, f32, not yet rounded: the delta rule's output)
/// and `z`: `[T, H, D]`; the result is `[T, H, D]` (row `(t, h)` normalises `R(x[h, t])`), as
/// `gated(&R(x).transpose(0, 1), z, ..)` without the rounding pass and the transposed copy.
pub fn gated_heads_first(
    x: &Tensor,
    z: &Tensor,
    w: &Tensor,
    eps: f64,
    prec: Precision,
    out: DType,
) -> Result<Tensor> {
    let (h, t, d) = x.dims3()?;
    if z.dims() != [t, h, d] {
        candle_core::bail!(
            "gated rms norm: expected z [{t}, {h}, {d}] for x {:?}, got {:?}",
            x.dims(),
            z.dims()
        );
    }
    let norm = Norm::new(eps, prec, out, Some(h));
    // x viewed with z's shape (same element count) so that the shape checks hold; rows are mapped below.
    let xv = x.contiguous()?.reshape((t, h, d))?;
    xv.apply_op3_no_bwd(&z.contiguous()?, &w.contiguous()?, &Gated(norm))
}

#[derive(Clone, Copy)]
struct Norm {
    eps: f32,
    prec: Precision,
    out: DType,
    /// `Some(H)`: `x` is `[H, T, D]` heads first and rounded (`R`) as it is read; output row `t·H + h`
    /// reads row `h·T + t` of `x`.
    heads_first: Option<usize>,
}

impl Norm {
    fn new(eps: f64, prec: Precision, out: DType, heads_first: Option<usize>) -> Norm {
        Norm {
            eps: eps as f32,
            prec,
            out,
            heads_first,
        }
    }

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
        let mut xrow = vec![0f32; d];
        for r in 0..rows {
            let xr: &[f32] = match self.heads_first {
                None => &x[r * d..(r + 1) * d],
                Some(h) => {
                    let xi = (r % h) * (rows / h) + r / h;
                    for (o, &v) in xrow.iter_mut().zip(&x[xi * d..(xi + 1) * d]) {
                        *o = p.round_scalar(v);
                    }
                    &xrow
                }
            };
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
        if i32::try_from(rows).is_err() || i32::try_from(d).is_err() {
            candle_core::bail!(
                "rms norm: {rows} rows of {d} are past the GPU kernel's 32-bit indices"
            );
        }
        let dev = x.0.device().clone();
        let xs = act_io::view(x.0, x.1)?;
        let ws = super::device::cuda_f32(w.0, w.1)?;
        // The ungated kernel reads `z` never; it gets `x` in that slot.
        let zs = match z {
            Some((s, l)) => act_io::view(s, l)?,
            None => act_io::view(x.0, x.1)?,
        };
        // SAFETY: every one of the rows·d outputs is written.
        let out = unsafe { act_io::Out::alloc(&dev, self.out, rows * d)? };
        let func = dev.get_or_load_custom_func("qgate_rms_norm", "qgate_norms", ptx()?)?;
        // Four-wide loads and stores where the row width and every operand's offset allow them.
        let v4 = d % 4 == 0
            && [Some(x.1), z.map(|z| z.1), Some(w.1)]
                .iter()
                .flatten()
                .all(|l| l.start_offset() % 4 == 0);
        // A warp per row, 8 rows a block.
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [
            d as i32,
            self.heads_first.map_or(0, |h| h as i32),
            z.is_some() as i32,
            super::precision::round_code(self.prec),
            xs.code(),
            zs.code(),
            out.code(),
            rows as i32,
            v4 as i32,
        ];
        let mut b = func.builder();
        xs.push(&mut b);
        zs.push(&mut b);
        b.arg(&ws);
        out.push(&mut b);
        b.arg(&self.eps);
        for i in &ints {
            b.arg(i);
        }
        // SAFETY: reads rows·d elements of x (and z) and d floats of w, writes rows·d, as allocated, in
        // the dtypes coded.
        unsafe { b.launch(cfg) }.w()?;
        Ok((out.storage(dev), x.1.shape().clone()))
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
        let CpuStorage::F32(s) = s2 else {
            candle_core::bail!("rms norm: f32 weights expected");
        };
        let x = act_io::f32_of(s1, l1, rows * d, "rms norm")?;
        let s = &s[l2.start_offset()..l2.start_offset() + d];
        let out = self.0.cpu(&x, None, s, rows);
        Ok((act_io::storage_of(out, self.0.out)?, l1.shape().clone()))
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
        let CpuStorage::F32(w) = s3 else {
            candle_core::bail!("gated rms norm: f32 weights expected");
        };
        let x = act_io::f32_of(s1, l1, rows * d, "gated rms norm")?;
        let z = act_io::f32_of(s2, l2, rows * d, "gated rms norm")?;
        let w = &w[l3.start_offset()..l3.start_offset() + d];
        let out = self.0.cpu(&x, Some(&z), w, rows);
        Ok((act_io::storage_of(out, self.0.out)?, l1.shape().clone()))
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

// Explicit _rn intrinsics where the host rounds a product, so none is contracted
// into an FMA; the sum of squares is a warp reduction.
#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
// One warp per row (8 rows a block): each lane sums the squares of its elements (4 consecutive ones from
// 4·lane, then every 128), then a butterfly of shuffles gives every lane the row's sum. heads (> 0): x is
// [heads, T, d], rounded as read; output row t·heads + h reads x row h·T + t. v4: vector loads and
// stores (d and every operand's offset multiples of 4).
extern "C" __global__ void qgate_rms_norm(const void* x, const void* z, const float* w, void* out,
                                          float eps, int d, int heads, int gated_norm, int mode, int xt, int zt,
                                          int ot, int rows, int v4) {
    const int lane = threadIdx.x & 31;
    // 32-bit row arithmetic (rows is an int): a 64-bit division costs more than a short row's work.
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const long row0 = (long)row * d;
    const long xrow0 = heads > 0 ? ((long)(row % heads) * (rows / heads) + row / heads) * d : row0;
    float acc = 0.0f;
    for (int i = 4 * lane; i < d; i += 128) {
        float v[4];
        ld4(x, xrow0 + i, xt, v4, d - i, v);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float u = heads > 0 ? rnd(v[e], mode) : v[e];
            acc = fmaf(u, u, acc);
        }
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(acc, (float)d), eps)));
    for (int i = 4 * lane; i < d; i += 128) {
        float v[4], ww[4], r[4];
        ld4(x, xrow0 + i, xt, v4, d - i, v);
        ld4(w, i, 0, v4, d - i, ww);
        if (!gated_norm) {
#pragma unroll
            for (int e = 0; e < 4; ++e) r[e] = rnd(__fmul_rn(__fmul_rn(v[e], inv), ww[e]), mode);
        } else {
            float zz[4];
            ld4(z, row0 + i, zt, v4, d - i, zz);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float xv = heads > 0 ? rnd(v[e], mode) : v[e];
                const float n = rnd(__fmul_rn(rnd(__fmul_rn(xv, inv), mode), ww[e]), mode);
                r[e] = rnd(__fmul_rn(n, silu(zz[e])), mode);
            }
        }
        st4(out, row0 + i, r, ot, v4, d - i);
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
            let got_zc = zero_centred(&x, &w, eps, prec, DType::F32).unwrap();
            let got_g = gated(&x, &z, &w, eps, prec, DType::F32).unwrap();
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

    /// Inputs stored as bf16 (`act_io`) and outputs asked as bf16 give the f32 run's values.
    #[test]
    fn norms_read_and_write_the_model_dtype() {
        let dev = Device::Cpu;
        let p = Precision::BF16;
        let (rows, d) = (5, 64);
        let r = |seed| {
            let v: Vec<f32> = noise(rows * d, seed).iter().map(|x| 2.0 * x).collect();
            p.round(&Tensor::from_vec(v, (rows, d), &dev).unwrap())
                .unwrap()
        };
        let (x, z) = (r(5), r(6));
        let w = Tensor::from_vec(noise(d, 7), d, &dev).unwrap();
        let (xh, zh) = (
            x.to_dtype(DType::BF16).unwrap(),
            z.to_dtype(DType::BF16).unwrap(),
        );
        let f32_of = |t: Tensor| {
            assert_eq!(t.dtype(), DType::BF16);
            t.to_dtype(DType::F32).unwrap()
        };
        let zc = zero_centred(&x, &w, 1e-6, p, DType::F32).unwrap();
        let zc_h = f32_of(zero_centred(&xh, &w, 1e-6, p, DType::BF16).unwrap());
        assert_eq!(max(&zc, &zc_h), 0.0);
        let g = gated(&x, &z, &w, 1e-6, p, DType::F32).unwrap();
        let g_h = f32_of(gated(&x, &zh, &w, 1e-6, p, DType::BF16).unwrap());
        assert_eq!(max(&g, &g_h), 0.0);
        assert!(max(&g, &g.zeros_like().unwrap()) > 0.1, "degenerate test");
    }

    /// The heads-first form equals rounding, transposing and the plain gated norm, bit for bit.
    #[test]
    fn gated_heads_first_is_round_transpose_gated() {
        let dev = Device::Cpu;
        let (h, t, d) = (3, 5, 32);
        for p in [Precision::F32, Precision::BF16] {
            let x = Tensor::from_vec(noise(h * t * d, 8), (h, t, d), &dev).unwrap();
            let z = Tensor::from_vec(noise(h * t * d, 9), (t, h, d), &dev).unwrap();
            let w = Tensor::from_vec(noise(d, 10), d, &dev).unwrap();
            let xt = p
                .round(&x)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap();
            let want = gated(&xt, &z, &w, 1e-6, p, DType::F32).unwrap();
            let got = gated_heads_first(&x, &z, &w, 1e-6, p, DType::F32).unwrap();
            assert_eq!(got.dims(), [t, h, d]);
            assert_eq!(max(&got, &want), 0.0, "{}", p.name());
            assert!(
                max(&got, &got.zeros_like().unwrap()) > 0.1,
                "degenerate test"
            );
        }
    }
}
