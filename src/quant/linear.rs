//! Linear symmetric fake-quantization, per block of consecutive input features or per output row, exactly
//! as coreai-opt / torchao compute it (reference: coreai_formats.md §5.1):
//! `scale = max(−min(x,0), max(x,0)) / ((qmax − qmin)/2)` in f32, clamped below at f32 epsilon, rounded to
//! f16 (unless the scale dtype is f32); `q = clamp(round_half_even(w / scale), qmin, qmax)`; `w′ = q · scale`.
use super::scheme::LinearSpec;
use rayon::prelude::*;

/// Scale storage dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleDtype {
    F16,
    F32,
}

impl ScaleDtype {
    pub fn parse(s: &str) -> Option<ScaleDtype> {
        match s {
            "f16" | "fp16" | "float16" => Some(ScaleDtype::F16),
            "f32" | "fp32" | "float32" => Some(ScaleDtype::F32),
            _ => None,
        }
    }
    pub fn bytes(self) -> u64 {
        match self {
            ScaleDtype::F16 => 2,
            ScaleDtype::F32 => 4,
        }
    }
    pub fn round(self, x: f32) -> f32 {
        match self {
            ScaleDtype::F16 => half::f16::from_f32(x).to_f32(),
            ScaleDtype::F32 => x,
        }
    }
}

/// Integer range `(qmin, qmax)`: sym `[−2^(b−1), 2^(b−1)−1]`; symclip `[−(2^(b−1)−1), 2^(b−1)−1]`.
pub fn qrange(bits: u8, clip: bool) -> (i32, i32) {
    let qmax = (1i32 << (bits - 1)) - 1;
    (if clip { -qmax } else { -qmax - 1 }, qmax)
}

/// The scale of one block (after the clamp at f32 epsilon and the scale-dtype rounding).
pub fn block_scale(block: &[f32], bits: u8, clip: bool, sd: ScaleDtype) -> f32 {
    let (qmin, qmax) = qrange(bits, clip);
    let (mut lo, mut hi) = (0f32, 0f32);
    for &x in block {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    let absmax = (-lo).max(hi);
    let scale = (absmax / ((qmax - qmin) as f32 / 2.0)).max(f32::EPSILON);
    sd.round(scale)
}

/// 1.5 · 2^23: adding and subtracting it rounds an f32 of magnitude below 2^22 to an integer, half to
/// even (IEEE round-to-nearest-even), in two vectorizable additions (`round_ties_even` is a libm call on
/// baseline x86-64).
const MAGIC: f32 = 12_582_912.0;

/// `clamp(round_half_even(x), qmin, qmax)` for integer bounds: clamping first gives the same result (the
/// bounds are integers) and keeps the magic-number rounding in range.
#[inline(always)]
fn round_clamp(x: f32, qmin: f32, qmax: f32) -> f32 {
    let y = x.clamp(qmin, qmax);
    (y + MAGIC) - MAGIC
}

/// Fake-quantize one block in place; returns its scale.
pub fn fake_quant_block(block: &mut [f32], bits: u8, clip: bool, sd: ScaleDtype) -> f32 {
    let (qmin, qmax) = qrange(bits, clip);
    let scale = block_scale(block, bits, clip, sd);
    let (qmin, qmax) = (qmin as f32, qmax as f32);
    for x in block.iter_mut() {
        *x = round_clamp(*x / scale, qmin, qmax) * scale;
    }
    scale
}

/// The integer codes of one block (for tests and size accounting): `clamp(round(w/scale))`.
pub fn codes(block: &[f32], bits: u8, clip: bool, sd: ScaleDtype) -> (Vec<i32>, f32) {
    let (qmin, qmax) = qrange(bits, clip);
    let scale = block_scale(block, bits, clip, sd);
    let q = block
        .iter()
        .map(|x| round_clamp(x / scale, qmin as f32, qmax as f32) as i32)
        .collect();
    (q, scale)
}

/// Whether a weight whose last dimension is `cols` can be quantized with this spec.
pub fn divisible(spec: &LinearSpec, cols: usize) -> bool {
    spec.block.is_none_or(|b| cols.is_multiple_of(b))
}

/// Fake-quantize a row-major matrix with `cols` columns (any number of leading dimensions: every row of
/// every expert is on its own). The caller checks `divisible` first.
pub fn fake_quant(data: &mut [f32], cols: usize, spec: &LinearSpec, sd: ScaleDtype) {
    let block = spec.block.unwrap_or(cols);
    data.par_chunks_mut(cols).for_each(|row| {
        for b in row.chunks_mut(block) {
            fake_quant_block(b, spec.bits, spec.clip, sd);
        }
    });
}

/// Bytes of the packed weight plus its scales.
pub fn storage_bytes(numel: u64, cols: u64, spec: &LinearSpec, sd: ScaleDtype) -> u64 {
    let block = spec.block.map(|b| b as u64).unwrap_or(cols);
    let scales = numel / block;
    (numel * spec.bits as u64).div_ceil(8) + scales * sd.bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16r(x: f32) -> f32 {
        half::f16::from_f32(x).to_f32()
    }

    #[test]
    fn magic_rounding_is_round_half_even_then_clamp() {
        let mut x = -300.0f32;
        while x < 300.0 {
            for v in [x, x + 0.5, x + 0.25, x - 1e-3] {
                for (lo, hi) in [(-128.0, 127.0), (-7.0, 7.0)] {
                    assert_eq!(
                        round_clamp(v, lo, hi),
                        v.round_ties_even().clamp(lo, hi),
                        "{v}"
                    );
                }
            }
            x += 0.5;
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(qrange(8, false), (-128, 127));
        assert_eq!(qrange(8, true), (-127, 127));
        assert_eq!(qrange(4, false), (-8, 7));
        assert_eq!(qrange(4, true), (-7, 7));
    }

    #[test]
    fn int8_sym_scale_is_absmax_over_127_5_and_positive_extreme_clamps() {
        // absmax 2.55 → scale 0.02 (f32), f16-rounded
        let mut b = vec![0.0f32; 32];
        b[0] = 2.55;
        b[1] = -2.55;
        b[2] = 0.01; // 0.5 step: tie
        b[3] = 0.03; // 1.5 steps: tie
        let s = f16r(2.55f32 / 127.5);
        let (q, scale) = codes(&b, 8, false, ScaleDtype::F16);
        assert_eq!(scale, s);
        // 2.55 / s ≈ 127.5 (just above or below depending on the f16 rounding of the scale)
        let r = 2.55f32 / s;
        assert!((r - 127.5).abs() < 0.1, "{r}");
        assert_eq!(q[0], 127, "positive extreme clamped to qmax");
        assert_eq!(q[1], (-r).round_ties_even().max(-128.0) as i32);
        assert_eq!(q[2], (0.01f32 / s).round_ties_even() as i32);
        assert!(q.iter().skip(4).all(|&x| x == 0));
    }

    #[test]
    fn ties_round_half_to_even_with_exact_scale() {
        // absmax 127 with symclip int8 → scale exactly 1.0 (representable in f16): w/scale = w exactly.
        let mut b = vec![0.0f32; 8];
        b[0] = 127.0;
        b[1] = 0.5;
        b[2] = 1.5;
        b[3] = 2.5;
        b[4] = -0.5;
        b[5] = -1.5;
        b[6] = -126.5;
        b[7] = 3.5;
        let (q, scale) = codes(&b, 8, true, ScaleDtype::F16);
        assert_eq!(scale, 1.0);
        assert_eq!(q, vec![127, 0, 2, 2, 0, -2, -126, 4]);
        let mut w = b.clone();
        fake_quant_block(&mut w, 8, true, ScaleDtype::F16);
        assert_eq!(w, vec![127.0, 0.0, 2.0, 2.0, 0.0, -2.0, -126.0, 4.0]);
    }

    #[test]
    fn symclip_range_and_int4_bounds() {
        // int4 symclip: absmax 7 → scale 1; −7 is the lowest code even though −8 fits in 4 bits.
        let b = [7.0f32, -7.0, -6.6, 6.5, 0.2, -0.5, 3.49, -3.5];
        let (q, s) = codes(&b, 4, true, ScaleDtype::F32);
        assert_eq!(s, 1.0);
        assert_eq!(q, vec![7, -7, -7, 6, 0, 0, 3, -4]);
        // int4 sym: absmax 7.5 → scale 1; 7.5 → 8 clamps to 7, −7.5 → −8 stays.
        let b = [7.5f32, -7.5, 0.0, 1.0];
        let (q, s) = codes(&b, 4, false, ScaleDtype::F32);
        assert_eq!(s, 1.0);
        assert_eq!(q, vec![7, -8, 0, 1]);
        assert!(q.iter().all(|&x| (-8..=7).contains(&x)));
    }

    #[test]
    fn fp16_scale_rounding_changes_codes() {
        // absmax 1.0 symclip int8: f32 scale 1/127 = 0.007874016; f16 rounds it to 0.007873535 (below), so
        // 1.0 / scale = 127.006 → 127 and the dequantized extreme is 127·s16, not 1.0.
        let b = [1.0f32, -1.0, 0.5];
        let s32 = 1.0f32 / 127.0;
        let s16 = f16r(s32);
        assert_ne!(s16, s32);
        let (_, s) = codes(&b, 8, true, ScaleDtype::F16);
        assert_eq!(s, s16);
        let mut w = b;
        fake_quant_block(&mut w, 8, true, ScaleDtype::F16);
        assert_eq!(w[0], 127.0 * s16);
        assert_eq!(w[2], (0.5f32 / s16).round_ties_even() * s16);
        let mut w32 = b;
        fake_quant_block(&mut w32, 8, true, ScaleDtype::F32);
        assert_eq!(w32[0], 127.0 * s32);
    }

    #[test]
    fn all_zero_block_uses_epsilon_scale() {
        let mut b = [0.0f32; 32];
        let s = fake_quant_block(&mut b, 8, false, ScaleDtype::F16);
        assert_eq!(s, f32::EPSILON); // 2^-23 is an f16 subnormal, exact
        assert!(b.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn one_outlier_flattens_the_block() {
        // int4 symclip: outlier 70 → scale 10; every small weight (|w| < 5) becomes 0.
        let mut b = [0.0f32; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as f32 - 16.0) * 0.25;
        }
        b[5] = 70.0;
        let s = fake_quant_block(&mut b, 4, true, ScaleDtype::F16);
        assert_eq!(s, 10.0);
        assert_eq!(b[5], 70.0);
        for (i, &x) in b.iter().enumerate() {
            if i != 5 {
                let orig = (i as f32 - 16.0) * 0.25;
                assert_eq!(x, (orig / 10.0).round_ties_even() * 10.0, "{i}");
            }
        }
        assert!(b.iter().all(|&x| x == 0.0 || x.abs() == 70.0));
    }

    #[test]
    fn per_block_and_per_channel_layouts() {
        // two rows of 64: blocks of 32 get their own scales; per-channel uses one per row.
        let mut m: Vec<f32> = (0..128)
            .map(|i| if i % 64 < 32 { 1.0 } else { 100.0 })
            .collect();
        m[0] = 1.27;
        let spec = LinearSpec {
            bits: 8,
            block: Some(32),
            clip: true,
        };
        let mut a = m.clone();
        fake_quant(&mut a, 64, &spec, ScaleDtype::F32);
        assert!((a[1] - 1.0).abs() < 0.006, "{}", a[1]);
        let pc = LinearSpec {
            block: None,
            ..spec
        };
        let mut c = m.clone();
        fake_quant(&mut c, 64, &pc, ScaleDtype::F32);
        // per-channel: scale 100/127 ≈ 0.787, so 1.0 → 1 step = 0.787
        assert!((c[1] - 100.0 / 127.0).abs() < 1e-6, "{}", c[1]);
        assert!(divisible(&spec, 64) && !divisible(&spec, 48) && divisible(&pc, 48));
        assert_eq!(storage_bytes(128, 64, &spec, ScaleDtype::F16), 128 + 4 * 2);
        let i4 = LinearSpec { bits: 4, ..spec };
        assert_eq!(storage_bytes(128, 64, &i4, ScaleDtype::F16), 64 + 4 * 2);
    }
}
