//! Per-position metrics: one oracle row against one candidate row.
//!
//! A candidate that carries only top-k or only argmax gets what those support; everything else is `None`
//! ("not computed"), never a made-up 0 or 1.0.
use super::kernel::{OracleRowStats, PairStats};
use serde::{Deserialize, Serialize};

/// Unit of the oracle margin (top-1 − top-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarginSpace {
    /// Softmax probabilities (the community transcripts' unit).
    Prob,
    /// Logits (nats).
    Logit,
}

impl MarginSpace {
    pub fn name(self) -> &'static str {
        match self {
            MarginSpace::Prob => "prob",
            MarginSpace::Logit => "logit",
        }
    }
}

/// How many top entries the overlap metric compares.
pub const TOP_K_OVERLAP: usize = 10;

/// What the oracle says at one position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OracleView {
    pub top1: usize,
    pub top2: usize,
    pub p1: f64,
    pub p2: f64,
    pub l1: f32,
    pub l2: f32,
    /// top-1 − top-2 in the run's margin space.
    pub margin: f64,
}

impl OracleView {
    pub fn from_stats(st: &OracleRowStats, space: MarginSpace) -> Self {
        let p1 = 1.0 / st.z;
        let p2 = ((st.l2 as f64) - (st.l1 as f64)).exp() / st.z;
        let margin = match space {
            MarginSpace::Prob => p1 - p2,
            MarginSpace::Logit => st.l1 as f64 - st.l2 as f64,
        };
        OracleView {
            top1: st.top1,
            top2: st.top2,
            p1,
            p2,
            l1: st.l1,
            l2: st.l2,
            margin,
        }
    }
}

/// Whether a candidate row is usable. NaN/Inf and constant rows are the "garbage logits" of a broken delegate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowHealth {
    Ok,
    /// NaN or ±Inf in the row, or finite values so large (~1e37) that the comparison's sums overflow.
    NonFinite,
    Constant,
    /// argmax-only rows: nothing to check.
    Unchecked,
    /// A `−inf`-masked vocabulary tail (ids `from..V`) over ids to which the oracle gives more than
    /// `MASKED_TAIL_MAX_ORACLE_MASS` of its probability: tokens the candidate cannot produce. Garbage.
    MaskedTailHidesOracle {
        from: usize,
    },
    /// Finite, with a `−inf`-masked vocabulary tail (ids `from..V`, e.g. padding rows a runtime masks)
    /// where the oracle's probability is negligible (≤ `MASKED_TAIL_MAX_ORACLE_MASS`): not garbage; the
    /// row's metrics are computed over ids `0..from`.
    MaskedTail {
        from: usize,
    },
}

/// Rank (1-based) of the oracle's top-1 token among the candidate's scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rank {
    Exact(u32),
    /// Not among the `k` entries the candidate stored: rank > k.
    Beyond(u32),
}

impl std::fmt::Display for Rank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rank::Exact(r) => write!(f, "{r}"),
            Rank::Beyond(k) => write!(f, ">{k}"),
        }
    }
}

/// What kind of candidate data produced a position's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowSource {
    Logits,
    TopK,
    Argmax,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PositionMetrics {
    pub seq: usize,
    pub pos: usize,
    pub oracle: OracleView,
    pub source: RowSource,
    pub health: RowHealth,
    /// `None` when the row is garbage (NaN/Inf or constant).
    pub cand_top1: Option<usize>,
    /// The oracle's logit of `cand_top1` (the tie rule needs it), set by `compare`.
    pub cand_oracle_logit: Option<f32>,
    pub matched: bool,
    pub rank: Option<Rank>,
    pub cosine: Option<f64>,
    pub cosine_centred: Option<f64>,
    /// KL(oracle ‖ candidate), nats.
    pub kl_oc: Option<f64>,
    /// KL(candidate ‖ oracle), nats.
    pub kl_co: Option<f64>,
    /// p_candidate(oracle top-1) − p_oracle(oracle top-1).
    pub delta_p: Option<f64>,
    /// |top-10 oracle ∩ top-10 candidate|.
    pub top10_overlap: Option<u32>,
}

impl PositionMetrics {
    fn bare(
        seq: usize,
        pos: usize,
        oracle: OracleView,
        source: RowSource,
        health: RowHealth,
    ) -> Self {
        PositionMetrics {
            seq,
            pos,
            oracle,
            source,
            health,
            cand_top1: None,
            cand_oracle_logit: None,
            matched: false,
            rank: None,
            cosine: None,
            cosine_centred: None,
            kl_oc: None,
            kl_co: None,
            delta_p: None,
            top10_overlap: None,
        }
    }
    pub fn is_garbage(&self) -> bool {
        matches!(
            self.health,
            RowHealth::NonFinite | RowHealth::Constant | RowHealth::MaskedTailHidesOracle { .. }
        )
    }
}

/// If every non-finite entry of `row` is `−inf` and together they form a suffix `k..len` (with at least two
/// finite entries before it), the start `k` of that masked vocabulary tail.
pub fn masked_tail(row: &[f32]) -> Option<usize> {
    let k = row.iter().rposition(|x| *x != f32::NEG_INFINITY)? + 1;
    if k == row.len() || k < 2 || row[..k].iter().any(|x| !x.is_finite()) {
        return None;
    }
    Some(k)
}

/// The default of the policy's `masked_tail_max_oracle_mass`: the most oracle probability a `−inf`-masked
/// vocabulary tail may hide (0.1 %). Padding ids of a trained model should carry far less (not yet
/// measured on a real Qwen3.5 checkpoint), and 0.1 % cannot move a top-1 or the KL limits. A mask over
/// more is a vocabulary the candidate cannot produce, and its row is garbage.
pub const MASKED_TAIL_MAX_ORACLE_MASS: f64 = 1e-3;

/// The oracle's probability on ids `k..`, from its `e_o = exp(o − max)` and `z = Σ e_o`.
pub fn oracle_tail_mass(e_o: &[f32], z: f64, k: usize) -> f64 {
    let tail: f64 = e_o.get(k..).unwrap_or(&[]).iter().map(|&x| x as f64).sum();
    tail / z
}

fn overlap(a: &[usize], b: &[usize]) -> u32 {
    a.iter().filter(|x| b.contains(x)).count() as u32
}

/// Full-logits candidate row. With `masked_from = Some(k)` the candidate masked ids `k..V` to `−inf`, and
/// `ost`, `oracle_top10`, `ps` and `cand_row` describe ids `0..k` only (the oracle renormalised there); the
/// caller guarantees the oracle's top-1 is below `k`.
#[allow(clippy::too_many_arguments)]
pub fn from_logits(
    seq: usize,
    pos: usize,
    oracle: OracleView,
    ost: &OracleRowStats,
    oracle_top10: &[usize],
    ps: &PairStats,
    cand_row: &[f32],
    masked_from: Option<usize>,
) -> PositionMetrics {
    let health = if !ps.finite {
        RowHealth::NonFinite
    } else if ps.constant {
        RowHealth::Constant
    } else {
        RowHealth::Ok
    };
    let mut m = PositionMetrics::bare(seq, pos, oracle, RowSource::Logits, health);
    if health != RowHealth::Ok {
        return m;
    }
    if let Some(from) = masked_from {
        m.health = RowHealth::MaskedTail { from };
    }
    let v = cand_row.len() as f64;
    m.cand_top1 = Some(ps.argmax);
    m.matched = ps.argmax == oracle.top1;
    m.rank = Some(Rank::Exact(ps.rank_before as u32 + 1));
    let denom = (ost.sumsq * ps.sumsq).sqrt();
    m.cosine = (denom > 0.0).then(|| (ps.dot / denom).clamp(-1.0, 1.0));
    let cov = ps.dot - ost.sum * ps.sum / v;
    let vo = ost.sumsq - ost.sum * ost.sum / v;
    let vc = ps.sumsq - ps.sum * ps.sum / v;
    m.cosine_centred = (vo > 0.0 && vc > 0.0).then(|| (cov / (vo * vc).sqrt()).clamp(-1.0, 1.0));
    let lse_o = ost.max as f64 + ost.z.ln();
    let lse_c = ps.max as f64 + ps.z.ln();
    let k = lse_o - lse_c;
    m.kl_oc = Some((ps.a_o / ost.z - k).max(0.0));
    m.kl_co = Some((ps.a_c / ps.z + k).max(0.0));
    let pc = ((cand_row[oracle.top1] as f64) - ps.max as f64).exp() / ps.z;
    m.delta_p = Some(pc - oracle.p1);
    // Finite logits of order 1e37 overflow the kernel's f32 lane sums: a NaN or infinite sum must not
    // become a passing value (`max(0.0)` maps NaN to 0, a NaN cosine compares false with any threshold).
    // Such a row cannot be compared: it is garbage, as a non-finite one.
    let sums = [ps.z, ps.sum, ps.sumsq, ps.dot, ps.a_o, ps.a_c];
    let derived = [
        m.cosine,
        m.cosine_centred,
        Some(cov),
        Some(vc),
        Some(lse_c),
        Some(ps.a_o / ost.z - k),
        Some(ps.a_c / ps.z + k),
        Some(pc),
    ];
    if sums.iter().any(|x| !x.is_finite()) || derived.iter().flatten().any(|x| !x.is_finite()) {
        return PositionMetrics::bare(seq, pos, oracle, RowSource::Logits, RowHealth::NonFinite);
    }
    let ctop = super::kernel::top_k(cand_row, TOP_K_OVERLAP);
    m.top10_overlap = Some(overlap(oracle_top10, &ctop));
    m
}

/// Top-k-only candidate row (`ids`, `logits` of one row; `vocab` bounds the ids).
/// Returns `Err(message)` for ids outside the vocabulary.
pub fn from_top_k(
    seq: usize,
    pos: usize,
    oracle: OracleView,
    oracle_top10: &[usize],
    ids: &[i64],
    logits: &[f32],
    vocab: usize,
) -> std::result::Result<PositionMetrics, String> {
    for &id in ids {
        if id < 0 || id as usize >= vocab {
            return Err(format!(
                "top_ids holds token id {id}, outside the vocabulary of {vocab}"
            ));
        }
    }
    let health = if logits.iter().any(|x| !x.is_finite()) {
        RowHealth::NonFinite
    } else if logits.len() >= 2 && logits.iter().all(|&x| x == logits[0]) {
        RowHealth::Constant
    } else {
        RowHealth::Ok
    };
    let mut m = PositionMetrics::bare(seq, pos, oracle, RowSource::TopK, health);
    if health != RowHealth::Ok {
        return Ok(m);
    }
    // order the stored entries by logit, descending; ties by token id
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by(|&a, &b| {
        logits[b]
            .partial_cmp(&logits[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(ids[a].cmp(&ids[b]))
    });
    let sorted: Vec<usize> = order.iter().map(|&i| ids[i] as usize).collect();
    m.cand_top1 = sorted.first().copied();
    m.matched = m.cand_top1 == Some(oracle.top1);
    m.rank = Some(match sorted.iter().position(|&t| t == oracle.top1) {
        Some(r) => Rank::Exact(r as u32 + 1),
        None => Rank::Beyond(sorted.len() as u32),
    });
    if sorted.len() >= TOP_K_OVERLAP {
        m.top10_overlap = Some(overlap(oracle_top10, &sorted[..TOP_K_OVERLAP]));
    }
    Ok(m)
}

/// Argmax-only candidate row.
pub fn from_argmax(
    seq: usize,
    pos: usize,
    oracle: OracleView,
    argmax: i64,
    vocab: usize,
) -> std::result::Result<PositionMetrics, String> {
    if argmax < 0 || argmax as usize >= vocab {
        return Err(format!(
            "argmax holds token id {argmax}, outside the vocabulary of {vocab}"
        ));
    }
    let mut m = PositionMetrics::bare(seq, pos, oracle, RowSource::Argmax, RowHealth::Unchecked);
    let a = argmax as usize;
    m.cand_top1 = Some(a);
    m.matched = a == oracle.top1;
    m.rank = Some(if m.matched {
        Rank::Exact(1)
    } else {
        Rank::Beyond(1)
    });
    Ok(m)
}
