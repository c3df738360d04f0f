//! The verdict: apply the policy's rules in a fixed order ([`Rule::ALL`]), name the first that fails and
//! its figure, and map the run to an exit code. A rule that cannot be applied (no rows, a metric the
//! capture cannot support, no rollout) fails; it never passes silently. Also prompt validation and the
//! ship decision.
use super::decision::{ExitCode, Rule, RuleOutcome, Status, SymptomKind, Verdict};
use super::margin_rule::FlipKind;
use super::metrics::{OracleView, RowHealth};
use super::policy::{Policy, PositionsRule, RolloutRequirement};
use super::summary::{CandidateSummary, Role};
use serde::Serialize;

fn fmt_row(seq: usize, pos: usize) -> String {
    format!("seq {seq} pos {pos}")
}

/// What one rule says about one candidate.
enum Check {
    Pass,
    Fail(String),
    NotRequired,
}

fn garbage_rows(s: &CandidateSummary, policy: &Policy) -> Check {
    if !policy.fail_on_garbage_rows {
        return Check::NotRequired;
    }
    let g = &s.garbage;
    if g.non_finite_rows + g.constant_rows + g.masked_tail_rows == 0 {
        return Check::Pass;
    }
    let (seq, pos, kind) = g.first.unwrap_or((0, 0, RowHealth::NonFinite));
    let what = match kind {
        RowHealth::Constant => "constant".to_string(),
        RowHealth::MaskedTailHidesOracle { from } => {
            format!("ids {from}.. masked to −inf where the oracle gives them probability")
        }
        _ => "NaN/Inf".to_string(),
    };
    let masked = if g.masked_tail_rows > 0 {
        format!(
            ", {} row(s) with a −inf-masked vocabulary tail that hides more than {}% of the oracle's probability",
            g.masked_tail_rows,
            100.0 * policy.masked_tail_max_oracle_mass
        )
    } else {
        String::new()
    };
    Check::Fail(format!(
        "garbage logits: {} NaN/Inf (or overflowing) row(s) and {} constant row(s){masked} (first: {what} at {})",
        g.non_finite_rows,
        g.constant_rows,
        fmt_row(seq, pos)
    ))
}

fn min_coverage(s: &CandidateSummary, policy: &Policy) -> Check {
    let c = &s.coverage;
    let hint = if c.only_last_rows_missing {
        "; each of them lacks only its last row, which positions = \"last\" judges (llm-runner discards row T−1: capture with coreai_capture.py, which appends a token, or gate with positions = \"all\")"
    } else {
        ""
    };
    let missing = if c.sequences_without_rows.is_empty() {
        String::new()
    } else {
        let l: Vec<String> = c
            .sequences_without_rows
            .iter()
            .take(10)
            .map(|x| x.to_string())
            .collect();
        format!(
            "; sequence(s) with no compared row: {}{}",
            l.join(", "),
            if c.sequences_without_rows.len() > 10 {
                ", …"
            } else {
                ""
            }
        ) + hint
    };
    match c.fraction {
        _ if c.compared == 0 => Check::Fail(format!(
            "no positions compared: the capture has no usable rows at the {} planned position(s) the policy counts (data: {}){missing}",
            c.planned, s.data
        )),
        Some(f) if f >= policy.min_coverage => match c.short_sequences.first() {
            None => Check::Pass,
            Some(q) => Check::Fail(format!(
                "coverage of seq {} is {}/{} = {:.1}% < min_coverage {:.1}% ({} sequence(s) below it; the whole plan's {:.1}% does not make up for one sequence's missing rows)",
                q.seq,
                q.compared,
                q.planned,
                100.0 * q.compared as f64 / q.planned.max(1) as f64,
                100.0 * policy.min_coverage,
                c.short_sequences.len(),
                100.0 * f
            )),
        },
        Some(f) => Check::Fail(format!(
            "coverage {}/{} = {:.1}% of the planned positions < min_coverage {:.1}%{missing}",
            c.compared,
            c.planned,
            100.0 * f,
            100.0 * policy.min_coverage
        )),
        None => Check::Fail("the policy counts no planned position".into()),
    }
}

fn collapse(s: &CandidateSummary, policy: &Policy) -> Check {
    if !policy.fail_on_collapse {
        return Check::NotRequired;
    }
    match s
        .symptoms
        .iter()
        .find(|y| y.kind == SymptomKind::CollapseAfterPosition0)
    {
        Some(y) => Check::Fail(format!("collapse in seq {}: {}", y.seq, y.detail)),
        None => Check::Pass,
    }
}

fn confident_flips(s: &CandidateSummary, policy: &Policy) -> Check {
    if s.introduced_confident_flips <= policy.max_introduced_confident_flips {
        return Check::Pass;
    }
    let first = s
        .flips
        .iter()
        .find(|f| f.kind == FlipKind::Confident && f.shared_with_control != Some(true));
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
    Check::Fail(format!(
        "{} {what} > {} allowed{at}",
        s.introduced_confident_flips, policy.max_introduced_confident_flips
    ))
}

fn min_cosine(s: &CandidateSummary, policy: &Policy) -> Check {
    let Some(th) = policy.min_cosine else {
        return Check::NotRequired;
    };
    match &s.cosine {
        None => Check::Fail(format!(
            "min cosine required by the policy ({th}) but not computable from a {} capture",
            s.data
        )),
        // a NaN minimum fails (it never passes a comparison by being incomparable)
        Some(c) if c.min.is_nan() || c.min < th => Check::Fail(format!(
            "min cosine {:.4} at {} < {th}",
            c.min,
            fmt_row(c.min_at.0, c.min_at.1)
        )),
        _ => Check::Pass,
    }
}

fn max_mean_kl(s: &CandidateSummary, policy: &Policy) -> Check {
    let Some(th) = policy.max_mean_kl else {
        return Check::NotRequired;
    };
    match &s.kl {
        None => Check::Fail(format!(
            "mean KL limit in the policy ({th}) but KL is not computable from a {} capture",
            s.data
        )),
        Some(k) if k.mean.is_nan() || k.mean > th => {
            Check::Fail(format!("mean KL {:.6} > {th}", k.mean))
        }
        _ => Check::Pass,
    }
}

fn rollout_prefix(s: &CandidateSummary, policy: &Policy) -> Check {
    let req = policy.rollout();
    if req == RolloutRequirement::Off {
        return Check::NotRequired;
    }
    let Some(r) = s.rollout.as_ref().filter(|r| !r.per_sequence.is_empty()) else {
        return Check::Fail(format!(
            "rollout_prefix = {} required by the policy but not applied: {} (set rollout_prefix = \"off\" to gate without rollouts)",
            req.describe(),
            s.rollout_missing
                .as_deref()
                .unwrap_or("no counted sequence has a rollout on both sides")
        ));
    };
    if let Some(g) = r.not_compared.first() {
        return Check::Fail(format!(
            "rollout_prefix = {} required by the policy but not applied to seq {}: {} for it ({} counted sequence(s) not compared)",
            req.describe(),
            g.seq,
            g.missing_on.describe(),
            r.not_compared.len()
        ));
    }
    // A shorter rollout is a generation budget (the community's 8-token gates): the same for every
    // sequence. One sequence stopping early where the others go on is a stop the capture did not record
    // (an EOS left out), which must not shrink what is compared.
    let budget = r
        .per_sequence
        .iter()
        .map(|c| c.candidate_len)
        .max()
        .unwrap_or(0);
    for c in &r.per_sequence {
        if c.oracle_len == 0 {
            return Check::Fail(format!(
                "rollout_prefix = {} required by the policy but not applied to seq {}: the oracle's rollout is empty (an oracle computed with --rollout 0; recompute it with a rollout, or set rollout_prefix = \"off\")",
                req.describe(),
                c.seq
            ));
        }
        if c.candidate_len == 0 {
            return Check::Fail(format!(
                "rollout of seq {} is empty: nothing to compare with the oracle's {} step(s)",
                c.seq, c.oracle_len
            ));
        }
        let mut need = match req {
            RolloutRequirement::Off => 0,
            RolloutRequirement::Full => c.oracle_len,
            RolloutRequirement::Steps(n) => n.min(c.oracle_len),
        };
        if c.truncated {
            // shorter, no EOS, agrees on every step it holds: compared over the common length, but that
            // length must reach the decode path: step 0 comes from the prefill's last row, which the
            // teacher-forced rows judge already; at least two steps (or what the policy asks, if less)
            let least = 2.min(need);
            if c.candidate_len < least {
                return Check::Fail(format!(
                    "rollout of seq {} holds {} step(s) of the oracle's {}: the decode path is not exercised (step 0 comes from the prefill); at least {least} are needed",
                    c.seq, c.candidate_len, c.oracle_len
                ));
            }
            if c.candidate_len < budget {
                return Check::Fail(format!(
                    "rollout of seq {} stops after {} step(s) where the oracle goes on and other sequences hold {budget}: a stop the capture did not record (an EOS left out?) is not a shorter budget",
                    c.seq, c.candidate_len
                ));
            }
            need = need.min(c.candidate_len);
        }
        if c.exact_prefix >= need {
            continue;
        }
        match &c.divergence {
            Some(d) if d.tie == Some(true) => continue,
            Some(d) => {
                let m = d
                    .oracle_margin
                    .map(|m| format!("oracle margin {m:.4}"))
                    .unwrap_or_else(|| "oracle margin unknown".into());
                return Check::Fail(format!(
                    "rollout of seq {} diverges at step {} ({m}): exact prefix {} < required {need}",
                    c.seq, d.step, c.exact_prefix
                ));
            }
            None => {
                return Check::Fail(format!(
                "rollout of seq {} runs past the oracle's end: exact prefix {} < required {need}",
                c.seq, c.exact_prefix
            ))
            }
        }
    }
    Check::Pass
}

fn repetition(s: &CandidateSummary, policy: &Policy) -> Check {
    if !policy.fail_on_repetition {
        return Check::NotRequired;
    }
    match s
        .symptoms
        .iter()
        .find(|y| y.kind == SymptomKind::DegenerateRepetition && !y.oracle_too)
    {
        Some(y) => Check::Fail(format!(
            "degenerate repetition in seq {}: {}",
            y.seq, y.detail
        )),
        None => Check::Pass,
    }
}

fn check(rule: Rule, s: &CandidateSummary, policy: &Policy) -> Check {
    match rule {
        Rule::GarbageRows => garbage_rows(s, policy),
        Rule::MinCoverage => min_coverage(s, policy),
        Rule::Collapse => collapse(s, policy),
        Rule::MaxIntroducedConfidentFlips => confident_flips(s, policy),
        Rule::MinCosine => min_cosine(s, policy),
        Rule::MaxMeanKl => max_mean_kl(s, policy),
        Rule::RolloutPrefix => rollout_prefix(s, policy),
        Rule::DegenerateRepetition => repetition(s, policy),
    }
}

/// Judge one candidate against the policy. The first failing rule wins; every rule's outcome is recorded.
pub fn judge(s: &CandidateSummary, policy: &Policy) -> Verdict {
    if s.role == Role::Control {
        return Verdict {
            status: Status::Control,
            failed_rule: None,
            reason: "control (not gated)".into(),
            rules: Vec::new(),
        };
    }
    let mut rules = Vec::new();
    let mut failed: Option<(Rule, String)> = None;
    for rule in Rule::ALL {
        if failed.is_some() {
            rules.push((rule, RuleOutcome::NotEvaluated));
            continue;
        }
        match check(rule, s, policy) {
            Check::Pass => rules.push((rule, RuleOutcome::Passed)),
            Check::NotRequired => rules.push((rule, RuleOutcome::NotRequired)),
            Check::Fail(why) => {
                rules.push((rule, RuleOutcome::Failed));
                failed = Some((rule, why));
            }
        }
    }
    match failed {
        Some((rule, reason)) => Verdict {
            status: Status::Fail,
            failed_rule: Some(rule),
            reason,
            rules,
        },
        None => {
            let ties = if s.tie_flips > 0 {
                format!(", {} tie-flip(s)", s.tie_flips)
            } else {
                String::new()
            };
            let cov = s
                .coverage
                .fraction
                .map(|f| format!(" (coverage {:.1}%)", 100.0 * f))
                .unwrap_or_default();
            Verdict {
                status: Status::Pass,
                failed_rule: None,
                reason: format!(
                    "{}/{} exact{cov}, 0 introduced confident flips{ties}",
                    s.exact, s.positions_counted
                ),
                rules,
            }
        }
    }
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
    if policy.positions == PositionsRule::Last {
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

/// How the ship decision was made. It is never the order the candidates were given in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShipBasis {
    /// The smallest passing candidate by size (every passing candidate's size is known).
    SmallestSize,
    /// The only candidate that passes.
    OnlyOnePasses,
}

impl ShipBasis {
    pub fn describe(self) -> &'static str {
        match self {
            ShipBasis::SmallestSize => "smallest size",
            ShipBasis::OnlyOnePasses => "the only candidate that passes",
        }
    }
}

/// What ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ship {
    Decided(String, ShipBasis),
    /// Several candidates pass (how many) and these (labels) have no known size: qgate does not guess.
    SizesUnknown(usize, Vec<String>),
    /// These (labels) pass at the same smallest size (bytes): qgate does not pick one by argument order.
    SameSize(Vec<String>, u64),
    /// Gated beside real artifacts, only these simulations (labels) pass: a simulation is not an
    /// artifact, and its size is an estimate.
    OnlySimulationsPass(Vec<String>),
    NothingPasses,
}

impl Ship {
    pub fn describe(&self) -> String {
        match self {
            Ship::Decided(l, how) => format!("ship: {l} ({})", how.describe()),
            Ship::SizesUnknown(n, l) => format!(
                "ship: not decided — {n} candidates pass and the size of {} is unknown (give bundle directories, size_bytes in the capture metadata, or --size LABEL=SIZE)",
                l.join(", ")
            ),
            Ship::SameSize(l, bytes) => format!(
                "ship: not decided — {} pass at the same smallest size ({bytes} bytes); qgate does not choose by argument order: pick one, or gate them one at a time",
                l.join(" and ")
            ),
            Ship::OnlySimulationsPass(l) => format!(
                "ship: none — only simulations pass ({}); a simulation is not an artifact: export that scheme and gate its bundle",
                l.join(", ")
            ),
            Ship::NothingPasses => "ship: none".into(),
        }
    }
}

/// The smallest passing candidate by size, when every passing candidate's size is known (or only one
/// passes); never the order the candidates were given in.
pub fn ship_decision(cands: &[CandidateSummary]) -> Ship {
    let gated = cands.iter().filter(|c| c.role == Role::Candidate);
    let passing: Vec<&CandidateSummary> = gated
        .clone()
        .filter(|c| c.verdict.status == Status::Pass)
        .collect();
    // Beside real artifacts (bundles, device captures), simulations do not ship: their sizes are
    // estimates of another kind, and they are not what would be released. A sweep gates simulations
    // only, and ships the scheme.
    let artifacts = gated.clone().any(|c| !c.id.simulation);
    let passing: Vec<&CandidateSummary> = if artifacts {
        let (real, sims): (Vec<_>, Vec<_>) = passing.into_iter().partition(|c| !c.id.simulation);
        if real.is_empty() && !sims.is_empty() {
            return Ship::OnlySimulationsPass(sims.iter().map(|c| c.id.label.clone()).collect());
        }
        real
    } else {
        passing
    };
    match passing.as_slice() {
        [] => Ship::NothingPasses,
        [only] => Ship::Decided(only.id.label.clone(), ShipBasis::OnlyOnePasses),
        _ => {
            let unknown: Vec<String> = passing
                .iter()
                .filter(|c| c.id.size_bytes.is_none())
                .map(|c| c.id.label.clone())
                .collect();
            if !unknown.is_empty() {
                return Ship::SizesUnknown(passing.len(), unknown);
            }
            let Some(min) = passing.iter().filter_map(|c| c.id.size_bytes).min() else {
                return Ship::NothingPasses;
            };
            let smallest: Vec<String> = passing
                .iter()
                .filter(|c| c.id.size_bytes == Some(min))
                .map(|c| c.id.label.clone())
                .collect();
            match smallest.as_slice() {
                [one] => Ship::Decided(one.clone(), ShipBasis::SmallestSize),
                _ => Ship::SameSize(smallest, min),
            }
        }
    }
}

/// Exit code and verdict line for the whole run. With a rejected prompt nothing is judged: callers mark
/// every candidate [`Status::NotJudged`] first.
pub fn overall(
    cands: &[CandidateSummary],
    ship: &Ship,
    prompt: &PromptCheck,
    policy: &Policy,
) -> (ExitCode, String) {
    if prompt.rejected {
        let first = prompt
            .examples
            .first()
            .map(|e| format!(" (first: seq {} pos {}, margin {:.4})", e.0, e.1, e.2))
            .unwrap_or_default();
        return (
            ExitCode::PromptRejected,
            format!(
                "PROMPT REJECTED: {} of {} counted positions have an oracle margin below the floor {} ({}){first}; such positions are coin flips and cannot judge a candidate; no candidate was judged",
                prompt.below_floor,
                prompt.positions_counted,
                policy.margin_floor,
                policy.margin_space.name()
            ),
        );
    }
    let ship_txt = ship.describe();
    let gated: Vec<&CandidateSummary> =
        cands.iter().filter(|c| c.role == Role::Candidate).collect();
    let failed: Vec<&&CandidateSummary> = gated
        .iter()
        .filter(|c| c.verdict.status != Status::Pass)
        .collect();
    match failed.first() {
        None => (
            ExitCode::Pass,
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
                ExitCode::GateFailed,
                format!(
                    "FAIL: {}: {} [{}]{more}; {ship_txt}",
                    f.id.label,
                    f.verdict.reason,
                    f.verdict.failed_rule.map(Rule::name).unwrap_or("?")
                ),
            )
        }
    }
}
