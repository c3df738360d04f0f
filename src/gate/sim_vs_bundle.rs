//! Simulation vs bundle: when one run holds a `qgate simulate` capture and a real bundle's capture of the
//! same quantization scheme, say how far they agree and name "the simulation passes, the bundle fails"
//! as a runtime lowering problem rather than a recipe problem.
use super::compare::Compared;
use super::decision::Status;
use super::summary::CandidateSummary;
use crate::capture::Capture;
use crate::quant::scheme::Scheme;
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Serialize)]
pub struct SimBundlePair {
    pub simulated: String,
    pub bundle: String,
    /// The scheme both stand for (`attn=…,gdn=…,mlp=…,head=…`).
    pub spec: String,
    /// Positions where both captures have a usable top-1.
    pub positions: usize,
    pub top1_agree: usize,
    pub simulated_verdict: Status,
    pub bundle_verdict: Status,
    pub finding: String,
}

/// The scheme a capture stands for: a simulation's recorded spec, or the scheme parsed from a bundle's
/// mode / label (the community's bundle names).
fn spec_of(cap: &Capture, cand: &CandidateSummary) -> Option<(bool, String)> {
    if cap.meta.runtime == super::summary::SIMULATE_RUNTIME {
        let spec = cap.meta.extra.get("quant_spec")?.as_str()?.to_string();
        return Some((true, spec));
    }
    // The full bundle name first (it carries suffixes such as `_sym` for the head), then the mode tag.
    let scheme = Scheme::parse(&cand.id.label)
        .ok()
        .or_else(|| cand.id.mode.as_deref().and_then(|m| Scheme::parse(m).ok()))?;
    Some((false, scheme.spec()))
}

/// Pair every simulated candidate with every real candidate of the same scheme.
pub fn pair_up(
    caps: &[&Capture],
    compared: &[Compared],
    cands: &[CandidateSummary],
) -> Vec<SimBundlePair> {
    let specs: Vec<Option<(bool, String)>> =
        caps.iter().zip(cands).map(|(c, s)| spec_of(c, s)).collect();
    let mut out = Vec::new();
    for (i, si) in specs.iter().enumerate() {
        let Some((true, spec)) = si else { continue };
        for (j, sj) in specs.iter().enumerate() {
            let Some((false, spec_b)) = sj else { continue };
            if spec != spec_b {
                continue;
            }
            let top1 = |k: usize| -> HashMap<(usize, usize), usize> {
                compared[k]
                    .positions
                    .iter()
                    .filter_map(|p| p.cand_top1.map(|t| ((p.seq, p.pos), t)))
                    .collect()
            };
            let (a, b) = (top1(i), top1(j));
            let common: Vec<_> = a.keys().filter(|k| b.contains_key(k)).collect();
            let agree = common.iter().filter(|k| a[k] == b[k]).count();
            let (vs, vb) = (cands[i].verdict.status, cands[j].verdict.status);
            let pct = if common.is_empty() {
                0.0
            } else {
                100.0 * agree as f64 / common.len() as f64
            };
            let finding = match (vs, vb) {
                (Status::Pass, Status::Fail) => format!(
                    "the simulation of this scheme passes but the bundle fails ({pct:.1}% top-1 agreement): the \
                     runtime computes something the scheme does not (a lowering/delegate problem), not a recipe problem"
                ),
                (Status::Fail, Status::Pass) => format!(
                    "the bundle passes where the simulation fails ({pct:.1}% top-1 agreement): the bundle does not \
                     compute this scheme as simulated — check the export recipe"
                ),
                (Status::Fail, Status::Fail) => format!("both fail ({pct:.1}% top-1 agreement): the scheme itself does not survive"),
                (Status::Pass, Status::Pass) => format!("both pass; {pct:.1}% top-1 agreement"),
                _ => format!("not both judged; {pct:.1}% top-1 agreement"),
            };
            out.push(SimBundlePair {
                simulated: cands[i].id.label.clone(),
                bundle: cands[j].id.label.clone(),
                spec: spec.clone(),
                positions: common.len(),
                top1_agree: agree,
                simulated_verdict: vs,
                bundle_verdict: vb,
                finding,
            });
        }
    }
    out
}
