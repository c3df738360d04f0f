//! Inputs and comparisons shared by the model's unit tests.
use super::delta_rule::DeltaInputs;
use candle_core::Tensor;

pub use super::noise::noise;

/// Largest `|a − b|` over two slices (element by element).
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// A tensor's values as f32 bit patterns (bf16/f16 widen exactly), for bit-for-bit comparisons.
pub fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

/// Largest `|a − b|` over two tensors of one shape.
pub fn max_diff_t(a: &Tensor, b: &Tensor) -> f32 {
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    max_diff(&flat(a), &flat(b))
}

/// One layer's delta-rule inputs, head-major (as `DeltaInputs`): `q`, `k` L2-normalised per row of `dk`,
/// `β ∈ [0, 1)`, `g ∈ (−0.6, 0]`, and an initial state `[h, dk, dv]`.
pub struct DeltaCase {
    pub h: usize,
    pub t: usize,
    pub dk: usize,
    pub dv: usize,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub beta: Vec<f32>,
    pub g: Vec<f32>,
    pub state: Vec<f32>,
}

impl DeltaCase {
    pub fn random(h: usize, t: usize, dk: usize, dv: usize) -> DeltaCase {
        let l2 = |mut v: Vec<f32>| {
            for r in v.chunks_exact_mut(dk) {
                let x = r.to_vec();
                super::gated_deltanet::l2_normalise_into(&x, r);
            }
            v
        };
        DeltaCase {
            h,
            t,
            dk,
            dv,
            q: l2(noise(h * t * dk, 1)),
            k: l2(noise(h * t * dk, 2)),
            v: noise(h * t * dv, 3),
            beta: noise(h * t, 4).iter().map(|x| 0.5 + 0.5 * x).collect(),
            g: noise(h * t, 5).iter().map(|x| -0.3 * (x + 1.0)).collect(),
            state: noise(h * dk * dv, 6),
        }
    }

    pub fn inputs(&self) -> DeltaInputs<'_> {
        DeltaInputs {
            heads: self.h,
            t: self.t,
            dk: self.dk,
            dv: self.dv,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            beta: &self.beta,
            g: &self.g,
        }
    }
}
