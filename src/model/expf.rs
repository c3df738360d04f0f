//! `exp` over f32 slices, bit for bit as glibc's `expf` (what `f32::exp` calls; on CPUs with FMA glibc
//! runs `__expf_fma`), eight lanes at a time. The SiLUs of the GDN conv, the MLPs and the gated norms
//! take ~10^8 exponentials per forward; one libm call each was a visible share of the bf16 forward.
//!
//! The algorithm is glibc's (ARM optimized-routines `expf`, glibc ≥ 2.27): in double precision,
//! `kd = fma(x, N/ln2, SHIFT)`, `r = fma(x, N/ln2, -(kd - SHIFT))`, `s = 2^(k/N)` from a 32-entry table
//! plus exponent bits, `y = fma(fma(r, C0, C1), r², fma(r, C2, 1)) · s`, rounded to f32 — the same
//! operations in the same order as `__expf_fma`'s fast path, so the results are identical. Inputs off
//! that path (|x| ≥ 88, infinities, NaNs) go to `f32::exp` itself. At first use the vector path is
//! checked against `f32::exp` on a spread of inputs and is only used when they agree everywhere (a
//! different libm keeps the scalar calls). Vector paths: AVX-512 (here) and AVX2+FMA (`cpu::avx2`),
//! chosen by the kernel set in force (`cpu::active`); the portable set calls `f32::exp`.

#[cfg(target_arch = "x86_64")]
pub(crate) const TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
#[cfg(target_arch = "x86_64")]
pub(crate) const INV_LN2_N: u64 = 0x40471547652b82fe;
#[cfg(target_arch = "x86_64")]
pub(crate) const C0: u64 = 0x3ebc6af84b912394;
#[cfg(target_arch = "x86_64")]
pub(crate) const C1: u64 = 0x3f2ebfce50fac4f3;
#[cfg(target_arch = "x86_64")]
pub(crate) const C2: u64 = 0x3f962e42ff0c52d6;
#[cfg(target_arch = "x86_64")]
pub(crate) const SHIFT: u64 = 0x4338000000000000;

/// `v[i] = v[i].exp()` for every element.
pub fn exp_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match super::cpu::active() {
        super::cpu::Kernels::Avx512 if vector_ok() => {
            // SAFETY: `vector_ok` implies AVX-512F and AVX-512VL were detected.
            unsafe { exp_avx512(v) };
            return;
        }
        super::cpu::Kernels::Avx512 | super::cpu::Kernels::Avx2 if avx2_ok() => {
            // SAFETY: `avx2_ok` implies AVX2 and FMA were detected.
            unsafe { super::cpu::avx2::exp_in_place(v) };
            return;
        }
        _ => {}
    }
    v.iter_mut().for_each(|x| *x = x.exp());
}

/// Whether `exp_in_place` runs a vector path on this machine under the kernels in force (it passed its
/// self-check).
pub fn vector_path_active() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match super::cpu::active() {
            super::cpu::Kernels::Avx512 => vector_ok() || avx2_ok(),
            super::cpu::Kernels::Avx2 => avx2_ok(),
            super::cpu::Kernels::Portable => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Inputs for the self-checks: a dense sweep of the fast path's range and its edges, and random bit
/// patterns.
#[cfg(target_arch = "x86_64")]
fn self_check_inputs() -> Vec<f32> {
    let mut xs: Vec<f32> = (0..20_000)
        .map(|i| -110.0 + 220.0 * (i as f32) / 20_000.0)
        .collect();
    let mut s = 0x2545F4914F6CDD1Du64;
    for _ in 0..20_000 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        xs.push(f32::from_bits(s as u32));
    }
    xs
}

#[cfg(target_arch = "x86_64")]
fn agrees_with_libm(xs: &[f32], got: &[f32]) -> bool {
    xs.iter().zip(got).all(|(x, g)| {
        let w = x.exp();
        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
    })
}

/// The AVX2 path runs here and agrees with `f32::exp` (checked once).
#[cfg(target_arch = "x86_64")]
fn avx2_ok() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if !super::cpu::Kernels::Avx2.supported() {
            return false;
        }
        let xs = self_check_inputs();
        let mut got = xs.clone();
        // SAFETY: AVX2 and FMA were detected above.
        unsafe { super::cpu::avx2::exp_in_place(&mut got) };
        agrees_with_libm(&xs, &got)
    })
}

/// SiLU over a slice, `x / (1 + exp(-x))` per element (candle's f32 formula), into `out`.
pub fn silu_into(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = -v;
    }
    exp_in_place(out);
    super::cpu::vectorised(|| {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v / (1.0 + *o);
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn vector_ok() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if !(std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl"))
        {
            return false;
        }
        let mut xs: Vec<f32> = (0..20_000)
            .map(|i| -110.0 + 220.0 * (i as f32) / 20_000.0)
            .collect();
        let mut s = 0x2545F4914F6CDD1Du64;
        for _ in 0..20_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            xs.push(f32::from_bits(s as u32));
        }
        let want: Vec<u32> = xs.iter().map(|x| x.exp().to_bits()).collect();
        // SAFETY: AVX-512F and AVX-512VL were detected above.
        unsafe { exp_avx512(&mut xs) };
        xs.iter()
            .zip(&want)
            .all(|(g, w)| g.to_bits() == *w || (g.is_nan() && f32::from_bits(*w).is_nan()))
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn exp_avx512(v: &mut [f32]) {
    use std::arch::x86_64::*;
    let ld = |i: usize| _mm512_castsi512_pd(_mm512_loadu_si512(TABLE.as_ptr().add(i) as *const _));
    let (t0, t1, t2, t3) = (ld(0), ld(8), ld(16), ld(24));
    let c = |b: u64| _mm512_set1_pd(f64::from_bits(b));
    let (inv, c0, c1, c2, shift, one) = (
        c(INV_LN2_N),
        c(C0),
        c(C1),
        c(C2),
        c(SHIFT),
        _mm512_set1_pd(1.0),
    );
    let n = v.len();
    let mut i = 0;
    while i < n {
        let take = 8.min(n - i);
        let m = ((1u32 << take) - 1) as u8;
        let p = v.as_mut_ptr().add(i);
        let xf = _mm256_maskz_loadu_ps(m, p);
        let bits = _mm256_castps_si256(xf);
        // lanes off the fast path: abstop = (bits >> 20) & 0x7ff > 0x42a
        let abstop = _mm256_and_si256(_mm256_srli_epi32::<20>(bits), _mm256_set1_epi32(0x7ff));
        let slow = _mm256_cmpgt_epi32_mask(abstop, _mm256_set1_epi32(0x42a)) & m;
        let xd = _mm512_cvtps_pd(xf);
        let kd = _mm512_fmadd_pd(inv, xd, shift);
        let ki = _mm512_castpd_si512(kd);
        let kd = _mm512_sub_pd(kd, shift);
        let r = _mm512_fmsub_pd(inv, xd, kd);
        let idx = _mm512_and_si512(ki, _mm512_set1_epi64(31));
        let lo = _mm512_permutex2var_pd(t0, idx, t1);
        let hi = _mm512_permutex2var_pd(t2, idx, t3);
        let upper = _mm512_test_epi64_mask(idx, _mm512_set1_epi64(16));
        let t = _mm512_castpd_si512(_mm512_mask_blend_pd(upper, lo, hi));
        let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
        let z = _mm512_fmadd_pd(r, c0, c1);
        let r2 = _mm512_mul_pd(r, r);
        let y = _mm512_fmadd_pd(r, c2, one);
        let y = _mm512_fmadd_pd(z, r2, y);
        let y = _mm512_mul_pd(y, s);
        let yf = _mm512_cvtpd_ps(y);
        _mm256_mask_storeu_ps(p, m, yf);
        if slow != 0 {
            for j in 0..take {
                if slow & (1 << j) != 0 {
                    let x = f32::from_bits(_mm256_extract_epi32_dyn(bits, j) as u32);
                    *p.add(j) = x.exp();
                }
            }
        }
        i += take;
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn _mm256_extract_epi32_dyn(v: std::arch::x86_64::__m256i, j: usize) -> i32 {
    let a: [i32; 8] = std::mem::transmute(v);
    a[j]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same bits as `f32::exp` on a dense sweep of the fast path's range, its edges and random patterns.
    #[test]
    fn matches_libm_expf_bit_for_bit() {
        let mut xs: Vec<f32> = (0..200_000)
            .map(|i| -105.0 + 210.0 * (i as f32) / 200_000.0)
            .collect();
        xs.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            88.0,
            -88.0,
            88.72,
            88.73,
            -103.0,
            -103.5,
            -104.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
        ]);
        let mut s = 99u64;
        for _ in 0..200_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            xs.push(f32::from_bits((s >> 32) as u32));
        }
        let check = |got: &[f32], path: &str| {
            for (x, g) in xs.iter().zip(got) {
                let w = x.exp();
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{path}: exp({x:e}): {g:e} vs {w:e}"
                );
            }
            eprintln!("expf {path}: checked");
        };
        let mut got = xs.clone();
        exp_in_place(&mut got);
        check(&got, "in force");
        #[cfg(target_arch = "x86_64")]
        {
            if crate::model::cpu::Kernels::Avx2.supported() {
                let mut got = xs.clone();
                // SAFETY: AVX2 and FMA were detected.
                unsafe { crate::model::cpu::avx2::exp_in_place(&mut got) };
                check(&got, "avx2");
            } else {
                eprintln!("skipped: expf avx2: this CPU has no AVX2+FMA");
            }
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
            {
                let mut got = xs.clone();
                // SAFETY: AVX-512F and AVX-512VL were detected.
                unsafe { exp_avx512(&mut got) };
                check(&got, "avx512");
            } else {
                eprintln!("skipped: expf avx512: this CPU has no AVX-512");
            }
        }
    }
}
