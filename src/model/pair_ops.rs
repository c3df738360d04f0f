//! Two element-wise ops of the portable kernels on pairs of equal-shape f32 tensors, each one kernel on a
//! GPU (the tensor-op versions made two to four launches and as many passes):
//!
//! - [`add_round`]: `R(x + y)` (the residual adds);
//! - [`silu_mul_round`]: `R(R(silu(g)) · u)` (SwiGLU's middle; `silu(g) = g / (1 + exp(−g))` in f32);
//! - [`sigmoid_gate_round`]: `R(o · R(1 / (1 + exp(−g))))` (the gated attention's output gate, as the
//!   tensor ops `recip(exp(−g) + 1)`, rounded, times `o`, rounded).
//!
//! `R` rounds to the model dtype (identity in f32). Products and sums are rounded as on the host (no
//! contraction into FMAs). The operands may be stored as f32, bf16 or f16 (`act_io`); the result is
//! stored in the first operand's dtype.
use super::act_io;
use super::precision::Precision;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `R(x + y)`, stored as `x`.
pub fn add_round(x: &Tensor, y: &Tensor, prec: Precision) -> Result<Tensor> {
    apply(x, y, Kind::Add, prec)
}

/// `R(R(silu(g)) · u)`, stored as `g`.
pub fn silu_mul_round(g: &Tensor, u: &Tensor, prec: Precision) -> Result<Tensor> {
    apply(g, u, Kind::SiluMul, prec)
}

/// `R(o · R(sigmoid(g)))`, stored as `o`.
pub fn sigmoid_gate_round(o: &Tensor, g: &Tensor, prec: Precision) -> Result<Tensor> {
    apply(o, g, Kind::SigmoidGate, prec)
}

fn apply(x: &Tensor, y: &Tensor, kind: Kind, prec: Precision) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&y.contiguous()?, &PairOp { kind, prec })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Add = 0,
    SiluMul = 1,
    SigmoidGate = 2,
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
            Kind::SigmoidGate => "qgate-sigmoid-gate-round",
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
        let x = act_io::f32_of(s1, l1, n, self.name())?;
        let y = act_io::f32_of(s2, l2, n, self.name())?;
        let p = self.prec;
        let out: Vec<f32> = match self.kind {
            Kind::Add => x
                .iter()
                .zip(y.iter())
                .map(|(a, b)| p.round_scalar(a + b))
                .collect(),
            Kind::SiluMul => x
                .iter()
                .zip(y.iter())
                .map(|(&g, &u)| p.round_scalar(p.round_scalar(g / (1.0 + (-g).exp())) * u))
                .collect(),
            Kind::SigmoidGate => x
                .iter()
                .zip(y.iter())
                .map(|(&o, &g)| p.round_scalar(o * p.round_scalar(1.0 / ((-g).exp() + 1.0))))
                .collect(),
        };
        use candle_core::backend::BackendStorage;
        Ok((act_io::storage_of(out, s1.dtype())?, l1.shape().clone()))
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
        let x = act_io::view(s1, l1)?;
        let y = act_io::view(s2, l2)?;
        // SAFETY: every one of the n outputs is written.
        let out = unsafe { act_io::Out::alloc(&dev, s1.dtype(), n)? };
        let func = dev.get_or_load_custom_func("qgate_pair_op", "qgate_pair_ops", ptx()?)?;
        // Four elements a thread (more loads in flight).
        let cfg = super::device::grid_stride(n.div_ceil(4));
        let n64 = n as u64;
        let v4 = [l1.start_offset(), l2.start_offset()]
            .iter()
            .all(|o| o.is_multiple_of(4));
        let ints = [
            self.kind as i32,
            super::precision::round_code(self.prec),
            x.code(),
            y.code(),
            out.code(),
            i32::from(v4),
        ];
        let mut b = func.builder();
        x.push(&mut b);
        y.push(&mut b);
        out.push(&mut b);
        b.arg(&n64);
        for i in &ints {
            b.arg(i);
        }
        // SAFETY: reads n elements of each operand and writes n, as allocated, in the dtypes coded.
        unsafe { b.launch(cfg) }.w()?;
        Ok((out.storage(dev), l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
// kind 0: R(x + y); 1: R(R(silu(x)) · y); 2: R(x · R(1 / (exp(−y) + 1))). Four consecutive elements a
// thread, loaded and stored as one 8- or 16-byte access when `v4` (every operand's start a multiple of
// four elements; allocations are 256-byte aligned; `n` need not be: the last group is element-wise).
extern "C" __global__ void qgate_pair_op(const void* x, const void* y, void* out, unsigned long long n,
                                         int kind, int mode, int xt, int yt, int ot, int v4) {
    for (unsigned long long i4 = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; 4 * i4 < n;
         i4 += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long i0 = 4 * i4;
        const int lim = (int)((n - i0) < 4 ? (n - i0) : 4);
        const int vec = v4 && lim == 4;
        float a[4], b[4], r[4];
        ld4(x, (long)i0, xt, vec, lim, a);
        ld4(y, (long)i0, yt, vec, lim, b);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            if (kind == 1) r[u] = rnd(__fmul_rn(rnd(silu(a[u]), mode), b[u]), mode);
            else if (kind == 2) r[u] = rnd(__fmul_rn(a[u], rnd(__fdiv_rn(1.0f, __fadd_rn(expf(-b[u]), 1.0f)), mode)), mode);
            else r[u] = rnd(__fadd_rn(a[u], b[u]), mode);
        }
        st4(out, (long)i0, r, ot, vec, lim);
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
            let gate = crate::model::attention::sigmoid(&y).unwrap();
            let sg = p.round(&(&x * p.round(&gate).unwrap()).unwrap()).unwrap();
            for (got, want) in [
                (add_round(&x, &y, p).unwrap(), add),
                (silu_mul_round(&x, &y, p).unwrap(), sm),
                (sigmoid_gate_round(&x, &y, p).unwrap(), sg),
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

    /// Operands stored as bf16/f16 (`act_io`) give the f32 run's bits, stored in the first operand's
    /// dtype.
    #[test]
    fn pair_ops_read_and_write_the_model_dtype() {
        let dev = Device::Cpu;
        for (p, dt) in [
            (Precision::BF16, candle_core::DType::BF16),
            (Precision::F16, candle_core::DType::F16),
        ] {
            let r = |seed| {
                let v: Vec<f32> = noise(999, seed).iter().map(|x| 5.0 * x).collect();
                p.round(&Tensor::from_vec(v, (27, 37), &dev).unwrap())
                    .unwrap()
            };
            let (x, y) = (r(3), r(4));
            let (xh, yh) = (x.to_dtype(dt).unwrap(), y.to_dtype(dt).unwrap());
            let bits = |t: &Tensor| -> Vec<u32> {
                let v = t.to_dtype(candle_core::DType::F32).unwrap();
                let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            for (f32_run, mixed) in [
                (add_round(&x, &y, p), add_round(&x, &yh, p)),
                (silu_mul_round(&x, &y, p), silu_mul_round(&xh, &yh, p)),
            ] {
                let (f32_run, mixed) = (f32_run.unwrap(), mixed.unwrap());
                assert_eq!(bits(&f32_run), bits(&mixed), "{}", p.name());
            }
            assert_eq!(
                add_round(&x, &yh, p).unwrap().dtype(),
                candle_core::DType::F32
            );
            assert_eq!(silu_mul_round(&xh, &yh, p).unwrap().dtype(), dt);
        }
    }
}
