//! bf16 × bf16 → f32 matrix product on CPUs with AVX-512-BF16 (`vdpbf16ps`), for the bf16 oracle.
//!
//! In bf16 mode every Linear input and weight is a bf16 value, so the products are exact in f32 and only
//! the accumulation order matters. `vdpbf16ps` is the instruction oneDNN uses for torch's CPU bf16 GEMM;
//! each output element here accumulates its k pairs in order (`acc += a[2p+1]·b[2p+1]; acc += a[2p]·b[2p]`,
//! RNE), whatever the tile it falls in, so results do not depend on the matrix size or on how the columns
//! are split across threads or head chunks. Weights are packed once at load (half the memory of f32).
use rayon::prelude::*;

/// Weights `[n, k]` (bf16 bits) packed as `[n/16][k/2][16]` pairs: lane j of pair p holds
/// `(w[j][2p], w[j][2p+1])`. `n` is padded to 16 and `k` to an even count with zeros.
pub struct PackedBf16 {
    pub n: usize,
    pub k: usize,
    k2: usize,
    data: Vec<u32>,
}

/// Whether this CPU runs the kernel (checked once per call site; cheap).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn to_bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

impl PackedBf16 {
    /// Pack `w` (`[n, k]` row-major f32 holding bf16 values).
    pub fn pack(w: &[f32], n: usize, k: usize) -> PackedBf16 {
        Self::pack_with(n, k, |j, i| to_bf16_bits(w[j * k + i]))
    }

    /// Pack from any source of `[n, k]` bf16 bit patterns (`at(row, col)`).
    pub fn pack_with(n: usize, k: usize, at: impl Fn(usize, usize) -> u16 + Sync) -> PackedBf16 {
        let k2 = k.div_ceil(2);
        let nb = n.div_ceil(16);
        let mut data = vec![0u32; nb * k2 * 16];
        data.par_chunks_mut(k2 * 16)
            .enumerate()
            .for_each(|(b, block)| {
                for lane in 0..16 {
                    let j = b * 16 + lane;
                    if j >= n {
                        break;
                    }
                    for p in 0..k2 {
                        let lo = at(j, 2 * p) as u32;
                        let hi = if 2 * p + 1 < k {
                            at(j, 2 * p + 1) as u32
                        } else {
                            0
                        };
                        block[p * 16 + lane] = lo | (hi << 16);
                    }
                }
            });
        PackedBf16 { n, k, k2, data }
    }

    /// Row `j` of W as f32 (exact): a tied head doubles as the embedding table.
    pub fn row(&self, j: usize) -> Vec<f32> {
        let (b, lane) = (j / 16, j % 16);
        let mut out = Vec::with_capacity(self.k);
        for p in 0..self.k2 {
            let pair = self.data[(b * self.k2 + p) * 16 + lane];
            out.push(half::bf16::from_bits(pair as u16).to_f32());
            if out.len() < self.k {
                out.push(half::bf16::from_bits((pair >> 16) as u16).to_f32());
            }
        }
        out
    }

    /// `x · Wᵀ`: `x` is `[m, k]` row-major f32 holding bf16 values; returns `[m, n]` f32 (unrounded sums).
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k, k2) = (self.n, self.k, self.k2);
        let mut a = vec![0u32; m * k2];
        for r in 0..m {
            let row = &x[r * k..(r + 1) * k];
            for p in 0..k2 {
                let lo = to_bf16_bits(row[2 * p]) as u32;
                let hi = if 2 * p + 1 < k {
                    to_bf16_bits(row[2 * p + 1]) as u32
                } else {
                    0
                };
                a[r * k2 + p] = lo | (hi << 16);
            }
        }
        let mut out = vec![0f32; m * n];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let panels = n.div_ceil(PANEL);
        (0..panels).into_par_iter().for_each(|pi| {
            let col0 = pi * PANEL;
            let ncols = PANEL.min(n - col0);
            let b = &self.data[(col0 / 16) * k2 * 16..];
            let mut r0 = 0;
            while r0 < m {
                let rows = MR.min(m - r0);
                let o = out_ptr;
                // SAFETY: each task writes only columns col0..col0+ncols of rows r0..r0+rows, disjoint
                // from every other task; `out` outlives the parallel loop; the CPU features were checked
                // by the caller (`available`).
                unsafe {
                    if rows == MR && ncols == PANEL {
                        tile_full(
                            a.as_ptr().add(r0 * k2),
                            k2,
                            b.as_ptr(),
                            o.0.add(r0 * n + col0),
                            n,
                        );
                    } else {
                        tile_edge(&a[r0 * k2..], k2, rows, b, ncols, o.0.add(r0 * n + col0), n);
                    }
                }
                r0 += rows;
            }
        });
        out
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output regions to rayon tasks (see `matmul_t`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

const MR: usize = 6;
const PANEL: usize = 64; // 4 blocks of 16 columns

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// MR rows × 64 columns, all in registers (24 accumulators + 4 B vectors + 1 broadcast of 32 zmm).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_full(a: *const u32, lda: usize, b: *const u32, out: *mut f32, ldo: usize) {
    let k2 = lda;
    let bh = |v: __m512i| -> __m512bh { std::mem::transmute(v) };
    let z = _mm512_setzero_ps();
    let mut c = [[z; 4]; MR];
    for p in 0..k2 {
        let b0 = bh(_mm512_loadu_si512(b.add(p * 16) as *const _));
        let b1 = bh(_mm512_loadu_si512(b.add((k2 + p) * 16) as *const _));
        let b2 = bh(_mm512_loadu_si512(b.add((2 * k2 + p) * 16) as *const _));
        let b3 = bh(_mm512_loadu_si512(b.add((3 * k2 + p) * 16) as *const _));
        for (r, cr) in c.iter_mut().enumerate() {
            let av = bh(_mm512_set1_epi32(*a.add(r * lda + p) as i32));
            cr[0] = _mm512_dpbf16_ps(cr[0], av, b0);
            cr[1] = _mm512_dpbf16_ps(cr[1], av, b1);
            cr[2] = _mm512_dpbf16_ps(cr[2], av, b2);
            cr[3] = _mm512_dpbf16_ps(cr[3], av, b3);
        }
    }
    for (r, cr) in c.iter().enumerate() {
        for (j, v) in cr.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * ldo + j * 16), *v);
        }
    }
}

/// Fewer rows or columns than a full tile: same per-element arithmetic, partial stores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_edge(
    a: &[u32],
    lda: usize,
    rows: usize,
    b: &[u32],
    ncols: usize,
    out: *mut f32,
    ldo: usize,
) {
    let k2 = lda;
    let blocks = ncols.div_ceil(16);
    for r in 0..rows {
        for blk in 0..blocks {
            let mut acc = _mm512_setzero_ps();
            for p in 0..k2 {
                let bv: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                    b.as_ptr().add((blk * k2 + p) * 16) as *const _,
                ));
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(a[r * lda + p] as i32));
                acc = _mm512_dpbf16_ps(acc, av, bv);
            }
            let mut tmp = [0f32; 16];
            _mm512_storeu_ps(tmp.as_mut_ptr(), acc);
            let take = 16.min(ncols - blk * 16);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(r * ldo + blk * 16), take);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_full(_: *const u32, _: usize, _: *const u32, _: *mut f32, _: usize) {}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_edge(_: &[u32], _: usize, _: usize, _: &[u32], _: usize, _: *mut f32, _: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same results for any matrix size or split: full tiles, edge tiles and a single row agree element
    /// for element, and every sum equals an f64 reference to f32 accuracy.
    #[test]
    fn tiles_agree_and_match_a_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512-BF16");
            return;
        }
        let (m, k, n) = (9, 131, 150);
        let mut s = 7u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            half::bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_f32()
        };
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let p = PackedBf16::pack(&w, n, k);
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
            }
        }
        let half = PackedBf16::pack(&w[..70 * k], 70, k).matmul_t(&x, m);
        for r in 0..m {
            assert_eq!(
                half[r * 70..(r + 1) * 70],
                full[r * n..r * n + 70],
                "column split changes row {r}"
            );
        }
    }
}
