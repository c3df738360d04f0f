//! AVX-512 kernels (moved from `f32_gemm` / `bf16_gemm`): the f32 GEMM tile (AVX-512F FMA, on inputs packed by row tiles)
//! and the bf16 GEMM tile (`vdpbf16ps`, AVX-512-BF16).
use crate::model::bf16_gemm::{col_mask, dispatch_tile, Tile};
use std::arch::x86_64::*;

/// # Safety
/// The tile must describe live buffers (see `bf16_gemm::drive`) with `a` packed by row tiles
/// (`bf16_gemm::pack_row_tiles`: a k step's `MR` values consecutive, `t.lda == MR`), and the CPU must
/// have AVX-512F.
pub(crate) unsafe fn f32_row_tiles_dispatch(t: &Tile) {
    debug_assert_eq!(t.lda, crate::model::bf16_gemm::MR);
    dispatch_tile!(f32_tile, t)
}

/// `R` rows × `NB` blocks of 16 columns, all accumulators in registers, on inputs packed by row tiles
/// (row `r`'s value at step `p` is `a[p·MR + r]`). Each output: `acc = fma(a[p], b[p], acc)` in order.
#[target_feature(enable = "avx512f")]
unsafe fn f32_tile<const R: usize, const NB: usize>(t: &Tile) {
    use crate::model::bf16_gemm::MR;
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
    let mut a = t.a as *const f32;
    for p in 0..t.kc {
        let mut bv = [_mm512_setzero_ps(); NB];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(b.add(j * t.ldb + p * 16));
        }
        for (r, cr) in c.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r));
            for (v, w) in cr.iter_mut().zip(bv.iter()) {
                *v = _mm512_fmadd_ps(av, *w, *v);
            }
        }
        a = a.add(MR);
    }
    for (r, cr) in c.iter().enumerate() {
        for (j, v) in cr.iter().enumerate() {
            _mm512_mask_storeu_ps(t.out.add(r * t.ldo + j * 16), masks[j], *v);
        }
    }
}

/// # Safety
/// The tile must describe live buffers (see `bf16_gemm::drive`) and the CPU must have AVX-512F and
/// AVX-512-BF16.
pub(crate) unsafe fn bf16_dispatch(t: &Tile, round: bool) {
    dispatch_tile!(bf16_tile, t, round)
}

/// `R` rows × `NB` blocks of 16 columns, all accumulators in registers (at most 24 + 4 B vectors).
/// Each element: `acc += a[2p+1]·b[2p+1]; acc += a[2p]·b[2p]` per k pair, in order (`vdpbf16ps`).
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_tile<const R: usize, const NB: usize>(t: &Tile, round: bool) {
    let bh = |v: __m512i| -> __m512bh { std::mem::transmute(v) };
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
        let mut bv = [bh(_mm512_setzero_si512()); NB];
        for (j, b) in bv.iter_mut().enumerate() {
            *b = bh(_mm512_loadu_si512(t.b.add(j * t.ldb + p * 16) as *const _));
        }
        for (r, cr) in c.iter_mut().enumerate() {
            let av = bh(_mm512_set1_epi32(*t.a.add(r * t.lda + p) as i32));
            for (v, b) in cr.iter_mut().zip(bv.iter()) {
                *v = _mm512_dpbf16_ps(*v, av, *b);
            }
        }
    }
    let round = round && t.last;
    for (r, cr) in c.iter().enumerate() {
        for (j, v) in cr.iter().enumerate() {
            let v = if round {
                crate::model::precision::round_bf16_x16(*v)
            } else {
                *v
            };
            _mm512_mask_storeu_ps(t.out.add(r * t.ldo + j * 16), masks[j], v);
        }
    }
}
