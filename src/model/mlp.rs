//! SwiGLU MLP: `R(R(R(silu(R(h·Wgᵀ))) · R(h·Wuᵀ)) · Wdᵀ)`; also the shape of every routed and shared expert.
pub use super::linear::{linear, LinearWeight};
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

    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        swiglu(
            h,
            &self.gate,
            &self.up,
            &self.down,
            self.prec,
            self.portable,
        )
    }
}

/// The SwiGLU body shared by dense MLPs and experts.
pub fn swiglu(
    h: &Tensor,
    gate: &LinearWeight,
    up: &LinearWeight,
    down: &LinearWeight,
    p: Precision,
    portable: bool,
) -> Result<Tensor> {
    let g = linear(h, gate, p)?;
    let u = linear(h, up, p)?;
    let a = super::ops::silu_mul_round(&g, &u, p, portable)?;
    linear(&a, down, p)
}
