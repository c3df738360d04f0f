//! The three oracle precisions and where they round. All arithmetic runs in f32; at each point where
//! HF's bf16/f16 mode stores a tensor in the model dtype we round to that dtype and back (`R(x)`).
use candle_core::{DType, Tensor};
use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    BF16,
    F16,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "f32" | "fp32" | "float32" => Some(Precision::F32),
            "bf16" | "bfloat16" => Some(Precision::BF16),
            "f16" | "fp16" | "float16" => Some(Precision::F16),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::BF16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// The model dtype when it is a 16-bit one.
    pub fn half_dtype(self) -> Option<DType> {
        match self {
            Precision::F32 => None,
            Precision::BF16 => Some(DType::BF16),
            Precision::F16 => Some(DType::F16),
        }
    }

    /// `R(x)`: round every element to the model dtype (round-to-nearest-even), keep it in f32.
    pub fn round(self, t: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Precision::F32 => Ok(t.clone()),
            Precision::BF16 => t.to_dtype(DType::BF16)?.to_dtype(DType::F32),
            Precision::F16 => t.to_dtype(DType::F16)?.to_dtype(DType::F32),
        }
    }

    pub fn round_slice(self, v: &mut [f32]) {
        match self {
            Precision::F32 => {}
            Precision::BF16 => v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
            Precision::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        }
    }

    pub fn round_scalar(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::BF16 => bf16::from_f32(x).to_f32(),
            Precision::F16 => f16::from_f32(x).to_f32(),
        }
    }
}
