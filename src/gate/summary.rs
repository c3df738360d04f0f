//! Everything a report shows, computed once from the compared positions (reports only format it).
use super::margin_rule::{self, ControlTop1, Flip, FlipKind};
use super::metrics::{PositionMetrics, RowHealth, RowSource};
use super::policy::Policy;
use super::rollout::RolloutComparison;
use super::stats;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Candidate,
    Control,
}

/// Where a candidate came from.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    pub label: String,
    pub capture: String,
    pub bundle: Option<String>,
    /// Quantization mode read from the bundle / capture name (zoo regex), if any.
    pub mode: Option<String>,
    pub size_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Garbage {
    pub non_finite_rows: usize,
    pub constant_rows: usize,
    /// First garbage row: (seq, pos, "non_finite" | "constant").
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

#[derive(Debug, Clone, Serialize)]
pub struct Symptom {
    /// "cosine_crater" | "collapse_after_position_0" | "degenerate_repetition"
    pub kind: &'static str,
    pub seq: usize,
    pub pos: Option<usize>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutSummary {
    pub sequences_compared: usize,
    pub sequences_exact: usize,
    pub min_exact_prefix: usize,
    pub per_sequence: Vec<RolloutComparison>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// "pass" | "fail" | "control"
    pub status: &'static str,
    /// Name of the first failing rule (policy field name), if any.
    pub failed_rule: Option<&'static str>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateSummary {
    #[serde(flatten)]
    pub id: Identity,
    pub role: Role,
    /// "logits" | "top_k" | "argmax" | "mixed" | "none"
    pub data: &'static str,
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
    pub symptoms: Vec<Symptom>,
    pub flips: Vec<Flip>,
    pub verdict: Verdict,
}

/// Which positions the policy counts ("last" = the last compared position of each sequence).
pub fn counted_mask(positions: &[PositionMetrics], policy: &Policy) -> Vec<bool> {
    let mut mask: Vec<bool> = positions
        .iter()
        .map(|m| policy.counts_sequence(m.seq))
        .collect();
    if policy.positions == "last" {
        for i in 0..positions.len() {
            let last_of_seq = positions
                .get(i + 1)
                .is_none_or(|n| n.seq != positions[i].seq);
            mask[i] &= last_of_seq;
        }
    }
    mask
}

/// Build a candidate's summary (the verdict is filled in by `verdict::judge`).
pub fn summarise(
    id: Identity,
    role: Role,
    positions: &[PositionMetrics],
    not_compared: usize,
    policy: &Policy,
    control: Option<&ControlTop1>,
    rollout: Option<RolloutSummary>,
) -> CandidateSummary {
    let mask = counted_mask(positions, policy);
    let counted: Vec<&PositionMetrics> = positions
        .iter()
        .zip(&mask)
        .filter(|(_, &c)| c)
        .map(|(m, _)| m)
        .collect();
    let floor = policy.margin_floor;
    let flips = {
        let keys: std::collections::HashSet<(usize, usize)> =
            counted.iter().map(|m| (m.seq, m.pos)).collect();
        margin_rule::flips(positions, floor, control, |m| {
            keys.contains(&(m.seq, m.pos))
        })
    };
    let exact = counted.iter().filter(|m| m.matched).count();
    let n = counted.len();

    let mut garbage = Garbage {
        non_finite_rows: 0,
        constant_rows: 0,
        first: None,
    };
    for m in positions {
        match m.health {
            RowHealth::NonFinite => garbage.non_finite_rows += 1,
            RowHealth::Constant => garbage.constant_rows += 1,
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
                if c < min {
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
    let data = match sources.len() {
        0 => "none",
        1 => sources.iter().next().copied().unwrap_or("none"),
        _ => "mixed",
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
        symptoms: Vec::new(),
        flips,
        verdict: Verdict {
            status: "fail",
            failed_rule: None,
            reason: String::new(),
        },
    };
    s.symptoms = super::verdict::symptoms(positions, &mask);
    s
}

pub const REPORT_SCHEMA: &str = "qgate-report/1";

#[derive(Debug, Clone, Serialize)]
pub struct OracleInfo {
    pub capture: String,
    pub label: String,
    pub runtime: String,
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanInfo {
    pub sequences: usize,
    pub tokens: usize,
    pub oracle_rows: usize,
    pub vocab_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    pub a: String,
    pub b: String,
    pub positions: usize,
    #[serde(flatten)]
    pub test: stats::McNemar,
}

/// The whole run: what summary.json holds and every report renders.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub schema: &'static str,
    pub qgate_version: &'static str,
    pub oracle: OracleInfo,
    pub plan: PlanInfo,
    pub margin_space: super::metrics::MarginSpace,
    pub margin_floor: f64,
    pub policy: Policy,
    pub prompt: super::verdict::PromptCheck,
    /// Gated candidates in the order given, then the control (role "control") if any.
    pub candidates: Vec<CandidateSummary>,
    pub paired: Vec<Paired>,
    pub ship: Option<String>,
    /// How the ship decision was made ("smallest size", or the order given when sizes are unknown).
    pub ship_basis: String,
    pub exit_code: i32,
    pub verdict: String,
    /// `qgate sweep` only: the quantization ladder behind the ship decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ladder: Option<Ladder>,
    /// Simulated and real captures of the same scheme in this run, and what their verdicts mean.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sim_vs_bundle: Vec<super::sim_vs_bundle::SimBundlePair>,
}

/// One simulated scheme of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Rung {
    pub label: String,
    pub alias: Option<String>,
    /// The exact spec (`attn=…,gdn=…,mlp=…,head=…`).
    pub spec: String,
    pub size_bytes: u64,
    /// Weights the scheme would quantize but leaves as they are (non-divisible dimensions).
    pub skipped: Vec<String>,
}

/// Why a scheme smaller than the one that ships was not chosen.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub label: String,
    pub size_bytes: Option<u64>,
    pub failed_rule: Option<&'static str>,
    pub reason: String,
}

/// `--ablate`: one component group at a time at the ablation method, the rest at the base scheme.
#[derive(Debug, Clone, Serialize)]
pub struct Ablation {
    pub base: String,
    pub method: String,
    /// (component, the variant's summary).
    pub variants: Vec<(String, CandidateSummary)>,
    /// Components whose variant fails the policy.
    pub sensitive: Vec<String>,
}

/// The ladder a sweep reports: every scheme's spec, size and skipped weights, the compute dtype of the
/// simulation, and the reasons the smaller schemes were rejected.
#[derive(Debug, Clone, Serialize)]
pub struct Ladder {
    pub compute: String,
    pub scale_dtype: String,
    pub rungs: Vec<Rung>,
    pub rejected_smaller: Vec<Rejection>,
    pub ablation: Option<Ablation>,
}
