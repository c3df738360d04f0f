//! The scan over chunks of the chunked delta rule as one op: `S_{i+1} = M_i · S_i + N_i` for every chunk
//! `i` of every value head, returning every chunk-start state and the final one.
//!
//! `delta_rule_portable::chunked` computes, for all chunks at once, `[N | G] = K̃ᵀ [V_new | C]` (one
//! batched GEMM) and the chunk decays `d_i`; here `M_i = d_i·I − G_i` is formed on the fly (the same
//! two roundings as `eye·d − G`). Only this recurrence
//! is sequential. As tensor ops it cost two launches per chunk (a batched GEMM over the heads and an add),
//! 128 per layer at T = 4,096, each too small to fill the GPU. Here it is one kernel per layer: a block owns
//! one head and 8 of its state's columns (columns of `S` never mix), keeps that `[Dk, 8]` slice in shared
//! memory for the whole scan, and each thread accumulates its outputs over `k` in ascending order with
//! fused multiply-adds. All f32, as HF's delta rule.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// `gn`: `[H·N, Dk, Dv + Dk]` (per chunk `[N | G]`, head-major), `d`: `[H·N]`, `s0`: `[H, Dk, Dv]`,
/// f32. Returns `(starts [H·N, Dk, Dv], final [H, Dk, Dv])`: the state at the start of every chunk and the
/// state after each head's last chunk.
pub fn scan(gn: &Tensor, d: &Tensor, s0: &Tensor) -> Result<(Tensor, Tensor)> {
    let (h, dk, dv) = s0.dims3()?;
    let b = gn.dim(0)?;
    if !gn.device().is_cpu() && (dk > MAX_DK || dk % 4 != 0 || dv % 4 != 0) {
        // Outside the kernel's shared-memory tile or its 4-wide loads.
        return scan_tensor_ops(gn, d, s0);
    }
    let out = gn
        .contiguous()?
        .apply_op3_no_bwd(&d.contiguous()?, &s0.contiguous()?, &ChunkScan)?;
    let block = dk * dv;
    Ok((
        out.narrow(0, 0, b * block)?.reshape((b, dk, dv))?,
        out.narrow(0, b * block, h * block)?.reshape((h, dk, dv))?,
    ))
}

/// The same recurrence as tensor ops (two per chunk), for GPUs when `Dk` exceeds the kernel's tiles.
fn scan_tensor_ops(gn: &Tensor, d: &Tensor, s0: &Tensor) -> Result<(Tensor, Tensor)> {
    let (h, dk, dv) = s0.dims3()?;
    let b = gn.dim(0)?;
    let n = b / h.max(1);
    let g = gn.narrow(2, dv, dk)?.reshape((h, n, dk, dk))?;
    let nn = gn.narrow(2, 0, dv)?.reshape((h, n, dk, dv))?;
    let d = d.reshape((h, n, 1, 1))?;
    let eye = Tensor::eye(dk, candle_core::DType::F32, gn.device())?;
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

/// The largest key head dim the GPU kernel's shared-memory tile holds.
const MAX_DK: usize = 128;

struct ChunkScan;

fn dims(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (b, dk, w) = l1.shape().dims3()?;
    let b2 = l2.shape().dims1()?;
    let (h, dk2, dv) = l3.shape().dims3()?;
    if b != b2 || dk != dk2 || w != dv + dk || h == 0 || b % h != 0 {
        candle_core::bail!(
            "chunk_scan: expected [H·N, Dk, Dv+Dk], [H·N], [H, Dk, Dv], got {:?}, {:?}, {:?}",
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
                    let ci = &gn[bi * dk * w..(bi + 1) * dk * w];
                    let di = d[bi];
                    let (done, rest) = states.split_at_mut((i + 1) * block);
                    let s = &done[i * block..];
                    let next = &mut rest[..block];
                    for r in 0..dk {
                        let (nr, gr) = ci[r * w..(r + 1) * w].split_at(dv);
                        for c in 0..dv {
                            let mut acc = 0f32;
                            for (k, &g) in gr.iter().enumerate() {
                                let m = if k == r { di - g } else { -g };
                                acc = m.mul_add(s[k * dv + c], acc);
                            }
                            next[r * dv + c] = acc + nr[c];
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
        if dk > MAX_DK {
            candle_core::bail!("chunk_scan: the GPU kernel needs Dk ≤ {MAX_DK}, got {dk}");
        }
        let dev = s1.device().clone();
        let gn = super::device::cuda_f32(s1, l1)?;
        let d = super::device::cuda_f32(s2, l2)?;
        let s0 = super::device::cuda_f32(s3, l3)?;
        let len = (n + 1) * h * dk * dv;
        // SAFETY: the kernel writes all N·H chunk-start states (entry 0 copied from s0) and H final ones.
        let out = unsafe { dev.alloc::<f32>(len)? };
        let func = dev.get_or_load_custom_func("qgate_chunk_scan", "qgate_chunk_scan", ptx()?)?;
        let threads = (dk * COLS / PER_THREAD) as u32;
        let cfg = LaunchConfig {
            grid_dim: (h as u32, dv.div_ceil(COLS) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
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
        // SAFETY: reads H·N·(Dv+Dk)·Dk + H·N + H·Dk·Dv floats and writes (N+1)·H·Dk·Dv, as allocated.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(len),
        ))
    }
}

/// Columns of the state per block, outputs per thread.
#[cfg(feature = "cuda")]
const COLS: usize = 8;
#[cfg(feature = "cuda")]
const PER_THREAD: usize = 4;

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
// Block (head h, columns c0..c0+8 of the state; fewer at the right edge); thread: row r = tid / 2,
// columns (tid % 2)·4 .. +4. The block's state slice stays in shared memory for the whole scan. Per chunk
// the thread walks its row of G (4 floats per load; the row stays in L1 across k) and accumulates over k
// in ascending order; M[r][k] = (k == r ? d − G[r][k] : −G[r][k]), as eye·d − G. Dk, Dv multiples of 4.
// (Staging M through shared memory in 32-column tiles measured 2.3× slower on an H200: BENCHMARKS.md.)
extern "C" __global__ void qgate_chunk_scan(const float* gn, const float* d, const float* s0, float* out,
                                            int n, int h, int dk, int dv) {
    __shared__ __align__(16) float S[128 * 8];
    const int head = blockIdx.x, c0 = blockIdx.y * 8;
    const int r = threadIdx.x >> 1, cc = (threadIdx.x & 1) * 4;
    const int ncols = min(8, dv - c0);
    const long blk = (long)dk * dv, w = dv + dk;
    float* starts = out + (long)head * n * blk;
    float* fin = out + (long)n * h * blk + (long)head * blk;
    for (int j = 0; j < 4; ++j) {
        const int col = cc + j;
        float v = 0.0f;
        if (col < ncols) {
            v = s0[head * blk + (long)r * dv + c0 + col];
            if (n > 0) starts[(long)r * dv + c0 + col] = v;
            else fin[(long)r * dv + c0 + col] = v;
        }
        S[r * 8 + col] = v;
    }
    __syncthreads();
    for (int i = 0; i < n; ++i) {
        const long bi = (long)head * n + i;
        const float* row = gn + (bi * dk + r) * w;  // [N[r][0..dv] | G[r][0..dk]]
        const float4* g4 = (const float4*)(row + dv);
        const float di = d[bi];
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int k4 = 0; k4 < dk / 4; ++k4) {
            const float4 g = g4[k4];
            const float gs[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int k = 4 * k4 + u;
                const float a = k == r ? di - gs[u] : -gs[u];
                const float4 sv = *(const float4*)(S + k * 8 + cc);
                acc[0] = fmaf(a, sv.x, acc[0]); acc[1] = fmaf(a, sv.y, acc[1]);
                acc[2] = fmaf(a, sv.z, acc[2]); acc[3] = fmaf(a, sv.w, acc[3]);
            }
        }
        __syncthreads();
        float* dst = i + 1 < n ? starts + (long)(i + 1) * blk : fin;
        for (int j = 0; j < 4; ++j) {
            const int col = cc + j;
            if (col < ncols) {
                const float v = acc[j] + row[c0 + col];
                S[r * 8 + col] = v;
                dst[(long)r * dv + c0 + col] = v;
            }
        }
        __syncthreads();
    }
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
        let gn = Tensor::from_vec(f(b * dk * (dv + dk), 1), (b, dk, dv + dk), &dev).unwrap();
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
                    let c = gn.get(hh * n + i).unwrap();
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
