//! f32 × f32 → f32 matrix product for the f32 oracle's Linear layers, on the kernel set it was packed
//! for (`cpu`: AVX-512F, AVX2+FMA or portable — the same bits on each).
//!
//! Weights are packed once at load as `[n/16][k][16]` (the same memory as the `[n, k]` tensor they
//! replace, padded to 16 rows), so a 64-column tile reads four contiguous streams. Each output element
//! accumulates `acc = fma(x[p], w[p], acc)` over `p` in order on one f32 accumulator, starting from 0:
//! the result does not depend on the matrix size, the tile it falls in or the thread count.
#[cfg(target_arch = "x86_64")]
use super::bf16_gemm::drive;
use super::bf16_gemm::{drive_blocked, pack_row_tiles, Operands, KBLOCK_F32};
use super::cpu::Kernels;
use crate::error::Result;
use rayon::prelude::*;

/// Weights packed for one kernel set; only built (`pack`) when this CPU runs that set.
pub struct PackedF32 {
    pub n: usize,
    pub k: usize,
    kernels: Kernels,
    data: Vec<f32>,
}

impl PackedF32 {
    /// Pack `w` (`[n, k]` row-major) for `kernels`; an error when this CPU cannot run them.
    pub fn pack(w: &[f32], n: usize, k: usize, kernels: Kernels) -> Result<PackedF32> {
        let kernels = kernels.check()?;
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
        Ok(PackedF32 {
            n,
            k,
            kernels,
            data,
        })
    }

    /// The kernel set this matrix multiplies with.
    pub fn kernels(&self) -> Kernels {
        self.kernels
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
        // AVX2 and AVX-512: the inputs packed by row tiles (the tile reads one k step's six values from
        // one pointer; with six row pointers the AVX2 loop was bound by address arithmetic).
        let tiled = matches!(self.kernels, Kernels::Avx2 | Kernels::Avx512)
            .then(|| pack_row_tiles(x, m, k));
        let ops = Operands {
            a: tiled.as_deref().unwrap_or(x).as_ptr() as *const u32,
            lda: k,
            b: self.data.as_ptr() as *const u32,
            kp: k,
            a_per_k: 1,
            a_row_tiles: tiled.is_some(),
            m,
            n,
            out: out.as_mut_ptr(),
        };
        // SAFETY: `x` is [m, k] (for AVX2 / AVX-512 `tiled`, its row-tile packing, read by the row-tile kernel),
        // `data` is [ceil(n/16), k, 16], `out` is [m, n], all alive for the call; `pack` checked that
        // this CPU runs `self.kernels`.
        unsafe {
            match self.kernels {
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx512 => drive(ops, |t| super::cpu::avx512::f32_row_tiles_dispatch(t)),
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx2 => drive_blocked(ops, KBLOCK_F32, |t| {
                    super::cpu::avx2::f32_row_tiles_dispatch(t)
                }),
                _ => drive_blocked(ops, KBLOCK_F32, |t| super::cpu::portable::f32_dispatch(t)),
            }
        }
        // SAFETY: `drive` stored every one of the m·n elements.
        unsafe { out.set_len(m * n) };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On every kernel set this CPU runs: any matrix size or split gives the same bits (each output the
    /// sequential FMA chain), and sums match an f64 reference. A set the CPU lacks is reported skipped.
    #[test]
    fn tiles_agree_and_match_a_reference() {
        for kernels in Kernels::ALL {
            if !kernels.supported() {
                eprintln!("skipped: f32 GEMM {kernels}: this CPU cannot run it");
                continue;
            }
            check(kernels);
            eprintln!("f32 GEMM {kernels}: checked");
        }
    }

    fn check(kernels: Kernels) {
        let (m, k, n) = (9, 1331, 150);
        let mut s = 11u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let p = PackedF32::pack(&w, n, k, kernels).unwrap();
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
        let part = PackedF32::pack(&w[..70 * k], 70, k, kernels)
            .unwrap()
            .matmul_t(&x, m);
        for r in 0..m {
            assert_eq!(
                part[r * 70..(r + 1) * 70],
                full[r * n..r * n + 70],
                "column split changes row {r}"
            );
        }
    }
}
