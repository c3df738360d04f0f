//! Sparse MoE block (qwen3_5_moe): softmax router over all experts in f32, top-k, always renormalised;
//! SwiGLU experts (fused `[E, 2I, H]` / `[E, H, I]` or per-expert tensors on disk); the k weighted
//! contributions summed in f32 and rounded once (HF's default `grouped_mm` path); a shared expert scaled
//! by a per-token sigmoid gate.
use super::attention::sigmoid;
use super::config::MoeConfig;
use super::mlp::{linear, swiglu, Mlp};
use super::precision::Precision;
use super::torch_topk::topk_largest;
use super::weights::WeightStore;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

struct Expert {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

pub struct SparseMoe {
    router: Tensor,
    experts: Vec<Expert>,
    shared: Mlp,
    shared_gate: Tensor,
    top_k: usize,
    prec: Precision,
}

impl SparseMoe {
    /// `prefix`: full name prefix ending in `mlp.`.
    pub fn new(
        ws: &WeightStore,
        prefix: &str,
        hidden: usize,
        m: &MoeConfig,
        prec: Precision,
    ) -> Result<Self> {
        let (e, i) = (m.num_experts, m.moe_intermediate_size);
        let fused = format!("{prefix}experts.gate_up_proj");
        let experts = if ws.contains(&fused) {
            let gate_up = ws.load(&fused, &[e, 2 * i, hidden], prec)?;
            let down = ws.load(&format!("{prefix}experts.down_proj"), &[e, hidden, i], prec)?;
            (0..e)
                .map(|x| {
                    let gu = gate_up.get(x)?;
                    Ok(Expert {
                        gate: gu.narrow(0, 0, i)?,
                        up: gu.narrow(0, i, i)?,
                        down: down.get(x)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            let first = format!("{prefix}experts.0.gate_proj.weight");
            if !ws.contains(&first) {
                return Err(Error::input(
                    &ws.primary,
                    format!(
                        "missing MoE experts: neither `{fused}` (fused) nor `{first}` (per-expert)"
                    ),
                ));
            }
            (0..e)
                .map(|x| {
                    let p = format!("{prefix}experts.{x}.");
                    Ok(Expert {
                        gate: ws.load(&format!("{p}gate_proj.weight"), &[i, hidden], prec)?,
                        up: ws.load(&format!("{p}up_proj.weight"), &[i, hidden], prec)?,
                        down: ws.load(&format!("{p}down_proj.weight"), &[hidden, i], prec)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        Ok(SparseMoe {
            router: ws.load(&format!("{prefix}gate.weight"), &[e, hidden], prec)?,
            experts,
            shared: Mlp::new(
                ws,
                &format!("{prefix}shared_expert."),
                hidden,
                m.shared_expert_intermediate_size,
                prec,
            )?,
            shared_gate: ws.load(
                &format!("{prefix}shared_expert_gate.weight"),
                &[1, hidden],
                prec,
            )?,
            top_k: m.num_experts_per_tok,
            prec,
        })
    }

    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let p = self.prec;
        let (t, hidden) = h.dims2()?;
        let e = self.experts.len();
        let logits: Vec<f32> = linear(h, &self.router, p)?.flatten_all()?.to_vec1()?;
        // Per token: softmax over all experts (f32), top-k (torch's own tie-breaking),
        // renormalise in f32, round the weights to the model dtype.
        let mut routes: Vec<Vec<(usize, f32)>> = Vec::with_capacity(t);
        for row in logits.chunks_exact(e) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let ex: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
            let sum: f32 = ex.iter().sum();
            let probs: Vec<f32> = ex.iter().map(|x| x / sum).collect();
            let idx = topk_largest(&probs, self.top_k);
            let top_sum: f32 = idx.iter().map(|&x| probs[x]).sum();
            routes.push(
                idx.iter()
                    .map(|&x| (x, p.round_scalar(probs[x] / top_sum)))
                    .collect(),
            );
        }
        // Weighted contribution of every (token, slot): R(R(expert(h_t)) · w).
        let mut contrib = vec![0f32; t * self.top_k * hidden];
        for (x, expert) in self.experts.iter().enumerate() {
            let hits: Vec<(usize, usize, f32)> = routes
                .iter()
                .enumerate()
                .flat_map(|(tok, r)| {
                    r.iter()
                        .enumerate()
                        .filter(|(_, (ex, _))| *ex == x)
                        .map(move |(slot, (_, w))| (tok, slot, *w))
                })
                .collect();
            if hits.is_empty() {
                continue;
            }
            let ids: Vec<u32> = hits.iter().map(|(tok, _, _)| *tok as u32).collect();
            let xs = h.index_select(&Tensor::new(ids.as_slice(), &Device::Cpu)?, 0)?;
            let out: Vec<f32> = swiglu(&xs, &expert.gate, &expert.up, &expert.down, p)?
                .flatten_all()?
                .to_vec1()?;
            for (n, (tok, slot, w)) in hits.iter().enumerate() {
                let dst = &mut contrib
                    [(tok * self.top_k + slot) * hidden..(tok * self.top_k + slot + 1) * hidden];
                for (d, v) in dst.iter_mut().zip(&out[n * hidden..(n + 1) * hidden]) {
                    *d = p.round_scalar(v * w);
                }
            }
        }
        // Sum over the k slots in f32, one rounding.
        let mut routed = vec![0f32; t * hidden];
        for tok in 0..t {
            for slot in 0..self.top_k {
                let src = &contrib
                    [(tok * self.top_k + slot) * hidden..(tok * self.top_k + slot + 1) * hidden];
                for (d, v) in routed[tok * hidden..(tok + 1) * hidden].iter_mut().zip(src) {
                    *d += v;
                }
            }
        }
        p.round_slice(&mut routed);
        let routed = Tensor::from_vec(routed, (t, hidden), &Device::Cpu)?;
        let shared = self.shared.forward(h)?;
        let sigma = p.round(&sigmoid(&linear(h, &self.shared_gate, p)?)?)?; // [T, 1]
        let shared = p.round(&shared.broadcast_mul(&sigma)?)?;
        Ok(p.round(&(routed + shared)?)?)
    }
}
