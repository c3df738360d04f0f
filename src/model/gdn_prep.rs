//! The Gated DeltaNet's pre-processing as two ops, for the portable kernels (one CUDA kernel each on a
//! GPU, where the tensor-op version made ~45 passes over `[T, C]` f32 tensors per layer):
//!
//! - [`conv_qkv`]: the causal depthwise conv (`out_t = Σ_j w_j · rows_{t+j}`, each product rounded to f32
//!   and the taps added in order, as the host kernel), `R`, SiLU (`x / (1 + exp(−x))`), `R`; then q and k
//!   L2-normalised per head (`x · 1/sqrt(Σx² + 1e-6)`), key heads expanded to value heads (head `j` uses
//!   key head `j / r`), everything heads-first: `q`, `k`: `[Hv, T, Dk]`, `v`: `[Hv, T, Dv]`, f32.
//! - [`beta_g`]: `β = R(1 / (1 + exp(−b)))` and `g = −exp(A_log) · softplus(a + dt_bias)` (torch's
//!   softplus, threshold 20, `log1p` computed accurately), both `[Hv, T]` f32.
//!
//! On the CPU the ops compute exactly what the tensor ops computed (same operations in the same order);
//! on the GPU only the order of the L2 norm's sum of squares differs (a warp reduction). The conv's
//! input (`qkv` and its history) may be stored as f32, bf16 or f16 (`act_io`).
use super::precision::Precision;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// Shapes of one GDN layer.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hk: usize,
    pub hv: usize,
    pub dk: usize,
    pub dv: usize,
}

impl Dims {
    fn channels(&self) -> usize {
        2 * self.hk * self.dk + self.hv * self.dv
    }
}

/// `history`: `[K−1, C]` (the previous call's last rows, zeros at the start), `qkv`: `[T, C]`, `w`: `[K, C]`
/// (tap-major conv weights). Returns `q`, `k` (`[Hv, T, Dk]`) and `v` (`[Hv, T, Dv]`) one after the other
/// in one contiguous tensor ([`split_qkv`] views them).
pub fn conv_qkv(
    history: &Tensor,
    qkv: &Tensor,
    w: &Tensor,
    dims: Dims,
    prec: Precision,
) -> Result<Tensor> {
    history.contiguous()?.apply_op3_no_bwd(
        &qkv.contiguous()?,
        &w.contiguous()?,
        &ConvQkv { dims, prec },
    )
}

/// `(q, k, v)` views of [`conv_qkv`]'s output for `t` positions.
pub fn split_qkv(out: &Tensor, dims: Dims, t: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let Dims { hv, dk, dv, .. } = dims;
    let q = out.narrow(0, 0, hv * t * dk)?.reshape((hv, t, dk))?;
    let k = out
        .narrow(0, hv * t * dk, hv * t * dk)?
        .reshape((hv, t, dk))?;
    let v = out
        .narrow(0, 2 * hv * t * dk, hv * t * dv)?
        .reshape((hv, t, dv))?;
    Ok((q, k, v))
}

/// `b`, `a`: `[T, Hv]`; `params`: `[2, Hv]` = (dt_bias, −exp(A_log)). Returns `[2, Hv, T]`: `β`, then `g`.
pub fn beta_g(b: &Tensor, a: &Tensor, params: &Tensor, prec: Precision) -> Result<Tensor> {
    b.contiguous()?
        .apply_op3_no_bwd(&a.contiguous()?, &params.contiguous()?, &BetaG { prec })
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

struct ConvQkv {
    dims: Dims,
    prec: Precision,
}

impl ConvQkv {
    fn shapes(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, usize, usize)> {
        let c = self.dims.channels();
        let (hist, c1) = l1.shape().dims2()?;
        let (t, c2) = l2.shape().dims2()?;
        let (kk, c3) = l3.shape().dims2()?;
        if c1 != c
            || c2 != c
            || c3 != c
            || hist + 1 != kk
            || !self.dims.hv.is_multiple_of(self.dims.hk)
        {
            candle_core::bail!(
                "conv_qkv: expected [K−1, {c}], [T, {c}], [K, {c}], got {:?}, {:?}, {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        Ok((t, kk, c))
    }
}

impl CustomOp3 for ConvQkv {
    fn name(&self) -> &'static str {
        "qgate-gdn-conv-qkv"
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
        let (t, kk, c) = self.shapes(l1, l2, l3)?;
        let CpuStorage::F32(ws) = s3 else {
            candle_core::bail!("conv_qkv: f32 weights expected");
        };
        let hs = super::act_io::f32_of(s1, l1, (kk - 1) * c, "conv_qkv")?;
        let xs = super::act_io::f32_of(s2, l2, t * c, "conv_qkv")?;
        let ws = &ws[l3.start_offset()..];
        let p = self.prec;
        let hist = kk - 1;
        let row = |i: usize| -> &[f32] {
            if i < hist {
                &hs[i * c..(i + 1) * c]
            } else {
                &xs[(i - hist) * c..(i - hist + 1) * c]
            }
        };
        // conv, R, SiLU, R: [T, C]
        let mut conv = vec![0f32; t * c];
        for (tt, out) in conv.chunks_mut(c).enumerate() {
            let r0 = row(tt);
            for (ch, o) in out.iter_mut().enumerate() {
                *o = r0[ch] * ws[ch];
            }
            for j in 1..kk {
                let rj = row(tt + j);
                for (ch, o) in out.iter_mut().enumerate() {
                    *o += rj[ch] * ws[j * c + ch];
                }
            }
            for o in out.iter_mut() {
                *o = p.round_scalar(silu(p.round_scalar(*o)));
            }
        }
        let Dims { hk, hv, dk, dv } = self.dims;
        let r = hv / hk;
        let mut out = vec![0f32; hv * t * (2 * dk + dv)];
        let (qo, rest) = out.split_at_mut(hv * t * dk);
        let (ko, vo) = rest.split_at_mut(hv * t * dk);
        for tt in 0..t {
            let x = &conv[tt * c..(tt + 1) * c];
            for (which, dst) in [(0usize, &mut *qo), (1, &mut *ko)] {
                for j in 0..hk {
                    let src = &x[which * hk * dk + j * dk..which * hk * dk + (j + 1) * dk];
                    let mut ss = 0f32;
                    for v in src {
                        ss += v * v;
                    }
                    let inv = 1.0 / (ss + 1e-6).sqrt();
                    for i in 0..r {
                        let head = j * r + i;
                        let o = &mut dst[(head * t + tt) * dk..(head * t + tt + 1) * dk];
                        for (o, v) in o.iter_mut().zip(src) {
                            *o = v * inv;
                        }
                    }
                }
            }
            for head in 0..hv {
                let src = &x[2 * hk * dk + head * dv..2 * hk * dk + (head + 1) * dv];
                vo[(head * t + tt) * dv..(head * t + tt + 1) * dv].copy_from_slice(src);
            }
        }
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
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
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (t, kk, c) = self.shapes(l1, l2, l3)?;
        let Dims { hk, hv, dk, dv } = self.dims;
        let width = dk.max(dv);
        if width > 256 {
            candle_core::bail!("conv_qkv: head dims above 256 are not supported on the GPU");
        }
        let dev = s1.device().clone();
        let hs = super::act_io::view(s1, l1)?;
        let xs = super::act_io::view(s2, l2)?;
        let ws = super::device::cuda_f32(s3, l3)?;
        let n = hv * t * (2 * dk + dv);
        // SAFETY: every output element is written (each (head slot, tile) warp writes its rows).
        let out = unsafe { dev.alloc::<f32>(n)? };
        let name = if width > 128 {
            "qgate_gdn_conv_qkv_wide"
        } else {
            "qgate_gdn_conv_qkv"
        };
        let func = dev.get_or_load_custom_func(name, "qgate_gdn_prep", ptx()?)?;
        // A warp per (head slot, tile of 8 positions: the kernel's CP), 8 warps a block.
        let cfg = LaunchConfig {
            grid_dim: ((t.div_ceil(8) * (2 * hk + hv)).div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints: [i32; 7] = [
            t as i32, kk as i32, c as i32, hk as i32, hv as i32, dk as i32, dv as i32,
        ];
        // Vector loads and stores where every row, head and offset falls on a multiple of 4 elements
        // (allocations are 256-byte aligned).
        let v4 = [
            dk,
            dv,
            c,
            l1.start_offset(),
            l2.start_offset(),
            l3.start_offset(),
        ]
        .iter()
        .all(|v| v % 4 == 0);
        let codes = [
            super::precision::round_code(self.prec),
            hs.code(),
            xs.code(),
            v4 as i32,
        ];
        let mut b = func.builder();
        hs.push(&mut b);
        xs.push(&mut b);
        b.arg(&ws);
        b.arg(&out);
        for i in ints.iter().chain(&codes) {
            b.arg(i);
        }
        // SAFETY: reads (K−1)·C + T·C elements (in the dtypes coded) + K·C floats, writes n floats, as
        // allocated.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(n),
        ))
    }
}

struct BetaG {
    prec: Precision,
}

/// torch softplus (threshold 20) with `log1p(y)` as `log(u)·y/(u−1)` for `u = 1 + y` (`y` where `u` is 1).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        return x;
    }
    let y = x.exp();
    let u = y + 1.0;
    if u == 1.0 {
        y
    } else {
        (u.ln() * y) / (u - 1.0)
    }
}

impl CustomOp3 for BetaG {
    fn name(&self) -> &'static str {
        "qgate-gdn-beta-g"
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
        let (t, hv) = l1.shape().dims2()?;
        if l2.shape().dims2()? != (t, hv) || l3.shape().dims2()? != (2, hv) {
            candle_core::bail!("beta_g: expected [T, Hv], [T, Hv], [2, Hv]");
        }
        let (CpuStorage::F32(b), CpuStorage::F32(a), CpuStorage::F32(pr)) = (s1, s2, s3) else {
            candle_core::bail!("beta_g: f32 only");
        };
        let (b, a, pr) = (
            &b[l1.start_offset()..],
            &a[l2.start_offset()..],
            &pr[l3.start_offset()..],
        );
        let p = self.prec;
        let mut out = vec![0f32; 2 * hv * t];
        for tt in 0..t {
            for h in 0..hv {
                let x = b[tt * hv + h];
                out[h * t + tt] = p.round_scalar(1.0 / ((-x).exp() + 1.0));
                out[hv * t + h * t + tt] = softplus(a[tt * hv + h] + pr[h]) * pr[hv + h];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((2, hv, t))))
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
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (t, hv) = l1.shape().dims2()?;
        if l2.shape().dims2()? != (t, hv) || l3.shape().dims2()? != (2, hv) {
            candle_core::bail!("beta_g: expected [T, Hv], [T, Hv], [2, Hv]");
        }
        let dev = s1.device().clone();
        let b = super::device::cuda_f32(s1, l1)?;
        let a = super::device::cuda_f32(s2, l2)?;
        let pr = super::device::cuda_f32(s3, l3)?;
        let n = t * hv;
        // SAFETY: every one of the 2·n outputs is written.
        let out = unsafe { dev.alloc::<f32>(2 * n)? };
        let func = dev.get_or_load_custom_func("qgate_gdn_beta_g", "qgate_gdn_prep", ptx()?)?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (t32, hv32) = (t as i32, hv as i32);
        let round = super::precision::round_code(self.prec);
        let mut bld = func.builder();
        bld.arg(&b);
        bld.arg(&a);
        bld.arg(&pr);
        bld.arg(&out);
        bld.arg(&t32);
        bld.arg(&hv32);
        bld.arg(&round);
        // SAFETY: reads 2·n + 2·Hv floats, writes 2·n, as allocated.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((2, hv, t)),
        ))
    }
}

// Explicit _rn intrinsics: no contraction into FMAs, so each product and sum rounds as on the host.
#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
// (rnd, silu, ld, ld4: `device::nvrtc_ptx_with_rounding`.)
// One warp per (head slot, tile of CP consecutive positions): slots 0..hk are q heads, hk..2hk k heads,
// then the hv value heads; lane l owns the four consecutive channels 4l.. and, for heads wider than 128
// (NQ = 2, the "_wide" entry), 4l + 128.. of the slot (width ≤ 256). The taps' weights are loaded once a warp; with the conv width KK a template argument
// (4, Qwen3.5's; 0: any width, rows re-read per tap) the last KK input rows slide through registers, so
// each row is read once a tile. Each channel: Σ_j R-free products x·w over the taps in order (the host's
// sum), R, SiLU, R; q and k rows are then L2-normalised (sum of squares: per lane in channel order, then
// a butterfly) and written once per value head they serve. v4: vector loads (checked on the host: dims,
// row width and offsets multiples of 4).
#define CP 8
// Row i of the conv's input: the history's rows first (kk − 1 of them), then x's.
__device__ __forceinline__ void conv_row(const void* hist, const void* x, int i, int kk, int c, int ch,
                                         int ht, int xt, int v4, int lim, float* r) {
    if (i < kk - 1) ld4(hist, (long)i * c + ch, ht, v4, lim, r);
    else ld4(x, (long)(i - (kk - 1)) * c + ch, xt, v4, lim, r);
}
template <int KK, int NQ>
__device__ __forceinline__ void conv_tile(const void* hist, const void* x, const float* w, float* out,
                                          int t, int kk, int c, int hk, int hv, int dk, int dv, int mode,
                                          int ht, int xt, int v4, int slot, int t0) {
    constexpr int NW = KK > 0 ? KK : 1;
    const int lane = threadIdx.x & 31;
    const int is_v = slot >= 2 * hk;
    const int width = is_v ? dv : dk;
    const int base = is_v ? 2 * hk * dk + (slot - 2 * hk) * dv : slot * dk;
    const int which = slot >= hk;          // q/k slots: 0 q, 1 k
    const int j0 = slot - which * hk;      // key head
    const int r = hv / hk;
    float wt[NQ][NW][4];                   // the taps' weights (KK > 0)
    float win[NQ][NW][4];                  // rows tt .. tt + KK − 1 (KK > 0)
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
        const int d0 = 4 * lane + 128 * q, lim = width - d0, ch = base + d0;
        if (KK > 0 && lim > 0)
#pragma unroll
            for (int j = 0; j < NW; ++j) {
                ld4(w, (long)j * c + ch, 0, v4, lim, wt[q][j]);
                if (j + 1 < NW) conv_row(hist, x, t0 + j, kk, c, ch, ht, xt, v4, lim, win[q][j + 1]);
            }
    }
    const int t1 = min(t, t0 + CP);
    for (int tt = t0; tt < t1; ++tt) {
        float val[8] = {};
        float ss = 0.0f;
#pragma unroll
        for (int q = 0; q < NQ; ++q) {
            const int d0 = 4 * lane + 128 * q, lim = width - d0, ch = base + d0;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (lim > 0) {
                if (KK > 0) {
#pragma unroll
                    for (int j = 0; j + 1 < NW; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) win[q][j][e] = win[q][j + 1][e];
                    conv_row(hist, x, tt + NW - 1, kk, c, ch, ht, xt, v4, lim, win[q][NW - 1]);
#pragma unroll
                    for (int j = 0; j < NW; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const float prod = __fmul_rn(win[q][j][e], wt[q][j][e]);
                            acc[e] = (j == 0) ? prod : __fadd_rn(acc[e], prod);
                        }
                } else {
                    for (int j = 0; j < kk; ++j) {
                        float rw[4], wj[4];
                        conv_row(hist, x, tt + j, kk, c, ch, ht, xt, v4, lim, rw);
                        ld4(w, (long)j * c + ch, 0, v4, lim, wj);
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const float prod = __fmul_rn(rw[e], wj[e]);
                            acc[e] = (j == 0) ? prod : __fadd_rn(acc[e], prod);
                        }
                    }
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float v = (e < lim) ? rnd(silu(rnd(acc[e], mode)), mode) : 0.0f;
                    ss = __fadd_rn(ss, __fmul_rn(v, v));
                    acc[e] = v;
                }
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) val[4 * q + e] = acc[e];
        }
        if (is_v) {
            float* o = out + 2L * hv * t * dk + ((long)(slot - 2 * hk) * t + tt) * dv;
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const int d0 = 4 * lane + 128 * q;
                if (v4 && d0 < dv) *(float4*)(o + d0) = make_float4(val[4 * q], val[4 * q + 1], val[4 * q + 2], val[4 * q + 3]);
                else for (int e = 0; e < 4; ++e) if (d0 + e < dv) o[d0 + e] = val[4 * q + e];
            }
            continue;
        }
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
        const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ss, 1e-6f)));
        float* basep = out + (long)which * hv * t * dk;
#pragma unroll
        for (int e = 0; e < 4 * NQ; ++e) val[e] = __fmul_rn(val[e], inv);
        for (int i = 0; i < r; ++i) {
            float* o = basep + ((long)(j0 * r + i) * t + tt) * dk;
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const int d0 = 4 * lane + 128 * q;
                if (v4 && d0 < dk) *(float4*)(o + d0) = make_float4(val[4 * q], val[4 * q + 1], val[4 * q + 2], val[4 * q + 3]);
                else for (int e = 0; e < 4; ++e) if (d0 + e < dk) o[d0 + e] = val[4 * q + e];
            }
        }
    }
}
// Two entry points, so the common one keeps its registers: head dims ≤ 128 (Qwen3.5's; one group of four
// channels a lane) and ≤ 256 ("_wide").
#define CONV_ENTRY(NAME, NQ)                                                                                  \
extern "C" __global__ void NAME(const void* hist, const void* x, const float* w, float* out, int t, int kk,  \
                                int c, int hk, int hv, int dk, int dv, int mode, int ht, int xt, int v4) {    \
    const long task = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);                             \
    const int slots = 2 * hk + hv, tiles = (t + CP - 1) / CP;                                                \
    if (task >= (long)tiles * slots) return;                                                                 \
    const int slot = (int)(task / tiles), t0 = (int)(task % tiles) * CP;                                     \
    if (kk == 4) conv_tile<4, NQ>(hist, x, w, out, t, kk, c, hk, hv, dk, dv, mode, ht, xt, v4, slot, t0);    \
    else conv_tile<0, NQ>(hist, x, w, out, t, kk, c, hk, hv, dk, dv, mode, ht, xt, v4, slot, t0);            \
}
CONV_ENTRY(qgate_gdn_conv_qkv, 1)
CONV_ENTRY(qgate_gdn_conv_qkv_wide, 2)

extern "C" __global__ void qgate_gdn_beta_g(const float* b, const float* a, const float* pr, float* out,
                                            int t, int hv, int mode) {
    const long e = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (e >= (long)t * hv) return;
    const int tt = (int)(e / hv), h = (int)(e % hv);
    const float xb = b[e];
    out[(long)h * t + tt] = rnd(__fdiv_rn(1.0f, __fadd_rn(expf(-xb), 1.0f)), mode);
    const float x = __fadd_rn(a[e], pr[h]);
    float sp;
    if (x > 20.0f) sp = x;
    else {
        const float y = expf(x), u = __fadd_rn(y, 1.0f);
        sp = (u == 1.0f) ? y : __fdiv_rn(__fmul_rn(logf(u), y), __fsub_rn(u, 1.0f));
    }
    out[(long)hv * t + (long)h * t + tt] = __fmul_rn(sp, pr[hv + h]);
}
"#;

/// The kernels' PTX, compiled once per process.
#[cfg(feature = "cuda")]
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx_with_rounding(&PTX, KERNEL, "the GDN pre-processing kernels")
}
