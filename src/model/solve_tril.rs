//! `(I + L) X = B` for a batch of 64×64 unit lower-triangular systems: the UT solve of the chunked delta
//! rule (HF: `torch.linalg.solve_triangular(..., upper=False, unitriangular=True)`), as one op.
//!
//! Forward substitution, `x_i = b_i − Σ_{j<i} L_ij x_j` with `j` ascending, in f32. Every column of `X`
//! is independent, so the CUDA kernel gives each thread one column of one system and walks the rows in
//! order: one launch instead of one per row. For 64-row systems (the delta rule's chunks) the system sits
//! in shared memory and the column in registers. The kernel is compiled at first use with NVRTC (part of
//! the CUDA runtime candle already needs), so the build needs no extra nvcc step.
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `a`: `[B, C, C]` (only the strictly lower triangle is read), `b`: `[B, C, W]`, both f32.
pub fn solve_unit_lower(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &SolveUnitLower { split: None })
}

/// [`solve_unit_lower`] as two tensors: columns `0..split` and `split..W` of the solution, each contiguous
/// `[B, C, split]` and `[B, C, W − split]` (written so by the kernel: the scan that reads them needs them
/// contiguous, and a copy would read and write them again; the whole solution is not written).
pub fn solve_unit_lower_split(a: &Tensor, b: &Tensor, split: usize) -> Result<(Tensor, Tensor)> {
    let (batch, c, w) = b.dims3()?;
    if split == 0 || split >= w {
        candle_core::bail!("solve_unit_lower_split: split {split} outside 1..W = {w}");
    }
    let out = a
        .contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &SolveUnitLower { split: Some(split) })?;
    let head = batch * c * split;
    Ok((
        out.narrow(0, 0, head)?.reshape((batch, c, split))?,
        out.narrow(0, head, batch * c * w - head)?
            .reshape((batch, c, w - split))?,
    ))
}

struct SolveUnitLower {
    /// `Some(s)`: the output is the solution's columns `0..s` (`[B, C, s]`), then its columns `s..W`
    /// (`[B, C, W − s]`), flattened.
    split: Option<usize>,
}

fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
    let (batch, c, c2) = l1.shape().dims3()?;
    let (batch2, c3, w) = l2.shape().dims3()?;
    if c != c2 || c != c3 || batch != batch2 || !l1.is_contiguous() || !l2.is_contiguous() {
        candle_core::bail!(
            "solve_unit_lower: expected contiguous [B, C, C] and [B, C, W], got {:?} and {:?}",
            l1.shape(),
            l2.shape()
        );
    }
    Ok((batch, c, w))
}

impl CustomOp2 for SolveUnitLower {
    fn name(&self) -> &'static str {
        "solve-unit-lower"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, c, w) = dims(l1, l2)?;
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("solve_unit_lower: f32 only");
        };
        let a = &a[l1.start_offset()..l1.start_offset() + batch * c * c];
        let b = &b[l2.start_offset()..l2.start_offset() + batch * c * w];
        let mut x = b.to_vec();
        for n in 0..batch {
            let (a, x) = (
                &a[n * c * c..(n + 1) * c * c],
                &mut x[n * c * w..(n + 1) * c * w],
            );
            let mut acc = vec![0f32; w];
            for i in 1..c {
                let (done, rest) = x.split_at_mut(i * w);
                acc.iter_mut().for_each(|v| *v = 0.0);
                for j in 0..i {
                    let l = a[i * c + j];
                    for (s, xj) in acc.iter_mut().zip(&done[j * w..(j + 1) * w]) {
                        *s += l * xj;
                    }
                }
                for (xi, s) in rest[..w].iter_mut().zip(&acc) {
                    *xi -= s;
                }
            }
        }
        let Some(split) = self.split else {
            return Ok((CpuStorage::F32(x), Shape::from((batch, c, w))));
        };
        let part = |r: std::ops::Range<usize>| {
            x.chunks_exact(w)
                .flat_map(move |row| row[r.clone()].iter().copied())
        };
        let parts: Vec<f32> = part(0..split).chain(part(split..w)).collect();
        let len = parts.len();
        Ok((CpuStorage::F32(parts), Shape::from(len)))
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
        let (batch, c, w) = dims(l1, l2)?;
        let dev = s1.device().clone();
        let a = super::device::cuda_f32(s1, l1)?;
        let b = super::device::cuda_f32(s2, l2)?;
        let split = self.split.unwrap_or(w);
        let len = batch * c * w;
        // SAFETY: every element is written by the kernel before it is read (with a split, every column
        // in its part).
        let x = unsafe { dev.alloc::<f32>(len)? };
        // The chunk size of the delta rule (64) has its own kernel: the system in shared memory, each
        // thread's column of X in registers.
        let name = if c == 64 {
            "qgate_solve_unit_lower_64"
        } else {
            "qgate_solve_unit_lower"
        };
        let func = dev.get_or_load_custom_func(name, "qgate_solve_tril", ptx()?)?;
        let threads = if c == 64 { 256u32 } else { 128u32 };
        let cfg = LaunchConfig {
            grid_dim: (batch as u32, (w as u32).div_ceil(threads), 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // split == w: no parts written.
        let (c32, w32, split32) = (c as i32, w as i32, split as i32);
        let mut builder = func.builder();
        builder.arg(&a);
        builder.arg(&b);
        builder.arg(&x);
        builder.arg(&c32);
        builder.arg(&w32);
        builder.arg(&split32);
        // SAFETY: the kernel reads B·C·C and B·C·W floats and writes B·C·W, as allocated.
        unsafe { builder.launch(cfg) }.w()?;
        let shape = match self.split {
            None => Shape::from((batch, c, w)),
            Some(_) => Shape::from(len),
        };
        Ok((candle_core::CudaStorage::wrap_cuda_slice(x, dev), shape))
    }
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
// x: the solution [B, C, w] (split == w), or its columns 0..split as [B, C, split] then split..w as
// [B, C, w − split] (split < w). The thread's column of the solution is at P[i·ps], i = 0..c.
__device__ __forceinline__ float* solution_column(float* x, int n, int c, int w, int split, int col, long* ps) {
    if (split >= w) { *ps = w; return x + (size_t)n * c * w + col; }
    if (col < split) { *ps = split; return x + (size_t)n * c * split + col; }
    *ps = w - split;
    return x + (size_t)gridDim.x * c * split + (size_t)n * c * (w - split) + (col - split);
}
extern "C" __global__ void qgate_solve_unit_lower(const float* a, const float* b, float* x, int c, int w, int split) {
    const int n = blockIdx.x;
    const int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= w) return;
    const float* A = a + (size_t)n * c * c;
    const float* B = b + (size_t)n * c * w;
    long ps;
    float* P = solution_column(x, n, c, w, split, col, &ps);
    P[0] = B[col];
    for (int i = 1; i < c; ++i) {
        float acc = 0.0f;
        for (int j = 0; j < i; ++j) acc = fmaf(A[i * c + j], P[j * ps], acc);
        P[i * ps] = B[i * w + col] - acc;
    }
}

// C = 64: the same arithmetic (fmaf over j ascending, then b − acc); A staged in shared memory (every
// thread reads the same A[i][j]: a broadcast), the thread's column of B loaded into registers up front
// and solved in place (both loops unrolled), so the sequential rows wait on no global load.
extern "C" __global__ void qgate_solve_unit_lower_64(const float* a, const float* b, float* x, int c, int w,
                                                     int split) {
    __shared__ __align__(16) float A[64 * 64];
    const int n = blockIdx.x;
    const float* An = a + (size_t)n * 64 * 64;
    for (int e = threadIdx.x; e < 64 * 64; e += blockDim.x) A[e] = An[e];
    __syncthreads();
    const int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= w) return;
    const float* B = b + (size_t)n * 64 * w;
    long ps;
    float* P = solution_column(x, n, 64, w, split, col, &ps);
    // The column of B loaded before any row is solved (64 independent loads in flight, not one a row).
    float xr[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) xr[i] = B[(size_t)i * w + col];
#pragma unroll
    for (int i = 0; i < 64; ++i) {
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < i; ++j) acc = fmaf(A[i * 64 + j], xr[j], acc);
        xr[i] = xr[i] - acc;
        P[i * ps] = xr[i];
    }
}
"#;

/// The kernels' PTX, compiled once per process.
#[cfg(feature = "cuda")]
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx(&PTX, KERNEL, "the delta-rule solve kernel")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{max_diff_t, noise};
    use candle_core::Device;

    /// The solution satisfies `(I + L) X = B`, and the split form returns its two column ranges, each
    /// contiguous.
    #[test]
    fn solves_and_splits() {
        let (batch, c, w, split) = (3, 9, 7, 4);
        let dev = Device::Cpu;
        let a = Tensor::from_vec(noise(batch * c * c, 11), (batch, c, c), &dev).unwrap();
        let b = Tensor::from_vec(noise(batch * c * w, 12), (batch, c, w), &dev).unwrap();
        let x = solve_unit_lower(&a, &b).unwrap();
        let lower = a.broadcast_mul(&Tensor::tril2(c, candle_core::DType::F32, &dev).unwrap());
        let strict = (lower.unwrap()
            - Tensor::eye(c, candle_core::DType::F32, &dev)
                .unwrap()
                .broadcast_mul(&a)
                .unwrap())
        .unwrap();
        let unit = strict
            .broadcast_add(&Tensor::eye(c, candle_core::DType::F32, &dev).unwrap())
            .unwrap();
        assert!(max_diff_t(&unit.matmul(&x).unwrap(), &b) <= 1e-4);
        let (head, tail) = solve_unit_lower_split(&a, &b, split).unwrap();
        assert!(head.is_contiguous() && head.dims() == [batch, c, split]);
        assert!(tail.is_contiguous() && tail.dims() == [batch, c, w - split]);
        let part = |from, len| x.narrow(2, from, len).unwrap();
        assert_eq!(max_diff_t(&head, &part(0, split)), 0.0);
        assert_eq!(max_diff_t(&tail, &part(split, w - split)), 0.0);
    }
}
