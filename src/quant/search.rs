//! The smallest passing mix (`qgate sweep --search int4:int8`): start from the low method everywhere
//! (every layer's attention / Gated DeltaNet / MLP, the head and the embedding), promote parts to the high
//! method greedily by measured harm per byte (the sensitivity map at the low method: harm per extra byte
//! the promotion costs), one part per step, until the gate passes; then a pruning pass demotes every
//! promoted part that is no longer needed (last promoted first). Every step is a full simulation judged by
//! the same gate as `qgate run` (policy, rollouts, the f16 control). The answer is a `simulate --scheme`
//! mix string; when no mix smaller than all-high passes (or all-high itself fails), that is the answer.
use super::linear::ScaleDtype;
use super::scheme::{Component, Method, Scheme};
use super::sensitivity::{bare, Part, SensitivityMap};
use crate::capture::Capture;
use crate::commands::simulate::{simulate, SimRequest};
use crate::error::Result;
use crate::gate::decision::{Rule, Status};
use crate::gate::evaluate::{evaluate, Inputs};
use crate::gate::policy::Policy;
use crate::gate::provenance::Provenance;
use crate::gate::summary::Identity;
use crate::model::precision::Precision;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Every part at the high method (the size to beat; it must pass for a search to make sense).
    AllHigh,
    /// Every part at the low method.
    AllLow,
    /// One part raised to the high method.
    Promote,
    /// One promoted part tried at the low method again (kept there only if the gate still passes).
    Demote,
}

/// One gated simulation of the search.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub action: Action,
    pub part: Option<String>,
    /// The mix as `simulate --scheme` takes it.
    pub mix: String,
    pub size_bytes: u64,
    pub introduced_confident_flips: usize,
    pub status: Status,
    pub failed_rule: Option<Rule>,
    /// Demote: whether the demotion was kept (the gate still passed).
    pub kept: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Found {
    /// A mix smaller than all-high passes.
    Mix,
    /// Every part at the low method already passes.
    AllLow,
    /// Only all-high passes: nothing useful between the two methods.
    NothingBelowAllHigh,
    /// All-high itself fails the gate: no mix of these two methods can ship.
    AllHighFails,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchOutcome {
    pub low: String,
    pub high: String,
    pub found: Found,
    /// The mix that passes (`simulate --scheme` syntax), when one does.
    pub mix: Option<String>,
    pub size_bytes: Option<u64>,
    pub all_high_bytes: u64,
    pub all_low_bytes: u64,
    /// all-high − the mix, when a mix passes.
    pub saved_bytes: Option<u64>,
    /// Parts at the high method in the mix.
    pub high_parts: Vec<String>,
    pub steps: Vec<Step>,
    /// One line in words.
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
    pub low: Method,
    pub high: Method,
    pub compute: Precision,
    pub scale_dtype: ScaleDtype,
    pub rollout: usize,
    /// The sensitivity map at the low method (the promotion order).
    pub map: &'a SensitivityMap,
    /// Where each step's capture is written (and removed once judged).
    pub scratch: &'a Path,
    pub progress: bool,
    pub device: candle_core::Device,
}

/// Every part at `m` (the embedding included).
pub fn uniform(m: Method) -> Scheme {
    let mut s = bare();
    for c in Component::EVERY {
        s.set(c, Some(m));
    }
    s.name = s.spec();
    s
}

struct Gated {
    size: u64,
    flips: usize,
    status: Status,
    failed_rule: Option<Rule>,
    part_bytes: BTreeMap<Part, u64>,
}

fn gate(req: &Request, scheme: &Scheme, n: usize) -> Result<Gated> {
    let mut scheme = scheme.clone();
    scheme.name = scheme.spec();
    // A fresh directory of its own for the step's capture (removed when done): never a name of the
    // user's files in `--captures`.
    let scratch = tempfile::Builder::new()
        .prefix(".qgate-search-")
        .tempdir_in(req.scratch)
        .map_err(|e| crate::error::io_err(req.scratch, e))?;
    let path = scratch
        .path()
        .join(format!("search-step-{n}.capture.safetensors"));
    let o = simulate(SimRequest {
        model_dir: req.model_dir,
        plan: req.plan,
        scheme,
        compute: req.compute,
        scale_dtype: req.scale_dtype,
        rollout: req.rollout,
        out: &path,
        progress: false,
        device: req.device.clone(),
    })?;
    let cap = Capture::open(&o.capture)?;
    let id = Identity {
        label: format!("search step {n}"),
        capture: cap.path.display().to_string(),
        bundle: None,
        mode: None,
        size_bytes: Some(o.report.size_bytes()),
        simulation: true,
    };
    let all = [&cap, req.control];
    let ev = evaluate(Inputs {
        oracle: req.oracle,
        provenance: req.provenance.clone(),
        all: &all,
        ids: vec![id, req.control_id.clone()],
        n_candidates: 1,
        policy: req.policy,
    })?;
    drop(cap);
    let _ = std::fs::remove_file(&o.capture);
    let c = &ev.run.candidates[0];
    let mut part_bytes = BTreeMap::new();
    for w in &o.report.weights {
        if let Some(p) = Part::of_weight(&w.name) {
            *part_bytes.entry(p).or_insert(0) += w.bytes;
        }
    }
    Ok(Gated {
        size: o.report.size_bytes(),
        flips: c.introduced_confident_flips,
        status: c.verdict.status,
        failed_rule: c.verdict.failed_rule,
        part_bytes,
    })
}

fn step(
    action: Action,
    part: Option<Part>,
    scheme: &Scheme,
    g: &Gated,
    kept: Option<bool>,
) -> Step {
    Step {
        action,
        part: part.map(|p| p.label()),
        mix: scheme.spec(),
        size_bytes: g.size,
        introduced_confident_flips: g.flips,
        status: g.status,
        failed_rule: g.failed_rule,
        kept,
    }
}

/// Run the search.
pub fn run(req: &Request) -> Result<SearchOutcome> {
    let (low, high) = (req.low, req.high);
    let mut steps = Vec::new();
    let mut n = 0usize;
    let say = |m: &str| {
        if req.progress {
            eprintln!("qgate: search: {m}");
        }
    };
    let all_high = uniform(high);
    let gh = gate(req, &all_high, n)?;
    n += 1;
    steps.push(step(Action::AllHigh, None, &all_high, &gh, None));
    say(&format!("all-high {} → {}", high.canonical(), gh.status));
    let mut current = uniform(low);
    let gl = gate(req, &current, n)?;
    n += 1;
    steps.push(step(Action::AllLow, None, &current, &gl, None));
    say(&format!("all-low {} → {}", low.canonical(), gl.status));
    let (high_bytes, low_bytes) = (gh.size, gl.size);
    let base = |found: Found, note: String, steps: Vec<Step>| SearchOutcome {
        low: low.canonical(),
        high: high.canonical(),
        found,
        mix: None,
        size_bytes: None,
        all_high_bytes: high_bytes,
        all_low_bytes: low_bytes,
        saved_bytes: None,
        high_parts: Vec::new(),
        steps,
        note,
    };
    if gh.status != Status::Pass {
        let why = gh
            .failed_rule
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        return Ok(base(
            Found::AllHighFails,
            format!(
                "all-high ({}) fails the gate{why}: no mix of {} and {} can ship",
                high.canonical(),
                low.canonical(),
                high.canonical()
            ),
            steps,
        ));
    }
    if gl.status == Status::Pass {
        let mut o = base(
            Found::AllLow,
            format!(
                "every part at {} passes: no part needs {}",
                low.canonical(),
                high.canonical()
            ),
            steps,
        );
        o.mix = Some(current.spec());
        o.size_bytes = Some(gl.size);
        o.saved_bytes = Some(gh.size.saturating_sub(gl.size));
        return Ok(o);
    }
    // promotion order: harm per extra byte, most first; harmless parts last, cheapest first
    let extra = |p: &Part| {
        let h = gh.part_bytes.get(p).copied().unwrap_or(0);
        let l = gl.part_bytes.get(p).copied().unwrap_or(0);
        h.saturating_sub(l)
    };
    let mut order: Vec<(Part, f64, u64)> = req
        .map
        .parts
        .iter()
        .map(|r| (r.part, r.harm(req.policy), extra(&r.part)))
        .collect();
    order.sort_by(|a, b| {
        let key = |x: &(Part, f64, u64)| {
            if x.1 > 0.0 {
                (0, -(x.1 / x.2.max(1) as f64))
            } else {
                (1, x.2 as f64)
            }
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.partial_cmp(&kb.1).unwrap_or(std::cmp::Ordering::Equal))
    });
    let mut promoted: Vec<Part> = Vec::new();
    let mut last = gl;
    for &(part, _, _) in &order {
        part.set_in(&mut current, Some(high));
        promoted.push(part);
        let g = gate(req, &current, n)?;
        n += 1;
        say(&format!("promote {} → {}", part.label(), g.status));
        steps.push(step(Action::Promote, Some(part), &current, &g, None));
        let pass = g.status == Status::Pass;
        last = g;
        if pass {
            break;
        }
    }
    // pruning: demote what is no longer needed, last promoted first (not the last itself: without it the
    // mix is the previous step's, which failed)
    for &part in promoted.clone().iter().rev().skip(1) {
        let mut trial = current.clone();
        part.set_in(&mut trial, Some(low));
        let g = gate(req, &trial, n)?;
        n += 1;
        let keep = g.status == Status::Pass;
        say(&format!(
            "demote {} → {}{}",
            part.label(),
            g.status,
            if keep { " (kept)" } else { " (reverted)" }
        ));
        steps.push(step(Action::Demote, Some(part), &trial, &g, Some(keep)));
        if keep {
            current = trial;
            promoted.retain(|p| *p != part);
            last = g;
        }
    }
    let high_parts: Vec<String> = promoted.iter().map(|p| p.label()).collect();
    let mut o = base(Found::Mix, String::new(), steps);
    if last.size >= gh.size {
        o.found = Found::NothingBelowAllHigh;
        o.note = format!(
            "no mix smaller than all-{} passes: nothing useful between {} and {}",
            high.canonical(),
            low.canonical(),
            high.canonical()
        );
        return Ok(o);
    }
    let size = crate::report::markdown::human_size;
    o.note = format!(
        "{} at {}, everything else at {}: {}, {} saved versus all-{}",
        high_parts.join(", "),
        high.canonical(),
        low.canonical(),
        size(last.size),
        size(gh.size - last.size),
        high.canonical()
    );
    o.mix = Some(current.spec());
    o.size_bytes = Some(last.size);
    o.saved_bytes = Some(gh.size - last.size);
    o.high_parts = high_parts;
    Ok(o)
}
