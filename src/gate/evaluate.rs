//! The gate's pipeline, callable as a library: compare the candidates (and the control) with the oracle,
//! summarise each, check that the control earns its role, judge each candidate against the policy, and
//! decide what ships. `qgate run` and `qgate sweep` only parse arguments, call this and print.
use super::compare::{self, Compared};
use super::decision::Status;
use super::margin_rule::{self, FlipKind, TieRule};
use super::metrics::{MarginSpace, OracleView};
use super::outcome::{OracleInfo, Paired, PlanInfo, RunSummary, REPORT_SCHEMA};
use super::policy::Policy;
use super::provenance::Provenance;
use super::roles;
use super::rollout::{self, RolloutComparison, RolloutGap, Side};
use super::stats;
use super::summary::{self, Identity, Role, RolloutSummary};
use super::symptoms;
use super::verdict;
use crate::capture::Capture;
use crate::error::{Error, Result};
use std::collections::HashMap;

/// A gated run: the summary every report renders, and the per-position data behind it.
pub struct Evaluation {
    pub run: RunSummary,
    pub compared: Vec<Compared>,
    /// Per capture, per compared position: whether the policy counts it.
    pub masks: Vec<Vec<bool>>,
    /// Per capture, per compared position: the gate's flip classification (`None`: no flip).
    pub judgements: Vec<Vec<Option<FlipKind>>>,
    pub views: Vec<(usize, usize, OracleView)>,
}

/// The inputs of one gated run.
pub struct Inputs<'a> {
    pub oracle: &'a Capture,
    pub provenance: Provenance,
    /// The gated candidates first, then the control if any.
    pub all: &'a [&'a Capture],
    pub ids: Vec<Identity>,
    pub n_candidates: usize,
    pub policy: &'a Policy,
}

fn rollout_comparisons(
    oracle: &Capture,
    cand: &Capture,
    view_at: &HashMap<(usize, usize), OracleView>,
    policy: &Policy,
) -> (Vec<RolloutComparison>, Vec<RolloutGap>, Option<String>) {
    let rule = TieRule::of(policy);
    // a recorded (prob, logit) margin pair in the run's margin space
    let in_space = |(p, l): (f32, f32)| -> f64 {
        if policy.margin_space == MarginSpace::Prob {
            p as f64
        } else {
            l as f64
        }
    };
    let mut out = Vec::new();
    let mut gaps = Vec::new();
    let (mut oracle_has, mut cand_has) = (false, false);
    for s in (0..oracle.len()).filter(|&s| policy.counts_sequence(s)) {
        let (ov, cv) = (oracle.seq(s), cand.seq(s));
        oracle_has |= ov.rollout.is_some();
        cand_has |= cv.rollout.is_some();
        let (or, cr) = match (&ov.rollout, &cv.rollout) {
            (Some(or), Some(cr)) => (or, cr),
            (None, None) => continue,
            // one side only: a sequence the rule cannot compare (a capture tool dropping the rollouts
            // that went wrong must not pass by omission)
            (Some(_), None) => {
                gaps.push(RolloutGap {
                    seq: s,
                    missing_on: Side::Candidate,
                });
                continue;
            }
            (None, Some(_)) => {
                gaps.push(RolloutGap {
                    seq: s,
                    missing_on: Side::Oracle,
                });
                continue;
            }
        };
        let last = ov.tokens.len() - 1;
        // the oracle's own per-step margins, in the run's margin space; step 0 from its last prompt row
        let mut margins: Vec<Option<f64>> = match &ov.rollout_margin {
            Some(m) => m.iter().map(|&pl| Some(in_space(pl))).collect(),
            None => vec![None; or.len()],
        };
        let v0 = view_at.get(&(s, last)).copied();
        if let (Some(first), Some(v0)) = (margins.first_mut(), v0) {
            *first = Some(v0.margin);
        }
        let mut c = rollout::compare(s, or, cr, &margins);
        if let Some(d) = c.divergence.as_mut() {
            d.tie = if d.step == 0 {
                // the full tie rule on the oracle's row after the prompt
                match (
                    v0,
                    compare::oracle_logit_at(oracle, s, last, d.candidate_token),
                ) {
                    (Some(v), Some(lc)) => Some(rule.is_tie(v.p1, v.l1, lc)),
                    _ => None,
                }
            } else {
                // later steps: only the oracle's recorded top-1 − top-2 margins are known; a tie needs
                // both below the floor and within the logit gap (necessary for any near-top token)
                ov.rollout_margin
                    .as_ref()
                    .and_then(|m| m.get(d.step))
                    .map(|&(p, l)| {
                        in_space((p, l)) < policy.margin_floor
                            && (l as f64) <= policy.tie_max_logit_gap
                    })
            };
        }
        out.push(c);
    }
    let missing = out.is_empty().then(|| {
        match (oracle_has, cand_has) {
            (false, _) => "the oracle capture holds no rollout",
            (true, false) => "the candidate holds no rollout",
            _ => "no counted sequence has a rollout on both sides",
        }
        .to_string()
    });
    // Sequences where neither side has a rollout, while others have one on both sides, are gaps too.
    if !out.is_empty() {
        for s in (0..oracle.len()).filter(|&s| policy.counts_sequence(s)) {
            if oracle.seq(s).rollout.is_none() && cand.seq(s).rollout.is_none() {
                gaps.push(RolloutGap {
                    seq: s,
                    missing_on: Side::Both,
                });
            }
        }
        gaps.sort_by_key(|g| g.seq);
    }
    (out, gaps, missing)
}

/// Compare, summarise, check roles, judge and decide. Errors (exit 2) when the policy does not fit the
/// plan, the oracle is one of the candidates, or the control does not earn its role.
pub fn evaluate(inp: Inputs<'_>) -> Result<Evaluation> {
    let Inputs {
        oracle,
        provenance,
        all,
        ids,
        n_candidates,
        policy,
    } = inp;
    policy
        .check_against_plan(oracle.len())
        .map_err(|m| Error::usage(format!("gate policy does not fit the plan: {m}")))?;
    roles::check_oracle_is_not_a_candidate(oracle, all)?;
    if all.len() > n_candidates {
        roles::check_control_is_not_a_candidate(all[n_candidates], &all[..n_candidates])?;
    }
    let (views, compared) = compare::compare(oracle, all, policy)?;
    let view_at: HashMap<(usize, usize), OracleView> =
        views.iter().map(|v| ((v.0, v.1), v.2)).collect();
    // Per capture, per compared position: whether the policy counts it.
    let masks: Vec<Vec<bool>> = compared
        .iter()
        .map(|c| summary::counted_mask(&c.positions, &views, policy))
        .collect();
    // The control's top-1 only where the policy counts the control's own rows: a flip it shares
    // elsewhere is not excused by rows on which the control itself was never judged.
    let control_top1 = (all.len() > n_candidates).then(|| {
        margin_rule::control_top1(
            compared[n_candidates]
                .positions
                .iter()
                .zip(&masks[n_candidates])
                .filter(|(_, &c)| c)
                .map(|(m, _)| m),
        )
    });
    let mut sums = Vec::new();
    for (i, c) in all.iter().enumerate() {
        let role = if i < n_candidates {
            Role::Candidate
        } else {
            Role::Control
        };
        let (per_seq, gaps, missing) = rollout_comparisons(oracle, c, &view_at, policy);
        let reps: Vec<_> = (0..oracle.len())
            .filter(|&s| policy.counts_sequence(s))
            .filter_map(|s| {
                let cr = c.seq(s).rollout?;
                symptoms::repetition(s, &cr, oracle.seq(s).rollout.as_deref())
            })
            .collect();
        let rs = (!per_seq.is_empty()).then(|| RolloutSummary {
            sequences_compared: per_seq.len(),
            sequences_exact: per_seq.iter().filter(|r| r.is_exact()).count(),
            min_exact_prefix: per_seq.iter().map(|r| r.exact_prefix).min().unwrap_or(0),
            per_sequence: per_seq,
            not_compared: gaps,
        });
        let ctl = if role == Role::Candidate {
            control_top1.as_ref()
        } else {
            None
        };
        let mut s = summary::summarise(
            ids[i].clone(),
            role,
            &compared[i].positions,
            compared[i].not_compared,
            &views,
            policy,
            ctl,
            rs,
        );
        s.rollout_missing = missing;
        s.symptoms.extend(reps);
        if role == Role::Control {
            roles::check_control_earns_role(c, &s, policy)?;
        }
        s.verdict = verdict::judge(&s, policy);
        sums.push(s);
    }

    let rule = TieRule::of(policy);
    let judgements: Vec<Vec<Option<FlipKind>>> = compared
        .iter()
        .map(|c| {
            c.positions
                .iter()
                .map(|m| margin_rule::classify(m, &rule))
                .collect()
        })
        .collect();
    let paired = paired_tests(&compared, &masks, &ids);

    let prompt = verdict::check_prompt(&views, policy);
    if prompt.rejected {
        for s in sums.iter_mut().filter(|s| s.role == Role::Candidate) {
            s.verdict.status = Status::NotJudged;
            s.verdict.failed_rule = None;
            s.verdict.reason = "not judged: the prompt was rejected (exit 3)".into();
            // no rule was applied: none may read as passed (or failed) in summary.json or JUnit
            for r in s.verdict.rules.iter_mut() {
                r.1 = super::decision::RuleOutcome::NotEvaluated;
            }
        }
    }
    let decision = verdict::ship_decision(&sums);
    let (code, line) = verdict::overall(&sums, &decision, &prompt, policy);
    let ship_note = if prompt.rejected {
        "ship: none — the prompt was rejected".to_string()
    } else {
        decision.describe()
    };
    let ship = match (prompt.rejected, decision) {
        (false, verdict::Ship::Decided(l, how)) => Some((l, how)),
        _ => None,
    };
    let plan = oracle.plan();
    let run = RunSummary {
        schema: REPORT_SCHEMA,
        qgate_version: env!("CARGO_PKG_VERSION"),
        oracle: OracleInfo {
            capture: oracle.path.display().to_string(),
            label: summary::clean_label(&oracle.meta.label),
            runtime: oracle.meta.runtime.clone(),
            dtype: oracle.meta.dtype.clone(),
            provenance,
            model: oracle_model(oracle),
            weights_sha256: oracle_weights(oracle),
            device: oracle
                .meta
                .extra
                .get("device")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        },
        plan: PlanInfo {
            sequences: oracle.len(),
            tokens: plan.iter().map(|t| t.len()).sum(),
            oracle_rows: views.len(),
            vocab_size: oracle.meta.vocab_size,
            sha256: crate::oracle::plan_sha256(&plan),
        },
        margin_space: policy.margin_space,
        margin_floor: policy.margin_floor,
        policy: policy.clone(),
        prompt,
        ship: ship.as_ref().map(|s| s.0.clone()),
        ship_note,
        ship_basis: ship.map(|s| s.1),
        ladder: None,
        sim_vs_bundle: Vec::new(),
        candidates: sums,
        paired,
        exit_code: code,
        verdict: line,
        date: utc_date(std::time::SystemTime::now()),
        report_files: Vec::new(),
    };
    Ok(Evaluation {
        run,
        compared,
        masks,
        judgements,
        views,
    })
}

/// The model an oracle capture names: qgate's `model_dir` (its last component) or HF's `model`.
fn oracle_model(oracle: &Capture) -> Option<String> {
    let e = &oracle.meta.extra;
    if let Some(d) = e.get("model_dir").and_then(|v| v.as_str()) {
        return std::path::Path::new(d)
            .file_name()
            .map(|n| n.to_string_lossy().to_string());
    }
    e.get("model").and_then(|v| v.as_str()).map(str::to_string)
}

/// One sha256 for the oracle's weights: the file's own for a single file, else the hash of the sorted
/// `file=sha;` lines.
fn oracle_weights(oracle: &Capture) -> Option<String> {
    use sha2::{Digest, Sha256};
    let files = super::provenance::recorded_weights(oracle)?;
    if let [(_, sha)] = files.as_slice() {
        return Some(sha.clone());
    }
    let mut h = Sha256::new();
    for (f, s) in &files {
        h.update(format!("{f}={s};"));
    }
    Some(hex::encode(h.finalize()))
}

/// `YYYY-MM-DD` (UTC) of a time (the date part of `progress::utc`, the one civil-date conversion).
pub fn utc_date(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::progress::utc(secs).chars().take(10).collect()
}

/// McNemar tests between every two captures on the positions both have and the policy counts.
fn paired_tests(compared: &[Compared], masks: &[Vec<bool>], ids: &[Identity]) -> Vec<Paired> {
    let matched: Vec<HashMap<(usize, usize), bool>> = compared
        .iter()
        .zip(masks)
        .map(|(c, m)| {
            c.positions
                .iter()
                .zip(m)
                .filter(|(_, &k)| k)
                .map(|(p, _)| ((p.seq, p.pos), p.matched))
                .collect()
        })
        .collect();
    let mut paired = Vec::new();
    for a in 0..compared.len() {
        for b in a + 1..compared.len() {
            let (mut ao, mut bo, mut n) = (0, 0, 0);
            for (k, &ma) in &matched[a] {
                if let Some(&mb) = matched[b].get(k) {
                    n += 1;
                    ao += (ma && !mb) as usize;
                    bo += (mb && !ma) as usize;
                }
            }
            if n > 0 {
                paired.push(Paired {
                    a: ids[a].label.clone(),
                    b: ids[b].label.clone(),
                    positions: n,
                    test: stats::mcnemar(ao, bo),
                });
            }
        }
    }
    paired
}

#[cfg(test)]
mod tests {
    use super::utc_date;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(UNIX_EPOCH), "1970-01-01");
        // 2026-11-30T07:34:11Z
        assert_eq!(
            utc_date(UNIX_EPOCH + Duration::from_secs(1_796_024_051)),
            "2026-11-30"
        );
        // 2000-02-29 (leap day of a century leap year)
        assert_eq!(
            utc_date(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29"
        );
    }
}
