//! The gated delta rule on any device, op for op HF's `torch_chunk_gated_delta_rule` (chunk 64, the UT
//! system solved by forward substitution, then the scan over chunks) and `torch_recurrent_gated_delta_rule`.
//! All f32. The host kernels in `delta_rule` compute the same quantities; only the order of f32 additions
//! differs (GEMM reductions), at the 1e-7 level.
//!
//! The chunked form is a few ops per layer (each one kernel or one batched cuBLAS GEMM on a GPU): the
//! element-wise preparation (`delta_chunk_prep`), one GEMM for both `·kᵀ` products, the decay mask, the UT
//! solve (`solve_tril`), the scan over chunks in HF's form (`chunk_scan`: the state and `v_new`) and two
//! GEMMs for the outputs.
use super::chunk_scan;
use super::delta_chunk_prep::{self, Dims, C};
use super::device::matmul;
use super::matmul_acc::matmul_acc_into;
use super::solve_tril::solve_unit_lower_split;
use candle_core::{Result, Tensor};

/// Chunked form (HF's prefill path). `qkv`: the conv output (`q`, `k` `[H, T, Dk]` L2-normalised and
/// expanded to value heads, not yet scaled, then `v` `[H, T, Dv]`, in one contiguous tensor), `bg`:
/// `[2, H, T]` (`β`, `g`), `state`: `[H, Dk, Dv]`. Returns `(o [H, T, Dv], new state)`.
pub fn chunked(qkv: &Tensor, bg: &Tensor, dims: Dims, state: &Tensor) -> Result<(Tensor, Tensor)> {
    let Dims { h, t, dv, .. } = dims;
    let n = dims.n();
    let p = delta_chunk_prep::prepare(qkv, bg, dims)?;
    // [k_β; q·scale] · kᵀ per chunk, then × exp(γ_i − γ_j) below the diagonal.
    let products = matmul(&p.kb_qs, &p.k.transpose(1, 2)?)?; // [B, 2C, C]
    let (ut_system, intra) = delta_chunk_prep::decay_mask(&products, &p.cum)?;
    // (I + strictly_lower(ut)) · [new_values | k_cumdecay] = [v_β | k_β·exp(γ)]
    // [B, C, Dv + Dk], written as its two parts, each contiguous for the scan.
    let (new_values, k_cumdecay) = solve_unit_lower_split(&ut_system, &p.rhs, dv)?;
    // HF's loop over chunks, the sequential part (one op, `chunk_scan`): v_new_i = V_i − W_i S_i and
    // S_{i+1} = S_i·d_i + K̃_iᵀ v_new_i, with V = new_values, W = k_cumdecay, K̃ = k·exp(γ_last − γ).
    let scanned = chunk_scan::scan(&new_values, &k_cumdecay, &p.k_to_end, &p.chunk_decay, state)?;
    // Then the outputs from the chunk-start states for every chunk at once, as HF writes them:
    // O_i = Q̃_i S_i + A_i v_new_i, the sum the GEMM's epilogue on a GPU (`matmul_acc`: the same single
    // rounding) written over the fresh product Q̃·S.
    let o = matmul(&p.q_decayed, &scanned.starts)?;
    let o = matmul_acc_into(o, &intra, &scanned.v_new, 1.0)?; // [B, C, Dv]
    let s = scanned.last;
    let o = o.reshape((h, n * C, dv))?;
    if n * C == t {
        Ok((o, s))
    } else {
        Ok((o.narrow(1, 0, t)?.contiguous()?, s))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::delta_rule;
    use crate::model::test_util::{max_diff_t, DeltaCase};
    use candle_core::Device;

    /// The op pipeline against the host kernel (HF's algorithm written out in loops), over lengths that
    /// end inside a chunk, on one chunk, and on a chunk boundary, from a non-zero state.
    #[test]
    fn chunked_ops_match_the_host_kernel() {
        let (h, dk, dv) = (3, 16, 24);
        for t in [150, 64, 5] {
            let case = DeltaCase::random(h, t, dk, dv);
            let mut host_state = case.state.clone();
            let host = delta_rule::chunked(&case.inputs(), &mut host_state);
            let dev = Device::Cpu;
            let qkv = [case.q.as_slice(), &case.k, &case.v].concat();
            let qkv = Tensor::from_vec(qkv, h * t * (2 * dk + dv), &dev).unwrap();
            let bg = Tensor::from_vec([case.beta.as_slice(), &case.g].concat(), (2, h, t), &dev);
            let s0 = Tensor::from_vec(case.state.clone(), (h, dk, dv), &dev).unwrap();
            let (o, s) = chunked(&qkv, &bg.unwrap(), Dims { h, t, dk, dv }, &s0).unwrap();
            assert_eq!(o.dims(), [h, t, dv]);
            let host_o = Tensor::from_vec(host, (h, t, dv), &dev).unwrap();
            let host_s = Tensor::from_vec(host_state, (h, dk, dv), &dev).unwrap();
            let (dlt_o, dlt_s) = (max_diff_t(&o, &host_o), max_diff_t(&s, &host_s));
            assert!(dlt_o <= 1e-5, "T={t}: outputs differ by {dlt_o}");
            assert!(dlt_s <= 1e-5, "T={t}: states differ by {dlt_s}");
            let o = o.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                o.iter().any(|x| x.abs() > 0.05),
                "degenerate test: outputs ~0"
            );
        }
    }
}
