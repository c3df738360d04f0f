//! The sensitivity map (`qgate sweep --sensitivity int4`): every layer × component (attention, Gated
//! DeltaNet, MLP or experts, head, embedding) quantized alone at the low method, the rest of the model
//! unquantized at the simulation's compute precision, judged against the oracle by the gate's own rules:
//! introduced confident flips (confident flips the f16 control does not share), mean KL and min cosine
//! over the policy's counted positions (teacher-forced positions; no rollout per part).
//!
//! **Prefix reuse.** Layers before the quantized one are identical to the unquantized model, so the
//! residual stream entering every layer is computed once per plan (held in memory) and a part at layer
//! `l` runs only layers `l..` and the head from there; the head part runs only the head; the embedding
//! part runs everything. `Naive` computes every part with a full simulation instead (one capture per
//! part, what `qgate simulate` would do): the same numbers, bit for bit, at the full cost — the
//! benchmark's baseline and the test of the prefix reuse.
use super::apply::{classify_at, QuantReport, QuantTransform};
use super::linear::ScaleDtype;
use super::scheme::{Component, Method, Scheme};
use crate::capture::Capture;
use crate::error::{Error, Result};
use crate::gate::compare::{self, OracleAt};
use crate::gate::margin_rule::{self, ControlTop1};
use crate::gate::metrics::PositionMetrics;
use crate::gate::policy::Policy;
use crate::gate::rows;
use crate::gate::summary::{self, Identity, Role};
use crate::model::config::{LayerKind, TextConfig};
use crate::model::precision::Precision;
use crate::model::weights::WeightStore;
use crate::model::Model;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// One quantizable part: a component of one decoder layer, or the head, or the embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Part {
    pub component: Component,
    /// `None` for the head and the embedding.
    pub layer: Option<usize>,
}

impl Part {
    /// `L2 mlp`, `head`, `embed`.
    pub fn label(&self) -> String {
        match self.layer {
            Some(l) => format!("L{l} {}", self.component.name()),
            None => self.component.name().to_string(),
        }
    }

    /// Set this part of `scheme` to `m`.
    pub fn set_in(&self, scheme: &mut Scheme, m: Option<Method>) {
        match self.layer {
            Some(l) => scheme.set_at(self.component, l, m),
            None => scheme.set(self.component, m),
        }
    }

    /// Parse `head`, `embed` or `COMPONENT@LAYER` (`mlp@2`, `gdn@0`, `attn@3`), the mix syntax.
    pub fn parse(s: &str) -> Option<Part> {
        let s = s.trim();
        match s.split_once('@') {
            None => Component::parse(s)
                .filter(|c| !c.per_layer())
                .map(|component| Part {
                    component,
                    layer: None,
                }),
            Some((c, l)) => {
                let component = Component::parse(c.trim()).filter(|c| c.per_layer())?;
                let layer = l.trim().parse().ok()?;
                Some(Part {
                    component,
                    layer: Some(layer),
                })
            }
        }
    }

    /// The part a weight belongs to (decoder-relative name, `lm_head.weight`), if it is quantizable.
    pub fn of_weight(name: &str) -> Option<Part> {
        classify_at(name).map(|(component, layer)| Part { component, layer })
    }
}

/// Every part of a model, in layer order, then the head and the embedding.
pub fn parts_of(cfg: &TextConfig) -> Vec<Part> {
    let mut parts = Vec::new();
    for (l, kind) in cfg.layer_types.iter().enumerate() {
        let mixer = match kind {
            LayerKind::FullAttention => Component::Attn,
            LayerKind::LinearAttention => Component::Gdn,
        };
        for component in [mixer, Component::Mlp] {
            parts.push(Part {
                component,
                layer: Some(l),
            });
        }
    }
    parts.push(Part {
        component: Component::Head,
        layer: None,
    });
    parts.push(Part {
        component: Component::Embed,
        layer: None,
    });
    parts
}

/// A scheme that leaves every weight as stored.
pub fn bare() -> Scheme {
    Scheme {
        name: String::new(),
        alias: None,
        attn: None,
        gdn: None,
        mlp: None,
        head: None,
        rest: None,
        embed: None,
        layers: Vec::new(),
    }
}

/// A scheme that quantizes `part` alone at `m` (everything else as stored).
pub fn only(part: Part, m: Method) -> Scheme {
    let mut s = bare();
    part.set_in(&mut s, Some(m));
    s.name = s.spec();
    s
}

/// What quantizing one part did.
#[derive(Debug, Clone, Serialize)]
pub struct PartResult {
    pub part: Part,
    pub label: String,
    /// Confident flips the control does not share, over the policy's counted positions.
    pub introduced_confident_flips: usize,
    pub confident_flips: usize,
    pub tie_flips: usize,
    /// Mean KL(oracle ‖ part) over the counted positions; `None`: not computed.
    pub mean_kl: Option<f64>,
    /// Minimum mean-centred cosine over the counted positions; `None`: not computed.
    pub min_cosine: Option<f64>,
    /// Bytes of the part's weights at the low method (packed codes + scales).
    pub bytes_low: u64,
    /// Bytes of the part's weights as stored unquantized (2 per element).
    pub bytes_plain: u64,
    /// Weights of the part the method had to leave unquantized (non-divisible dimensions).
    pub skipped: Vec<String>,
    /// Decoder layers this part recomputed (prefix reuse), of the model's.
    pub layers_run: usize,
    /// Positions the policy counts.
    pub positions_counted: usize,
}

impl PartResult {
    /// The harm score the search ranks parts by: introduced confident flips, plus the fraction of the
    /// policy's KL budget and cosine budget used (0 for a budget the policy does not set or a metric not
    /// computed).
    pub fn harm(&self, policy: &Policy) -> f64 {
        let kl = match (self.mean_kl, policy.max_mean_kl) {
            (Some(k), Some(lim)) if lim > 0.0 => k / lim,
            _ => 0.0,
        };
        let cos = match (self.min_cosine, policy.min_cosine) {
            (Some(c), Some(lim)) if lim < 1.0 => (1.0 - c).max(0.0) / (1.0 - lim),
            _ => 0.0,
        };
        self.introduced_confident_flips as f64 + kl + cos
    }
}

/// How the parts are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Resume from the oracle-precision residual stream at the part's layer.
    PrefixReuse,
    /// One full simulation per part (the baseline).
    Naive,
}

#[derive(Debug, Clone, Serialize)]
pub struct SensitivityMap {
    pub method: String,
    pub compute: String,
    pub mode: Mode,
    pub layers: usize,
    pub parts: Vec<PartResult>,
    /// Positions the policy counts (each part is judged on these).
    pub positions_counted: usize,
    /// Seconds for the whole map (baseline residual streams included).
    pub seconds: f64,
    /// Decoder-layer passes over the plan the map ran, and what one full model per part would have run.
    pub layer_passes: usize,
    pub layer_passes_naive: usize,
}

impl SensitivityMap {
    /// Parts by harm, most harmful first (ties: layer order).
    pub fn ranked(&self, policy: &Policy) -> Vec<&PartResult> {
        let mut r: Vec<&PartResult> = self.parts.iter().collect();
        r.sort_by(|a, b| {
            b.harm(policy)
                .partial_cmp(&a.harm(policy))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        r
    }
}

pub struct Request<'a> {
    pub model_dir: &'a Path,
    pub plan: &'a [Vec<i64>],
    pub oracle: &'a Capture,
    /// The f16 control's capture (its top-1 decides which flips are shared).
    pub control: &'a Capture,
    pub policy: &'a Policy,
    pub method: Method,
    pub compute: Precision,
    pub scale_dtype: ScaleDtype,
    pub mode: Mode,
    pub progress: bool,
    pub device: candle_core::Device,
    /// Naive mode: where the per-part captures go (each removed once judged).
    pub scratch: &'a Path,
    /// Only these parts (`None`: every part of the model).
    pub only: Option<&'a [Part]>,
}

/// The oracle's views and the control's top-1 (via the gate's own comparison).
fn control_and_views(
    oracle: &Capture,
    control: &Capture,
    policy: &Policy,
) -> Result<(Vec<OracleAt>, ControlTop1)> {
    let (views, compared) = compare::compare(oracle, &[control], policy)?;
    let top1 = margin_rule::control_top1(&compared[0].positions);
    Ok((views, top1))
}

/// Judge one part's positions with the gate's summary.
fn judge(
    part: Part,
    positions: &[PositionMetrics],
    views: &[OracleAt],
    policy: &Policy,
    control: &ControlTop1,
    report: &QuantReport,
    layers_run: usize,
) -> PartResult {
    let id = Identity {
        label: part.label(),
        capture: String::new(),
        bundle: None,
        mode: None,
        size_bytes: None,
        simulation: true,
    };
    let s = summary::summarise(
        id,
        Role::Candidate,
        positions,
        views.len().saturating_sub(positions.len()),
        views,
        policy,
        Some(control),
        None,
    );
    let mine = |w: &&super::apply::WeightRecord| Part::of_weight(&w.name) == Some(part);
    PartResult {
        part,
        label: part.label(),
        introduced_confident_flips: s.introduced_confident_flips,
        confident_flips: s.confident_flips,
        tie_flips: s.tie_flips,
        mean_kl: s.kl.as_ref().map(|k| k.mean),
        min_cosine: s.cosine.as_ref().map(|c| c.min),
        bytes_low: report.weights.iter().filter(mine).map(|w| w.bytes).sum(),
        bytes_plain: report
            .weights
            .iter()
            .filter(mine)
            .map(|w| w.shape.iter().product::<usize>() as u64 * 2)
            .sum(),
        skipped: report
            .skipped
            .iter()
            .filter(|k| Part::of_weight(&k.name) == Some(part))
            .map(|k| format!("{} {:?} ({})", k.name, k.shape, k.reason))
            .collect(),
        layers_run,
        positions_counted: s.positions_counted,
    }
}

fn token_ids(seq: &[i64]) -> Result<Vec<u32>> {
    seq.iter()
        .map(|&t| u32::try_from(t).map_err(|_| Error::usage(format!("token id {t} is not valid"))))
        .collect()
}

fn store(
    req: &Request,
    scheme: Option<Scheme>,
) -> Result<(WeightStore, Option<Arc<QuantTransform>>)> {
    let mut ws = WeightStore::open(req.model_dir)?;
    ws.set_device(&req.device);
    let t = scheme.map(|s| Arc::new(QuantTransform::new(s, req.scale_dtype)));
    if let Some(t) = &t {
        ws.set_transform(t.clone());
    }
    Ok((ws, t))
}

/// Every part of `only` exists in the model (`--sensitivity-parts`, checked before any work).
pub fn check_parts(cfg: &TextConfig, only: &[Part]) -> Result<()> {
    let parts = parts_of(cfg);
    match only.iter().find(|p| !parts.contains(p)) {
        Some(p) => Err(Error::usage(format!(
            "--sensitivity-parts: the model has no part `{}`",
            p.label()
        ))),
        None => Ok(()),
    }
}

/// Compute the map.
pub fn run(req: &Request) -> Result<SensitivityMap> {
    let t0 = Instant::now();
    let cfg = TextConfig::from_dir(req.model_dir)?;
    let n_layers = cfg.layer_types.len();
    let mut parts = parts_of(&cfg);
    if let Some(only) = req.only {
        check_parts(&cfg, only)?;
        parts.retain(|p| only.contains(p));
    }
    let (views, control) = control_and_views(req.oracle, req.control, req.policy)?;
    let bar =
        crate::progress::Progress::new(req.progress, parts.len() as u64, "sensitivity", "parts");
    let mut results = Vec::with_capacity(parts.len());
    let mut layer_passes = 0usize;
    match req.mode {
        Mode::Naive => {
            // The scratch captures go to a fresh directory of their own (removed with everything in it
            // when done): never a name of the user's files in `--captures`.
            let scratch = tempfile::Builder::new()
                .prefix(".qgate-sensitivity-")
                .tempdir_in(req.scratch)
                .map_err(|e| crate::error::io_err(req.scratch, e))?;
            for &part in &parts {
                bar.set_message(part.label());
                let path = scratch.path().join(format!(
                    "part-{}.capture.safetensors",
                    part.label().replace(' ', "-")
                ));
                let o =
                    crate::commands::simulate::simulate(crate::commands::simulate::SimRequest {
                        model_dir: req.model_dir,
                        plan: req.plan,
                        scheme: only(part, req.method),
                        compute: req.compute,
                        scale_dtype: req.scale_dtype,
                        rollout: 0,
                        out: &path,
                        progress: false,
                        device: req.device.clone(),
                    })?;
                let cap = Capture::open(&o.capture)?;
                let (_, compared) = compare::compare(req.oracle, &[&cap], req.policy)?;
                drop(cap);
                let _ = std::fs::remove_file(&o.capture);
                layer_passes += n_layers;
                results.push(judge(
                    part,
                    &compared[0].positions,
                    &views,
                    req.policy,
                    &control,
                    &o.report,
                    n_layers,
                ));
                bar.inc(1);
            }
        }
        Mode::PrefixReuse => {
            let (ws, _) = store(req, None)?;
            let model = Model::from_store(cfg.clone(), &ws, req.compute)?;
            // the residual stream entering every layer (and after the last), per sequence
            let mut streams: Vec<Vec<candle_core::Tensor>> = Vec::with_capacity(req.plan.len());
            for seq in req.plan {
                let ids = token_ids(seq)?;
                let x0 = model.embed_tokens(&ids)?;
                let mut cache = model.new_cache();
                let mut trace = Vec::with_capacity(n_layers);
                model.forward_layers(0, &x0, &mut cache, None, Some(&mut trace))?;
                let mut s = Vec::with_capacity(n_layers + 1);
                s.push(x0);
                s.extend(trace);
                streams.push(s);
            }
            layer_passes += n_layers;
            for &part in &parts {
                bar.set_message(part.label());
                let (pws, t) = store(req, Some(only(part, req.method)))?;
                let mut positions = Vec::new();
                let layers_run;
                match (part.component, part.layer) {
                    (Component::Head, _) => {
                        let head = model.load_head(&pws)?;
                        for (s, st) in streams.iter().enumerate() {
                            let h = model.final_norm(&st[n_layers])?;
                            let lg: Vec<f32> =
                                model.logits_with(&h, &head)?.flatten_all()?.to_vec1()?;
                            positions.extend(rows::compare_sequence(
                                req.oracle,
                                s,
                                &lg,
                                req.policy.margin_space,
                            )?);
                        }
                        layers_run = 0;
                    }
                    (Component::Embed, _) => {
                        let pm = Model::from_store(cfg.clone(), &pws, req.compute)?;
                        for (s, seq) in req.plan.iter().enumerate() {
                            let ids = token_ids(seq)?;
                            let mut cache = pm.new_cache();
                            let lg: Vec<f32> =
                                pm.forward(&ids, &mut cache)?.flatten_all()?.to_vec1()?;
                            positions.extend(rows::compare_sequence(
                                req.oracle,
                                s,
                                &lg,
                                req.policy.margin_space,
                            )?);
                        }
                        layers_run = n_layers;
                    }
                    (_, Some(l)) => {
                        let slot = model.load_layer(&pws, l)?;
                        for (s, st) in streams.iter().enumerate() {
                            let mut cache = model.new_cache();
                            let x =
                                model.forward_layers(l, &st[l], &mut cache, Some(&slot), None)?;
                            let h = model.final_norm(&x)?;
                            let lg: Vec<f32> = model.logits(&h)?.flatten_all()?.to_vec1()?;
                            positions.extend(rows::compare_sequence(
                                req.oracle,
                                s,
                                &lg,
                                req.policy.margin_space,
                            )?);
                        }
                        layers_run = n_layers - l;
                    }
                    (c, None) => {
                        return Err(Error::Internal(format!("part {} has no layer", c.name())))
                    }
                }
                layer_passes += layers_run;
                let report = t.map(|t| t.report()).unwrap_or_default();
                results.push(judge(
                    part, &positions, &views, req.policy, &control, &report, layers_run,
                ));
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let counted = results.first().map(|r| r.positions_counted).unwrap_or(0);
    Ok(SensitivityMap {
        method: req.method.canonical(),
        compute: req.compute.name().to_string(),
        mode: req.mode,
        layers: n_layers,
        parts: results,
        positions_counted: counted,
        seconds: t0.elapsed().as_secs_f64(),
        layer_passes,
        layer_passes_naive: parts.len() * n_layers,
    })
}
