//! `R(x)` for an f32 tensor on a GPU in one kernel: each element rounded to bf16/f16 (round to nearest
//! even, as a cast) and widened back, one read and one write (the two casts it replaces made three
//! passes and two launches). The same bits as `x.to_dtype(bf16).to_dtype(f32)`.
use super::precision::Precision;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `R(x)` of a contiguous f32 tensor off the CPU (`Precision::round` calls it there).
pub fn round_on_device(x: &Tensor, prec: Precision) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&RoundOp(prec))
}

struct RoundOp(Precision);

impl CustomOp1 for RoundOp {
    fn name(&self) -> &'static str {
        "qgate-round"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("round_on_device: f32 only");
        };
        let (o, n) = (l.start_offset(), l.shape().elem_count());
        let out = v[o..o + n]
            .iter()
            .map(|&x| self.0.round_scalar(x))
            .collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let n = l.shape().elem_count();
        let dev = s.device().clone();
        let name = match self.0 {
            Precision::BF16 => "qgate_round_bf16",
            Precision::F16 => "qgate_round_f16",
            Precision::F32 => candle_core::bail!("round_on_device: nothing to round in f32"),
        };
        let func = dev.get_or_load_custom_func(name, "qgate_round", ptx()?)?;
        let x = s.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
        // SAFETY: every one of the n outputs is written.
        let y = unsafe { dev.alloc::<f32>(n)? };
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65535 * 4) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n64 = n as u64;
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&y);
        b.arg(&n64);
        // SAFETY: reads and writes n floats, as allocated.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(y, dev),
            l.shape().clone(),
        ))
    }
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
extern "C" __global__ void qgate_round_bf16(const float* x, float* y, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x[i]));
        y[i] = __uint_as_float(((unsigned int)h) << 16);
    }
}
extern "C" __global__ void qgate_round_f16(const float* x, float* y, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float f; asm("{ .reg .f16 t; cvt.rn.f16.f32 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "f"(x[i]));
        y[i] = f;
    }
}
"#;

/// The kernels' PTX, compiled once per process.
#[cfg(feature = "cuda")]
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx(&PTX, KERNEL, "the rounding kernel")
}
