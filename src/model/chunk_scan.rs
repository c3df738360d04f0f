//! The scan over chunks of the chunked delta rule as one op, in HF's own form
//! (`torch_chunk_gated_delta_rule`'s loop): for every chunk `i` of every value head,
//!
//! ```text
//! v_new_i = U_i − W_i · S_i              (U: new_values, W: k_cumdecay, [C, Dv] and [C, Dk])
//! S_{i+1} = S_i · d_i + K̃_iᵀ · v_new_i   (K̃ = k·exp(γ_last − γ) [C, Dk], d_i = exp(γ_last))
//! ```
//!
//! returning every chunk-start state `S_i` (the outputs `O_i = Q̃_i S_i + A_i v_new_i` are then two
//! batched GEMMs for all chunks at once), every `v_new_i`, and the final state. Each product is a sum of
//! fused multiply-adds from zero in ascending order, then one rounding of the difference (`U − W·S`) or of
//! the sum (`R(S·d) + K̃ᵀ·v_new`), as HF's GEMM-then-element-wise ops round.
//!
//! On a GPU it is one kernel per layer: a block owns one head and 16 of its state's columns (columns of
//! `S` never mix), keeps that `[Dk, 16]` slice and the chunk's `[C, 16]` slice of `v_new` in shared
//! memory, and copies each chunk's `W` and `K̃` into shared memory with `cp.async` one chunk ahead. Only
//! this recurrence is sequential. (Until the tenth session the scan carried `S_{i+1} = M_i S_i + N_i`
//! with `M_i = d_i·I − K̃ᵀW` formed by one more batched GEMM before it and `v_new` by one more after it;
//! the products are the same size, and the two GEMMs are gone.) All f32, as HF's delta rule.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The chunk size (HF's 64).
const C: usize = super::delta_chunk_prep::C;

/// The scan's results: `starts [H·N, Dk, Dv]` (the state at the start of every chunk), `v_new
/// [H·N, C, Dv]`, `last [H, Dk, Dv]` (each head's state after its last chunk).
pub struct Scanned {
    pub starts: Tensor,
    pub v_new: Tensor,
    pub last: Tensor,
}

/// `u`: `[H·N, C, Dv]`, `w`, `kt`: `[H·N, C, Dk]` (head-major), `d`: `[H·N]`, `s0`: `[H, Dk, Dv]`, all f32.
pub fn scan(u: &Tensor, w: &Tensor, kt: &Tensor, d: &Tensor, s0: &Tensor) -> Result<Scanned> {
    let (h, dk, dv) = s0.dims3()?;
    let b = u.dim(0)?;
    if !u.device().is_cpu() && (dk > MAX_DK || dk % 4 != 0 || dv % 4 != 0 || !fits(u, dk)) {
        // Outside the kernel's shared-memory tiles or its 4-wide loads, or a GPU whose blocks cannot
        // have the kernel's shared memory (consumer GPUs allow ~100 KB).
        return scan_tensor_ops(u, w, kt, d, s0);
    }
    // Copies of their own: the op reads them while candle holds the inputs' storage, and `d` is a
    // part of the same storage as `kt` (`delta_chunk_prep::prepare`'s one output).
    let op = ChunkScan {
        d: d.force_contiguous()?,
        s0: s0.force_contiguous()?,
    };
    let out = aligned(u)?.apply_op3_no_bwd(&aligned(w)?, &aligned(kt)?, &op)?;
    let (state, vn) = (dk * dv, C * dv);
    Ok(Scanned {
        starts: out.narrow(0, 0, b * state)?.reshape((b, dk, dv))?,
        v_new: out.narrow(0, b * state, b * vn)?.reshape((b, C, dv))?,
        // A copy: the state is carried to the next step, and a view would keep every chunk-start state
        // of this layer (64 MiB a layer at T = 4,096 in the 0.8B shapes) alive with it.
        last: super::strided_copy::copy(&out.narrow(0, b * (state + vn), h * state)?)?
            .reshape((h, dk, dv))?,
    })
}

/// Bytes of dynamic shared memory the GPU kernel needs: two chunks' `W` and `K̃` (rows padded by 4
/// floats, so a warp's 16-byte loads of consecutive rows hit distinct banks), the state slice and the
/// chunk's `v_new` slice.
#[cfg(feature = "cuda")]
fn smem_bytes(dk: usize) -> usize {
    (4 * C * (dk + 4) + COLS * dk + C * COLS) * 4
}

/// Whether `x`'s GPU lets a block opt in to the kernel's shared memory (the H100/H200's 227 KB do; an
/// RTX 4090's 99 KB do not).
#[cfg(feature = "cuda")]
fn fits(x: &Tensor, dk: usize) -> bool {
    match x.device() {
        candle_core::Device::Cuda(dev) => {
            super::device::max_shared_mem_optin(dev) >= smem_bytes(dk)
        }
        _ => false,
    }
}

#[cfg(not(feature = "cuda"))]
fn fits(_: &Tensor, _: usize) -> bool {
    false
}

/// `x` contiguous from a 16-byte boundary (the kernel's 4-wide loads and copies).
fn aligned(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() && x.layout().start_offset().is_multiple_of(4) {
        Ok(x.clone())
    } else {
        x.force_contiguous()
    }
}

/// The same recurrence as tensor ops (a few per chunk), for GPUs outside the kernel's tiles.
fn scan_tensor_ops(
    u: &Tensor,
    w: &Tensor,
    kt: &Tensor,
    d: &Tensor,
    s0: &Tensor,
) -> Result<Scanned> {
    use super::device::matmul;
    let (h, dk, dv) = s0.dims3()?;
    let b = u.dim(0)?;
    let n = b / h.max(1);
    let per_chunk = |x: &Tensor, cols: usize| x.reshape((h, n, C, cols));
    let (u, w, kt) = (per_chunk(u, dv)?, per_chunk(w, dk)?, per_chunk(kt, dk)?);
    let d = d.reshape((h, n, 1, 1))?;
    let (mut starts, mut v_new) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut s = s0.clone();
    for i in 0..n {
        starts.push(s.clone());
        let at = |x: &Tensor| x.narrow(1, i, 1)?.squeeze(1);
        let vn = (at(&u)? - matmul(&at(&w)?, &s)?)?;
        let upd = matmul(&at(&kt)?.transpose(1, 2)?, &vn)?;
        s = (s.broadcast_mul(&at(&d)?)? + upd)?;
        v_new.push(vn);
    }
    Ok(Scanned {
        starts: Tensor::stack(&starts, 1)?.reshape((b, dk, dv))?,
        v_new: Tensor::stack(&v_new, 1)?.reshape((b, C, dv))?,
        last: s,
    })
}

/// The largest key head dim the GPU kernel's tiles hold (phase 2: 4 rows a thread, 8 a warp's lanes, 4 warps).
const MAX_DK: usize = 128;

/// `d` and `s0` ride with the op (candle's custom ops take at most three tensors).
struct ChunkScan {
    d: Tensor,
    s0: Tensor,
}

/// `(N, H, Dk, Dv)` from the layouts of `u`, `w`, `kt`, `d`, `s0`.
fn dims(lu: &Layout, lw: &Layout, lk: &Layout, ld: &Layout, ls: &Layout) -> Result<[usize; 4]> {
    let (b, c, dv) = lu.shape().dims3()?;
    let (b2, c2, dk) = lw.shape().dims3()?;
    let (b3, c3, dk2) = lk.shape().dims3()?;
    let b4 = ld.shape().dims1()?;
    let (h, dk3, dv2) = ls.shape().dims3()?;
    let same = b == b2 && b == b3 && b == b4 && c == C && c2 == C && c3 == C;
    if !same || dk != dk2 || dk != dk3 || dv != dv2 || h == 0 || b % h != 0 {
        candle_core::bail!(
            "chunk_scan: expected [H·N, {C}, Dv], [H·N, {C}, Dk] ×2, [H·N], [H, Dk, Dv], got {:?}, {:?}, {:?}, {:?}, {:?}",
            lu.shape(),
            lw.shape(),
            lk.shape(),
            ld.shape(),
            ls.shape()
        );
    }
    if ![lu, lw, lk, ld, ls].iter().all(|l| l.is_contiguous()) {
        candle_core::bail!("chunk_scan: contiguous inputs expected");
    }
    Ok([b / h, h, dk, dv])
}

/// Floats of the op's output: every chunk-start state, every `v_new`, the final states.
fn out_len([n, h, dk, dv]: [usize; 4]) -> usize {
    n * h * (dk * dv + C * dv) + h * dk * dv
}

impl CustomOp3 for ChunkScan {
    fn name(&self) -> &'static str {
        "qgate-chunk-scan"
    }

    fn cpu_fwd(
        &self,
        su: &CpuStorage,
        lu: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (d_storage, ld) = self.d.storage_and_layout();
        let (s_storage, ls) = self.s0.storage_and_layout();
        let dims4 = dims(lu, lw, lk, ld, ls)?;
        let [n, h, dk, dv] = dims4;
        let (
            CpuStorage::F32(u),
            CpuStorage::F32(w),
            CpuStorage::F32(kt),
            candle_core::Storage::Cpu(CpuStorage::F32(d)),
            candle_core::Storage::Cpu(CpuStorage::F32(s0)),
        ) = (su, sw, sk, &*d_storage, &*s_storage)
        else {
            candle_core::bail!("chunk_scan: f32 host tensors only");
        };
        let u = &u[lu.start_offset()..];
        let w = &w[lw.start_offset()..];
        let kt = &kt[lk.start_offset()..];
        let d = &d[ld.start_offset()..];
        let s0 = &s0[ls.start_offset()..ls.start_offset() + h * dk * dv];
        let state = dk * dv;
        // Per head: its N chunk-start states, its final state, then its N chunks' v_new.
        let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..h)
            .into_par_iter()
            .map(|hh| {
                let mut states = vec![0f32; (n + 1) * state];
                let mut vns = vec![0f32; n * C * dv];
                states[..state].copy_from_slice(&s0[hh * state..(hh + 1) * state]);
                for i in 0..n {
                    let bi = hh * n + i;
                    let (ui, wi, ki) = (
                        &u[bi * C * dv..(bi + 1) * C * dv],
                        &w[bi * C * dk..(bi + 1) * C * dk],
                        &kt[bi * C * dk..(bi + 1) * C * dk],
                    );
                    let (done, rest) = states.split_at_mut((i + 1) * state);
                    let s = &done[i * state..];
                    let next = &mut rest[..state];
                    let vn = &mut vns[i * C * dv..(i + 1) * C * dv];
                    for c in 0..C {
                        for x in 0..dv {
                            let mut acc = 0f32;
                            for k in 0..dk {
                                acc = wi[c * dk + k].mul_add(s[k * dv + x], acc);
                            }
                            vn[c * dv + x] = ui[c * dv + x] - acc;
                        }
                    }
                    for k in 0..dk {
                        for x in 0..dv {
                            let mut acc = 0f32;
                            for c in 0..C {
                                acc = ki[c * dk + k].mul_add(vn[c * dv + x], acc);
                            }
                            next[k * dv + x] = s[k * dv + x] * d[bi] + acc;
                        }
                    }
                }
                (states, vns)
            })
            .collect();
        let mut out = vec![0f32; out_len(dims4)];
        let (starts, rest) = out.split_at_mut(n * h * state);
        let (vn_all, last) = rest.split_at_mut(n * h * C * dv);
        for (hh, (states, vns)) in per_head.iter().enumerate() {
            starts[hh * n * state..(hh + 1) * n * state].copy_from_slice(&states[..n * state]);
            last[hh * state..(hh + 1) * state].copy_from_slice(&states[n * state..]);
            vn_all[hh * n * C * dv..(hh + 1) * n * C * dv].copy_from_slice(vns);
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        su: &candle_core::CudaStorage,
        lu: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sk: &candle_core::CudaStorage,
        lk: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (d_storage, ld) = self.d.storage_and_layout();
        let (s_storage, ls) = self.s0.storage_and_layout();
        let dims4 = dims(lu, lw, lk, ld, ls)?;
        let [n, h, dk, dv] = dims4;
        if dk > MAX_DK || dk % 4 != 0 || dv % 4 != 0 {
            candle_core::bail!("chunk_scan: the GPU kernel needs Dk ≤ {MAX_DK}, Dk and Dv multiples of 4, got {dk}, {dv}");
        }
        if ![lu, lw, lk, ls]
            .iter()
            .all(|l| l.start_offset().is_multiple_of(4))
        {
            candle_core::bail!("chunk_scan: the GPU kernel needs 16-byte aligned inputs");
        }
        let (candle_core::Storage::Cuda(sd), candle_core::Storage::Cuda(ss)) =
            (&*d_storage, &*s_storage)
        else {
            candle_core::bail!("chunk_scan: d and s0 must be on the GPU with u");
        };
        let dev = su.device().clone();
        let u = super::device::cuda_f32(su, lu)?;
        let w = super::device::cuda_f32(sw, lw)?;
        let kt = super::device::cuda_f32(sk, lk)?;
        let d = super::device::cuda_f32(sd, ld)?;
        let s0 = super::device::cuda_f32(ss, ls)?;
        let len = out_len(dims4);
        // SAFETY: the kernel writes all N·H chunk-start states (entry 0 copied from s0), all N·H·C·Dv
        // entries of v_new and the H final states.
        let out = unsafe { dev.alloc::<f32>(len)? };
        let func = dev.get_or_load_custom_func("qgate_chunk_scan", "qgate_chunk_scan", ptx()?)?;
        // Two chunks' W and K̃, the state and v_new slices; above the 48 KiB default, so opted in.
        let smem = smem_bytes(dk) as u32;
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
        func.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let cfg = LaunchConfig {
            grid_dim: (h as u32, dv.div_ceil(COLS) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        let (n32, h32, dk32, dv32) = (n as i32, h as i32, dk as i32, dv as i32);
        let mut b = func.builder();
        b.arg(&u);
        b.arg(&w);
        b.arg(&kt);
        b.arg(&d);
        b.arg(&s0);
        b.arg(&out);
        b.arg(&n32);
        b.arg(&h32);
        b.arg(&dk32);
        b.arg(&dv32);
        // SAFETY: reads H·N·C·(Dv + 2·Dk) + H·N + H·Dk·Dv floats and writes `len`, as allocated;
        // `smem` bytes of dynamic shared memory, as the kernel indexes.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(len),
        ))
    }
}

/// Columns of the state per block.
#[cfg(feature = "cuda")]
const COLS: usize = 16;

/// Threads per block (four warps). With 256 the lanes' tiles halve, the shared-memory loads per
/// multiply-add double and the kernel was slower on an H200 (324 against 279 µs a layer at bf16
/// T = 4,096; BENCHMARKS.md, eleventh session).
#[cfg(feature = "cuda")]
const THREADS: u32 = 128;

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
// Block (head h, columns c0..c0+16 of the state; fewer at the right edge), 128 threads, lane = (y, x) with
// y = lane & 7, x = lane >> 3, so a warp's shared-memory loads are 8 consecutive 16-byte pieces of one
// row of W or K̃ and 4 of one row of S or v_new (one wavefront each):
//   phase 1 (v_new [64][16]): warp wp computes rows 16·wp + y and 16·wp + 8 + y, columns 4x .. 4x+3:
//            acc = Σ_k fmaf(W[r][k], S[k][col], acc) over k ascending from zero, then v_new = U − acc;
//   phase 2 (S [Dk][16]): warp wp computes rows 32·wp + 4y .. +3, columns 4x .. 4x+3:
//            acc = Σ_c fmaf(K̃[c][r], v_new[c][col], acc) over c ascending from zero, then S = S·d + acc
//            (two roundings, as HF's ops).
// W and K̃ of chunk i+1 are copied into shared memory (rows padded to Dk+4 floats) with cp.async while
// chunk i is computed; U and d of chunk i+1 are loaded into registers. Dk a multiple of 4 (≤ 128), Dv a
// multiple of 4; C = 64.
#define CH 64
#define NT 128
__device__ __forceinline__ void cp16(float* dst, const float* src) {
    unsigned a = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(a), "l"(src));
}
__device__ __forceinline__ void ld4(float* d, const float* p) {
    const float4 v = *(const float4*)p; d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w;
}
__device__ __forceinline__ void st4(float* p, const float* d) {
    *(float4*)p = make_float4(d[0], d[1], d[2], d[3]);
}
extern "C" __global__ void qgate_chunk_scan(const float* u, const float* w, const float* kt, const float* d,
                                            const float* s0, float* out, int n, int h, int dk, int dv) {
    extern __shared__ __align__(16) float sm[];
    const int ld = dk + 4, mat = CH * ld;     // padded row stride, one chunk's W (or K̃)
    float* S = sm + 4 * mat;                  // [dk][16]
    float* V = S + dk * 16;                   // [CH][16]
    const int head = blockIdx.x, c0 = blockIdx.y * 16, tid = threadIdx.x, lane = tid & 31, wp = tid >> 5;
    const int y = lane & 7, cl = 4 * (lane >> 3), col = c0 + cl;
    const bool act = col < dv;
    const int r1 = 16 * wp + y;               // phase 1 rows r1, r1 + 8
    const int r0 = 32 * wp + 4 * y;           // phase 2 rows r0 .. r0 + 3
    const bool rows2 = r0 < dk;
    const long state = (long)dk * dv, vlen = (long)CH * dv;
    float* starts = out + (long)head * n * state;
    float* vnew = out + (long)n * h * state + (long)head * n * vlen;
    float* fin = out + (long)n * h * (state + vlen) + (long)head * state;
    if (rows2)
        for (int a = 0; a < 4; ++a) {
            float v[4] = {};
            if (act) {
                ld4(v, s0 + head * state + (long)(r0 + a) * dv + col);
                st4((n > 0 ? starts : fin) + (long)(r0 + a) * dv + col, v);
            }
            st4(S + (r0 + a) * 16 + cl, v);
        }
    // The thread's first 16-byte piece of a chunk's [CH][dk] matrix (row fr0, quad fq0), and the step
    // to its next (NT pieces on: dr rows and dq quads), without a division per piece.
    const int q4 = dk / 4, quads = CH * q4, dr = NT / q4, dq = NT % q4;
    const int fr0 = tid / q4, fq0 = tid % q4;
    // Chunk j's W and K̃ into buffer j & 1.
    auto fetch = [&](long j) {
        float* bw = sm + (j & 1) * 2 * mat;
        float* bk = bw + mat;
        const float* gw = w + ((long)head * n + j) * CH * dk;
        const float* gk = kt + ((long)head * n + j) * CH * dk;
        int r = fr0, q = fq0;
        for (int p = tid; p < quads; p += NT) {
            cp16(bw + r * ld + 4 * q, gw + 4 * p);
            cp16(bk + r * ld + 4 * q, gk + 4 * p);
            r += dr;
            q += dq;
            if (q >= q4) { q -= q4; ++r; }
        }
    };
    if (n > 0) fetch(0);
    asm volatile("cp.async.commit_group;\n" ::);
    float di_next = 0.0f;
    float4 u_next[2] = {};
    if (n > 0) {
        di_next = d[(long)head * n];
        if (act)
            for (int j = 0; j < 2; ++j)
                u_next[j] = *(const float4*)(u + ((long)head * n * CH + r1 + 8 * j) * dv + col);
    }
    __syncthreads();
    for (int i = 0; i < n; ++i) {
        const long bi = (long)head * n + i;
        const float* W = sm + (i & 1) * 2 * mat;
        const float* K = W + mat;
        const float di = di_next;
        const float4 uu[2] = {u_next[0], u_next[1]};
        if (i + 1 < n) {
            fetch(i + 1);
            di_next = d[bi + 1];
            if (act)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    u_next[j] = *(const float4*)(u + ((bi + 1) * CH + r1 + 8 * j) * dv + col);
        }
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();
        // Phase 1: v_new rows r1, r1 + 8.
        float a1[2][4] = {};
#pragma unroll 4
        for (int k = 0; k < dk; k += 4) {
            float wr[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j) ld4(wr[j], W + (r1 + 8 * j) * ld + k);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                float ss[4];
                ld4(ss, S + (k + q) * 16 + cl);
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int b = 0; b < 4; ++b) a1[j][b] = fmaf(wr[j][q], ss[b], a1[j][b]);
            }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const float4 v = make_float4(__fsub_rn(uu[j].x, a1[j][0]), __fsub_rn(uu[j].y, a1[j][1]),
                                         __fsub_rn(uu[j].z, a1[j][2]), __fsub_rn(uu[j].w, a1[j][3]));
            const int r = r1 + 8 * j;
            *(float4*)(V + r * 16 + cl) = v;
            if (act) *(float4*)(vnew + ((long)i * CH + r) * dv + col) = v;
        }
        __syncthreads();
        // Phase 2: S rows r0..r0+3, columns cl..cl+3.
        if (rows2) {
            float acc[4][4] = {};
#pragma unroll 8
            for (int c = 0; c < CH; ++c) {
                float k4[4], v4[4];
                ld4(k4, K + c * ld + r0);
                ld4(v4, V + c * 16 + cl);
#pragma unroll
                for (int a = 0; a < 4; ++a)
#pragma unroll
                    for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(k4[a], v4[b], acc[a][b]);
            }
            float* dst = i + 1 < n ? starts + (long)(i + 1) * state : fin;
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                float sv[4];
                ld4(sv, S + (r0 + a) * 16 + cl);
#pragma unroll
                for (int b = 0; b < 4; ++b) sv[b] = __fadd_rn(__fmul_rn(sv[b], di), acc[a][b]);
                st4(S + (r0 + a) * 16 + cl, sv);
                if (act) st4(dst + (long)(r0 + a) * dv + col, sv);
            }
        }
        __syncthreads();
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
}
"#;

/// The kernels' PTX, compiled once per process.
#[cfg(feature = "cuda")]
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx(&PTX, KERNEL, "the chunk-scan kernel")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{max_diff_t as max, noise};
    use candle_core::Device;

    /// Values in [-0.5, 0.5).
    fn f(len: usize, seed: u64) -> Vec<f32> {
        noise(len, seed).iter().map(|x| 0.5 * x).collect()
    }

    /// The op against HF's loop written with tensor ops (candle's matmul), f32, and the tensor-op
    /// fallback (what a GPU runs outside the kernel's tiles) against both.
    #[test]
    fn scan_is_hf_loop() {
        let (n, h, dk, dv) = (5, 3, 8, 12);
        let dev = Device::Cpu;
        let b = h * n;
        let t = |len, seed, shape: (usize, usize, usize)| {
            Tensor::from_vec(f(len, seed), shape, &dev).unwrap()
        };
        let u = t(b * C * dv, 1, (b, C, dv));
        let w = t(b * C * dk, 2, (b, C, dk)).affine(0.1, 0.0).unwrap();
        let kt = t(b * C * dk, 3, (b, C, dk)).affine(0.1, 0.0).unwrap();
        let d = Tensor::from_vec(f(b, 4), b, &dev)
            .unwrap()
            .affine(0.2, 0.8)
            .unwrap();
        let s0 = t(h * dk * dv, 5, (h, dk, dv));
        let got = scan(&u, &w, &kt, &d, &s0).unwrap();
        let ops = scan_tensor_ops(&u, &w, &kt, &d, &s0).unwrap();
        for (x, y) in [
            (&got.starts, &ops.starts),
            (&got.v_new, &ops.v_new),
            (&got.last, &ops.last),
        ] {
            assert_eq!(x.dims(), y.dims());
            assert!(max(x, y) <= 1e-5, "op vs tensor ops: {}", max(x, y));
        }
        // HF's loop, one head at a time.
        for hh in 0..h {
            let mut s = s0.get(hh).unwrap();
            for i in 0..=n {
                let want = if i < n {
                    got.starts.get(hh * n + i).unwrap()
                } else {
                    got.last.get(hh).unwrap()
                };
                let dlt = max(&want, &s);
                assert!(dlt <= 1e-5, "head {hh} chunk {i}: state off by {dlt}");
                if i < n {
                    let bi = hh * n + i;
                    let v_prime = w.get(bi).unwrap().matmul(&s).unwrap();
                    let v_new = (u.get(bi).unwrap() - v_prime).unwrap();
                    let dlt = max(&got.v_new.get(bi).unwrap(), &v_new);
                    assert!(dlt <= 1e-5, "head {hh} chunk {i}: v_new off by {dlt}");
                    let upd = kt.get(bi).unwrap().t().unwrap().matmul(&v_new).unwrap();
                    s = (s.broadcast_mul(&d.get(bi).unwrap()).unwrap() + upd).unwrap();
                }
            }
        }
        let zeros = got.starts.zeros_like().unwrap();
        assert!(max(&got.starts, &zeros) > 0.1, "degenerate test: states ~0");
    }
}
