//! The element-wise parts of the chunked delta rule as two ops (one CUDA kernel each on a GPU), where the
//! tensor-op version spent ~40 launches per layer on broadcasting multiplies, exps and copies:
//!
//! - [`prepare`]: from `q`, `k`, `v` (the conv output, heads first) and `β`, `g`, per chunk of 64 positions
//!   (zero-padded at the end, as HF pads): the in-chunk cumulative log-decay `γ` (summed in order, as
//!   torch's CPU `cumsum`), and every decayed or β-scaled operand HF's `torch_chunk_gated_delta_rule`
//!   forms from them (below).
//! - [`decay_mask`]: the two `[64, 64]` products of a chunk (`k_β·kᵀ` and `q·kᵀ`, one batched GEMM)
//!   multiplied by `exp(γ_i − γ_j)` below the diagonal: the UT system (strictly lower) and the in-chunk
//!   attention (diagonal included).
//!
//! All f32, each value formed by the same operations in the same order as HF's (`q·scale`, then
//! `·exp(γ)`; `k·β`, then `·exp(γ)`; `k·exp(γ_last − γ)`), so the only differences from HF are those of
//! `exp` between libms and of the GEMMs' summation order.
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

pub const C: usize = super::delta_rule::CHUNK;

/// Shapes of one layer's delta rule: `h` value heads, `t` positions, key/value head dims.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub h: usize,
    pub t: usize,
    pub dk: usize,
    pub dv: usize,
}

impl Dims {
    /// Chunks per head.
    pub fn n(&self) -> usize {
        self.t.div_ceil(C)
    }
    /// `(head, chunk)` pairs: the batch of every per-chunk tensor.
    pub fn b(&self) -> usize {
        self.h * self.n()
    }
    /// Floats of [`prepare`]'s output per `(head, chunk)`, part by part (see [`Prepared`]).
    fn parts(&self) -> [usize; 7] {
        let (dk, dv) = (self.dk, self.dv);
        [C * (dv + dk), 2 * C * dk, C * dk, C * dk, C * dk, C, 1]
    }
}

/// [`prepare`]'s output, each `[B, …]` with `B = heads × chunks` (head-major), positions past `T` zero.
pub struct Prepared {
    /// `[B, C, Dv + Dk]`: `v·β` then `(k·β)·exp(γ)`, the right-hand side of the UT solve.
    pub rhs: Tensor,
    /// `[B, 2C, Dk]`: rows `0..C` `k·β`, rows `C..2C` `q·scale`, the left operands of the two `·kᵀ`.
    pub kb_qs: Tensor,
    /// `[B, C, Dk]`: `k`.
    pub k: Tensor,
    /// `[B, C, Dk]`: `(q·scale)·exp(γ)`.
    pub q_decayed: Tensor,
    /// `[B, C, Dk]`: `k·exp(γ_last − γ)`.
    pub k_to_end: Tensor,
    /// `[B, C]`: `γ`.
    pub cum: Tensor,
    /// `[B]`: `exp(γ_last)`, the chunk's decay of the state.
    pub chunk_decay: Tensor,
}

/// `qkv`: the conv output, `q` `[H, T, Dk]`, `k` `[H, T, Dk]`, `v` `[H, T, Dv]` one after the other in one
/// contiguous tensor; `bg`: `[2, H, T]` (`β` then `g`).
pub fn prepare(qkv: &Tensor, bg: &Tensor, dims: Dims) -> Result<Prepared> {
    let out = qkv
        .contiguous()?
        .apply_op2_no_bwd(&bg.contiguous()?, &Prepare { dims })?;
    let b = dims.b();
    let (dk, dv) = (dims.dk, dims.dv);
    let mut start = 0;
    let mut part = |i: usize, shape: &[usize]| -> Result<Tensor> {
        let len = dims.parts()[i] * b;
        let x = out.narrow(0, start, len)?.reshape(shape)?;
        start += len;
        Ok(x)
    };
    Ok(Prepared {
        rhs: part(0, &[b, C, dv + dk])?,
        kb_qs: part(1, &[b, 2 * C, dk])?,
        k: part(2, &[b, C, dk])?,
        q_decayed: part(3, &[b, C, dk])?,
        k_to_end: part(4, &[b, C, dk])?,
        cum: part(5, &[b, C])?,
        chunk_decay: part(6, &[b])?,
    })
}

/// `products`: `[B, 2C, C]` (`k_β·kᵀ` rows then `q·kᵀ` rows), `cum`: `[B, C]`. Returns `[2, B, C, C]`: the
/// UT system (strictly lower, zero elsewhere) and the in-chunk attention (lower with the diagonal).
pub fn decay_mask(products: &Tensor, cum: &Tensor) -> Result<(Tensor, Tensor)> {
    let out = products
        .contiguous()?
        .apply_op2_no_bwd(&cum.contiguous()?, &DecayMask)?;
    Ok((out.get(0)?, out.get(1)?))
}

struct Prepare {
    dims: Dims,
}

impl Prepare {
    fn check(&self, l1: &Layout, l2: &Layout) -> Result<()> {
        let Dims { h, t, dk, dv } = self.dims;
        let want = h * t * (2 * dk + dv);
        if l1.shape().elem_count() != want
            || l2.shape().dims() != [2, h, t]
            || !l1.is_contiguous()
            || !l2.is_contiguous()
        {
            candle_core::bail!(
                "delta-rule prepare: expected {want} contiguous q/k/v values and [2, {h}, {t}], got {:?} and {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        Ok(())
    }

    fn out_len(&self) -> usize {
        self.dims.parts().iter().sum::<usize>() * self.dims.b()
    }
}

impl CustomOp2 for Prepare {
    fn name(&self) -> &'static str {
        "qgate-delta-prepare"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(l1, l2)?;
        let (CpuStorage::F32(qkv), CpuStorage::F32(bg)) = (s1, s2) else {
            candle_core::bail!("delta-rule prepare: f32 only");
        };
        let Dims { h, t, dk, dv } = self.dims;
        let (n, b) = (self.dims.n(), self.dims.b());
        let qkv = &qkv[l1.start_offset()..];
        let bg = &bg[l2.start_offset()..];
        let (q, k, v) = (
            &qkv[..h * t * dk],
            &qkv[h * t * dk..2 * h * t * dk],
            &qkv[2 * h * t * dk..],
        );
        let (beta, g) = (&bg[..h * t], &bg[h * t..2 * h * t]);
        let scale = (dk as f32).powf(-0.5);
        let mut out = vec![0f32; self.out_len()];
        let parts = self.dims.parts();
        let mut offs = [0usize; 7];
        for i in 1..7 {
            offs[i] = offs[i - 1] + parts[i - 1] * b;
        }
        for hh in 0..h {
            for c in 0..n {
                let bi = hh * n + c;
                let mut cum = [0f32; C];
                let mut acc = 0f32;
                for (i, cu) in cum.iter_mut().enumerate() {
                    let pos = c * C + i;
                    if pos < t {
                        acc += g[hh * t + pos];
                    }
                    *cu = acc;
                }
                let last = cum[C - 1];
                for i in 0..C {
                    let pos = c * C + i;
                    out[offs[5] + bi * C + i] = cum[i];
                    if pos >= t {
                        continue;
                    }
                    let be = beta[hh * t + pos];
                    let (eg, to_end) = (cum[i].exp(), (last - cum[i]).exp());
                    let row = hh * t + pos;
                    let rhs = offs[0] + (bi * C + i) * (dv + dk);
                    for x in 0..dv {
                        out[rhs + x] = v[row * dv + x] * be;
                    }
                    for a in 0..dk {
                        let (kv, qv) = (k[row * dk + a], q[row * dk + a]);
                        let kb = kv * be;
                        let qs = qv * scale;
                        out[rhs + dv + a] = kb * eg;
                        out[offs[1] + (bi * 2 * C + i) * dk + a] = kb;
                        out[offs[1] + (bi * 2 * C + C + i) * dk + a] = qs;
                        out[offs[2] + (bi * C + i) * dk + a] = kv;
                        out[offs[3] + (bi * C + i) * dk + a] = qs * eg;
                        out[offs[4] + (bi * C + i) * dk + a] = kv * to_end;
                    }
                }
                out[offs[6] + bi] = last.exp();
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        self.check(l1, l2)?;
        let Dims { h, t, dk, dv } = self.dims;
        let dev = s1.device().clone();
        let qkv = super::device::cuda_f32(s1, l1)?;
        let bg = super::device::cuda_f32(s2, l2)?;
        let len = self.out_len();
        // SAFETY: every output element is written (padded positions as zeros).
        let out = unsafe { dev.alloc::<f32>(len)? };
        let func =
            dev.get_or_load_custom_func("qgate_delta_prepare", "qgate_delta_prep", ptx()?)?;
        let cfg = LaunchConfig {
            grid_dim: (self.dims.b() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [h as i32, t as i32, dk as i32, dv as i32];
        let scale = (dk as f32).powf(-0.5);
        let mut bld = func.builder();
        bld.arg(&qkv);
        bld.arg(&bg);
        bld.arg(&out);
        for i in &ints {
            bld.arg(i);
        }
        bld.arg(&scale);
        // 16-byte loads and stores where every row and part starts on a multiple of 4 floats (the parts'
        // offsets are multiples of C·Dk or C·Dv, allocations 256-byte aligned).
        let v4 = i32::from(
            dk.is_multiple_of(4) && dv.is_multiple_of(4) && l1.start_offset().is_multiple_of(4),
        );
        bld.arg(&v4);
        // SAFETY: reads H·T·(2Dk+Dv) + 2·H·T floats, writes `len`, as allocated.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(len),
        ))
    }
}

struct DecayMask;

fn mask_dims(l1: &Layout, l2: &Layout) -> Result<usize> {
    let (b, rows, cols) = l1.shape().dims3()?;
    let (b2, cols2) = l2.shape().dims2()?;
    if rows != 2 * C || cols != C || b2 != b || cols2 != C {
        candle_core::bail!(
            "delta-rule decay mask: expected [B, {}, {C}] and [B, {C}], got {:?} and {:?}",
            2 * C,
            l1.shape(),
            l2.shape()
        );
    }
    Ok(b)
}

impl CustomOp2 for DecayMask {
    fn name(&self) -> &'static str {
        "qgate-delta-decay-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = mask_dims(l1, l2)?;
        let (CpuStorage::F32(p), CpuStorage::F32(cum)) = (s1, s2) else {
            candle_core::bail!("delta-rule decay mask: f32 only");
        };
        let p = &p[l1.start_offset()..];
        let cum = &cum[l2.start_offset()..];
        let mut out = vec![0f32; 2 * b * C * C];
        for part in 0..2 {
            for bi in 0..b {
                let cu = &cum[bi * C..(bi + 1) * C];
                for i in 0..C {
                    let last = if part == 0 { i } else { i + 1 };
                    for j in 0..last {
                        let src = p[(bi * 2 * C + part * C + i) * C + j];
                        out[((part * b + bi) * C + i) * C + j] = src * (cu[i] - cu[j]).exp();
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((2, b, C, C))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let b = mask_dims(l1, l2)?;
        let dev = s1.device().clone();
        let p = super::device::cuda_f32(s1, l1)?;
        let cum = super::device::cuda_f32(s2, l2)?;
        // SAFETY: every output element is written (zeros above the diagonal).
        let out = unsafe { dev.alloc::<f32>(2 * b * C * C)? };
        let func = dev.get_or_load_custom_func("qgate_delta_mask", "qgate_delta_prep", ptx()?)?;
        let cfg = LaunchConfig {
            grid_dim: (b as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let b32 = b as i32;
        let mut bld = func.builder();
        bld.arg(&p);
        bld.arg(&cum);
        bld.arg(&out);
        bld.arg(&b32);
        // SAFETY: reads B·2C·C + B·C floats, writes 2·B·C·C, as allocated.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((2, b, C, C)),
        ))
    }
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
#define CH 64
// W consecutive floats (W = 4: one 16-byte access).
template <int W> __device__ __forceinline__ void ldw(float* d, const float* p) {
    if (W == 4) { const float4 v = *(const float4*)p; d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w; }
    else for (int e = 0; e < W; ++e) d[e] = p[e];
}
template <int W> __device__ __forceinline__ void stw(float* p, const float* d) {
    if (W == 4) *(float4*)p = make_float4(d[0], d[1], d[2], d[3]);
    else for (int e = 0; e < W; ++e) p[e] = d[e];
}
// Rows 0..CH of a chunk, W columns a step, `width` columns a row: f(row, column) for the thread's pieces
// tid, tid + blockDim, … without a division per piece.
template <int W, class F> __device__ __forceinline__ void for_pieces(int width, F f) {
    const int pr = width / W, dr = blockDim.x / pr, dq = blockDim.x % pr;
    int i = threadIdx.x / pr, x = threadIdx.x % pr;
    for (int e = threadIdx.x; e < CH * pr; e += blockDim.x) {
        f(i, W * x);
        i += dr;
        x += dq;
        if (x >= pr) { x -= pr; ++i; }
    }
}
// One block per (head, chunk). The chunk's cumulative log-decay is summed in order by one thread. W = 4:
// Dk, Dv and the input's offset multiples of 4 (checked on the host).
template <int W>
__device__ __forceinline__ void prepare(const float* qkv, const float* bg, float* out, int h, int t, int dk,
                                        int dv, float scale) {
    __shared__ float cum[CH], eg[CH], to_end[CH], beta[CH], gl[CH];
    const int n = (t + CH - 1) / CH, bi = blockIdx.x, hh = bi / n, c = bi % n, b = h * n;
    const float* q = qkv;
    const float* k = qkv + (long)h * t * dk;
    const float* v = qkv + 2L * h * t * dk;
    const long p0 = 0;
    const long p1 = p0 + (long)b * CH * (dv + dk);
    const long p2 = p1 + (long)b * 2 * CH * dk;
    const long p3 = p2 + (long)b * CH * dk;
    const long p4 = p3 + (long)b * CH * dk;
    const long p5 = p4 + (long)b * CH * dk;
    const long p6 = p5 + (long)b * CH;
    if (threadIdx.x < CH) {
        const int pos = c * CH + threadIdx.x;
        gl[threadIdx.x] = pos < t ? bg[(long)h * t + (long)hh * t + pos] : 0.0f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float acc = 0.0f;
        for (int i = 0; i < CH; ++i) {
            if (c * CH + i < t) acc += gl[i];
            cum[i] = acc;
        }
        out[p6 + bi] = expf(acc);
    }
    __syncthreads();
    if (threadIdx.x < CH) {
        const int i = threadIdx.x, pos = c * CH + i;
        eg[i] = expf(cum[i]);
        to_end[i] = expf(cum[CH - 1] - cum[i]);
        beta[i] = pos < t ? bg[(long)hh * t + pos] : 0.0f;
        out[p5 + (long)bi * CH + i] = cum[i];
    }
    __syncthreads();
    for_pieces<W>(dv, [&](int i, int col) {
        const int pos = c * CH + i;
        float val[W] = {};
        if (pos < t) {
            ldw<W>(val, v + ((long)hh * t + pos) * dv + col);
            for (int e = 0; e < W; ++e) val[e] = val[e] * beta[i];
        }
        stw<W>(out + p0 + ((long)bi * CH + i) * (dv + dk) + col, val);
    });
    for_pieces<W>(dk, [&](int i, int col) {
        const int pos = c * CH + i;
        float kv[W] = {}, qv[W] = {}, o[W];
        if (pos < t) {
            ldw<W>(kv, k + ((long)hh * t + pos) * dk + col);
            ldw<W>(qv, q + ((long)hh * t + pos) * dk + col);
        }
        float kb[W], qs[W];
        for (int e = 0; e < W; ++e) { kb[e] = kv[e] * beta[i]; qs[e] = qv[e] * scale; }
        for (int e = 0; e < W; ++e) o[e] = kb[e] * eg[i];
        stw<W>(out + p0 + ((long)bi * CH + i) * (dv + dk) + dv + col, o);
        stw<W>(out + p1 + ((long)bi * 2 * CH + i) * dk + col, kb);
        stw<W>(out + p1 + ((long)bi * 2 * CH + CH + i) * dk + col, qs);
        stw<W>(out + p2 + ((long)bi * CH + i) * dk + col, kv);
        for (int e = 0; e < W; ++e) o[e] = qs[e] * eg[i];
        stw<W>(out + p3 + ((long)bi * CH + i) * dk + col, o);
        for (int e = 0; e < W; ++e) o[e] = kv[e] * to_end[i];
        stw<W>(out + p4 + ((long)bi * CH + i) * dk + col, o);
    });
}
extern "C" __global__ void qgate_delta_prepare(const float* qkv, const float* bg, float* out,
                                               int h, int t, int dk, int dv, float scale, int v4) {
    if (v4) prepare<4>(qkv, bg, out, h, t, dk, dv, scale);
    else prepare<1>(qkv, bg, out, h, t, dk, dv, scale);
}

// One block per (head, chunk): the two [C, C] products times exp(cum_i − cum_j) below the diagonal.
extern "C" __global__ void qgate_delta_mask(const float* p, const float* cum, float* out, int b) {
    __shared__ float cu[CH];
    const int bi = blockIdx.x;
    if (threadIdx.x < CH) cu[threadIdx.x] = cum[(long)bi * CH + threadIdx.x];
    __syncthreads();
    for (int e = threadIdx.x; e < 2 * CH * CH; e += blockDim.x) {
        const int part = e / (CH * CH), i = (e / CH) % CH, j = e % CH;
        const bool keep = part == 0 ? j < i : j <= i;
        const float src = p[((long)bi * 2 * CH + part * CH + i) * CH + j];
        out[(((long)part * b + bi) * CH + i) * CH + j] = keep ? src * expf(cu[i] - cu[j]) : 0.0f;
    }
}
"#;

/// The kernels' PTX, compiled once per process.
#[cfg(feature = "cuda")]
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx(&PTX, KERNEL, "the delta-rule preparation kernels")
}
