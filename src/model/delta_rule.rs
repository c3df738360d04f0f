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
                let o = &mut o[c0 * dv..];
                chunk_step_dispatch(&q[c0 * dk..], &k[c0 * dk..], &v[c0 * dv..], &beta[c0..], &g[c0..], l, dk, dv, s, o);
                c0 += l;
            }
        });
    out
}

/// `chunk_step` compiled with FMA when the CPU has it: `mul_add` is then one instruction (as in the BLAS
/// kernels behind HF's matmuls) instead of a libm call. The results are identical either way.
#[allow(clippy::too_many_arguments)]
fn chunk_step_dispatch(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: &[f32],
    g: &[f32],
    l: usize,
    dk: usize,
    dv: usize,
    s: &mut [f32],
    o: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "fma,avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn with_fma(
            q: &[f32],
            k: &[f32],
            v: &[f32],
            beta: &[f32],
            g: &[f32],
            l: usize,
            dk: usize,
            dv: usize,
            s: &mut [f32],
            o: &mut [f32],
        ) {
            chunk_step(q, k, v, beta, g, l, dk, dv, s, o)
        }
        if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2") {
            // SAFETY: the features were detected at run time.
            return unsafe { with_fma(q, k, v, beta, g, l, dk, dv, s, o) };
        }
    }
    chunk_step(q, k, v, beta, g, l, dk, dv, s, o)
}

/// One chunk of `l ≤ 64` positions. Positions past the end (HF's zero padding) would contribute exact
/// zeros, so a short last chunk is processed without them.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn chunk_step(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: &[f32],
    g: &[f32],
    l: usize,
    dk: usize,
    dv: usize,
    s: &mut [f32],
    o: &mut [f32],
) {
    // Cumulative log-decay inside the chunk and the pairwise decays exp(γ_i − γ_j), i ≥ j.
    let mut gc = vec![0f32; l];
    let mut acc = 0f32;
    for i in 0..l {
        acc += g[i];
        gc[i] = acc;
    }
    let decay = |i: usize, j: usize| (gc[i] - gc[j]).exp();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |s, (x, y)| x.mul_add(*y, s));
    let kb: Vec<f32> = (0..l * dk).map(|e| k[e] * beta[e / dk]).collect();
    let vb: Vec<f32> = (0..l * dv).map(|e| v[e] * beta[e / dv]).collect();

    // UT system A_ij = (β_i k_i · k_j) e^{γ_i−γ_j} (strictly lower part), solved by forward substitution:
    // new_values = (I + A)^-1 diag(β) V, k_cumdecay = (I + A)^-1 diag(β e^{γ}) K.
    let mut ut = vec![0f32; l * l];
    for i in 0..l {
        for j in 0..i {
            ut[i * l + j] = dot(&kb[i * dk..(i + 1) * dk], &k[j * dk..(j + 1) * dk]) * decay(i, j);
        }
    }
    let mut new_v = vb;
    let mut k_cum: Vec<f32> = (0..l * dk).map(|e| kb[e] * gc[e / dk].exp()).collect();
    for i in 1..l {
        for j in 0..i {
            let a = ut[i * l + j];
            if a == 0.0 {
                continue;
            }
            let (done, rest) = new_v.split_at_mut(i * dv);
            for (x, y) in rest[..dv].iter_mut().zip(&done[j * dv..(j + 1) * dv]) {
                *x -= a * y;
            }
            let (done, rest) = k_cum.split_at_mut(i * dk);
            for (x, y) in rest[..dk].iter_mut().zip(&done[j * dk..(j + 1) * dk]) {
                *x -= a * y;
            }
        }
    }

    // v_new = new_values − k_cumdecay · S
    let mut v_new = new_v;
    for i in 0..l {
        for a in 0..dk {
            let kc = k_cum[i * dk + a];
            let srow = &s[a * dv..(a + 1) * dv];
            for (x, sv) in v_new[i * dv..(i + 1) * dv].iter_mut().zip(srow) {
                *x = (-kc).mul_add(*sv, *x);
            }
        }
    }
    // o_i = (q_i e^{γ_i}) · S + Σ_{j≤i} (q_i · k_j) e^{γ_i−γ_j} v_new_j
    for i in 0..l {
        let qd = gc[i].exp();
        let oi = &mut o[i * dv..(i + 1) * dv];
        oi.iter_mut().for_each(|x| *x = 0.0);
        for a in 0..dk {
            let qa = q[i * dk + a] * qd;
            for (x, sv) in oi.iter_mut().zip(&s[a * dv..(a + 1) * dv]) {
                *x = qa.mul_add(*sv, *x);
            }
        }
        let mut intra = vec![0f32; dv];
        for j in 0..=i {
            let w = dot(&q[i * dk..(i + 1) * dk], &k[j * dk..(j + 1) * dk]) * decay(i, j);
            for (x, y) in intra.iter_mut().zip(&v_new[j * dv..(j + 1) * dv]) {
                *x = w.mul_add(*y, *x);
            }
        }
        for (x, y) in oi.iter_mut().zip(&intra) {
            *x += y;
        }
    }
    // S ← e^{γ_last} S + Σ_i (k_i e^{γ_last − γ_i}) ⊗ v_new_i
    let last = gc[l - 1];
    let chunk_decay = last.exp();
    s.iter_mut().for_each(|x| *x *= chunk_decay);
    let mut upd = vec![0f32; dk * dv];
    for i in 0..l {
        let kd = (last - gc[i]).exp();
        for a in 0..dk {
            let ka = k[i * dk + a] * kd;
            for (x, y) in upd[a * dv..(a + 1) * dv]
                .iter_mut()
                .zip(&v_new[i * dv..(i + 1) * dv])
            {
                *x = ka.mul_add(*y, *x);
            }
        }
    }
    for (x, u) in s.iter_mut().zip(&upd) {
        *x += u;
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

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn l2(v: &mut [f32], d: usize) {
        for r in v.chunks_exact_mut(d) {
            let n = (r.iter().map(|x| x * x).sum::<f32>() + 1e-6).sqrt();
            r.iter_mut().for_each(|x| *x /= n);
        }
    }

    #[test]
    fn chunked_and_recurrent_agree_across_chunk_boundaries_and_carry_state() {
        let (h, t, dk, dv) = (3, 150, 16, 24);
        let mut q = noise(h * t * dk, 1);
        let mut k = noise(h * t * dk, 2);
        l2(&mut q, dk);
        l2(&mut k, dk);
        let v = noise(h * t * dv, 3);
        let beta: Vec<f32> = noise(h * t, 4).iter().map(|x| 0.5 + 0.5 * x).collect();
        let g: Vec<f32> = noise(h * t, 5).iter().map(|x| -0.3 * (x + 1.0)).collect();
        let x = DeltaInputs {
            heads: h,
            t,
            dk,
            dv,
            q: &q,
            k: &k,
            v: &v,
            beta: &beta,
            g: &g,
        };
        let init = noise(h * dk * dv, 6);
        let (mut s1, mut s2) = (init.clone(), init);
        let a = chunked(&x, &mut s1);
        let b = recurrent(&x, &mut s2);
        let max_o = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let max_s = s1
            .iter()
            .zip(&s2)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max_o <= 1e-4, "outputs differ by {max_o}");
        assert!(max_s <= 1e-4, "final states differ by {max_s}");
        assert!(
            a.iter().any(|x| x.abs() > 1e-2),
            "degenerate test: outputs all ~0"
        );
    }
}
