//! `(I + L) X = B` for a batch of 64×64 unit lower-triangular systems: the UT solve of the chunked delta
//! rule (HF: `torch.linalg.solve_triangular(..., upper=False, unitriangular=True)`), as one op.
//!
//! Forward substitution, `x_i = b_i − Σ_{j<i} L_ij x_j` with `j` ascending, in f32. Every column of `X`
//! is independent, so the CUDA kernel gives each thread one column of one system and walks the rows in
//! order: one launch instead of one per row. The kernel is compiled at first use with NVRTC (part of the
//! CUDA runtime candle already needs), so the build needs no extra nvcc step.
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `a`: `[B, C, C]` (only the strictly lower triangle is read), `b`: `[B, C, W]`, both f32.
pub fn solve_unit_lower(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &SolveUnitLower)
}

struct SolveUnitLower;

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
        Ok((CpuStorage::F32(x), Shape::from((batch, c, w))))
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
        // SAFETY: every element is written by the kernel before it is read.
        let x = unsafe { dev.alloc::<f32>(batch * c * w)? };
        let func =
            dev.get_or_load_custom_func("qgate_solve_unit_lower", "qgate_solve_tril", ptx()?)?;
        let threads = 128u32;
        let cfg = LaunchConfig {
            grid_dim: (batch as u32, (w as u32).div_ceil(threads), 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (c32, w32) = (c as i32, w as i32);
        let mut builder = func.builder();
        builder.arg(&a);
        builder.arg(&b);
        builder.arg(&x);
        builder.arg(&c32);
        builder.arg(&w32);
        // SAFETY: the kernel reads B·C·C and B·C·W floats and writes B·C·W, as allocated above.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(x, dev),
            Shape::from((batch, c, w)),
        ))
    }
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
extern "C" __global__ void qgate_solve_unit_lower(const float* a, const float* b, float* x, int c, int w) {
    const int n = blockIdx.x;
    const int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= w) return;
    const float* A = a + (size_t)n * c * c;
    const float* B = b + (size_t)n * c * w;
    float* X = x + (size_t)n * c * w;
    X[col] = B[col];
    for (int i = 1; i < c; ++i) {
        float acc = 0.0f;
        for (int j = 0; j < i; ++j) acc += A[i * c + j] * X[j * w + col];
        X[i * w + col] = B[i * w + col] - acc;
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
