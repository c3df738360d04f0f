//! The gated delta rule as tensor ops on any device, op for op HF's `torch_chunk_gated_delta_rule`
//! (chunk 64, the UT system solved by forward substitution, then the scan over chunks) and
//! `torch_recurrent_gated_delta_rule`. All f32. The host kernels in `delta_rule` compute the same
//! quantities; only the order of f32 additions differs (GEMM reductions), at the 1e-7 level.
//!
//! Shapes: `q`, `k`: `[H, T, Dk]` (L2-normalised, expanded to value heads, not yet scaled), `v`:
//! `[H, T, Dv]`, `beta`, `g`: `[H, T]`, `state`: `[H, Dk, Dv]`. Both return `(o [H, T, Dv], new state)`.
use super::delta_rule::CHUNK;
use super::device::{matmul, standard_layout};
use super::solve_tril::solve_unit_lower;
use candle_core::{Result, Tensor};

/// Chunked form (HF's prefill path). No host loop: the recurrence over chunks is one op.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    beta: &Tensor,
    g: &Tensor,
    state: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (h, t, dk) = q.dims3()?;
    let dv = v.dim(2)?;
    let dev = q.device();
    let q = q.affine((dk as f32).powf(-0.5) as f64, 0.0)?;
    let pad = (CHUNK - t % CHUNK) % CHUNK;
    let (q, k, v) = (
        q.pad_with_zeros(1, 0, pad)?,
        k.pad_with_zeros(1, 0, pad)?,
        v.pad_with_zeros(1, 0, pad)?,
    );
    let (beta, g) = (
        beta.pad_with_zeros(1, 0, pad)?,
        g.pad_with_zeros(1, 0, pad)?,
    );
    let n = (t + pad) / CHUNK;
    let v_beta = v.broadcast_mul(&beta.unsqueeze(2)?)?;
    let k_beta = k.broadcast_mul(&beta.unsqueeze(2)?)?;
    // [H·N, C, ·]: one batch entry per (head, chunk).
    let chunks = |x: &Tensor, d: usize| x.reshape((h * n, CHUNK, d));
    let (q, k, k_beta, v_beta) = (
        chunks(&q, dk)?,
        chunks(&k, dk)?,
        chunks(&k_beta, dk)?,
        chunks(&v_beta, dv)?,
    );
    let cum = g.reshape((h * n, CHUNK))?.cumsum(1)?; // [H·N, C]

    // pairwise[i, j] = exp(cum_i − cum_j) for j ≤ i, 0 above the diagonal (−inf before the exp).
    let upper: Vec<f32> = (0..CHUNK * CHUNK)
        .map(|e| {
            if e % CHUNK > e / CHUNK {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let upper = Tensor::from_vec(upper, (CHUNK, CHUNK), dev)?;
    let pairwise = cum
        .unsqueeze(2)?
        .broadcast_sub(&cum.unsqueeze(1)?)?
        .broadcast_add(&upper)?
        .exp()?;
    let kt = k.transpose(1, 2)?;
    let ut_system = (matmul(&k_beta, &kt)? * &pairwise)?;
    let intra = (matmul(&q, &kt)? * &pairwise)?;
    let cum_exp = cum.exp()?.unsqueeze(2)?;
    let decayed_k_beta = k_beta.broadcast_mul(&cum_exp)?;
    // (I + strictly_lower(ut)) · [new_values | k_cumdecay] = [v_beta | decayed_k_beta]
    let rhs = Tensor::cat(&[&v_beta, &decayed_k_beta], 2)?;
    let solved = solve_unit_lower(&ut_system, &rhs)?; // one op (a CUDA kernel on the GPU)
    let new_values = solved.narrow(2, 0, dv)?.contiguous()?;
    let k_cumdecay = solved.narrow(2, dv, dk)?.contiguous()?;

    // Decays applied once, outside the scan.
    let q = q.broadcast_mul(&cum_exp)?;
    let last = cum.narrow(1, CHUNK - 1, 1)?; // [H·N, 1]
    let k = k.broadcast_mul(&last.broadcast_sub(&cum)?.exp()?.unsqueeze(2)?)?;
    let chunk_decay = last.exp()?; // [H·N, 1]

    // The scan over chunks carries only the state: S_{i+1} = S_i·d_i + K̃_iᵀ (V_i − C_i S_i)
    //   = (d_i·I − K̃_iᵀ C_i) S_i + K̃_iᵀ V_i = M_i S_i + N_i,
    // with M_i and N_i for every chunk computed at once beforehand, so only this recurrence is
    // sequential (one op, `chunk_scan`). The outputs then come from the stacked chunk-start
    // states exactly as HF writes them: O_i = Q̃_i S_i + A_i (V_i − C_i S_i).
    let eye = Tensor::eye(dk, candle_core::DType::F32, dev)?;
    let k_t = k.transpose(1, 2)?; // [H·N, Dk, C]
    let m = eye
        .broadcast_mul(&chunk_decay.reshape((h * n, 1, 1))?)?
        .broadcast_sub(&matmul(&k_t, &k_cumdecay)?)?; // [H·N, Dk, Dk]
    let nn = matmul(&k_t, &new_values)?; // [H·N, Dk, Dv]
                                         // Chunk-major [N, H, ·, ·] so that chunk i is a contiguous block.
    let by_chunk = |x: &Tensor, r: usize, c: usize| -> Result<Tensor> {
        standard_layout(&x.reshape((h, n, r, c))?.transpose(0, 1)?)
    };
    let (m, nn) = (by_chunk(&m, dk, dk)?, by_chunk(&nn, dk, dv)?);
    // One op for the whole recurrence (`chunk_scan`: one kernel on a GPU): [N + 1, H, Dk, Dv].
    let states = super::chunk_scan::scan(&m, &nn, state)?;
    let s = states.get(n)?.copy()?; // its own buffer: the cache must not keep every chunk state alive
                                    // [N, H, Dk, Dv] → [H·N, Dk, Dv], batch order matching the other [H·N, ·, ·] tensors.
    let starts =
        standard_layout(&states.narrow(0, 0, n)?.transpose(0, 1)?)?.reshape((h * n, dk, dv))?;
    let v_new = (new_values - matmul(&k_cumdecay, &starts)?)?;
    let o = (matmul(&q, &starts)? + matmul(&intra, &v_new)?)?; // [H·N, C, Dv]
    let o = o.reshape((h, n * CHUNK, dv))?;
    Ok((standard_layout(&o.narrow(1, 0, t)?)?, s))
}

/// Recurrent form over the positions given (HF's path for single cached steps).
pub fn recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    beta: &Tensor,
    g: &Tensor,
    state: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (_, t, dk) = q.dims3()?;
    let div = Tensor::new((dk as f32).sqrt(), q.device())?;
    let q = q.broadcast_div(&div)?; // a division, as HF (not a multiplication by the reciprocal)
    let mut s = state.clone();
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let q_i = q.narrow(1, i, 1)?.transpose(1, 2)?; // [H, Dk, 1]
        let k_i = k.narrow(1, i, 1)?.transpose(1, 2)?; // [H, Dk, 1]
        let v_i = v.narrow(1, i, 1)?; // [H, 1, Dv]
        let decay = g.narrow(1, i, 1)?.exp()?.unsqueeze(2)?; // [H, 1, 1]
        let beta_i = beta.narrow(1, i, 1)?.unsqueeze(2)?; // [H, 1, 1]
        s = s.broadcast_mul(&decay)?;
        let kv_mem = s.broadcast_mul(&k_i)?.sum_keepdim(1)?; // [H, 1, Dv]
        let delta = (v_i - kv_mem)?.broadcast_mul(&beta_i)?;
        s = (s + k_i.broadcast_mul(&delta)?)?;
        outs.push(s.broadcast_mul(&q_i)?.sum_keepdim(1)?); // [H, 1, Dv]
    }
    Ok((Tensor::cat(&outs, 1)?, s))
}
