//! Symptom detectors: cosine craters, collapse after position 0 and degenerate repetition. They describe
//! what a broken runtime typically looks like; `verdict::judge` fails a candidate on collapse and
//! repetition (policy switches `fail_on_collapse`, `fail_on_repetition`), craters are reported (the
//! `min_cosine` rule decides on them).
use super::decision::SymptomKind;
use super::metrics::PositionMetrics;
use serde::Serialize;

/// A degenerate repetition is the same token at least this many times in a row in a rollout.
pub const REPETITION_RUN: usize = 8;

#[derive(Debug, Clone, Serialize)]
pub struct Symptom {
    pub kind: SymptomKind,
    pub seq: usize,
    pub pos: Option<usize>,
    pub detail: String,
    /// The oracle shows the same symptom (a repetition the oracle's own rollout has): never fails.
    pub oracle_too: bool,
}

/// Cosine crater and collapse-after-position-0 flags over the counted positions (plan order).
pub fn row_symptoms(positions: &[PositionMetrics], mask: &[bool]) -> Vec<Symptom> {
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
                            kind: SymptomKind::CosineCrater,
                            seq,
                            pos: Some(m.pos),
                            detail: format!("cosine {c:.4} vs sequence median {med:.4}"),
                            oracle_too: false,
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
                    kind: SymptomKind::CollapseAfterPosition0,
                    seq,
                    pos: Some(first.pos),
                    detail: format!(
                        "position 0 agrees, then {agree}/{} later positions agree",
                        later.len()
                    ),
                    oracle_too: false,
                });
            }
        }
        i = j;
    }
    out
}

/// Degenerate repetition in a candidate rollout (≥ 8 times the same token in a row).
pub fn repetition(seq: usize, cand: &[i64], oracle: Option<&[i64]>) -> Option<Symptom> {
    let (run, tok) = super::rollout::longest_run(cand);
    let tok = tok?;
    if run < REPETITION_RUN {
        return None;
    }
    // Excused only when the oracle repeats the same token as long (not any token anywhere).
    let oracle_too = oracle.is_some_and(|o| {
        o.split(|&x| x != tok).map(<[i64]>::len).max().unwrap_or(0) >= REPETITION_RUN
    });
    Some(Symptom {
        kind: SymptomKind::DegenerateRepetition,
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
        oracle_too,
    })
}
