//! The scan over chunks of the chunked delta rule as one op: `S_{i+1} = M_i · S_i + N_i` for every chunk
//! `i` of every value head, returning every chunk-start state and the final one.
//!
//! `delta_rule_portable::chunked` computes, for all chunks at once, `[Nᵀ; Gᵀ] = [V | W]ᵀ K̃` (one
//! batched GEMM) and the chunk decays `d_i`; here `M_i = d_i·I − G_i` is formed on the fly (the same
//! two roundings as `eye·d − G`). Only this recurrence is sequential. As tensor ops it cost two launches
//! per chunk (a batched GEMM over the heads and an add), 128 per layer at T = 4,096, each too small to fill
//! the GPU. Here it is one kernel per layer: a block owns one head and 16 of its state's columns (columns
//! of `S` never mix), keeps that `[Dk, 16]` slice in shared memory for the whole scan, copies each
//! chunk's `Gᵀ` into shared memory one chunk ahead, and each thread accumulates a 4 × 4 tile of outputs
//! over `k` in ascending order with fused multiply-adds. All f32, as HF's delta rule.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// `gnt`: `[H·N, Dv + Dk, Dk]` (per chunk `[Nᵀ; Gᵀ]`, head-major), `d`: `[H·N]`, `s0`: `[H, Dk, Dv]`,
/// f32. Returns `(starts [H·N, Dk, Dv], final [H, Dk, Dv])`: the state at the start of every chunk and the
/// state after each head's last chunk.
pub fn scan(gnt: &Tensor, d: &Tensor, s0: &Tensor) -> Result<(Tensor, Tensor)> {
    let (h, dk, dv) = s0.dims3()?;
    let b = gnt.dim(0)?;
    if !gnt.device().is_cpu() && (dk > MAX_DK || dk % 4 != 0 || dv % 4 != 0 || !fits(gnt, dk)) {
        // Outside the kernel's shared-memory tiles or its 4-wide loads, or a GPU whose blocks cannot
        // have the kernel's shared memory (consumer GPUs allow ~100 KB).
        return scan_tensor_ops(gnt, d, s0);
    }
    let out = aligned(gnt)?.apply_op3_no_bwd(&d.contiguous()?, &aligned(s0)?, &ChunkScan)?;
    let block = dk * dv;
    Ok((
        out.narrow(0, 0, b * block)?.reshape((b, dk, dv))?,
        // A copy: the state is carried to the next step, and a view would keep every chunk-start state
        // of this layer (64 MiB a layer at T = 4,096 in the 0.8B shapes) alive with it.
        super::strided_copy::copy(&out.narrow(0, b * block, h * block)?)?.reshape((h, dk, dv))?,
    ))
}

/// Bytes of dynamic shared memory the GPU kernel needs: two chunks' `Gᵀ` and the state slice.
#[cfg(feature = "cuda")]
fn smem_bytes(dk: usize) -> usize {
    (2 * dk * dk + COLS * dk) * 4
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

/// The same recurrence as tensor ops (two per chunk), for GPUs when `Dk` exceeds the kernel's tiles.
fn scan_tensor_ops(gnt: &Tensor, d: &Tensor, s0: &Tensor) -> Result<(Tensor, Tensor)> {
    let (h, dk, dv) = s0.dims3()?;
    let b = gnt.dim(0)?;
    let n = b / h.max(1);
    let g = gnt
        .narrow(1, dv, dk)?
        .transpose(1, 2)?
        .reshape((h, n, dk, dk))?;
    let nn = gnt
        .narrow(1, 0, dv)?
        .transpose(1, 2)?
        .reshape((h, n, dk, dv))?;
    let d = d.reshape((h, n, 1, 1))?;
    let eye = Tensor::eye(dk, candle_core::DType::F32, gnt.device())?;
    let mut starts = Vec::with_capacity(n);
    let mut s = s0.clone();
    for i in 0..n {
        starts.push(s.clone());
        let m = eye
            .broadcast_mul(&d.narrow(1, i, 1)?.squeeze(1)?)?
            .broadcast_sub(&g.narrow(1, i, 1)?.squeeze(1)?)?;
        s = (super::device::matmul(&m, &s)? + nn.narrow(1, i, 1)?.squeeze(1)?)?;
    }
    Ok((Tensor::stack(&starts, 1)?.reshape((b, dk, dv))?, s))
}

/// The largest key head dim the GPU kernel's shared-memory tiles hold.
const MAX_DK: usize = 128;

struct ChunkScan;

fn dims(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (b, w, dk) = l1.shape().dims3()?;
    let b2 = l2.shape().dims1()?;
    let (h, dk2, dv) = l3.shape().dims3()?;
    if b != b2 || dk != dk2 || w != dv + dk || h == 0 || b % h != 0 {
        candle_core::bail!(
            "chunk_scan: expected [H·N, Dv+Dk, Dk], [H·N], [H, Dk, Dv], got {:?}, {:?}, {:?}",
            l1.shape(),
            l2.shape(),
            l3.shape()
        );
    }
    if !(l1.is_contiguous() && l2.is_contiguous() && l3.is_contiguous()) {
        candle_core::bail!("chunk_scan: contiguous inputs expected");
    }
    Ok((b / h, h, dk, dv))
}

impl CustomOp3 for ChunkScan {
    fn name(&self) -> &'static str {
        "qgate-chunk-scan"
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
        use rayon::prelude::*;
        let (n, h, dk, dv) = dims(l1, l2, l3)?;
        let (CpuStorage::F32(gn), CpuStorage::F32(d), CpuStorage::F32(s0)) = (s1, s2, s3) else {
            candle_core::bail!("chunk_scan: f32 only");
        };
        let w = dv + dk;
        let gn = &gn[l1.start_offset()..];
        let d = &d[l2.start_offset()..];
        let s0 = &s0[l3.start_offset()..l3.start_offset() + h * dk * dv];
        let block = dk * dv;
        // Per head: its N chunk-start states then its final state; laid out below.
        let per_head: Vec<Vec<f32>> = (0..h)
            .into_par_iter()
            .map(|hh| {
                let mut states = vec![0f32; (n + 1) * block];
                states[..block].copy_from_slice(&s0[hh * block..(hh + 1) * block]);
                for i in 0..n {
                    let bi = hh * n + i;
                    let ci = &gn[bi * w * dk..(bi + 1) * w * dk]; // [Nᵀ; Gᵀ]
                    let (nt, gt) = ci.split_at(dv * dk);
                    let di = d[bi];
                    let (done, rest) = states.split_at_mut((i + 1) * block);
                    let s = &done[i * block..];
                    let next = &mut rest[..block];
                    for r in 0..dk {
                        for c in 0..dv {
                            let mut acc = 0f32;
                            for k in 0..dk {
                                let g = gt[k * dk + r];
                                let m = if k == r { di - g } else { -g };
                                acc = m.mul_add(s[k * dv + c], acc);
                            }
                            next[r * dv + c] = acc + nt[c * dk + r];
                        }
                    }
                }
                states
            })
            .collect();
        let mut out = vec![0f32; (n + 1) * h * block];
        let (starts, fin) = out.split_at_mut(n * h * block);
        for (hh, states) in per_head.iter().enumerate() {
            starts[hh * n * block..(hh + 1) * n * block].copy_from_slice(&states[..n * block]);
            fin[hh * block..(hh + 1) * block].copy_from_slice(&states[n * block..]);
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (n, h, dk, dv) = dims(l1, l2, l3)?;
        if dk > MAX_DK || dk % 4 != 0 || dv % 4 != 0 {
            candle_core::bail!("chunk_scan: the GPU kernel needs Dk ≤ {MAX_DK}, Dk and Dv multiples of 4, got {dk}, {dv}");
        }
        if !l1.start_offset().is_multiple_of(4) || !l3.start_offset().is_multiple_of(4) {
            candle_core::bail!("chunk_scan: the GPU kernel needs 16-byte aligned inputs");
        }
        let dev = s1.device().clone();
        let gn = super::device::cuda_f32(s1, l1)?;
        let d = super::device::cuda_f32(s2, l2)?;
        let s0 = super::device::cuda_f32(s3, l3)?;
        let len = (n + 1) * h * dk * dv;
        // SAFETY: the kernel writes all N·H chunk-start states (entry 0 copied from s0) and H final ones.
        let out = unsafe { dev.alloc::<f32>(len)? };
        let func = dev.get_or_load_custom_func("qgate_chunk_scan", "qgate_chunk_scan", ptx()?)?;
        // Two chunks' Gᵀ and the state slice; above the 48 KiB default, so opted in.
        let smem = smem_bytes(dk) as u32;
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
        func.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let cfg = LaunchConfig {
            grid_dim: (h as u32, dv.div_ceil(COLS) as u32, 1),
            block_dim: (dk as u32, 1, 1),
            shared_mem_bytes: smem,
        };
        let (n32, h32, dk32, dv32) = (n as i32, h as i32, dk as i32, dv as i32);
        let mut b = func.builder();
        b.arg(&gn);
        b.arg(&d);
        b.arg(&s0);
        b.arg(&out);
        b.arg(&n32);
        b.arg(&h32);
        b.arg(&dk32);
        b.arg(&dv32);
        // SAFETY: reads H·N·(Dv+Dk)·Dk + H·N + H·Dk·Dv floats and writes (N+1)·H·Dk·Dv, as allocated;
        // `smem` bytes of dynamic shared memory, as the kernel indexes.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(len),
        ))
    }
}

/// Columns of the state per block (a thread computes 4 rows × 4 of them).
#[cfg(feature = "cuda")]
const COLS: usize = 16;

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
// Block (head h, columns c0..c0+16 of the state; fewer at the right edge), Dk threads; thread: rows
// r0..r0+3 (r0 = 4·(tid mod Dk/4)), columns 4·(tid div Dk/4) .. +4 of the block's 16. The block's state
// slice S[k][16] stays in shared memory for the whole scan; each chunk's Gᵀ [Dk][Dk] is copied into
// shared memory with cp.async one chunk ahead (double buffer), so the scan waits on no global load.
// M[r][k] = (k == r ? d − G[r][k] : −G[r][k]): the diagonal of the shared copy is replaced by G − d
// (−(G − d) = d − G exactly in round-to-nearest), then every term is fmaf(−Gᵀ[k][r], S[k][c], acc),
// accumulated over k in ascending order. Dk a multiple of 4 (≤ 128), Dv a multiple of 4.
__device__ __forceinline__ void cp16(float* dst, const float* src) {
    unsigned a = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(a), "l"(src));
}
extern "C" __global__ void qgate_chunk_scan(const float* gnt, const float* d, const float* s0, float* out,
                                            int n, int h, int dk, int dv) {
    extern __shared__ __align__(16) float sm[];
    float* S = sm + 2 * dk * dk;  // [dk][16]
    const int head = blockIdx.x, c0 = blockIdx.y * 16, tid = threadIdx.x, nth = blockDim.x;
    const int rgs = dk / 4, r0 = 4 * (tid % rgs), cl = 4 * (tid / rgs), col = c0 + cl;
    const bool active = col < dv;
    const long blk = (long)dk * dv, w = dv + dk;
    float* starts = out + (long)head * n * blk;
    float* fin = out + (long)n * h * blk + (long)head * blk;
    for (int i = 0; i < 4; ++i) {
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (active) {
            v = *(const float4*)(s0 + head * blk + (long)(r0 + i) * dv + col);
            *(float4*)((n > 0 ? starts : fin) + (long)(r0 + i) * dv + col) = v;
        }
        *(float4*)(S + (r0 + i) * 16 + cl) = v;
    }
    const int quads = dk * dk / 4;
    if (n > 0) {
        const float* src = gnt + ((long)head * n * w + dv) * dk;
        for (int q = tid; q < quads; q += nth) cp16(sm + 4 * q, src + 4 * q);
    }
    asm volatile("cp.async.commit_group;\n" ::);
    // Chunk i's decay and Nᵀ entries (rows col..col+3, entries r0..r0+3; N[r][c] = Nᵀ[c][r]) are loaded
    // into registers one chunk ahead too.
    float di_next = 0.0f;
    float4 nv_next[4] = {};
    if (n > 0) {
        di_next = d[(long)head * n];
        if (active)
            for (int j = 0; j < 4; ++j) nv_next[j] = *(const float4*)(gnt + ((long)head * n * w + col + j) * dk + r0);
    }
    for (int i = 0; i < n; ++i) {
        const long bi = (long)head * n + i;
        float* cur = sm + (i & 1) * dk * dk;
        const float di = di_next;
        float4 nv[4];
        for (int j = 0; j < 4; ++j) nv[j] = nv_next[j];
        if (i + 1 < n) {
            float* nxt = sm + ((i + 1) & 1) * dk * dk;
            const float* src = gnt + ((bi + 1) * w + dv) * dk;
            for (int q = tid; q < quads; q += nth) cp16(nxt + 4 * q, src + 4 * q);
            di_next = d[bi + 1];
            if (active)
                for (int j = 0; j < 4; ++j) nv_next[j] = *(const float4*)(gnt + ((bi + 1) * w + col + j) * dk + r0);
        }
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();
        for (int r = tid; r < dk; r += nth) cur[r * dk + r] = cur[r * dk + r] - di;
        __syncthreads();
        float acc[4][4];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
#pragma unroll 8
        for (int k = 0; k < dk; ++k) {
            const float4 g = *(const float4*)(cur + k * dk + r0);
            const float4 s = *(const float4*)(S + k * 16 + cl);
            const float gg[4] = {g.x, g.y, g.z, g.w}, ss[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(-gg[a], ss[b], acc[a][b]);
        }
        __syncthreads();
        float* dst = i + 1 < n ? starts + (long)(i + 1) * blk : fin;
        const float nn[4][4] = {{nv[0].x, nv[1].x, nv[2].x, nv[3].x}, {nv[0].y, nv[1].y, nv[2].y, nv[3].y},
                                {nv[0].z, nv[1].z, nv[2].z, nv[3].z}, {nv[0].w, nv[1].w, nv[2].w, nv[3].w}};
        if (active) {
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                const float4 v = make_float4(acc[a][0] + nn[a][0], acc[a][1] + nn[a][1],
                                             acc[a][2] + nn[a][2], acc[a][3] + nn[a][3]);
                *(float4*)(S + (r0 + a) * 16 + cl) = v;
                *(float4*)(dst + (long)(r0 + a) * dv + col) = v;
            }
        }
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

    /// The op against the recurrence written out with tensor ops (candle's matmul), f32, and the
    /// tensor-op fallback (what a GPU runs when `Dk` exceeds the kernel's tile) against both.
    #[test]
    fn scan_is_the_recurrence() {
        let (n, h, dk, dv) = (5, 3, 8, 16);
        let dev = Device::Cpu;
        let b = h * n;
        let gn = Tensor::from_vec(f(b * dk * (dv + dk), 1), (b, dv + dk, dk), &dev).unwrap();
        let d = Tensor::from_vec(f(b, 2), b, &dev).unwrap();
        let s0 = Tensor::from_vec(f(h * dk * dv, 3), (h, dk, dv), &dev).unwrap();
        let (starts, fin) = scan(&gn, &d, &s0).unwrap();
        let (starts2, fin2) = scan_tensor_ops(&gn, &d, &s0).unwrap();
        assert!(max(&starts, &starts2) <= 1e-5 && max(&fin, &fin2) <= 1e-5);
        let eye = Tensor::eye(dk, candle_core::DType::F32, &dev).unwrap();
        for hh in 0..h {
            let mut s = s0.get(hh).unwrap();
            for i in 0..=n {
                let got = if i < n {
                    starts.get(hh * n + i).unwrap()
                } else {
                    fin.get(hh).unwrap()
                };
                let dlt = max(&got, &s);
                assert!(dlt <= 1e-5, "head {hh} chunk {i}: max |Δ| {dlt}");
                if i < n {
                    let c = gn.get(hh * n + i).unwrap().t().unwrap();
                    let g = c.narrow(1, dv, dk).unwrap();
                    let nn = c.narrow(1, 0, dv).unwrap();
                    let di = d.get(hh * n + i).unwrap();
                    let m = eye.broadcast_mul(&di).unwrap().sub(&g).unwrap();
                    s = (m.matmul(&s).unwrap() + nn).unwrap();
                }
            }
        }
        let zeros = starts.zeros_like().unwrap();
        assert!(max(&starts, &zeros) > 0.1, "degenerate test: states ~0");
    }
}
