//! Sparse MoE block (qwen3_5_moe): softmax router over all experts in f32, top-k, always renormalised;
//! SwiGLU experts (fused `[E, 2I, H]` / `[E, H, I]` or per-expert tensors on disk); the k weighted
//! contributions summed in f32 and rounded once (HF's default `grouped_mm` path); a shared expert scaled
//! by a per-token sigmoid gate.
use super::attention::sigmoid;
use super::config::MoeConfig;
use super::mlp::{linear, swiglu, LinearWeight, Mlp};
use super::precision::Precision;
use super::torch_topk::topk_largest;
use super::weights::WeightStore;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

pub struct Expert {
    gate: LinearWeight,
    up: LinearWeight,
    down: LinearWeight,
}

impl Expert {
    fn from_tensors(gate: Tensor, up: Tensor, down: Tensor, prec: Precision) -> Result<Expert> {
        Ok(Expert {
            gate: LinearWeight::new(gate.contiguous()?, prec)?,
            up: LinearWeight::new(up.contiguous()?, prec)?,
            down: LinearWeight::new(down.contiguous()?, prec)?,
        })
    }
}

/// Where the experts live on disk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `experts.gate_up_proj [E, 2I, H]` + `experts.down_proj [E, H, I]`.
    Fused,
    /// `experts.{x}.{gate,up,down}_proj.weight`.
    PerExpert,
}

/// The routing of one call: per token, the top-k `(expert, rounded weight)` in slot order.
pub struct Routes {
    per_token: Vec<Vec<(usize, f32)>>,
    /// Weighted contribution of every (token, slot), filled expert by expert: `[T, k, H]`.
    contrib: Vec<f32>,
    /// The same on the device, `[T·k, H]` (portable kernels; `contrib` then stays empty).
    contrib_t: Option<Tensor>,
}

impl Routes {
    /// Experts at least one token routes to, ascending.
    pub fn experts(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .per_token
            .iter()
            .flat_map(|r| r.iter().map(|(x, _)| *x))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

pub struct SparseMoe {
    router: LinearWeight,
    /// All experts (in-memory model), or none when they are loaded one at a time (`load_expert`).
    experts: Vec<Expert>,
    shared: Mlp,
    shared_gate: LinearWeight,
    top_k: usize,
    num_experts: usize,
    layout: Layout,
    prefix: String,
    hidden: usize,
    inter: usize,
    prec: Precision,
    portable: bool,
}

impl SparseMoe {
    /// `prefix`: full name prefix ending in `mlp.`. Loads every expert.
    pub fn new(
        ws: &WeightStore,
        prefix: &str,
        hidden: usize,
        m: &MoeConfig,
        prec: Precision,
    ) -> Result<Self> {
        let mut moe = SparseMoe::new_lazy(ws, prefix, hidden, m, prec)?;
        // The whole bank as one contiguous range: a fused bank is one read per tensor.
        let all: Vec<usize> = (0..m.num_experts).collect();
        moe.experts = moe
            .source()
            .load(ws, &all)?
            .into_iter()
            .map(|(_, ex)| ex)
            .collect();
        Ok(moe)
    }

    /// Router, shared expert and gate only; experts come one at a time from `load_expert` (streaming:
    /// only the experts some token routes to are ever converted).
    pub fn new_lazy(
        ws: &WeightStore,
        prefix: &str,
        hidden: usize,
        m: &MoeConfig,
        prec: Precision,
    ) -> Result<Self> {
        let (e, i) = (m.num_experts, m.moe_intermediate_size);
        let fused = format!("{prefix}experts.gate_up_proj");
        let layout = if ws.contains(&fused) {
            Layout::Fused
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
            Layout::PerExpert
        };
        // The bank is part of the model even where streaming reads only the routed experts.
        match layout {
            Layout::Fused => {
                ws.claim(&fused);
                ws.claim(&format!("{prefix}experts.down_proj"));
            }
            Layout::PerExpert => {
                for x in 0..e {
                    for w in ["gate_proj", "up_proj", "down_proj"] {
                        ws.claim(&format!("{prefix}experts.{x}.{w}.weight"));
                    }
                }
            }
        }
        Ok(SparseMoe {
            router: ws.load_linear(&format!("{prefix}gate.weight"), &[e, hidden], prec)?,
            experts: Vec::new(),
            shared: Mlp::new(
                ws,
                &format!("{prefix}shared_expert."),
                hidden,
                m.shared_expert_intermediate_size,
                prec,
            )?,
            shared_gate: ws.load_linear(
                &format!("{prefix}shared_expert_gate.weight"),
                &[1, hidden],
                prec,
            )?,
            top_k: m.num_experts_per_tok,
            num_experts: e,
            layout,
            prefix: prefix.to_string(),
            hidden,
            inter: i,
            prec,
            portable: ws.portable_kernels(),
        })
    }

    /// Expert `x` alone, with the same values as the in-memory bank.
    pub fn load_expert(&self, ws: &WeightStore, x: usize) -> Result<Expert> {
        self.source().load_one(ws, x)
    }

    /// Where this block's experts are on disk, for loading them elsewhere (a prefetch thread).
    pub fn source(&self) -> ExpertSource {
        ExpertSource {
            num_experts: self.num_experts,
            inter: self.inter,
            hidden: self.hidden,
            prec: self.prec,
            layout: self.layout,
            prefix: self.prefix.clone(),
        }
    }
}

/// The on-disk location and shapes of one MoE block's experts.
#[derive(Clone)]
pub struct ExpertSource {
    num_experts: usize,
    inter: usize,
    hidden: usize,
    prec: Precision,
    layout: Layout,
    prefix: String,
}

impl ExpertSource {
    /// Bytes of one expert in f32 (gate, up and down).
    pub fn expert_f32_bytes(&self) -> usize {
        3 * self.inter * self.hidden * 4
    }

    /// Split the (ascending) experts `xs` into loading groups of at most `max_bytes` of f32 weights each
    /// (at least one expert), a group never spanning a gap in a fused bank so that it is one read there.
    pub fn groups(&self, xs: &[usize], max_bytes: usize) -> Vec<Vec<usize>> {
        let per_group = (max_bytes / self.expert_f32_bytes().max(1)).max(1);
        let mut out: Vec<Vec<usize>> = Vec::new();
        for &x in xs {
            match out.last_mut() {
                Some(g)
                    if g.len() < per_group
                        && (self.layout == Layout::PerExpert
                            || g.last().map(|l| l + 1) == Some(x)) =>
                {
                    g.push(x)
                }
                _ => out.push(vec![x]),
            }
        }
        out
    }

    /// The experts `xs` (ascending; consecutive in a fused bank, as `groups` makes them), with the same
    /// values as the in-memory bank: a fused bank is read with one positioned read per tensor for the
    /// whole range.
    pub fn load(&self, ws: &WeightStore, xs: &[usize]) -> Result<Vec<(usize, Expert)>> {
        let (e, i, h, prec) = (self.num_experts, self.inter, self.hidden, self.prec);
        let contiguous = xs.windows(2).all(|w| w[1] == w[0] + 1);
        match (self.layout, xs.first()) {
            (Layout::Fused, Some(&first)) if contiguous => {
                let n = xs.len();
                let prefix = &self.prefix;
                let gate_up = ws.load_rows(
                    &format!("{prefix}experts.gate_up_proj"),
                    &[e, 2 * i, h],
                    first,
                    n,
                    prec,
                )?;
                let down = ws.load_rows(
                    &format!("{prefix}experts.down_proj"),
                    &[e, h, i],
                    first,
                    n,
                    prec,
                )?;
                (0..n)
                    .map(|k| {
                        let gu = gate_up.get(k)?;
                        let ex = Expert::from_tensors(
                            gu.narrow(0, 0, i)?,
                            gu.narrow(0, i, i)?,
                            down.get(k)?,
                            prec,
                        )?;
                        Ok((first + k, ex))
                    })
                    .collect()
            }
            _ => xs.iter().map(|&x| Ok((x, self.load_one(ws, x)?))).collect(),
        }
    }

    fn load_one(&self, ws: &WeightStore, x: usize) -> Result<Expert> {
        let (e, i, h, prec) = (self.num_experts, self.inter, self.hidden, self.prec);
        let prefix = &self.prefix;
        match self.layout {
            Layout::Fused => {
                let gu = ws
                    .load_rows(
                        &format!("{prefix}experts.gate_up_proj"),
                        &[e, 2 * i, h],
                        x,
                        1,
                        prec,
                    )?
                    .get(0)?;
                let down = ws
                    .load_rows(
                        &format!("{prefix}experts.down_proj"),
                        &[e, h, i],
                        x,
                        1,
                        prec,
                    )?
                    .get(0)?;
                Expert::from_tensors(gu.narrow(0, 0, i)?, gu.narrow(0, i, i)?, down, prec)
            }
            Layout::PerExpert => {
                let p = format!("{prefix}experts.{x}.");
                Ok(Expert {
                    gate: ws.load_linear(&format!("{p}gate_proj.weight"), &[i, h], prec)?,
                    up: ws.load_linear(&format!("{p}up_proj.weight"), &[i, h], prec)?,
                    down: ws.load_linear(&format!("{p}down_proj.weight"), &[h, i], prec)?,
                })
            }
        }
    }
}

impl SparseMoe {
    /// The whole block with the in-memory expert bank.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let mut routes = self.route(h)?;
        for x in routes.experts() {
            let expert = self.experts.get(x).ok_or_else(|| {
                Error::Internal(format!("expert {x} is not loaded (lazy MoE block)"))
            })?;
            self.apply_expert(h, &mut routes, x, expert)?;
        }
        self.finish(h, routes)
    }

    /// Router logits, per token: softmax over all experts (f32), top-k (torch's own tie-breaking),
    /// renormalise in f32, round the weights to the model dtype.
    pub fn route(&self, h: &Tensor) -> Result<Routes> {
        let p = self.prec;
        let (t, hidden) = h.dims2()?;
        let e = self.num_experts;
        let logits: Vec<f32> = linear(h, &self.router, p)?.flatten_all()?.to_vec1()?;
        let mut per_token: Vec<Vec<(usize, f32)>> = Vec::with_capacity(t);
        for row in logits.chunks_exact(e) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let ex: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
            let sum: f32 = ex.iter().sum();
            let probs: Vec<f32> = ex.iter().map(|x| x / sum).collect();
            let idx = topk_largest(&probs, self.top_k);
            let top_sum: f32 = idx.iter().map(|&x| probs[x]).sum();
            per_token.push(
                idx.iter()
                    .map(|&x| (x, p.round_scalar(probs[x] / top_sum)))
                    .collect(),
            );
        }
        if self.portable {
            let zeros = Tensor::zeros(
                (t * self.top_k, hidden),
                candle_core::DType::F32,
                h.device(),
            )?;
            return Ok(Routes {
                per_token,
                contrib: Vec::new(),
                contrib_t: Some(zeros),
            });
        }
        Ok(Routes {
            per_token,
            contrib: vec![0f32; t * self.top_k * hidden],
            contrib_t: None,
        })
    }

    /// Weighted contribution of every (token, slot) routed to expert `x`: R(R(expert(h_t)) · w).
    /// Experts may be applied in any order: each (token, slot) is written once.
    pub fn apply_expert(
        &self,
        h: &Tensor,
        routes: &mut Routes,
        x: usize,
        expert: &Expert,
    ) -> Result<()> {
        let p = self.prec;
        let hidden = self.hidden;
        let hits: Vec<(usize, usize, f32)> = routes
            .per_token
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
            return Ok(());
        }
        let ids: Vec<u32> = hits.iter().map(|(tok, _, _)| *tok as u32).collect();
        let xs = h.index_select(&Tensor::new(ids.as_slice(), h.device())?, 0)?;
        if let Some(contrib) = routes.contrib_t.take() {
            // On the device: R(out · w) for each hit, added into its (token, slot) row (zero before).
            let dev = h.device();
            let out_dt = candle_core::DType::F32;
            let out = swiglu(&xs, &expert.gate, &expert.up, &expert.down, p, true, out_dt)?;
            let w: Vec<f32> = hits.iter().map(|(_, _, w)| *w).collect();
            let w = Tensor::from_vec(w, (hits.len(), 1), dev)?;
            let y = p.round(&out.broadcast_mul(&w)?)?;
            let rows: Vec<u32> = hits
                .iter()
                .map(|(tok, slot, _)| (tok * self.top_k + slot) as u32)
                .collect();
            let rows = Tensor::from_vec(rows, hits.len(), dev)?;
            routes.contrib_t = Some(contrib.index_add(&rows, &y, 0)?);
            return Ok(());
        }
        let out_dt = candle_core::DType::F32;
        let out: Vec<f32> = swiglu(
            &xs,
            &expert.gate,
            &expert.up,
            &expert.down,
            p,
            false,
            out_dt,
        )?
        .flatten_all()?
        .to_vec1()?;
        for (n, (tok, slot, w)) in hits.iter().enumerate() {
            let at = (tok * self.top_k + slot) * hidden;
            let dst = &mut routes.contrib[at..at + hidden];
            for (d, v) in dst.iter_mut().zip(&out[n * hidden..(n + 1) * hidden]) {
                *d = p.round_scalar(v * w);
            }
        }
        Ok(())
    }

    /// Sum over the k slots in f32 with one rounding, plus the gated shared expert.
    pub fn finish(&self, h: &Tensor, routes: Routes) -> Result<Tensor> {
        let p = self.prec;
        let (t, hidden) = h.dims2()?;
        if let Some(contrib) = routes.contrib_t {
            let routed = p.round(&contrib.reshape((t, self.top_k, hidden))?.sum(1)?)?;
            return self.add_shared(h, routed);
        }
        let contrib = routes.contrib;
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
        self.add_shared(h, routed)
    }

    /// `R(routed + R(shared(h) · R(sigmoid(h · gateᵀ))))`.
    fn add_shared(&self, h: &Tensor, routed: Tensor) -> Result<Tensor> {
        let p = self.prec;
        let shared = self.shared.forward(h)?;
        let sigma = p.round(&sigmoid(&linear(h, &self.shared_gate, p)?)?)?; // [T, 1]
        let shared = p.round(&shared.broadcast_mul(&sigma)?)?;
        Ok(p.round(&(routed + shared)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(layout: Layout) -> ExpertSource {
        ExpertSource {
            num_experts: 16,
            inter: 4,
            hidden: 8,
            prec: Precision::F32,
            layout,
            prefix: String::new(),
        }
    }

    #[test]
    fn expert_groups_are_bounded_and_contiguous_in_a_fused_bank() {
        let s = source(Layout::Fused);
        let one = s.expert_f32_bytes(); // 384 bytes
        let xs = [0, 1, 2, 3, 5, 6, 9, 10, 11, 12, 13];
        let g = s.groups(&xs, 3 * one);
        assert_eq!(
            g,
            vec![
                vec![0, 1, 2],
                vec![3],
                vec![5, 6],
                vec![9, 10, 11],
                vec![12, 13]
            ]
        );
        // A budget below one expert still loads one at a time.
        assert_eq!(s.groups(&[4, 7], 1), vec![vec![4], vec![7]]);
        assert!(s.groups(&[], one).is_empty());
        // Per-expert tensors: gaps do not matter.
        let p = source(Layout::PerExpert);
        assert_eq!(
            p.groups(&xs[..5], 2 * one),
            vec![vec![0, 1], vec![2, 3], vec![5]]
        );
    }
}
