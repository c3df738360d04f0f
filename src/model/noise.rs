//! Deterministic pseudo-random inputs, shared by the model's unit tests and the on-device kernel check
//! (`examples/gpu_ops_check.rs`).

/// Deterministic pseudo-random values in [-1, 1) (an LCG; `seed` picks the stream).
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
