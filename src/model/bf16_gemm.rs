//! bf16 × bf16 → f32 matrix product for the bf16 oracle: `vdpbf16ps` on CPUs with AVX-512-BF16, else
//! (AVX2+FMA, portable) the bf16 weights are widened to f32 in registers, per tile, and multiplied with
//! FMAs in `vdpbf16ps`'s order. The weights stay bf16 in memory on every path.
//!
//! In bf16 mode every Linear input and weight is a bf16 value, so the products are exact in f32 and only
//! the accumulation order matters. `vdpbf16ps` is the instruction oneDNN uses for torch's CPU bf16 GEMM;
//! each output element here accumulates its k pairs in order (`acc += a[2p+1]·b[2p+1]; acc += a[2p]·b[2p]`,
//! RNE), whatever the tile it falls in, so results do not depend on the matrix size or on how the columns
//! are split across threads or head chunks. Weights are packed once at load (half the memory of f32).
use super::cpu::Kernels;
use crate::error::Result;
use rayon::prelude::*;

/// Weights `[n, k]` (bf16 bits) packed as `[n/16][k/2][16]` pairs: lane j of pair p holds
/// `(w[j][2p], w[j][2p+1])`. `n` is padded to 16 and `k` to an even count with zeros.
/// Only built (`pack`, `pack_with`) when this CPU runs its kernel set.
pub struct PackedBf16 {
    pub n: usize,
    pub k: usize,
    k2: usize,
    kernels: Kernels,
    data: Vec<u32>,
}

fn to_bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

impl PackedBf16 {
    /// Pack `w` (`[n, k]` row-major f32 holding bf16 values).
    pub fn pack(w: &[f32], n: usize, k: usize, kernels: Kernels) -> Result<PackedBf16> {
        Self::pack_with(n, k, kernels, |j, i| to_bf16_bits(w[j * k + i]))
    }

    /// Pack from any source of `[n, k]` bf16 bit patterns (`at(row, col)`).
    /// An error when this CPU cannot run `kernels`.
    pub fn pack_with(
        n: usize,
        k: usize,
        kernels: Kernels,
        at: impl Fn(usize, usize) -> u16 + Sync,
    ) -> Result<PackedBf16> {
        let kernels = kernels.check()?;
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
        Ok(PackedBf16 {
            n,
            k,
            k2,
            kernels,
            data,
        })
    }

    /// The kernel set this matrix multiplies with.
    pub fn kernels(&self) -> Kernels {
        self.kernels
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
        self.matmul_t_rounded(x, m, false)
    }

    /// As `matmul_t`; with `round_bf16` every sum is rounded to bf16 (round-to-nearest-even, as
    /// `half::bf16::from_f32`) as it is stored, which saves a pass over the output.
    pub fn matmul_t_rounded(&self, x: &[f32], m: usize, round_bf16: bool) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if self.kernels.native_bf16() {
            return self.matmul_native(x, m, round_bf16);
        }
        self.matmul_widening(x, m, round_bf16)
    }

    /// `vdpbf16ps` (AVX-512-BF16): inputs packed as bf16 pairs.
    #[cfg(target_arch = "x86_64")]
    fn matmul_native(&self, x: &[f32], m: usize, round_bf16: bool) -> Vec<f32> {
        let (n, k, k2) = (self.n, self.k, self.k2);
        let mut a = vec![0u32; m * k2];
        let pack_row = |(r, dst): (usize, &mut [u32])| pack_pairs(&x[r * k..(r + 1) * k], dst);
        if m * k >= 1 << 16 {
            a.par_chunks_mut(k2).enumerate().for_each(pack_row);
        } else {
            a.chunks_mut(k2).enumerate().for_each(pack_row);
        }
        let mut out = output_buffer(m * n);
        let ops = Operands {
            a: a.as_ptr(),
            lda: k2,
            b: self.data.as_ptr(),
            kp: k2,
            a_per_k: 1,
            a_row_tiles: false,
            m,
            n,
            out: out.as_mut_ptr(),
        };
        // SAFETY: `a` is [m, k2], `data` is [ceil(n/16), k2, 16], `out` is [m, n], all alive for the
        // call; `pack_with` checked that this CPU runs `self.kernels`, and `native_bf16` that it has
        // AVX-512-BF16.
        unsafe { drive(ops, |t| super::cpu::avx512::bf16_dispatch(t, round_bf16)) };
        // SAFETY: `drive` stored every one of the m·n elements (masked stores cover each tile exactly).
        unsafe { out.set_len(m * n) };
        out
    }

    /// Widening kernels: inputs as f32 bf16 values (`[m, 2·k2]`, the last pair zero-padded), weights
    /// widened from the packed bf16 pairs in registers.
    fn matmul_widening(&self, x: &[f32], m: usize, round_bf16: bool) -> Vec<f32> {
        let (n, k, k2) = (self.n, self.k, self.k2);
        let lda = 2 * k2;
        let mut a = vec![0f32; m * lda];
        let pack_row = |(r, dst): (usize, &mut [f32])| {
            for (d, &v) in dst.iter_mut().zip(&x[r * k..(r + 1) * k]) {
                *d = super::precision::Precision::BF16.round_scalar(v);
            }
        };
        if m * k >= 1 << 16 {
            a.par_chunks_mut(lda).enumerate().for_each(pack_row);
        } else {
            a.chunks_mut(lda).enumerate().for_each(pack_row);
        }
        let mut out = output_buffer(m * n);
        let ops = Operands {
            a: a.as_ptr() as *const u32,
            lda,
            b: self.data.as_ptr(),
            kp: k2,
            a_per_k: 2,
            a_row_tiles: false,
            m,
            n,
            out: out.as_mut_ptr(),
        };
        // SAFETY: `a` is [m, 2·k2] f32, `data` is [ceil(n/16), k2, 16], `out` is [m, n], all alive for
        // the call; `pack_with` checked that this CPU runs `self.kernels`.
        unsafe {
            match self.kernels {
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx512 | Kernels::Avx2 => {
                    // AVX-512F without BF16: every AVX-512F CPU has AVX2 and FMA.
                    drive_blocked(ops, KBLOCK_BF16, |t| {
                        super::cpu::avx2::bf16_dispatch(t, round_bf16)
                    })
                }
                _ => drive_blocked(ops, KBLOCK_BF16, |t| {
                    super::cpu::portable::bf16_dispatch(t, round_bf16)
                }),
            }
        }
        // SAFETY: `drive` stored every one of the m·n elements.
        unsafe { out.set_len(m * n) };
        out
    }
}

/// One input row as bf16 pairs (`lo | hi << 16`, the last one zero-padded): the bf16 values in order,
/// rounded as `half::bf16::from_f32`.
#[cfg(target_arch = "x86_64")]
fn pack_pairs(row: &[f32], dst: &mut [u32]) {
    let k = row.len();
    let mut done = 0;
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected; the kernel writes dst[..k / 32 * 16] only.
        unsafe { pack_pairs_avx512(row, dst) };
        done = k / 32 * 16;
    }
    for (p, d) in dst.iter_mut().enumerate().skip(done) {
        let lo = to_bf16_bits(row[2 * p]) as u32;
        let hi = if 2 * p + 1 < k {
            to_bf16_bits(row[2 * p + 1]) as u32
        } else {
            0
        };
        *d = lo | (hi << 16);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_pairs_avx512(row: &[f32], dst: &mut [u32]) {
    let bits = |v: __m512| {
        let r = super::precision::round_bf16_x16(v);
        _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(r)))
    };
    for c in 0..row.len() / 32 {
        let lo = bits(_mm512_loadu_ps(row.as_ptr().add(c * 32)));
        let hi = bits(_mm512_loadu_ps(row.as_ptr().add(c * 32 + 16)));
        let d = dst.as_mut_ptr().add(c * 16) as *mut __m256i;
        _mm256_storeu_si256(d, lo);
        _mm256_storeu_si256(d.add(1), hi);
    }
}

/// `x` (`[m, k]` row-major f32) packed by row tiles of `MR` rows: `[ceil(m/MR)][k][MR]`, rows past `m`
/// zero. A tile's inputs for one k step are then `MR` consecutive values (one pointer, fixed offsets).
pub(crate) fn pack_row_tiles(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut a = vec![0f32; m.div_ceil(MR) * k * MR];
    let pack = |(ti, dst): (usize, &mut [f32])| {
        for r in 0..MR.min(m - ti * MR) {
            let row = &x[(ti * MR + r) * k..(ti * MR + r + 1) * k];
            for (p, &v) in row.iter().enumerate() {
                dst[p * MR + r] = v;
            }
        }
    };
    if m * k >= 1 << 16 {
        a.par_chunks_mut(k * MR).enumerate().for_each(pack);
    } else {
        a.chunks_mut(k * MR).enumerate().for_each(pack);
    }
    a
}

/// An output buffer of `len` f32 with capacity only (every element is stored by the kernel before it
/// is read): no zeroing pass.
pub(crate) fn output_buffer(len: usize) -> Vec<f32> {
    Vec::with_capacity(len)
}

/// The operands of one packed GEMM: `a` `[m, lda]` (4-byte elements: bf16 pairs or f32), `b` packed
/// `[ceil(n/16)][kp][16]`, `out` `[m, n]` f32.
#[derive(Clone, Copy)]
pub(crate) struct Operands {
    pub a: *const u32,
    pub lda: usize,
    pub b: *const u32,
    pub kp: usize,
    /// Elements of `a` per k step (1; 2 for f32 pairs against packed bf16 pairs).
    pub a_per_k: usize,
    /// `a` is packed by row tiles (`pack_row_tiles`: `[ceil(m/MR)][kp][MR]`, a_per_k 1) rather than
    /// `[m, lda]`; the kernel must be one that reads that layout (`Tile::a`'s k stride is then `MR`).
    pub a_row_tiles: bool,
    pub m: usize,
    pub n: usize,
    pub out: *mut f32,
}
// SAFETY: only used to hand disjoint output regions to rayon tasks (see `drive`).
unsafe impl Send for Operands {}
unsafe impl Sync for Operands {}

/// One micro-tile: `rows ≤ MR` rows × `ncols ≤ NR` columns over the k-steps `p0 .. p0+kc` (pointers
/// already offset to `p0`). `load_c`: continue the sums already in `out` (a later k block), else start
/// from zero; `last`: this is the last k block, so the store is final.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub a: *const u32,
    pub lda: usize,
    pub b: *const u32,
    pub ldb: usize,
    pub kc: usize,
    pub out: *mut f32,
    pub ldo: usize,
    pub rows: usize,
    pub ncols: usize,
    pub load_c: bool,
    pub last: bool,
}

pub(crate) const MR: usize = 6;
pub(crate) const NR: usize = 64; // 4 blocks of 16 columns

// AVX-512: K is not blocked, every tile runs the whole k range (measured on Zen 4, blocks sized for L1
// gained nothing over whole-K tiles, the weight panel streams well from L2). The AVX2 and portable
// kernels (16 columns per register tile, so four passes over the row tile's inputs per panel) run k
// blocks (`drive_blocked`): each element still accumulates in order on one accumulator, reloading its
// exact f32 partial sum.

/// k blocks (in steps) of the widening kernels. f32: a 16-column slice of a block is 32 KiB, the
/// 64-column panel slice 128 KiB (L2); measured on Zen 3 (`examples/gemm_probe`, the head and MLP
/// shapes), 512 and 1,024 steps ran at 130–150 GFLOP/s on 2 cores, 256 at 110–135, 128 at 95–135.
/// bf16: 8 KiB of pairs per slice (L1), 32 KiB per panel slice.
pub(crate) const KBLOCK_F32: usize = 512;
pub(crate) const KBLOCK_BF16: usize = 128;

/// Rows per task when there are few column panels (small `n`): the row range is split too, so both
/// threads work. A task always owns whole output elements (K is never split across threads).
const ROW_GROUP: usize = 8 * MR;

/// Column panels of `NR` (and, for small `n`, groups of rows) run in parallel; inside a task, k blocks
/// then row tiles.
///
/// # Safety
/// The operands must describe valid, live buffers of the stated shapes, and `kernel` must be safe to
/// call on this CPU.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn drive(o: Operands, kernel: impl Fn(&Tile) + Sync) {
    drive_blocked(o, usize::MAX, kernel)
}

/// As `drive`, with the k range cut into blocks of `kblock` steps (`kblock` ≥ 1): a task runs every
/// row tile over one k block before the next, so the block's slice of the weight panel stays in cache.
/// A later block continues each output's sum from the exact f32 partial stored by the previous one
/// (`load_c`), so every element is still one in-order chain: the same bits as one whole-k pass.
///
/// # Safety
/// As `drive`.
pub(crate) unsafe fn drive_blocked(o: Operands, kblock: usize, kernel: impl Fn(&Tile) + Sync) {
    let (m, n, kp) = (o.m, o.n, o.kp);
    if m == 0 || n == 0 {
        return;
    }
    let kblock = kblock.max(1);
    let panels = n.div_ceil(NR);
    let (groups, rows_per) = if panels >= 16 {
        (1, m)
    } else {
        (m.div_ceil(ROW_GROUP), ROW_GROUP)
    };
    (0..panels * groups).into_par_iter().for_each(|task| {
        // capture the whole (Sync) struct, not its raw-pointer fields one by one
        #[allow(clippy::redundant_locals)]
        let o = o;
        let (pi, g) = (task / groups, task % groups);
        let col0 = pi * NR;
        let ncols = NR.min(n - col0);
        let bp = o.b.add((col0 / 16) * kp * 16);
        let (row_lo, row_hi) = (g * rows_per, m.min((g + 1) * rows_per));
        let mut p0 = 0;
        loop {
            let kc = kblock.min(kp - p0);
            let mut r0 = row_lo;
            while r0 < row_hi {
                let rows = MR.min(row_hi - r0);
                let (a, lda) = if o.a_row_tiles {
                    (o.a.add((r0 / MR) * kp * MR + p0 * MR), MR)
                } else {
                    (o.a.add(r0 * o.lda + p0 * o.a_per_k), o.lda)
                };
                kernel(&Tile {
                    a,
                    lda,
                    b: bp.add(p0 * 16),
                    ldb: kp * 16,
                    kc,
                    out: o.out.add(r0 * n + col0),
                    ldo: n,
                    rows,
                    ncols,
                    load_c: p0 > 0,
                    last: p0 + kc >= kp,
                });
                r0 += rows;
            }
            p0 += kc;
            if p0 >= kp {
                break;
            }
        }
    });
}

/// Calls `$f::<R, NB>(tile, extra..)` for the tile's row count and 16-column block count.
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_tile {
    ($f:ident, $t:expr $(, $x:expr)*) => {{
        macro_rules! nb {
            ($r:literal) => {
                match $t.ncols.div_ceil(16) {
                    4 => $f::<$r, 4>($t $(, $x)*),
                    3 => $f::<$r, 3>($t $(, $x)*),
                    2 => $f::<$r, 2>($t $(, $x)*),
                    _ => $f::<$r, 1>($t $(, $x)*),
                }
            };
        }
        match $t.rows {
            6 => nb!(6),
            5 => nb!(5),
            4 => nb!(4),
            3 => nb!(3),
            2 => nb!(2),
            _ => nb!(1),
        }
    }};
}
#[cfg(target_arch = "x86_64")]
pub(crate) use dispatch_tile;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Store mask for 16-column block `j` of a tile with `ncols` valid columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn col_mask(ncols: usize, j: usize) -> u16 {
    let left = ncols.saturating_sub(j * 16);
    if left >= 16 {
        0xFFFF
    } else {
        ((1u32 << left) - 1) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same results for any matrix size or split: full tiles, edge tiles and a single row agree element
    /// for element, and every sum equals an f64 reference to f32 accuracy.
    #[test]
    fn tiles_agree_and_match_a_reference() {
        for kernels in Kernels::ALL {
            if !kernels.supported() {
                eprintln!("skipped: bf16 GEMM {kernels}: this CPU cannot run it");
                continue;
            }
            check(kernels);
            eprintln!("bf16 GEMM {}: checked", kernels.describe());
        }
        if !Kernels::Avx512.native_bf16() {
            eprintln!("skipped: bf16 GEMM with vdpbf16ps: this CPU has no AVX-512-BF16");
        }
    }

    fn check(kernels: Kernels) {
        let (m, k, n) = (9, 131, 150);
        let mut s = 7u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            half::bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_f32()
        };
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let p = PackedBf16::pack(&w, n, k, kernels).unwrap();
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
        let half = PackedBf16::pack(&w[..70 * k], 70, k, kernels)
            .unwrap()
            .matmul_t(&x, m);
        for r in 0..m {
            assert_eq!(
                half[r * 70..(r + 1) * 70],
                full[r * n..r * n + 70],
                "column split changes row {r}"
            );
        }
    }
}
