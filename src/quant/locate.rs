//! Where the error enters (`qgate locate --scheme …`): for a simulated scheme, the residual stream after
//! every decoder layer of the quantized model against the unquantized model's at the same compute
//! precision (so the difference is what quantization did), at the positions where the scheme introduces
//! confident flips (the gate's rule against the oracle, with the f16 control). Per layer, after its mixer
//! (attention / Gated DeltaNet) and after its MLP: the mean relative error `‖x_q − x‖ / ‖x‖` and the
//! minimum cosine; the error enters at the block whose error rises the most over the block before it, and
//! the trend after it says whether the error grows, is carried, or is damped downstream.
use super::apply::QuantTransform;
use super::linear::ScaleDtype;
use super::scheme::Scheme;
use crate::capture::Capture;
use crate::commands::simulate::{simulate, SimRequest};
use crate::error::{Error, Result};
use crate::gate::evaluate::{evaluate, Inputs};
use crate::gate::margin_rule::FlipKind;
use crate::gate::policy::Policy;
use crate::gate::provenance::Provenance;
use crate::gate::summary::Identity;
use crate::model::config::{LayerKind, TextConfig};
use crate::model::precision::Precision;
use crate::model::weights::WeightStore;
use crate::model::Model;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Which positions the per-layer errors are measured at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The confident flips the scheme introduces (the ones that fail the gate).
    IntroducedFlips,
    /// The scheme introduces none: every counted position.
    AllPositions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trend {
    /// The error at the last layer is more than 1.25× the error where it entered.
    Grows,
    /// Within 0.8–1.25× of it.
    Carried,
    /// Below 0.8× of it.
    Damped,
    /// The entry is the last layer (nothing downstream) or no error was measured.
    NotApplicable,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerError {
    pub layer: usize,
    /// The block whose output this is: `attention`, `deltanet` or `mlp`.
    pub kind: &'static str,
    pub mean_rel_err: f64,
    pub max_rel_err: f64,
    pub min_cosine: f64,
    /// mean_rel_err minus the block before's (the embedding's before layer 0's mixer).
    pub added: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Located {
    pub scheme: String,
    pub spec: String,
    pub basis: Basis,
    pub introduced_confident_flips: usize,
    /// (sequence, position) measured.
    pub positions: Vec<(usize, usize)>,
    /// Relative error of the embedding output (non-zero only when the scheme quantizes the embedding).
    pub embedding_rel_err: f64,
    /// Two rows per layer: after the mixer, after the MLP.
    pub layers: Vec<LayerError>,
    pub entry_layer: Option<usize>,
    /// The block of the entry layer where the error enters (`attention`, `deltanet`, `mlp`).
    pub entry_block: Option<&'static str>,
    pub trend: Trend,
    /// last layer's error / the entry layer's.
    pub growth: Option<f64>,
    pub note: String,
}

pub struct Request<'a> {
    pub model_dir: &'a Path,
    pub plan: &'a [Vec<i64>],
    pub oracle: &'a Capture,
    pub provenance: Provenance,
    pub control: &'a Capture,
    pub control_id: Identity,
    pub policy: &'a Policy,
    pub scheme: Scheme,
    pub compute: Precision,
    pub scale_dtype: ScaleDtype,
    pub scratch: &'a Path,
    pub device: candle_core::Device,
}

fn ids(seq: &[i64]) -> Result<Vec<u32>> {
    seq.iter()
        .map(|&t| u32::try_from(t).map_err(|_| Error::usage(format!("token id {t} is not valid"))))
        .collect()
}

/// Residual streams `[embedding, after layer 0's mixer, after layer 0's MLP, …]`, each `[T, H]` as rows.
fn streams(model: &Model, seq: &[i64]) -> Result<Vec<Vec<Vec<f32>>>> {
    let x0 = model.embed_tokens(&ids(seq)?)?;
    let mut cache = model.new_cache();
    let halves = model.forward_layers_halves(&x0, &mut cache)?;
    std::iter::once(x0)
        .chain(halves.into_iter().flat_map(|(a, b)| [a, b]))
        .map(|t| Ok(t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?))
        .collect()
}

fn rel_err_cos(q: &[f32], r: &[f32]) -> (f64, f64) {
    let (mut d2, mut r2, mut q2, mut dot) = (0f64, 0f64, 0f64, 0f64);
    for (&a, &b) in q.iter().zip(r) {
        let (a, b) = (a as f64, b as f64);
        d2 += (a - b) * (a - b);
        r2 += b * b;
        q2 += a * a;
        dot += a * b;
    }
    let rel = if r2 > 0.0 { (d2 / r2).sqrt() } else { 0.0 };
    let cos = if q2 > 0.0 && r2 > 0.0 {
        dot / (q2 * r2).sqrt()
    } else {
        1.0
    };
    (rel, cos)
}

/// Simulate, gate, and measure.
pub fn run(req: Request) -> Result<Located> {
    let cfg = TextConfig::from_dir(req.model_dir)?;
    let mut scheme = req.scheme.clone();
    let spec = scheme.spec();
    let label = scheme.label();
    if scheme.name.is_empty() {
        scheme.name = spec.clone();
    }
    // 1. the gate's flips
    let path = req.scratch.join("locate.capture.safetensors");
    let o = simulate(SimRequest {
        model_dir: req.model_dir,
        plan: req.plan,
        scheme: scheme.clone(),
        compute: req.compute,
        scale_dtype: req.scale_dtype,
        rollout: 0,
        out: &path,
        progress: false,
        device: req.device.clone(),
    })?;
    let cap = Capture::open(&o.capture)?;
    let id = Identity {
        label: label.clone(),
        capture: cap.path.display().to_string(),
        bundle: None,
        mode: None,
        size_bytes: Some(o.report.size_bytes()),
        simulation: true,
    };
    let all = [&cap, req.control];
    let ev = evaluate(Inputs {
        oracle: req.oracle,
        provenance: req.provenance,
        all: &all,
        ids: vec![id, req.control_id],
        n_candidates: 1,
        policy: req.policy,
    })?;
    let cand = &ev.run.candidates[0];
    let mut positions: Vec<(usize, usize)> = cand
        .flips
        .iter()
        .filter(|f| f.kind == FlipKind::Confident && f.shared_with_control != Some(true))
        .map(|f| (f.seq, f.pos))
        .collect();
    let introduced = positions.len();
    let basis = if positions.is_empty() {
        positions = ev.compared[0]
            .positions
            .iter()
            .zip(&ev.masks[0])
            .filter(|(_, &k)| k)
            .map(|(m, _)| (m.seq, m.pos))
            .collect();
        Basis::AllPositions
    } else {
        Basis::IntroducedFlips
    };
    drop(cap);
    let _ = std::fs::remove_file(&o.capture);

    // 2. residual streams of the unquantized and the quantized model at those positions
    let mut ws = WeightStore::open(req.model_dir)?;
    ws.set_device(&req.device);
    let reference = Model::from_store(cfg.clone(), &ws, req.compute)?;
    let mut qws = WeightStore::open(req.model_dir)?;
    qws.set_device(&req.device);
    qws.set_transform(Arc::new(QuantTransform::new(scheme, req.scale_dtype)));
    let quantized = Model::from_store(cfg.clone(), &qws, req.compute)?;
    let mut by_seq: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(s, p) in &positions {
        by_seq.entry(s).or_default().push(p);
    }
    let n = cfg.layer_types.len();
    // per stream index (0 = embedding): (sum rel, max rel, min cos, count)
    let mut acc = vec![(0f64, 0f64, 1f64, 0usize); 2 * n + 1];
    for (&s, ps) in &by_seq {
        let seq = req
            .plan
            .get(s)
            .ok_or_else(|| Error::Internal(format!("flip in sequence {s} beyond the plan")))?;
        let r = streams(&reference, seq)?;
        let q = streams(&quantized, seq)?;
        for (i, (rl, ql)) in r.iter().zip(&q).enumerate() {
            for &p in ps {
                let (Some(rv), Some(qv)) = (rl.get(p), ql.get(p)) else {
                    continue;
                };
                let (rel, cos) = rel_err_cos(qv, rv);
                let a = &mut acc[i];
                a.0 += rel;
                a.1 = a.1.max(rel);
                a.2 = a.2.min(cos);
                a.3 += 1;
            }
        }
    }
    let mean = |i: usize| acc[i].0 / acc[i].3.max(1) as f64;
    let embedding_rel_err = mean(0);
    let layers: Vec<LayerError> = (0..2 * n)
        .map(|i| LayerError {
            layer: i / 2,
            kind: match (i % 2, &cfg.layer_types[i / 2]) {
                (1, _) => "mlp",
                (_, LayerKind::FullAttention) => "attention",
                (_, LayerKind::LinearAttention) => "deltanet",
            },
            mean_rel_err: mean(i + 1),
            max_rel_err: acc[i + 1].1,
            min_cosine: acc[i + 1].2,
            added: mean(i + 1) - mean(i),
        })
        .collect();
    let measured = acc.iter().any(|a| a.3 > 0) && layers.iter().any(|l| l.mean_rel_err > 0.0);
    let entry = measured
        .then(|| {
            (0..layers.len()).max_by(|&a, &b| {
                layers[a]
                    .added
                    .partial_cmp(&layers[b].added)
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
        })
        .flatten();
    let last = layers.len().saturating_sub(1);
    let (trend, growth) = match entry {
        Some(e) if e < last && layers[e].mean_rel_err > 0.0 => {
            let g = layers[last].mean_rel_err / layers[e].mean_rel_err;
            let t = if g > 1.25 {
                Trend::Grows
            } else if g < 0.8 {
                Trend::Damped
            } else {
                Trend::Carried
            };
            (t, Some(g))
        }
        _ => (Trend::NotApplicable, None),
    };
    let where_ = match basis {
        Basis::IntroducedFlips => format!("at its {introduced} introduced confident flip(s)"),
        Basis::AllPositions => {
            "it introduces no confident flip; measured over every counted position".to_string()
        }
    };
    let note = match (entry, trend, growth) {
        (Some(e), Trend::NotApplicable, _) => format!(
            "{label}: {where_}, the error enters at layer {} {} (+{:.4} relative error), the last block",
            layers[e].layer, layers[e].kind, layers[e].added
        ),
        (Some(e), t, Some(g)) => format!(
            "{label}: {where_}, the error enters at layer {} {} (+{:.4} relative error) and {} downstream ({:.2}× by layer {})",
            layers[e].layer,
            layers[e].kind,
            layers[e].added,
            match t {
                Trend::Grows => "grows",
                Trend::Damped => "is damped",
                _ => "is carried",
            },
            g,
            n - 1
        ),
        _ => format!("{label}: {where_}; the residual stream is identical to the unquantized model's"),
    };
    Ok(Located {
        scheme: label,
        spec,
        basis,
        introduced_confident_flips: introduced,
        positions,
        embedding_rel_err,
        entry_layer: entry.map(|e| layers[e].layer),
        entry_block: entry.map(|e| layers[e].kind),
        layers,
        trend,
        growth,
        note,
    })
}
