//! Two element-wise ops of the portable kernels on pairs of equal-shape f32 tensors, each one kernel on a
//! GPU (the tensor-op versions made two to four launches and as many passes):
//!
//! - [`add_round`]: `R(x + y)` (the residual adds);
//! - [`silu_mul_round`]: `R(R(silu(g)) · u)` (SwiGLU's middle; `silu(g) = g / (1 + exp(−g))` in f32).
//!
//! `R` rounds to the model dtype (identity in f32). Products and sums are rounded as on the host (no
//! contraction into FMAs).
use super::precision::Precision;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `R(x + y)`.
pub fn add_round(x: &Tensor, y: &Tensor, prec: Precision) -> Result<Tensor> {
    apply(x, y, Kind::Add, prec)
}

/// `R(R(silu(g)) · u)`.
pub fn silu_mul_round(g: &Tensor, u: &Tensor, prec: Precision) -> Result<Tensor> {
    apply(g, u, Kind::SiluMul, prec)
}

fn apply(x: &Tensor, y: &Tensor, kind: Kind, prec: Precision) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&y.contiguous()?, &PairOp { kind, prec })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Add,
    SiluMul,
}

struct PairOp {
    kind: Kind,
    prec: Precision,
}

impl PairOp {
    fn len(&self, l1: &Layout, l2: &Layout) -> Result<usize> {
        if l1.shape() != l2.shape() || !l1.is_contiguous() || !l2.is_contiguous() {
            candle_core::bail!(
                "{}: expected two contiguous tensors of one shape, got {:?} and {:?}",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        Ok(l1.shape().elem_count())
    }
}

impl CustomOp2 for PairOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Add => "qgate-add-round",
            Kind::SiluMul => "qgate-silu-mul-round",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.len(l1, l2)?;
        let (CpuStorage::F32(x), CpuStorage::F32(y)) = (s1, s2) else {
            candle_core::bail!("{}: f32 only", self.name());
        };
        let x = &x[l1.start_offset()..l1.start_offset() + n];
        let y = &y[l2.start_offset()..l2.start_offset() + n];
        let p = self.prec;
        let out = match self.kind {
            Kind::Add => x
                .iter()
                .zip(y)
                .map(|(a, b)| p.round_scalar(a + b))
                .collect(),
            Kind::SiluMul => x
                .iter()
                .zip(y)
                .map(|(&g, &u)| p.round_scalar(p.round_scalar(g / (1.0 + (-g).exp())) * u))
                .collect(),
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let n = self.len(l1, l2)?;
        let dev = s1.device().clone();
        let x = super::device::cuda_f32(s1, l1)?;
        let y = super::device::cuda_f32(s2, l2)?;
        // SAFETY: every one of the n outputs is written.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let func = dev.get_or_load_custom_func("qgate_pair_op", "qgate_pair_ops", ptx()?)?;
        let cfg = super::device::grid_stride(n);
        let n64 = n as u64;
        let ints = [
            (self.kind == Kind::SiluMul) as i32,
            super::precision::round_code(self.prec),
        ];
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&y);
        b.arg(&out);
        b.arg(&n64);
        for i in &ints {
            b.arg(i);
        }
        // SAFETY: reads 2·n floats and writes n, as allocated.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            l1.shape().clone(),
        ))
    }
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
extern "C" __global__ void qgate_pair_op(const float* x, const float* y, float* out, unsigned long long n,
                                         int silu_mul, int mode) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        out[i] = silu_mul ? rnd(__fmul_rn(rnd(silu(x[i]), mode), y[i]), mode) : rnd(__fadd_rn(x[i], y[i]), mode);
    }
}
"#;

/// The kernel's PTX, compiled once per process.
#[cfg(feature = "cuda")]
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx_with_rounding(&PTX, KERNEL, "the element-wise pair kernel")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::noise;
    use candle_core::Device;

    /// Both ops against the tensor-op expressions on the CPU, bit for bit, in f32 and bf16.
    #[test]
    fn pair_ops_are_the_expressions() {
        let dev = Device::Cpu;
        let f = |seed| -> Vec<f32> { noise(999, seed).iter().map(|x| 5.0 * x).collect() };
        let x = Tensor::from_vec(f(1), (27, 37), &dev).unwrap();
        let y = Tensor::from_vec(f(2), (27, 37), &dev).unwrap();
        for p in [Precision::F32, Precision::BF16, Precision::F16] {
            let add = p.round(&(&x + &y).unwrap()).unwrap();
            let sm = p
                .round(&(p.round(&x.silu().unwrap()).unwrap() * &y).unwrap())
                .unwrap();
            for (got, want) in [
                (add_round(&x, &y, p).unwrap(), add),
                (silu_mul_round(&x, &y, p).unwrap(), sm),
            ] {
                let (g, w) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert!(
                    g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{}",
                    p.name()
                );
            }
        }
    }
}
