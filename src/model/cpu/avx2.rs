//! AVX2 + FMA kernels (256-bit): the f32 GEMM tile, the bf16 GEMM tile (bf16 weights widened to f32 in
//! registers, per tile), bf16 rounding, `expf`, and the delta rule's row updates and small matmuls.
//! Every kernel keeps the exact sequence of f32 operations of its scalar definition (see `cpu`).
use crate::model::bf16_gemm::Tile;
use std::arch::x86_64::*;

/// Calls `$f::<R>(tile, extra..)` for the tile's row count (≤ 6).
macro_rules! by_rows {
    ($f:ident, $t:expr $(, $x:expr)*) => {
        match $t.rows {
            6 => $f::<6>($t $(, $x)*),
            5 => $f::<5>($t $(, $x)*),
            4 => $f::<4>($t $(, $x)*),
            3 => $f::<3>($t $(, $x)*),
            2 => $f::<2>($t $(, $x)*),
            _ => $f::<1>($t $(, $x)*),
        }
    };
}

/// # Safety
/// The tile must describe live buffers (see `bf16_gemm::drive`) and the CPU must have AVX2 and FMA; `a`
/// holds f32 bf16 values in pairs (`[rows, lda]`, `lda ≥ 2·kc`) and `b`
/// packed bf16 pairs (`bf16_gemm::PackedBf16`).
pub(crate) unsafe fn bf16_dispatch(t: &Tile, round: bool) {
    by_rows!(bf16_tile, t, round)
}

/// Store (or, with `round`, round to bf16 and store) one 16-column block of `R` rows; a partial block
/// (`cols < 16`) goes through a buffer so that nothing past the tile is written.
#[inline(always)]
unsafe fn store_block<const R: usize>(t: &Tile, j: usize, c: &[[__m256; 2]; R], round: bool) {
    let cols = (t.ncols - j * 16).min(16);
    for (r, cr) in c.iter().enumerate() {
        let (v0, v1) = if round {
            (round_bf16_x8(cr[0]), round_bf16_x8(cr[1]))
        } else {
            (cr[0], cr[1])
        };
        let dst = t.out.add(r * t.ldo + j * 16);
        if cols == 16 {
            _mm256_storeu_ps(dst, v0);
            _mm256_storeu_ps(dst.add(8), v1);
        } else {
            let mut buf = [0f32; 16];
            _mm256_storeu_ps(buf.as_mut_ptr(), v0);
            _mm256_storeu_ps(buf.as_mut_ptr().add(8), v1);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, cols);
        }
    }
}

/// The partial sums already in `out` (a later k block), or zeros.
#[inline(always)]
unsafe fn load_block<const R: usize>(t: &Tile, j: usize) -> [[__m256; 2]; R] {
    let mut c = [[_mm256_setzero_ps(); 2]; R];
    if t.load_c {
        let cols = (t.ncols - j * 16).min(16);
        for (r, cr) in c.iter_mut().enumerate() {
            let mut buf = [0f32; 16];
            std::ptr::copy_nonoverlapping(t.out.add(r * t.ldo + j * 16), buf.as_mut_ptr(), cols);
            cr[0] = _mm256_loadu_ps(buf.as_ptr());
            cr[1] = _mm256_loadu_ps(buf.as_ptr().add(8));
        }
    }
    c
}

/// # Safety
/// The tile must describe live buffers (see `bf16_gemm::drive`: `b` packed f32 `[.., kc, 16]` blocks
/// `ldb` apart) with `a` packed by row tiles (`bf16_gemm::pack_row_tiles`: a k step's `MR` values
/// consecutive, `t.lda == MR`), and the CPU must have AVX2 and FMA.
pub(crate) unsafe fn f32_row_tiles_dispatch(t: &Tile) {
    by_rows!(f32_tile_row_tiles, t)
}

/// `R` rows × 16 columns per block (12 accumulators at R = 6), the blocks of the tile one after the
/// other, on inputs packed by row tiles (row `r`'s value at step `p` is `a[p·MR + r]`: one input pointer
/// and one weight pointer advance per step). Each output: `acc = fma(a[p], b[p], acc)` for p in order.
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_tile_row_tiles<const R: usize>(t: &Tile) {
    use crate::model::bf16_gemm::MR;
    debug_assert_eq!(t.lda, MR);
    for j in 0..t.ncols.div_ceil(16) {
        let mut c = load_block::<R>(t, j);
        let mut a = t.a as *const f32;
        let mut b = (t.b as *const f32).add(j * t.ldb);
        for _ in 0..t.kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for (r, cr) in c.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r));
                cr[0] = _mm256_fmadd_ps(av, b0, cr[0]);
                cr[1] = _mm256_fmadd_ps(av, b1, cr[1]);
            }
            a = a.add(MR);
            b = b.add(16);
        }
        store_block::<R>(t, j, &c, false);
    }
}

/// bf16 weights widened in registers: per k pair, `acc = fma(a[2p+1], w[2p+1], acc)` then
/// `acc = fma(a[2p], w[2p], acc)` — `vdpbf16ps`'s order; the products of two bf16 values are exact in
/// f32, so each step rounds once, as that instruction does.
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_tile<const R: usize>(t: &Tile, round: bool) {
    let a = t.a as *const f32;
    let hi_mask = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    for j in 0..t.ncols.div_ceil(16) {
        let bj = t.b.add(j * t.ldb);
        let mut c = load_block::<R>(t, j);
        for p in 0..t.kc {
            let w0 = _mm256_loadu_si256(bj.add(p * 16) as *const __m256i);
            let w1 = _mm256_loadu_si256(bj.add(p * 16 + 8) as *const __m256i);
            let h0 = _mm256_castsi256_ps(_mm256_and_si256(w0, hi_mask));
            let h1 = _mm256_castsi256_ps(_mm256_and_si256(w1, hi_mask));
            for (r, cr) in c.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r * t.lda + 2 * p + 1));
                cr[0] = _mm256_fmadd_ps(av, h0, cr[0]);
                cr[1] = _mm256_fmadd_ps(av, h1, cr[1]);
            }
            let l0 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w0));
            let l1 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w1));
            for (r, cr) in c.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r * t.lda + 2 * p));
                cr[0] = _mm256_fmadd_ps(av, l0, cr[0]);
                cr[1] = _mm256_fmadd_ps(av, l1, cr[1]);
            }
        }
        store_block::<R>(t, j, &c, round && t.last);
    }
}

/// Round 8 f32 values to bf16 and back, bit for bit as `half::bf16::from_f32(x).to_f32()`.
#[inline(always)]
pub(crate) unsafe fn round_bf16_x8(v: __m256) -> __m256 {
    let bits = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb);
    let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let rounded = _mm256_and_si256(_mm256_add_epi32(bits, bias), hi);
    let quiet = _mm256_and_si256(_mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000)), hi);
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    _mm256_castsi256_ps(_mm256_blendv_epi8(rounded, quiet, nan))
}

/// `R(x)` to bf16 in place.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn round_bf16_slice(v: &mut [f32]) {
    let mut chunks = v.chunks_exact_mut(8);
    for c in &mut chunks {
        let x = _mm256_loadu_ps(c.as_ptr());
        _mm256_storeu_ps(c.as_mut_ptr(), round_bf16_x8(x));
    }
    for x in chunks.into_remainder() {
        *x = half::bf16::from_f32(*x).to_f32();
    }
}

/// `v[i] = v[i].exp()`, bit for bit as glibc's `expf` (the algorithm and constants of `expf`: in double
/// precision, four lanes per register); lanes off its fast path (|x| ≥ 88, infinities, NaNs) and the
/// tail of fewer than 8 values go to `f32::exp` itself.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_in_place(v: &mut [f32]) {
    use crate::model::expf::{C0, C1, C2, INV_LN2_N, SHIFT, TABLE};
    let c = |b: u64| _mm256_set1_pd(f64::from_bits(b));
    let (inv, c0, c1, c2, shift, one) = (
        c(INV_LN2_N),
        c(C0),
        c(C1),
        c(C2),
        c(SHIFT),
        _mm256_set1_pd(1.0),
    );
    let table = TABLE.as_ptr() as *const i64;
    let four = |x4: __m128| -> __m128 {
        let xd = _mm256_cvtps_pd(x4);
        let kd = _mm256_fmadd_pd(inv, xd, shift);
        let ki = _mm256_castpd_si256(kd);
        let kd = _mm256_sub_pd(kd, shift);
        let r = _mm256_fmsub_pd(inv, xd, kd);
        let idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
        let t = _mm256_i64gather_epi64::<8>(table, idx);
        let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
        let z = _mm256_fmadd_pd(r, c0, c1);
        let r2 = _mm256_mul_pd(r, r);
        let y = _mm256_fmadd_pd(r, c2, one);
        let y = _mm256_fmadd_pd(z, r2, y);
        let y = _mm256_mul_pd(y, s);
        _mm256_cvtpd_ps(y)
    };
    let mut chunks = v.chunks_exact_mut(8);
    for ch in &mut chunks {
        let p = ch.as_mut_ptr();
        let xf = _mm256_loadu_ps(p);
        let bits = _mm256_castps_si256(xf);
        // lanes off the fast path: abstop = (bits >> 20) & 0x7ff > 0x42a
        let abstop = _mm256_and_si256(_mm256_srli_epi32::<20>(bits), _mm256_set1_epi32(0x7ff));
        let slow = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(
            abstop,
            _mm256_set1_epi32(0x42a),
        )));
        let lo = four(_mm256_castps256_ps128(xf));
        let hi = four(_mm256_extractf128_ps::<1>(xf));
        let x: [f32; 8] = std::mem::transmute(xf);
        _mm256_storeu_ps(p, _mm256_set_m128(hi, lo));
        if slow != 0 {
            for (j, &xj) in x.iter().enumerate() {
                if slow & (1 << j) != 0 {
                    *p.add(j) = xj.exp();
                }
            }
        }
    }
    for x in chunks.into_remainder() {
        *x = x.exp();
    }
}

/// `x ← x − c[j]·rows[j]` (`SUB`, a multiply then a subtract, zero `c[j]` skipped) or
/// `x ← fma(c[j], rows[j], x)`, for `j = 0, 1, …` in order; `rows[j]` starts at `j * ld`. Up to 96
/// columns stay in registers; columns past the last multiple of 8 run the same operations one by one.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `rows` must hold `(c.len() − 1)·ld + x.len()` values.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn rows_update<const SUB: bool>(
    x: &mut [f32],
    rows: &[f32],
    ld: usize,
    c: &[f32],
) {
    const NV: usize = 12;
    let w = x.len();
    let full = w / 8 * 8;
    let mut c0 = 0;
    while c0 < full {
        let nv = ((full - c0) / 8).min(NV);
        let xp = x.as_mut_ptr().add(c0);
        let mut acc = [_mm256_setzero_ps(); NV];
        for (v, a) in acc.iter_mut().enumerate().take(nv) {
            *a = _mm256_loadu_ps(xp.add(v * 8));
        }
        for (j, &a) in c.iter().enumerate() {
            if SUB && a == 0.0 {
                continue;
            }
            let av = _mm256_set1_ps(a);
            let yp = rows.as_ptr().add(j * ld + c0);
            for (v, acc) in acc.iter_mut().enumerate().take(nv) {
                let y = _mm256_loadu_ps(yp.add(v * 8));
                *acc = if SUB {
                    _mm256_sub_ps(*acc, _mm256_mul_ps(av, y))
                } else {
                    _mm256_fmadd_ps(av, y, *acc)
                };
            }
        }
        for (v, a) in acc.iter().enumerate().take(nv) {
            _mm256_storeu_ps(xp.add(v * 8), *a);
        }
        c0 += nv * 8;
    }
    for (j, &a) in c.iter().enumerate() {
        if SUB && a == 0.0 {
            continue;
        }
        let y = &rows[j * ld + full..j * ld + w];
        for (x, &y) in x[full..].iter_mut().zip(y) {
            *x = if SUB { *x - a * y } else { a.mul_add(y, *x) };
        }
    }
}

/// `C[m×n] += A[m×kd] · B[kd×n]`, every element adding its products with one FMA each, `p` in order:
/// register tiles of up to 6 rows × 16 columns; columns past the last multiple of 16 one by one (same
/// operations).
///
/// # Safety
/// The CPU must have AVX2 and FMA; the slices must hold the stated shapes (checked by the caller).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn mm_acc(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    m: usize,
    n: usize,
    kd: usize,
) {
    let (cp, ap, bp) = (c.as_mut_ptr(), a.as_ptr(), b.as_ptr());
    let full = n / 16 * 16;
    let mut c0 = 0;
    while c0 < full {
        let mut r0 = 0;
        while r0 < m {
            let rows = 6.min(m - r0);
            let t = MmTile {
                c: cp.add(r0 * ldc + c0),
                ldc,
                a: ap.add(r0 * lda),
                lda,
                b: bp.add(c0),
                ldb,
                kd,
            };
            match rows {
                6 => mm_tile::<6>(&t),
                5 => mm_tile::<5>(&t),
                4 => mm_tile::<4>(&t),
                3 => mm_tile::<3>(&t),
                2 => mm_tile::<2>(&t),
                _ => mm_tile::<1>(&t),
            }
            r0 += rows;
        }
        c0 += 16;
    }
    if full < n {
        for i in 0..m {
            for p in 0..kd {
                let av = a[i * lda + p];
                for (x, bv) in c[i * ldc + full..i * ldc + n]
                    .iter_mut()
                    .zip(&b[p * ldb + full..p * ldb + n])
                {
                    *x = av.mul_add(*bv, *x);
                }
            }
        }
    }
}

struct MmTile {
    c: *mut f32,
    ldc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    kd: usize,
}

#[target_feature(enable = "avx2,fma")]
unsafe fn mm_tile<const R: usize>(t: &MmTile) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (r, ar) in acc.iter_mut().enumerate() {
        ar[0] = _mm256_loadu_ps(t.c.add(r * t.ldc));
        ar[1] = _mm256_loadu_ps(t.c.add(r * t.ldc + 8));
    }
    for p in 0..t.kd {
        let b0 = _mm256_loadu_ps(t.b.add(p * t.ldb));
        let b1 = _mm256_loadu_ps(t.b.add(p * t.ldb + 8));
        for (r, ar) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*t.a.add(r * t.lda + p));
            ar[0] = _mm256_fmadd_ps(av, b0, ar[0]);
            ar[1] = _mm256_fmadd_ps(av, b1, ar[1]);
        }
    }
    for (r, ar) in acc.iter().enumerate() {
        _mm256_storeu_ps(t.c.add(r * t.ldc), ar[0]);
        _mm256_storeu_ps(t.c.add(r * t.ldc + 8), ar[1]);
    }
}
