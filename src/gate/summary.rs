//! Everything a report shows, computed once from the compared positions (reports only format it).
use super::decision::{Status, Verdict};
use super::margin_rule::{self, ControlTop1, Flip, FlipKind, TieRule};
use super::metrics::{OracleView, PositionMetrics, RowHealth, RowSource};
use super::policy::{Policy, PositionsRule};
use super::rollout::{RolloutComparison, RolloutGap};
use super::stats;
pub use super::symptoms::Symptom;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Candidate,
    Control,
}

/// The `runtime` of a `qgate simulate` capture.
pub const SIMULATE_RUNTIME: &str = "qgate-simulate";

/// Where a candidate came from.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    pub label: String,
    pub capture: String,
    pub bundle: Option<String>,
    /// Quantization mode read from the bundle / capture name (zoo regex), if any.
    pub mode: Option<String>,
    pub size_bytes: Option<u64>,
    /// A `qgate simulate` capture (its size is an estimate of packed codes, not files on disk): beside
    /// real artifacts, a simulation never ships.
    pub simulation: bool,
}

/// A label as reports show it: one line, without the characters that would break a markdown table or
/// code span (`|`, `` ` ``, `<`, `>`, control characters); empty becomes "candidate".
pub fn clean_label(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| match c {
            '|' => '/',
            '`' => '\'',
            '<' => '‹',
            '>' => '›',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    if t.is_empty() {
        "candidate".into()
    } else {
        t
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Garbage {
    pub non_finite_rows: usize,
    pub constant_rows: usize,
    /// Rows whose `−inf` vocabulary tail hides more than `MASKED_TAIL_MAX_ORACLE_MASS` of the oracle's
    /// probability.
    pub masked_tail_rows: usize,
    /// First garbage row: (seq, pos, its health).
    pub first: Option<(usize, usize, RowHealth)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CosineStats {
    pub min: f64,
    pub min_at: (usize, usize),
    pub mean: f64,
    pub raw_min: f64,
    pub raw_mean: f64,
}

/// llama.cpp-style distribution block.
#[derive(Debug, Clone, Serialize)]
pub struct Distribution {
    pub mean: f64,
    pub se: Option<f64>,
    pub rms: f64,
    pub max: f64,
    pub p99_9: f64,
    pub p99: f64,
    pub p95: f64,
    pub p90: f64,
    pub median: f64,
    pub p10: f64,
    pub p5: f64,
    pub p1: f64,
    pub min: f64,
}

fn distribution(values: &[(usize, f64)]) -> Option<Distribution> {
    let (mean, se) = stats::clustered_mean(values)?;
    let mut s: Vec<f64> = values.iter().map(|v| v.1).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    let p = |q| stats::percentile(&s, q).unwrap_or(f64::NAN);
    Some(Distribution {
        mean,
        se,
        rms: (s.iter().map(|x| x * x).sum::<f64>() / s.len() as f64).sqrt(),
        max: s[s.len() - 1],
        p99_9: p(99.9),
        p99: p(99.0),
        p95: p(95.0),
        p90: p(90.0),
        median: p(50.0),
        p10: p(10.0),
        p5: p(5.0),
        p1: p(1.0),
        min: s[0],
    })
}

/// What per-position data a capture holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    Logits,
    TopK,
    Argmax,
    Mixed,
    None,
}

impl DataKind {
    pub fn name(self) -> &'static str {
        match self {
            DataKind::Logits => "logits",
            DataKind::TopK => "top_k",
            DataKind::Argmax => "argmax",
            DataKind::Mixed => "mixed",
            DataKind::None => "none",
        }
    }
}

impl std::fmt::Display for DataKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Coverage: how many of the plan's positions that the policy counts were compared (usable rows: garbage
/// rows are not coverage). Under `positions = "last"`, one position per counted sequence.
#[derive(Debug, Clone, Serialize)]
pub struct Coverage {
    pub planned: usize,
    pub compared: usize,
    /// `compared / planned`; `None` when the policy counts nothing.
    pub fraction: Option<f64>,
    /// Counted sequences of the plan with no usable compared row.
    pub sequences_without_rows: Vec<usize>,
    /// Under `positions = "all"`: counted sequences whose own coverage is below `min_coverage` with more
    /// than one row missing (one missing row is llm-runner's discarded last row). The pooled fraction
    /// alone would let a long sequence's tail — the long-context positions — go unjudged.
    pub short_sequences: Vec<SequenceCoverage>,
    /// Under `positions = "last"`: every uncovered sequence holds the row before its last one but not the
    /// last (llm-runner discards row T−1); the message says how to get it.
    pub only_last_rows_missing: bool,
}

/// One sequence's coverage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SequenceCoverage {
    pub seq: usize,
    pub planned: usize,
    pub compared: usize,
}

/// Coverage of `positions` (one candidate; `mask`: which of them the policy counts, `counted_mask`)
/// against the oracle rows `views` under `policy`.
pub fn coverage(
    positions: &[PositionMetrics],
    mask: &[bool],
    views: &[(usize, usize, OracleView)],
    policy: &Policy,
) -> Coverage {
    use std::collections::{BTreeSet, HashSet};
    let planned_seqs: BTreeSet<usize> = views
        .iter()
        .map(|v| v.0)
        .filter(|&s| policy.counts_sequence(s))
        .collect();
    let usable: Vec<&PositionMetrics> = positions
        .iter()
        .zip(mask)
        .filter(|(m, &counted)| counted && !m.is_garbage())
        .map(|(m, _)| m)
        .collect();
    let seqs_with_rows: BTreeSet<usize> = usable.iter().map(|m| m.seq).collect();
    let (planned, compared) = match policy.positions {
        PositionsRule::All => (
            views.iter().filter(|v| policy.counts_sequence(v.0)).count(),
            usable.len(),
        ),
        PositionsRule::Last => (planned_seqs.len(), seqs_with_rows.len()),
    };
    let short_sequences = match policy.positions {
        PositionsRule::Last => Vec::new(),
        PositionsRule::All => {
            use std::collections::BTreeMap;
            let mut per: BTreeMap<usize, SequenceCoverage> = BTreeMap::new();
            for v in views.iter().filter(|v| policy.counts_sequence(v.0)) {
                per.entry(v.0)
                    .or_insert(SequenceCoverage {
                        seq: v.0,
                        planned: 0,
                        compared: 0,
                    })
                    .planned += 1;
            }
            for m in &usable {
                if let Some(c) = per.get_mut(&m.seq) {
                    c.compared += 1;
                }
            }
            per.into_values()
                .filter(|c| {
                    c.planned - c.compared.min(c.planned) > 1
                        && (c.compared as f64) < policy.min_coverage * c.planned as f64
                })
                .collect()
        }
    };
    let sequences_without_rows: Vec<usize> =
        planned_seqs.difference(&seqs_with_rows).copied().collect();
    let only_last_rows_missing =
        policy.positions == PositionsRule::Last && !sequences_without_rows.is_empty() && {
            let last = plan_last_positions(views);
            let rows: HashSet<(usize, usize)> = positions
                .iter()
                .filter(|m| !m.is_garbage())
                .map(|m| (m.seq, m.pos))
                .collect();
            sequences_without_rows.iter().all(|s| {
                // a 1-token sequence has no row before its last: llm-runner gives it none at all
                last.get(s)
                    .is_some_and(|&l| l == 0 || rows.contains(&(*s, l - 1)))
            })
        };
    Coverage {
        planned,
        compared,
        fraction: (planned > 0).then(|| compared as f64 / planned as f64),
        sequences_without_rows,
        short_sequences,
        only_last_rows_missing,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutSummary {
    pub sequences_compared: usize,
    pub sequences_exact: usize,
    pub min_exact_prefix: usize,
    pub per_sequence: Vec<RolloutComparison>,
    /// Counted sequences where only one side holds a rollout (not compared).
    pub not_compared: Vec<RolloutGap>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateSummary {
    #[serde(flatten)]
    pub id: Identity,
    pub role: Role,
    pub data: DataKind,
    pub coverage: Coverage,
    pub positions_compared: usize,
    pub positions_not_compared: usize,
    pub positions_counted: usize,
    pub exact: usize,
    pub top1_agreement: Option<f64>,
    pub top1_wilson95: Option<(f64, f64)>,
    pub tie_flips: usize,
    pub confident_flips: usize,
    /// `None` without a control.
    pub shared_with_control: Option<usize>,
    pub introduced_confident_flips: usize,
    pub garbage: Garbage,
    pub cosine: Option<CosineStats>,
    pub kl: Option<Distribution>,
    pub kl_reverse_mean: Option<f64>,
    pub delta_p: Option<Distribution>,
    pub top10_overlap_mean: Option<f64>,
    pub rank_of_oracle_top1_median: Option<String>,
    /// Metric names that the candidate's data cannot support.
    pub not_computed: Vec<&'static str>,
    pub rollout: Option<RolloutSummary>,
    /// Why no rollout was compared, when none was.
    pub rollout_missing: Option<String>,
    pub symptoms: Vec<Symptom>,
    pub flips: Vec<Flip>,
    pub verdict: Verdict,
}

/// The plan's last position of each sequence, from the oracle's rows.
fn plan_last_positions(
    views: &[(usize, usize, OracleView)],
) -> std::collections::HashMap<usize, usize> {
    let mut last = std::collections::HashMap::new();
    for &(s, p, _) in views {
        let e = last.entry(s).or_insert(p);
        *e = (*e).max(p);
    }
    last
}

/// Which positions the policy counts ("last" = the plan's last position of each sequence, row T−1: a
/// capture without that row is not covered there; its own last row does not stand in for it).
pub fn counted_mask(
    positions: &[PositionMetrics],
    views: &[(usize, usize, OracleView)],
    policy: &Policy,
) -> Vec<bool> {
    let last = (policy.positions == PositionsRule::Last).then(|| plan_last_positions(views));
    positions
        .iter()
        .map(|m| {
            policy.counts_sequence(m.seq)
                && last.as_ref().is_none_or(|l| l.get(&m.seq) == Some(&m.pos))
        })
        .collect()
}

/// Build a candidate's summary (the verdict is filled in by `verdict::judge`). `views` are the oracle's
/// rows (the plan's positions).
#[allow(clippy::too_many_arguments)]
pub fn summarise(
    id: Identity,
    role: Role,
    positions: &[PositionMetrics],
    not_compared: usize,
    views: &[(usize, usize, OracleView)],
    policy: &Policy,
    control: Option<&ControlTop1>,
    rollout: Option<RolloutSummary>,
) -> CandidateSummary {
    let mask = counted_mask(positions, views, policy);
    let counted: Vec<&PositionMetrics> = positions
        .iter()
        .zip(&mask)
        .filter(|(_, &c)| c)
        .map(|(m, _)| m)
        .collect();
    let rule = TieRule::of(policy);
    let flips = {
        let keys: std::collections::HashSet<(usize, usize)> =
            counted.iter().map(|m| (m.seq, m.pos)).collect();
        margin_rule::flips(positions, &rule, control, |m| {
            keys.contains(&(m.seq, m.pos))
        })
    };
    let exact = counted.iter().filter(|m| m.matched).count();
    let n = counted.len();

    let mut garbage = Garbage {
        non_finite_rows: 0,
        constant_rows: 0,
        masked_tail_rows: 0,
        first: None,
    };
    for m in positions {
        match m.health {
            RowHealth::NonFinite => garbage.non_finite_rows += 1,
            RowHealth::Constant => garbage.constant_rows += 1,
            RowHealth::MaskedTailHidesOracle { .. } => garbage.masked_tail_rows += 1,
            _ => continue,
        }
        garbage.first.get_or_insert((m.seq, m.pos, m.health));
    }

    let ok: Vec<&&PositionMetrics> = counted.iter().filter(|m| !m.is_garbage()).collect();
    let collect = |f: &dyn Fn(&PositionMetrics) -> Option<f64>| -> Vec<(usize, f64)> {
        ok.iter().filter_map(|m| f(m).map(|v| (m.seq, v))).collect()
    };
    let cos = collect(&|m| m.cosine_centred);
    let cosine = (!cos.is_empty() && cos.len() == ok.len()).then(|| {
        let (mut min, mut at) = (f64::INFINITY, (0, 0));
        for m in &ok {
            if let Some(c) = m.cosine_centred {
                // a NaN (never expected: such rows are garbage) becomes the minimum, not skipped
                if c < min || (c.is_nan() && !min.is_nan()) {
                    min = c;
                    at = (m.seq, m.pos);
                }
            }
        }
        let raw = collect(&|m| m.cosine);
        CosineStats {
            min,
            min_at: at,
            mean: cos.iter().map(|v| v.1).sum::<f64>() / cos.len() as f64,
            raw_min: raw.iter().map(|v| v.1).fold(f64::INFINITY, f64::min),
            raw_mean: raw.iter().map(|v| v.1).sum::<f64>() / raw.len().max(1) as f64,
        }
    });
    let all_have = |v: &Vec<(usize, f64)>| !v.is_empty() && v.len() == ok.len();
    let kl_v = collect(&|m| m.kl_oc);
    let kl = all_have(&kl_v).then(|| distribution(&kl_v)).flatten();
    let klr = collect(&|m| m.kl_co);
    let kl_reverse_mean =
        all_have(&klr).then(|| klr.iter().map(|v| v.1).sum::<f64>() / klr.len() as f64);
    let dp_v = collect(&|m| m.delta_p);
    let delta_p = all_have(&dp_v).then(|| distribution(&dp_v)).flatten();
    let ov = collect(&|m| m.top10_overlap.map(|x| x as f64));
    let top10_overlap_mean =
        all_have(&ov).then(|| ov.iter().map(|v| v.1).sum::<f64>() / ov.len() as f64);
    let rank_of_oracle_top1_median = {
        let mut r: Vec<(u32, bool)> = ok
            .iter()
            .filter_map(|m| {
                m.rank.map(|r| match r {
                    super::metrics::Rank::Exact(x) => (x, false),
                    super::metrics::Rank::Beyond(k) => (k + 1, true),
                })
            })
            .collect();
        r.sort();
        r.get(r.len() / 2)
            .filter(|_| r.len() == ok.len() && !r.is_empty())
            .map(|&(x, beyond)| {
                if beyond {
                    format!(">{}", x - 1)
                } else {
                    x.to_string()
                }
            })
    };

    let sources: std::collections::BTreeSet<&'static str> = positions
        .iter()
        .map(|m| match m.source {
            RowSource::Logits => "logits",
            RowSource::TopK => "top_k",
            RowSource::Argmax => "argmax",
        })
        .collect();
    let data = match (sources.len(), sources.iter().next().copied()) {
        (0, _) => DataKind::None,
        (1, Some("logits")) => DataKind::Logits,
        (1, Some("top_k")) => DataKind::TopK,
        (1, _) => DataKind::Argmax,
        _ => DataKind::Mixed,
    };
    let mut not_computed = Vec::new();
    if ok.is_empty() || cosine.is_none() {
        not_computed.push("cosine");
    }
    if kl.is_none() {
        not_computed.push("kl");
    }
    if delta_p.is_none() {
        not_computed.push("delta_p");
    }
    if top10_overlap_mean.is_none() {
        not_computed.push("top10_overlap");
    }
    if rank_of_oracle_top1_median.is_none() {
        not_computed.push("rank");
    }

    let tie = flips.iter().filter(|f| f.kind == FlipKind::Tie).count();
    let conf = flips
        .iter()
        .filter(|f| f.kind == FlipKind::Confident)
        .count();
    let shared = control.map(|_| {
        flips
            .iter()
            .filter(|f| f.kind == FlipKind::Confident && f.shared_with_control == Some(true))
            .count()
    });
    let introduced = margin_rule::introduced(&flips);
    let mut s = CandidateSummary {
        id,
        role,
        data,
        coverage: coverage(positions, &mask, views, policy),
        positions_compared: positions.len(),
        positions_not_compared: not_compared,
        positions_counted: n,
        exact,
        top1_agreement: (n > 0).then(|| exact as f64 / n as f64),
        top1_wilson95: stats::wilson(exact, n),
        tie_flips: tie,
        confident_flips: conf,
        shared_with_control: shared,
        introduced_confident_flips: introduced,
        garbage,
        cosine,
        kl,
        kl_reverse_mean,
        delta_p,
        top10_overlap_mean,
        rank_of_oracle_top1_median,
        not_computed,
        rollout,
        rollout_missing: None,
        symptoms: Vec::new(),
        flips,
        verdict: Verdict {
            status: Status::Fail,
            failed_rule: None,
            reason: "not judged yet".into(),
            rules: Vec::new(),
        },
    };
    s.symptoms = super::symptoms::row_symptoms(positions, &mask);
    s
}

/// A candidate with nothing compared, for unit tests of what is decided from summaries.
#[cfg(test)]
pub fn test_candidate(label: &str) -> CandidateSummary {
    let policy = super::policy::Policy::load(None).expect("the built-in policy");
    summarise(
        Identity {
            label: label.into(),
            capture: String::new(),
            bundle: None,
            mode: None,
            size_bytes: None,
            simulation: true,
        },
        Role::Candidate,
        &[],
        0,
        &[],
        &policy,
        None,
        None,
    )
}
