//! The three oracle precisions and where they round. All arithmetic runs in f32; at each point where
//! HF's bf16/f16 mode stores a tensor in the model dtype we round to that dtype and back (`R(x)`).
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

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
    /// One pass over an f32 CPU tensor (copy and round per cache-sized chunk, in parallel), with the
    /// same bits as a round trip through the model dtype.
    pub fn round(self, t: &Tensor) -> candle_core::Result<Tensor> {
        if self == Precision::F32 {
            return Ok(t.clone());
        }
        if t.dtype() == DType::F32 && t.device().is_cpu() {
            let v = with_f32_slice(t, |src| {
                let mut out = vec![0f32; src.len()];
                let step = |(d, s): (&mut [f32], &[f32])| {
                    d.copy_from_slice(s);
                    self.round_slice_serial(d);
                };
                if src.len() >= PAR_MIN {
                    out.par_chunks_mut(CHUNK)
                        .zip(src.par_chunks(CHUNK))
                        .for_each(step);
                } else {
                    out.chunks_mut(CHUNK).zip(src.chunks(CHUNK)).for_each(step);
                }
                out
            })?;
            return Tensor::from_vec(v, t.shape(), &Device::Cpu);
        }
        if t.dtype() == DType::F32 && !t.device().is_cpu() {
            return super::round_op::round_on_device(t, self); // one kernel
        }
        match self {
            Precision::F32 => Ok(t.clone()),
            Precision::BF16 => t.to_dtype(DType::BF16)?.to_dtype(DType::F32),
            Precision::F16 => t.to_dtype(DType::F16)?.to_dtype(DType::F32),
        }
    }

    /// `R(x)` in place (in parallel for long slices; elementwise, so the thread count does not matter).
    pub fn round_slice(self, v: &mut [f32]) {
        if self == Precision::F32 {
            return;
        }
        if v.len() >= PAR_MIN {
            v.par_chunks_mut(CHUNK)
                .for_each(|c| self.round_slice_serial(c));
        } else {
            self.round_slice_serial(v);
        }
    }

    fn round_slice_serial(self, v: &mut [f32]) {
        match self {
            Precision::F32 => {}
            Precision::BF16 => {
                #[cfg(target_arch = "x86_64")]
                match super::cpu::active() {
                    super::cpu::Kernels::Avx512 => {
                        // SAFETY: the kernels in force were checked to run on this CPU.
                        unsafe { round_bf16_avx512(v) };
                        return;
                    }
                    super::cpu::Kernels::Avx2 => {
                        // SAFETY: the kernels in force were checked to run on this CPU.
                        unsafe { super::cpu::avx2::round_bf16_slice(v) };
                        return;
                    }
                    super::cpu::Kernels::Portable => {}
                }
                v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32())
            }
            Precision::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        }
    }

    #[inline(always)]
    pub fn round_scalar(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::BF16 => f32::from_bits(bf16_round_bits(x.to_bits())),
            Precision::F16 => f16::from_f32(x).to_f32(),
        }
    }
}

/// `half::bf16::from_f32(x).to_f32()` on the bit pattern, without the call: round to nearest even,
/// NaNs quieted.
#[inline(always)]
fn bf16_round_bits(b: u32) -> u32 {
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        (b | 0x0040_0000) & 0xFFFF_0000
    } else {
        b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000
    }
}

const CHUNK: usize = 1 << 13;
const PAR_MIN: usize = 1 << 16;

/// Run `f` on the tensor's elements as one contiguous f32 slice (no copy when the tensor is a contiguous
/// f32 CPU tensor; otherwise a converted contiguous copy).
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[a..b]));
        }
    }
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(f(&v))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_bf16_avx512(v: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = v.chunks_exact_mut(16);
    for c in &mut chunks {
        let x = _mm512_loadu_ps(c.as_ptr());
        _mm512_storeu_ps(c.as_mut_ptr(), round_bf16_x16(x));
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let m = ((1u32 << rest.len()) - 1) as u16;
        let x = _mm512_maskz_loadu_ps(m, rest.as_ptr());
        _mm512_mask_storeu_ps(rest.as_mut_ptr(), m, round_bf16_x16(x));
    }
}

/// Round 16 f32 values to bf16 and back, bit for bit as `half::bf16::from_f32(x).to_f32()`:
/// round-to-nearest-even on the bit pattern (no flushing of subnormals), NaNs quieted (`| 0x0040`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn round_bf16_x16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let bits = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb);
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let rounded = _mm512_and_si512(_mm512_add_epi32(bits, bias), hi);
    let quiet = _mm512_and_si512(_mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000)), hi);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_castsi512_ps(_mm512_mask_blend_epi32(nan, rounded, quiet))
}

#[cfg(feature = "cuda")]
/// The rounding mode the CUDA kernels take (`rnd(x, mode)`): 0 f32 (none), 1 bf16, 2 f16.
pub(crate) fn round_code(p: Precision) -> i32 {
    match p {
        Precision::F32 => 0,
        Precision::BF16 => 1,
        Precision::F16 => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector rounding equals half's on every class of input: ties both ways, carries into the
    /// exponent, overflow to infinity, subnormals, infinities and NaNs.
    #[test]
    fn bf16_rounding_matches_half_bit_for_bit() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFF80_8000),
            f32::from_bits(0x0000_8000),
            f32::from_bits(0x0001_8000),
            f32::from_bits(0x0000_0001),
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0x3FFF_FFFF),
            f32::from_bits(0x7F7F_FFFF),
            f32::from_bits(0x7F7F_8000),
            f32::from_bits(0x7F7F_7FFF),
        ];
        let mut s = 3u64;
        for _ in 0..100_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            xs.push(f32::from_bits((s >> 32) as u32));
        }
        let want: Vec<u32> = xs
            .iter()
            .map(|&x| bf16::from_f32(x).to_f32().to_bits())
            .collect();
        let scalar: Vec<u32> = xs
            .iter()
            .map(|&x| Precision::BF16.round_scalar(x).to_bits())
            .collect();
        assert_eq!(scalar, want);
        let mut got = xs.clone();
        Precision::BF16.round_slice(&mut got);
        let got: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want);
        let t = Tensor::from_vec(xs.clone(), xs.len(), &Device::Cpu).unwrap();
        let r: Vec<u32> = Precision::BF16
            .round(&t)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(r, want);
        let old: Vec<u32> = t
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(r, old);
    }
}
