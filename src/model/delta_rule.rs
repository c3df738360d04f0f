//! The gated delta rule, all f32, per value head (state `S ∈ R^{Dk×Dv}`):
//! `S ← e^{g}·S; u = β(v − Sᵀk); S ← S + k⊗u; o = Sᵀq`.
//! `chunked` follows HF's `torch_chunk_gated_delta_rule` (chunk 64, UT transform) used for whole
//! sequences; `recurrent` follows `torch_recurrent_gated_delta_rule` used for single cached steps.
//! Inputs are already GVA-expanded to value heads and L2-normalised; `q` is scaled here as HF does.
use rayon::prelude::*;

pub const CHUNK: usize = 64;

/// Head-major inputs for one layer: `q`,`k`: `[H, T, Dk]`, `v`: `[H, T, Dv]`, `beta`,`g`: `[H, T]`.
pub struct DeltaInputs<'a> {
    pub heads: usize,
    pub t: usize,
    pub dk: usize,
    pub dv: usize,
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub beta: &'a [f32],
    pub g: &'a [f32],
}

/// Chunked form. `state` (`[H, Dk, Dv]`) is the initial state on entry and the final state on return.
/// Returns `o` as `[H, T, Dv]`. Heads run in parallel; each head's arithmetic is sequential, so the
/// result does not depend on the thread count.
pub fn chunked(x: &DeltaInputs, state: &mut [f32]) -> Vec<f32> {
    let (t, dk, dv) = (x.t, x.dk, x.dv);
    let scale = (dk as f32).powf(-0.5);
    let mut out = vec![0f32; x.heads * t * dv];
    out.par_chunks_mut(t * dv)
        .zip(state.par_chunks_mut(dk * dv))
        .enumerate()
        .for_each(|(h, (o, s))| {
            let q: Vec<f32> = x.q[h * t * dk..(h + 1) * t * dk]
                .iter()
                .map(|v| v * scale)
                .collect();
            let k = &x.k[h * t * dk..(h + 1) * t * dk];
            let v = &x.v[h * t * dv..(h + 1) * t * dv];
            let beta = &x.beta[h * t..(h + 1) * t];
            let g = &x.g[h * t..(h + 1) * t];
            let mut c0 = 0;
            while c0 < t {
                let l = CHUNK.min(t - c0);
                let chunk = Chunk {
                    q: &q[c0 * dk..],
                    k: &k[c0 * dk..],
                    v: &v[c0 * dv..],
                    beta: &beta[c0..],
                    g: &g[c0..],
                    l,
                    dk,
                    dv,
                };
                chunk_step_dispatch(&chunk, s, &mut o[c0 * dv..]);
                c0 += l;
            }
        });
    out
}

/// One chunk's inputs (positions `0..l` of each slice).
struct Chunk<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    beta: &'a [f32],
    g: &'a [f32],
    l: usize,
    dk: usize,
    dv: usize,
}

/// `chunk_step` compiled with FMA when the CPU has it: `mul_add` is then one instruction (as in the BLAS
/// kernels behind HF's matmuls) instead of a libm call. The results are identical either way.
fn chunk_step_dispatch(c: &Chunk, s: &mut [f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "fma,avx2")]
        unsafe fn with_fma(c: &Chunk, s: &mut [f32], o: &mut [f32]) {
            chunk_step(c, s, o)
        }
        if super::cpu::active() != super::cpu::Kernels::Portable {
            // SAFETY: the kernels in force (AVX2+FMA or AVX-512F, which implies both) run on this CPU.
            return unsafe { with_fma(c, s, o) };
        }
    }
    chunk_step(c, s, o)
}

/// One chunk of `l ≤ 64` positions. Positions past the end (HF's zero padding) would contribute exact
/// zeros, so a short last chunk is processed without them.
#[inline(always)]
fn chunk_step(c: &Chunk, s: &mut [f32], o: &mut [f32]) {
    let Chunk {
        q,
        k,
        v,
        beta,
        g,
        l,
        dk,
        dv,
    } = *c;
    // Cumulative log-decay inside the chunk and the pairwise decays exp(γ_i − γ_j), i ≥ j.
    let mut gc = vec![0f32; l];
    let mut acc = 0f32;
    for i in 0..l {
        acc += g[i];
        gc[i] = acc;
    }
    let mut decay_m = vec![0f32; l * l];
    for i in 0..l {
        for j in 0..=i {
            decay_m[i * l + j] = (gc[i] - gc[j]).exp();
        }
    }
    let decay = |i: usize, j: usize| decay_m[i * l + j];
    // K transposed ([Dk, l]) so the dot products of one row against all earlier keys run along j
    // (vectorised) while each dot still accumulates over the key dimension in order, with FMA.
    let mut kt = vec![0f32; dk * l];
    for j in 0..l {
        for a in 0..dk {
            kt[a * l + j] = k[j * dk + a];
        }
    }
    let dots_upto = |x: &[f32], n: usize, out: &mut [f32]| {
        out[..n].iter_mut().for_each(|o| *o = 0.0);
        for (a, &xa) in x.iter().enumerate() {
            for (o, kv) in out[..n].iter_mut().zip(&kt[a * l..a * l + n]) {
                *o = xa.mul_add(*kv, *o);
            }
        }
    };
    let mut row_dots = vec![0f32; l];
    let kb: Vec<f32> = (0..l * dk).map(|e| k[e] * beta[e / dk]).collect();
    let vb: Vec<f32> = (0..l * dv).map(|e| v[e] * beta[e / dv]).collect();

    // UT system A_ij = (β_i k_i · k_j) e^{γ_i−γ_j} (strictly lower part), solved by forward substitution:
    // new_values = (I + A)^-1 diag(β) V, k_cumdecay = (I + A)^-1 diag(β e^{γ}) K.
    let mut ut = vec![0f32; l * l];
    for i in 0..l {
        dots_upto(&kb[i * dk..(i + 1) * dk], i, &mut row_dots);
        for j in 0..i {
            ut[i * l + j] = row_dots[j] * decay(i, j);
        }
    }
    let mut new_v = vb;
    let gexp: Vec<f32> = gc.iter().map(|g| g.exp()).collect();
    let k_cum_init: Vec<f32> = (0..l * dk).map(|e| kb[e] * gexp[e / dk]).collect();
    let mut k_cum = k_cum_init;
    // row i −= a_ij · row j for j < i in order (a mul then a sub per element; zero a_ij skipped)
    for i in 1..l {
        let coefs = &ut[i * l..i * l + i];
        let (done, rest) = new_v.split_at_mut(i * dv);
        sub_scaled_rows(&mut rest[..dv], done, dv, coefs);
        let (done, rest) = k_cum.split_at_mut(i * dk);
        sub_scaled_rows(&mut rest[..dk], done, dk, coefs);
    }

    // v_new = new_values − k_cumdecay · S: per element, fma(−k_cum[i][a], S[a][x], ·) for a in order.
    let mut v_new = new_v;
    let neg_kc: Vec<f32> = k_cum.iter().map(|x| -x).collect();
    mm_acc(&mut v_new, dv, &neg_kc, dk, s, dv, l, dv, dk);
    // o_i = (q_i e^{γ_i}) · S + Σ_{j≤i} (q_i · k_j) e^{γ_i−γ_j} v_new_j
    // (q_i e^{γ_i}) · S: from zero, fma(q[i][a]·e^{γ_i}, S[a][x], ·) for a in order.
    let mut qdec = vec![0f32; l * dk];
    for i in 0..l {
        let qd = gc[i].exp();
        for (d, &qa) in qdec[i * dk..(i + 1) * dk]
            .iter_mut()
            .zip(&q[i * dk..(i + 1) * dk])
        {
            *d = qa * qd;
        }
    }
    o[..l * dv].iter_mut().for_each(|x| *x = 0.0);
    mm_acc(o, dv, &qdec, dk, s, dv, l, dv, dk);
    for i in 0..l {
        let oi = &mut o[i * dv..(i + 1) * dv];
        let mut intra = vec![0f32; dv];
        dots_upto(&q[i * dk..(i + 1) * dk], i + 1, &mut row_dots);
        let w: Vec<f32> = (0..=i).map(|j| row_dots[j] * decay(i, j)).collect();
        fma_rows(&mut intra, &v_new, dv, &w);
        for (x, y) in oi.iter_mut().zip(&intra) {
            *x += y;
        }
    }
    // S ← e^{γ_last} S + Σ_i (k_i e^{γ_last − γ_i}) ⊗ v_new_i
    let last = gc[l - 1];
    let chunk_decay = last.exp();
    s.iter_mut().for_each(|x| *x *= chunk_decay);
    // upd[a][x] = Σ_i fma(k[i][a]·e^{γ_last−γ_i}, v_new[i][x], ·), i in order, from zero.
    let mut upd = vec![0f32; dk * dv];
    let mut kdec_t = vec![0f32; dk * l];
    for i in 0..l {
        let kd = (last - gc[i]).exp();
        for a in 0..dk {
            kdec_t[a * l + i] = k[i * dk + a] * kd;
        }
    }
    mm_acc(&mut upd, dv, &kdec_t, l, &v_new, dv, dk, dv, l);
    for (x, u) in s.iter_mut().zip(&upd) {
        *x += u;
    }
}

/// `x ← x − c[j] · rows[j]` for `j = 0, 1, …` in order (a multiply, then a subtract, per element),
/// skipping zero coefficients; `rows[j]` starts at `j * ld`.
fn sub_scaled_rows(x: &mut [f32], rows: &[f32], ld: usize, c: &[f32]) {
    assert!(c.is_empty() || rows.len() >= (c.len() - 1) * ld + x.len());
    #[cfg(target_arch = "x86_64")]
    match super::cpu::active() {
        // SAFETY (both): bounds asserted above; the kernels in force run on this CPU.
        super::cpu::Kernels::Avx512 => return unsafe { rows_avx512::<true>(x, rows, ld, c) },
        super::cpu::Kernels::Avx2 => {
            return unsafe { super::cpu::avx2::rows_update::<true>(x, rows, ld, c) }
        }
        super::cpu::Kernels::Portable => {}
    }
    let n = x.len();
    for (j, &a) in c.iter().enumerate() {
        if a == 0.0 {
            continue;
        }
        for (x, y) in x.iter_mut().zip(&rows[j * ld..j * ld + n]) {
            *x -= a * y;
        }
    }
}

/// `acc ← fma(c[j], rows[j], acc)` for `j = 0, 1, …` in order; `rows[j]` starts at `j * ld`.
fn fma_rows(acc: &mut [f32], rows: &[f32], ld: usize, c: &[f32]) {
    assert!(c.is_empty() || rows.len() >= (c.len() - 1) * ld + acc.len());
    #[cfg(target_arch = "x86_64")]
    match super::cpu::active() {
        // SAFETY (both): bounds asserted above; the kernels in force run on this CPU.
        super::cpu::Kernels::Avx512 => return unsafe { rows_avx512::<false>(acc, rows, ld, c) },
        super::cpu::Kernels::Avx2 => {
            return unsafe { super::cpu::avx2::rows_update::<false>(acc, rows, ld, c) }
        }
        super::cpu::Kernels::Portable => {}
    }
    let n = acc.len();
    for (j, &w) in c.iter().enumerate() {
        for (x, y) in acc.iter_mut().zip(&rows[j * ld..j * ld + n]) {
            *x = w.mul_add(*y, *x);
        }
    }
}

/// The two row updates above with the row kept in registers (up to 128 columns at a time).
/// `SUB`: `x − a·y` with zero `a` skipped; else `fma(a, y, x)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512<const SUB: bool>(x: &mut [f32], rows: &[f32], ld: usize, c: &[f32]) {
    use std::arch::x86_64::*;
    const NV: usize = 8;
    let w = x.len();
    let mut c0 = 0;
    while c0 < w {
        let width = (NV * 16).min(w - c0);
        let masks: [u16; NV] = std::array::from_fn(|v| {
            let left = width.saturating_sub(v * 16);
            if left >= 16 {
                0xFFFF
            } else {
                ((1u32 << left) - 1) as u16
            }
        });
        let xp = x.as_mut_ptr().add(c0);
        let mut acc = [_mm512_setzero_ps(); NV];
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm512_maskz_loadu_ps(masks[v], xp.add(v * 16));
        }
        for (j, &a) in c.iter().enumerate() {
            if SUB && a == 0.0 {
                continue;
            }
            let av = _mm512_set1_ps(a);
            let yp = rows.as_ptr().add(j * ld + c0);
            for (v, acc) in acc.iter_mut().enumerate() {
                let y = _mm512_maskz_loadu_ps(masks[v], yp.add(v * 16));
                *acc = if SUB {
                    _mm512_sub_ps(*acc, _mm512_mul_ps(av, y))
                } else {
                    _mm512_fmadd_ps(av, y, *acc)
                };
            }
        }
        for (v, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(xp.add(v * 16), masks[v], *a);
        }
        c0 += width;
    }
}

/// `C[m×n] += A[m×kd] · B[kd×n]` (row-major with leading dimensions `ldc`, `lda`, `ldb`): every element
/// adds its products with one FMA each, `p = 0, 1, …` in order, exactly as the scalar loop
/// `c = a[i][p].mul_add(b[p][x], c)` does, so register blocking and vector width change no bit.
#[allow(clippy::too_many_arguments)]
fn mm_acc(
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
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n && b.len() >= kd.saturating_sub(1) * ldb + n);
    assert!(kd == 0 || a.len() >= (m - 1) * lda + kd);
    #[cfg(target_arch = "x86_64")]
    match super::cpu::active() {
        // SAFETY (both): bounds asserted above; the kernels in force run on this CPU.
        super::cpu::Kernels::Avx512 => {
            return unsafe { mm_acc_avx512(c, ldc, a, lda, b, ldb, m, n, kd) }
        }
        super::cpu::Kernels::Avx2 => {
            return unsafe { super::cpu::avx2::mm_acc(c, ldc, a, lda, b, ldb, m, n, kd) }
        }
        super::cpu::Kernels::Portable => {}
    }
    for i in 0..m {
        for p in 0..kd {
            let av = a[i * lda + p];
            for (x, bv) in c[i * ldc..i * ldc + n]
                .iter_mut()
                .zip(&b[p * ldb..p * ldb + n])
            {
                *x = av.mul_add(*bv, *x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn mm_acc_avx512(
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
    let mut c0 = 0;
    while c0 < n {
        let ncols = 64.min(n - c0);
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
                ncols,
            };
            macro_rules! nb {
                ($r:literal) => {
                    match ncols.div_ceil(16) {
                        4 => mm_tile::<$r, 4>(&t),
                        3 => mm_tile::<$r, 3>(&t),
                        2 => mm_tile::<$r, 2>(&t),
                        _ => mm_tile::<$r, 1>(&t),
                    }
                };
            }
            match rows {
                6 => nb!(6),
                5 => nb!(5),
                4 => nb!(4),
                3 => nb!(3),
                2 => nb!(2),
                _ => nb!(1),
            }
            r0 += rows;
        }
        c0 += ncols;
    }
}

#[cfg(target_arch = "x86_64")]
struct MmTile {
    c: *mut f32,
    ldc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    kd: usize,
    ncols: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn mm_tile<const R: usize, const NB: usize>(t: &MmTile) {
    use std::arch::x86_64::*;
    let masks: [u16; NB] = std::array::from_fn(|j| {
        let left = t.ncols.saturating_sub(j * 16);
        if left >= 16 {
            0xFFFF
        } else {
            ((1u32 << left) - 1) as u16
        }
    });
    let mut acc = [[_mm512_setzero_ps(); NB]; R];
    for (r, ar) in acc.iter_mut().enumerate() {
        for (j, v) in ar.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_ps(masks[j], t.c.add(r * t.ldc + j * 16));
        }
    }
    for p in 0..t.kd {
        let mut bv = [_mm512_setzero_ps(); NB];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_ps(masks[j], t.b.add(p * t.ldb + j * 16));
        }
        for (r, ar) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*t.a.add(r * t.lda + p));
            for (v, w) in ar.iter_mut().zip(bv.iter()) {
                *v = _mm512_fmadd_ps(av, *w, *v);
            }
        }
    }
    for (r, ar) in acc.iter().enumerate() {
        for (j, v) in ar.iter().enumerate() {
            _mm512_mask_storeu_ps(t.c.add(r * t.ldc + j * 16), masks[j], *v);
        }
    }
}

/// Recurrent form over the positions given (HF uses it for single cached steps). Same layout as `chunked`.
pub fn recurrent(x: &DeltaInputs, state: &mut [f32]) -> Vec<f32> {
    let (t, dk, dv) = (x.t, x.dk, x.dv);
    let div = (dk as f32).sqrt();
    let mut out = vec![0f32; x.heads * t * dv];
    out.par_chunks_mut(t * dv)
        .zip(state.par_chunks_mut(dk * dv))
        .enumerate()
        .for_each(|(h, (o, s))| {
            for i in 0..t {
                let q: Vec<f32> = x.q[(h * t + i) * dk..(h * t + i + 1) * dk]
                    .iter()
                    .map(|v| v / div)
                    .collect();
                let k = &x.k[(h * t + i) * dk..(h * t + i + 1) * dk];
                let v = &x.v[(h * t + i) * dv..(h * t + i + 1) * dv];
                let decay = x.g[h * t + i].exp();
                let beta = x.beta[h * t + i];
                s.iter_mut().for_each(|e| *e *= decay);
                let mut kv_mem = vec![0f32; dv];
                for a in 0..dk {
                    for (m, sv) in kv_mem.iter_mut().zip(&s[a * dv..(a + 1) * dv]) {
                        *m += sv * k[a];
                    }
                }
                let delta: Vec<f32> = v
                    .iter()
                    .zip(&kv_mem)
                    .map(|(vv, m)| (vv - m) * beta)
                    .collect();
                for a in 0..dk {
                    for (sv, d) in s[a * dv..(a + 1) * dv].iter_mut().zip(&delta) {
                        *sv += k[a] * d;
                    }
                }
                let oi = &mut o[i * dv..(i + 1) * dv];
                oi.iter_mut().for_each(|e| *e = 0.0);
                for a in 0..dk {
                    for (e, sv) in oi.iter_mut().zip(&s[a * dv..(a + 1) * dv]) {
                        *e += sv * q[a];
                    }
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{max_diff, DeltaCase};

    #[test]
    fn chunked_and_recurrent_agree_across_chunk_boundaries_and_carry_state() {
        let case = DeltaCase::random(3, 150, 16, 24);
        let x = case.inputs();
        let (mut s1, mut s2) = (case.state.clone(), case.state.clone());
        let a = chunked(&x, &mut s1);
        let b = recurrent(&x, &mut s2);
        let max_o = max_diff(&a, &b);
        let max_s = max_diff(&s1, &s2);
        assert!(max_o <= 1e-4, "outputs differ by {max_o}");
        assert!(max_s <= 1e-4, "final states differ by {max_s}");
        assert!(
            a.iter().any(|x| x.abs() > 1e-2),
            "degenerate test: outputs all ~0"
        );
    }
}
