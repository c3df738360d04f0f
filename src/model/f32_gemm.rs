//! f32 × f32 → f32 matrix product with AVX-512F FMA, for the f32 oracle's Linear layers.
//!
//! Weights are packed once at load as `[n/16][k][16]` (the same memory as the `[n, k]` tensor they
//! replace, padded to 16 rows), so a 64-column tile reads four contiguous streams. Each output element
//! accumulates `acc = fma(x[p], w[p], acc)` over `p` in order on one f32 accumulator, starting from 0:
//! the result does not depend on the matrix size, the tile it falls in or the thread count.
use super::bf16_gemm::{dispatch_tile, drive, Operands, Tile};
use rayon::prelude::*;

pub struct PackedF32 {
    pub n: usize,
    pub k: usize,
    data: Vec<f32>,
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedF32 {
    /// Pack `w` (`[n, k]` row-major).
    pub fn pack(w: &[f32], n: usize, k: usize) -> PackedF32 {
        assert_eq!(w.len(), n * k);
        let nb = n.div_ceil(16);
        let mut data = vec![0f32; nb * k * 16];
        data.par_chunks_mut(k * 16)
            .enumerate()
            .for_each(|(b, block)| {
                for lane in 0..16 {
                    let j = b * 16 + lane;
                    if j >= n {
                        break;
                    }
                    for (p, &x) in w[j * k..(j + 1) * k].iter().enumerate() {
                        block[p * 16 + lane] = x;
                    }
                }
            });
        PackedF32 { n, k, data }
    }

    /// Row `j` of W (a tied head doubles as the embedding table).
    pub fn row(&self, j: usize) -> Vec<f32> {
        let (b, lane) = (j / 16, j % 16);
        let block = &self.data[b * self.k * 16..(b + 1) * self.k * 16];
        (0..self.k).map(|p| block[p * 16 + lane]).collect()
    }

    /// `x · Wᵀ`: `x` is `[m, k]` row-major; returns `[m, n]`.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k);
        let mut out = super::bf16_gemm::output_buffer(m * n);
        let ops = Operands {
            a: x.as_ptr() as *const u32,
            lda: k,
            b: self.data.as_ptr() as *const u32,
            kp: k,
            m,
            n,
            out: out.as_mut_ptr(),
        };
        // SAFETY: `x` is [m, k], `data` is [ceil(n/16), k, 16], `out` is [m, n], all alive for the call;
        // the CPU features were checked by the caller (`available`).
        unsafe { drive(ops, |t| f32_dispatch(t)) };
        // SAFETY: `drive` stored every one of the m·n elements.
        unsafe { out.set_len(m * n) };
        out
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
unsafe fn f32_dispatch(t: &Tile) {
    dispatch_tile!(f32_tile, t)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn f32_dispatch(_: &Tile) {}

/// `R` rows × `NB` blocks of 16 columns, all accumulators in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f32_tile<const R: usize, const NB: usize>(t: &Tile) {
    use super::bf16_gemm::col_mask;
    let a = t.a as *const f32;
    let b = t.b as *const f32;
    let masks: [u16; NB] = std::array::from_fn(|j| col_mask(t.ncols, j));
    let mut c = [[_mm512_setzero_ps(); NB]; R];
    if t.load_c {
        for (r, cr) in c.iter_mut().enumerate() {
            for (j, v) in cr.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(masks[j], t.out.add(r * t.ldo + j * 16));
            }
        }
    }
    for p in 0..t.kc {
        let mut bv = [_mm512_setzero_ps(); NB];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(b.add(j * t.ldb + p * 16));
        }
        for (r, cr) in c.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * t.lda + p));
            for (v, w) in cr.iter_mut().zip(bv.iter()) {
                *v = _mm512_fmadd_ps(av, *w, *v);
            }
        }
    }
    for (r, cr) in c.iter().enumerate() {
        for (j, v) in cr.iter().enumerate() {
            _mm512_mask_storeu_ps(t.out.add(r * t.ldo + j * 16), masks[j], *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any matrix size or split gives the same bits, and sums match an f64 reference.
    #[test]
    fn tiles_agree_and_match_a_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let (m, k, n) = (9, 1331, 150);
        let mut s = 11u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let p = PackedF32::pack(&w, n, k);
        assert_eq!(p.row(37), w[37 * k..38 * k].to_vec());
        let full = p.matmul_t(&x, m);
        for r in 0..m {
            let one = p.matmul_t(&x[r * k..(r + 1) * k], 1);
            assert_eq!(
                one,
                full[r * n..(r + 1) * n].to_vec(),
                "row {r} alone differs"
            );
            for c in 0..n {
                let want: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                    .sum();
                assert!((full[r * n + c] as f64 - want).abs() < 1e-4, "({r},{c})");
                // the sequential fma chain, exactly
                let chain = (0..k).fold(0f32, |acc, i| x[r * k + i].mul_add(w[c * k + i], acc));
                assert_eq!(
                    full[r * n + c].to_bits(),
                    chain.to_bits(),
                    "({r},{c}) order"
                );
            }
        }
        let part = PackedF32::pack(&w[..70 * k], 70, k).matmul_t(&x, m);
        for r in 0..m {
            assert_eq!(
                part[r * 70..(r + 1) * 70],
                full[r * n..r * n + 70],
                "column split changes row {r}"
            );
        }
    }
}
