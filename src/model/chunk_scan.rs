//! The scan over chunks of the chunked delta rule as one op: `S_{i+1} = M_i · S_i + N_i` for every chunk
//! `i` of every value head, returning every chunk-start state and the final one.
//!
//! `delta_rule_portable::chunked` computes `M_i = d_i·I − K̃_iᵀ C_i` and `N_i = K̃_iᵀ V_i` for all chunks at
//! once; only this recurrence is sequential. As tensor ops it cost two launches per chunk (a batched GEMM
//! over the heads and an add), 128 per layer at T = 4,096, each too small to fill the GPU. Here it is one
//! kernel per layer: a block owns one head and 16 of its state's columns (columns of `S` never mix), keeps
//! that `[Dk, 16]` slice in shared memory for the whole scan, and each thread accumulates its outputs over
//! `k` in ascending order with fused multiply-adds. All f32, as HF's delta rule.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// `m`: `[N, H, Dk, Dk]`, `nn`: `[N, H, Dk, Dv]`, `s0`: `[H, Dk, Dv]`, f32. Returns `[N + 1, H, Dk, Dv]`:
/// entry `i` is the state at the start of chunk `i`, entry `N` the state after the last chunk.
pub fn scan(m: &Tensor, nn: &Tensor, s0: &Tensor) -> Result<Tensor> {
    let dk = s0.dim(1)?;
    if !m.device().is_cpu() && dk > 128 {
        // Wider than the kernel's shared-memory tiles: the recurrence as tensor ops (two per chunk).
        let n = m.dim(0)?;
        let mut states = Vec::with_capacity(n + 1);
        let mut s = s0.clone();
        for i in 0..n {
            states.push(s.clone());
            s = (super::device::matmul(&m.get(i)?, &s)? + nn.get(i)?)?;
        }
        states.push(s);
        return Tensor::stack(&states, 0);
    }
    m.contiguous()?
        .apply_op3_no_bwd(&nn.contiguous()?, &s0.contiguous()?, &ChunkScan)
}

struct ChunkScan;

fn dims(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (n, h, dk, dk2) = l1.shape().dims4()?;
    let (n2, h2, dk3, dv) = l2.shape().dims4()?;
    let (h3, dk4, dv2) = l3.shape().dims3()?;
    if dk != dk2 || n != n2 || h != h2 || h != h3 || dk != dk3 || dk != dk4 || dv != dv2 {
        candle_core::bail!(
            "chunk_scan: expected [N,H,Dk,Dk], [N,H,Dk,Dv], [H,Dk,Dv], got {:?}, {:?}, {:?}",
            l1.shape(),
            l2.shape(),
            l3.shape()
        );
    }
    if !(l1.is_contiguous() && l2.is_contiguous() && l3.is_contiguous()) {
        candle_core::bail!("chunk_scan: contiguous inputs expected");
    }
    Ok((n, h, dk, dv))
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
        let (CpuStorage::F32(m), CpuStorage::F32(nn), CpuStorage::F32(s0)) = (s1, s2, s3) else {
            candle_core::bail!("chunk_scan: f32 only");
        };
        let m = &m[l1.start_offset()..];
        let nn = &nn[l2.start_offset()..];
        let s0 = &s0[l3.start_offset()..l3.start_offset() + h * dk * dv];
        let block = dk * dv;
        let mut out = vec![0f32; (n + 1) * h * block];
        // Heads are independent: compute each head's whole scan, then interleave into [N+1, H, ..].
        let per_head: Vec<Vec<f32>> = (0..h)
            .into_par_iter()
            .map(|hh| {
                let mut states = vec![0f32; (n + 1) * block];
                states[..block].copy_from_slice(&s0[hh * block..(hh + 1) * block]);
                for i in 0..n {
                    let mi = &m[(i * h + hh) * dk * dk..(i * h + hh + 1) * dk * dk];
                    let ni = &nn[(i * h + hh) * block..(i * h + hh + 1) * block];
                    let (done, rest) = states.split_at_mut((i + 1) * block);
                    let s = &done[i * block..];
                    let next = &mut rest[..block];
                    for r in 0..dk {
                        for c in 0..dv {
                            let mut acc = 0f32;
                            for k in 0..dk {
                                acc = mi[r * dk + k].mul_add(s[k * dv + c], acc);
                            }
                            next[r * dv + c] = acc + ni[r * dv + c];
                        }
                    }
                }
                states
            })
            .collect();
        for (hh, states) in per_head.iter().enumerate() {
            for i in 0..=n {
                out[(i * h + hh) * block..(i * h + hh + 1) * block]
                    .copy_from_slice(&states[i * block..(i + 1) * block]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n + 1, h, dk, dv))))
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
        let m = s1.as_cuda_slice::<f32>()?.slice(l1.start_offset()..);
        let nn = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
        let s0 = s3.as_cuda_slice::<f32>()?.slice(l3.start_offset()..);
        // SAFETY: the kernel writes all (N+1)·H·Dk·Dv outputs (entry 0 copied from s0).
        let out = unsafe { dev.alloc::<f32>((n + 1) * h * dk * dv)? };
        let func = dev.get_or_load_custom_func("qgate_chunk_scan", "qgate_chunk_scan", ptx()?)?;
        let threads = (dk * COLS / PER_THREAD) as u32;
        let cfg = LaunchConfig {
            grid_dim: (h as u32, dv.div_ceil(COLS) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n32, h32, dk32, dv32) = (n as i32, h as i32, dk as i32, dv as i32);
        let mut b = func.builder();
        b.arg(&m);
        b.arg(&nn);
        b.arg(&s0);
        b.arg(&out);
        b.arg(&n32);
        b.arg(&h32);
        b.arg(&dk32);
        b.arg(&dv32);
        // SAFETY: reads N·H·Dk·Dk + N·H·Dk·Dv + H·Dk·Dv floats and writes (N+1)·H·Dk·Dv, as allocated.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((n + 1, h, dk, dv)),
        ))
    }
}

/// Columns of the state per block, outputs per thread, largest key head dim (the shared-memory tiles).
#[cfg(feature = "cuda")]
const COLS: usize = 16;
#[cfg(feature = "cuda")]
const PER_THREAD: usize = 8;
#[cfg(feature = "cuda")]
const MAX_DK: usize = 128;

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
// Block (head h, columns c0..c0+16 of the state; fewer at the right edge); thread: row r = tid / 2,
// columns (tid % 2)·8 .. +8. The block's state slice stays in shared memory for the whole scan; each
// thread reads its row of M_i from global memory (L2) and accumulates over k in ascending order.
// (Staging M_i through shared memory in 32-column tiles measured 2.3× slower on an H200: BENCHMARKS.md.)
extern "C" __global__ void qgate_chunk_scan(const float* m, const float* nn, const float* s0, float* out,
                                            int n, int h, int dk, int dv) {
    __shared__ float S[128 * 16];
    const int head = blockIdx.x, c0 = blockIdx.y * 16;
    const int r = threadIdx.x >> 1, cc = (threadIdx.x & 1) * 8;
    const int ncols = min(16, dv - c0);
    const long blk = (long)dk * dv;
    for (int j = 0; j < 8; ++j) {
        const int col = cc + j;
        float v = 0.0f;
        if (col < ncols) {
            v = s0[head * blk + (long)r * dv + c0 + col];
            out[head * blk + (long)r * dv + c0 + col] = v;
        }
        S[r * 16 + col] = v;
    }
    __syncthreads();
    for (int i = 0; i < n; ++i) {
        const float* mi = m + ((long)i * h + head) * dk * dk + (long)r * dk;
        float acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
        for (int k = 0; k < dk; ++k) {
            const float a = mi[k];
            const float* srow = S + k * 16 + cc;
            for (int j = 0; j < 8; ++j) acc[j] = fmaf(a, srow[j], acc[j]);
        }
        __syncthreads();
        const float* ni = nn + ((long)i * h + head) * blk + (long)r * dv + c0;
        float* dst = out + ((long)(i + 1) * h + head) * blk + (long)r * dv + c0;
        for (int j = 0; j < 8; ++j) {
            const int col = cc + j;
            if (col < ncols) {
                const float v = acc[j] + ni[col];
                S[r * 16 + col] = v;
                dst[col] = v;
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
    use candle_core::Device;

    /// The op against the recurrence written with tensor ops (candle's matmul), f32.
    #[test]
    fn scan_is_the_recurrence() {
        let (n, h, dk, dv) = (5, 3, 8, 16);
        let dev = Device::Cpu;
        let f = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0 - 0.5
                })
                .collect()
        };
        let m = Tensor::from_vec(f(n * h * dk * dk, 1), (n, h, dk, dk), &dev).unwrap();
        let nn = Tensor::from_vec(f(n * h * dk * dv, 2), (n, h, dk, dv), &dev).unwrap();
        let s0 = Tensor::from_vec(f(h * dk * dv, 3), (h, dk, dv), &dev).unwrap();
        let got = scan(&m, &nn, &s0).unwrap();
        let mut s = s0.clone();
        for i in 0..=n {
            let d = (got.get(i).unwrap() - &s)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d <= 1e-5, "chunk {i}: max |Δ| {d}");
            if i < n {
                s = (m.get(i).unwrap().matmul(&s).unwrap() + nn.get(i).unwrap()).unwrap();
            }
        }
    }
}
