//! The verdict: apply the policy's rules in a fixed order, name the first that fails and its figure, and map
//! the run to an exit code (0 pass, 1 gate failed, 2 bad input, 3 prompt rejected). Also the symptom flags
//! and prompt validation.
use super::metrics::{OracleView, PositionMetrics, RowHealth};
use super::policy::{Policy, RolloutRequirement};
use super::summary::{CandidateSummary, Role, Symptom, Verdict};
use serde::Serialize;

pub const EXIT_PASS: i32 = 0;
pub const EXIT_GATE_FAILED: i32 = 1;
pub const EXIT_PROMPT_REJECTED: i32 = 3;

/// A degenerate repetition is the same token at least this many times in a row in a rollout.
pub const REPETITION_RUN: usize = 8;

fn fmt_row(seq: usize, pos: usize) -> String {
    format!("seq {seq} pos {pos}")
}

/// Judge one candidate against the policy. The first failing rule wins.
pub fn judge(s: &CandidateSummary, policy: &Policy) -> Verdict {
    if s.role == Role::Control {
        return Verdict {
            status: "control",
            failed_rule: None,
            reason: "control (not gated)".into(),
        };
    }
    let fail = |rule: &'static str, reason: String| Verdict {
        status: "fail",
        failed_rule: Some(rule),
        reason,
    };
    let g = &s.garbage;
    if g.non_finite_rows + g.constant_rows > 0 {
        let (seq, pos, kind) = g.first.unwrap_or((0, 0, RowHealth::NonFinite));
        let what = if kind == RowHealth::Constant {
            "constant"
        } else {
            "NaN/Inf"
        };
        return fail(
            "garbage_rows",
            format!(
                "garbage logits: {} NaN/Inf row(s) and {} constant row(s) (first: {what} at {})",
                g.non_finite_rows,
                g.constant_rows,
                fmt_row(seq, pos)
            ),
        );
    }
    if s.positions_counted == 0 {
        return fail(
            "positions",
            format!(
                "no positions compared: the capture has no per-position rows the policy counts ({} compared in all, data: {})",
                s.positions_compared, s.data
            ),
        );
    }
    if s.introduced_confident_flips > policy.max_introduced_confident_flips {
        let first = s.flips.iter().find(|f| {
            f.kind == super::margin_rule::FlipKind::Confident && f.shared_with_control != Some(true)
        });
        let at = first
            .map(|f| {
                format!(
                    " (first at {}: oracle margin {:.4}, candidate token {} instead of {})",
                    fmt_row(f.seq, f.pos),
                    f.margin,
                    f.candidate_token,
                    f.oracle_top1
                )
            })
            .unwrap_or_default();
        let what = if s.shared_with_control.is_some() {
            "introduced confident flip(s)"
        } else {
            "confident flip(s)"
        };
        return fail(
            "max_introduced_confident_flips",
            format!(
                "{} {what} > {} allowed{at}",
                s.introduced_confident_flips, policy.max_introduced_confident_flips
            ),
        );
    }
    if let Some(th) = policy.min_cosine {
        match &s.cosine {
            None => {
                return fail(
                    "min_cosine",
                    format!(
                    "min cosine required by the policy ({th}) but not computable from a {} capture",
                    s.data
                ),
                )
            }
            Some(c) if c.min < th => {
                return fail(
                    "min_cosine",
                    format!(
                        "min cosine {:.4} at {} < {th}",
                        c.min,
                        fmt_row(c.min_at.0, c.min_at.1)
                    ),
                )
            }
            _ => {}
        }
    }
    if let Some(th) = policy.max_mean_kl {
        match &s.kl {
            None => {
                return fail(
                    "max_mean_kl",
                    format!(
                    "mean KL limit in the policy ({th}) but KL is not computable from a {} capture",
                    s.data
                ),
                )
            }
            Some(k) if k.mean > th => {
                return fail("max_mean_kl", format!("mean KL {:.6} > {th}", k.mean));
            }
            _ => {}
        }
    }
    if let (Ok(req), Some(r)) = (policy.rollout(), &s.rollout) {
        for c in &r.per_sequence {
            let need = match req {
                RolloutRequirement::Off => 0,
                RolloutRequirement::Full => c.oracle_len,
                RolloutRequirement::Steps(n) => n.min(c.oracle_len),
            };
            if c.exact_prefix >= need {
                continue;
            }
            match &c.divergence {
                Some(d) if d.oracle_margin.is_some_and(|m| m < policy.margin_floor) => continue,
                Some(d) => {
                    let m = d
                        .oracle_margin
                        .map(|m| format!("oracle margin {m:.4}"))
                        .unwrap_or_else(|| "oracle margin unknown".into());
                    return fail(
                        "rollout_prefix",
                        format!(
                            "rollout of seq {} diverges at step {} ({m}): exact prefix {} < required {need}",
                            c.seq, d.step, c.exact_prefix
                        ),
                    );
                }
                None => {
                    return fail(
                        "rollout_prefix",
                        format!(
                            "rollout of seq {} stops after {} tokens: exact prefix {} < required {need}",
                            c.seq, c.candidate_len, c.exact_prefix
                        ),
                    )
                }
            }
        }
    }
    let ties = if s.tie_flips > 0 {
        format!(", {} tie-flip(s)", s.tie_flips)
    } else {
        String::new()
    };
    Verdict {
        status: "pass",
        failed_rule: None,
        reason: format!(
            "{}/{} exact, 0 introduced confident flips{ties}",
            s.exact, s.positions_counted
        ),
    }
}

/// Cosine crater and collapse-after-position-0 flags over the counted positions (plan order).
pub fn symptoms(positions: &[PositionMetrics], mask: &[bool]) -> Vec<Symptom> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < positions.len() {
        let seq = positions[i].seq;
        let mut j = i;
        while j < positions.len() && positions[j].seq == seq {
            j += 1;
        }
        let rows: Vec<&PositionMetrics> =
            (i..j).filter(|&k| mask[k]).map(|k| &positions[k]).collect();
        // crater: 1 − cos more than 10× the sequence's typical 1 − cos, and at least 0.02 below its median
        let mut cs: Vec<f64> = rows.iter().filter_map(|m| m.cosine_centred).collect();
        if cs.len() >= 3 {
            cs.sort_by(|a, b| a.total_cmp(b));
            let med = cs[cs.len() / 2];
            for m in &rows {
                if let Some(c) = m.cosine_centred {
                    if med - c >= 0.02 && (1.0 - c) > 10.0 * (1.0 - med) {
                        out.push(Symptom {
                            kind: "cosine_crater",
                            seq,
                            pos: Some(m.pos),
                            detail: format!("cosine {c:.4} vs sequence median {med:.4}"),
                        });
                    }
                }
            }
        }
        // collapse: position 0 agrees, then most later positions do not
        if let Some(first) = rows.first().filter(|m| m.pos == 0 && m.matched) {
            let later: Vec<&&PositionMetrics> = rows.iter().skip(1).collect();
            let agree = later.iter().filter(|m| m.matched).count();
            if later.len() >= 4 && (agree as f64) < 0.5 * later.len() as f64 {
                out.push(Symptom {
                    kind: "collapse_after_position_0",
                    seq,
                    pos: Some(first.pos),
                    detail: format!(
                        "position 0 agrees, then {agree}/{} later positions agree",
                        later.len()
                    ),
                });
            }
        }
        i = j;
    }
    out
}

/// Degenerate repetition in a candidate rollout (≥ 8 times the same token in a row).
pub fn repetition_symptom(seq: usize, cand: &[i64], oracle: Option<&[i64]>) -> Option<Symptom> {
    let (run, tok) = super::rollout::longest_run(cand);
    let tok = tok?;
    if run < REPETITION_RUN {
        return None;
    }
    let oracle_too = oracle.is_some_and(|o| super::rollout::longest_run(o).0 >= REPETITION_RUN);
    Some(Symptom {
        kind: "degenerate_repetition",
        seq,
        pos: None,
        detail: format!(
            "token {tok} {run} times in a row in the rollout{}",
            if oracle_too {
                " (the oracle's rollout repeats too)"
            } else {
                ""
            }
        ),
    })
}

/// Prompt validation: oracle positions that the policy counts but whose margin is below the floor.
#[derive(Debug, Clone, Serialize)]
pub struct PromptCheck {
    pub positions_counted: usize,
    pub below_floor: usize,
    /// Up to 20 of them: (seq, pos, margin).
    pub examples: Vec<(usize, usize, f64)>,
    pub rejected: bool,
}

pub fn check_prompt(views: &[(usize, usize, OracleView)], policy: &Policy) -> PromptCheck {
    let mut counted: Vec<&(usize, usize, OracleView)> = views
        .iter()
        .filter(|v| policy.counts_sequence(v.0))
        .collect();
    if policy.positions == "last" {
        counted = counted
            .iter()
            .enumerate()
            .filter(|(i, v)| counted.get(i + 1).is_none_or(|n| n.0 != v.0))
            .map(|(_, v)| *v)
            .collect();
    }
    let below: Vec<(usize, usize, f64)> = counted
        .iter()
        .filter(|v| v.2.margin < policy.margin_floor)
        .map(|v| (v.0, v.1, v.2.margin))
        .collect();
    PromptCheck {
        positions_counted: counted.len(),
        below_floor: below.len(),
        rejected: policy.require_confident_prompt && !below.is_empty(),
        examples: below.into_iter().take(20).collect(),
    }
}

/// The smallest passing candidate: by size when every passing candidate's size is known, else the first
/// passing one in the order given. Returns (label, how it was chosen).
pub fn ship_decision(cands: &[CandidateSummary]) -> Option<(String, &'static str)> {
    let passing: Vec<&CandidateSummary> = cands
        .iter()
        .filter(|c| c.verdict.status == "pass")
        .collect();
    if passing.is_empty() {
        return None;
    }
    if passing.iter().all(|c| c.id.size_bytes.is_some()) {
        let best = passing.iter().min_by_key(|c| c.id.size_bytes)?;
        Some((best.id.label.clone(), "smallest size"))
    } else {
        Some((
            passing[0].id.label.clone(),
            "first passing in the order given; sizes unknown",
        ))
    }
}

/// Exit code and verdict line for the whole run.
pub fn overall(cands: &[CandidateSummary], prompt: &PromptCheck, policy: &Policy) -> (i32, String) {
    let ship = ship_decision(cands);
    let ship_txt = match &ship {
        Some((l, how)) => format!("ship: {l} ({how})"),
        None => "ship: none".into(),
    };
    if prompt.rejected {
        let first = prompt
            .examples
            .first()
            .map(|e| format!(" (first: seq {} pos {}, margin {:.4})", e.0, e.1, e.2))
            .unwrap_or_default();
        return (
            EXIT_PROMPT_REJECTED,
            format!(
                "PROMPT REJECTED: {} of {} counted positions have an oracle margin below the floor {} ({}){first}; such positions are coin flips and cannot judge a candidate",
                prompt.below_floor,
                prompt.positions_counted,
                policy.margin_floor,
                policy.margin_space.name()
            ),
        );
    }
    let gated: Vec<&CandidateSummary> =
        cands.iter().filter(|c| c.role == Role::Candidate).collect();
    let failed: Vec<&&CandidateSummary> = gated
        .iter()
        .filter(|c| c.verdict.status != "pass")
        .collect();
    match failed.first() {
        None => (
            EXIT_PASS,
            format!(
                "PASS: {} of {} candidate(s) pass the gate; {ship_txt}",
                gated.len(),
                gated.len()
            ),
        ),
        Some(f) => {
            let more = if failed.len() > 1 {
                format!(" (+{} more failing)", failed.len() - 1)
            } else {
                String::new()
            };
            (
                EXIT_GATE_FAILED,
                format!(
                    "FAIL: {}: {} [{}]{more}; {ship_txt}",
                    f.id.label,
                    f.verdict.reason,
                    f.verdict.failed_rule.unwrap_or("?")
                ),
            )
        }
    }
}
