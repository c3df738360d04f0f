//! Portable kernels: plain Rust over fixed 16-lane arrays (no `std::arch`, no x86 assumptions), which
//! LLVM vectorises for whatever the target offers (NEON `fmla` on aarch64). `mul_add` is a fused
//! multiply-add on every target (an instruction where the CPU has one, else libm's exact `fmaf`), so
//! the results are those of the SIMD paths bit for bit.
use crate::model::bf16_gemm::Tile;

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
/// The tile must describe live buffers (see `bf16_gemm::drive`).
pub(crate) unsafe fn f32_dispatch(t: &Tile) {
    by_rows!(f32_tile, t)
}

/// # Safety
/// As `f32_dispatch`, with `a` holding f32 bf16 values in pairs and `b` packed bf16 pairs.
pub(crate) unsafe fn bf16_dispatch(t: &Tile, round: bool) {
    by_rows!(bf16_tile, t, round)
}

#[inline(always)]
unsafe fn load_block<const R: usize>(t: &Tile, j: usize) -> [[f32; 16]; R] {
    let mut c = [[0f32; 16]; R];
    if t.load_c {
        let cols = (t.ncols - j * 16).min(16);
        for (r, cr) in c.iter_mut().enumerate() {
            std::ptr::copy_nonoverlapping(t.out.add(r * t.ldo + j * 16), cr.as_mut_ptr(), cols);
        }
    }
    c
}

#[inline(always)]
unsafe fn store_block<const R: usize>(t: &Tile, j: usize, c: &[[f32; 16]; R], round: bool) {
    let cols = (t.ncols - j * 16).min(16);
    for (r, cr) in c.iter().enumerate() {
        let mut v = *cr;
        if round {
            for x in v.iter_mut() {
                *x = half::bf16::from_f32(*x).to_f32();
            }
        }
        std::ptr::copy_nonoverlapping(v.as_ptr(), t.out.add(r * t.ldo + j * 16), cols);
    }
}

unsafe fn f32_tile<const R: usize>(t: &Tile) {
    let a = t.a as *const f32;
    let b = t.b as *const f32;
    for j in 0..t.ncols.div_ceil(16) {
        let bj = b.add(j * t.ldb);
        let mut c = load_block::<R>(t, j);
        for p in 0..t.kc {
            let bv: [f32; 16] = std::ptr::read_unaligned(bj.add(p * 16) as *const [f32; 16]);
            for (r, cr) in c.iter_mut().enumerate() {
                let av = *a.add(r * t.lda + p);
                for (x, &w) in cr.iter_mut().zip(&bv) {
                    *x = av.mul_add(w, *x);
                }
            }
        }
        store_block::<R>(t, j, &c, false);
    }
}

unsafe fn bf16_tile<const R: usize>(t: &Tile, round: bool) {
    let a = t.a as *const f32;
    for j in 0..t.ncols.div_ceil(16) {
        let bj = t.b.add(j * t.ldb);
        let mut c = load_block::<R>(t, j);
        for p in 0..t.kc {
            let wv: [u32; 16] = std::ptr::read_unaligned(bj.add(p * 16) as *const [u32; 16]);
            let hi: [f32; 16] = std::array::from_fn(|l| f32::from_bits(wv[l] & 0xFFFF_0000));
            let lo: [f32; 16] = std::array::from_fn(|l| f32::from_bits(wv[l] << 16));
            for (r, cr) in c.iter_mut().enumerate() {
                let (ao, ae) = (*a.add(r * t.lda + 2 * p + 1), *a.add(r * t.lda + 2 * p));
                for (x, &w) in cr.iter_mut().zip(&hi) {
                    *x = ao.mul_add(w, *x);
                }
                for (x, &w) in cr.iter_mut().zip(&lo) {
                    *x = ae.mul_add(w, *x);
                }
            }
        }
        store_block::<R>(t, j, &c, round && t.last);
    }
}
