//! SwiGLU MLP: `R(R(R(silu(R(h·Wgᵀ))) · R(h·Wuᵀ)) · Wdᵀ)`; also the shape of every routed and shared expert.
pub use super::linear::{linear, linear_to, LinearWeight};
use super::precision::Precision;
use super::weights::WeightStore;
use crate::error::Result;
use candle_core::Tensor;

pub struct Mlp {
    gate: LinearWeight,
    up: LinearWeight,
    down: LinearWeight,
    prec: Precision,
    portable: bool,
}

impl Mlp {
    /// `prefix` is the full tensor-name prefix ending in `.` (e.g. `model.layers.0.mlp.`).
    pub fn new(
        ws: &WeightStore,
        prefix: &str,
        hidden: usize,
        inter: usize,
        prec: Precision,
    ) -> Result<Mlp> {
        Ok(Mlp {
            gate: ws.load_linear(&format!("{prefix}gate_proj.weight"), &[inter, hidden], prec)?,
            up: ws.load_linear(&format!("{prefix}up_proj.weight"), &[inter, hidden], prec)?,
            down: ws.load_linear(&format!("{prefix}down_proj.weight"), &[hidden, inter], prec)?,
            prec,
            portable: ws.portable_kernels(),
        })
    }

    /// `h` stored as f32 or the model dtype (`act_io`); the result as f32.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.forward_to(h, candle_core::DType::F32)
    }

    /// [`Mlp::forward`] with the result stored as `out`.
    pub fn forward_to(&self, h: &Tensor, out: candle_core::DType) -> Result<Tensor> {
        let (p, portable) = (self.prec, self.portable);
        swiglu(h, &self.gate, &self.up, &self.down, p, portable, out)
    }
}

/// The SwiGLU body shared by dense MLPs and experts, the result stored as `out`; the gate and up products
/// and SwiGLU's middle are stored as `act_io::storage_dtype` (the model dtype on the portable kernels in
/// bf16/f16).
pub fn swiglu(
    h: &Tensor,
    gate: &LinearWeight,
    up: &LinearWeight,
    down: &LinearWeight,
    p: Precision,
    portable: bool,
    out: candle_core::DType,
) -> Result<Tensor> {
    let io = super::act_io::storage_dtype(p, portable);
    let g = linear_to(h, gate, p, io)?;
    let u = linear_to(h, up, p, io)?;
    let a = super::ops::silu_mul_round(&g, &u, p, portable)?;
    linear_to(&a, down, p, out)
}
