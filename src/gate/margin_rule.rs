//! The margin rule. A **confident flip** is a position where the candidate's top-1 differs from the
//! oracle's and the oracle's margin (top-1 − top-2) is at least the floor; below the floor it is a
//! **tie-flip**, which passes (the oracle itself could not tell those tokens apart).
//!
//! Control attribution: a candidate flip is **shared with control** when the control (typically fp16 of the
//! same plan) flips to the *same* token at that position; otherwise it is **introduced**. The gate decides
//! on introduced confident flips.
use super::metrics::PositionMetrics;
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlipKind {
    Tie,
    Confident,
}

/// Classify one position; `None` when the candidate agrees with the oracle (or the row is garbage, which
/// the verdict handles separately).
pub fn classify(m: &PositionMetrics, floor: f64) -> Option<FlipKind> {
    let c = m.cand_top1?;
    if c == m.oracle.top1 {
        return None;
    }
    Some(if m.oracle.margin >= floor {
        FlipKind::Confident
    } else {
        FlipKind::Tie
    })
}

/// Whether the oracle can judge this position at all (margin at or above the floor).
pub fn is_confident_position(m: &PositionMetrics, floor: f64) -> bool {
    m.oracle.margin >= floor
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flip {
    pub seq: usize,
    pub pos: usize,
    pub kind: FlipKind,
    pub oracle_top1: usize,
    pub oracle_top2: usize,
    pub oracle_p1: f64,
    pub oracle_p2: f64,
    pub candidate_token: usize,
    pub margin: f64,
    pub cosine: Option<f64>,
    /// `Some(true)`: the control flips to the same token here. `None`: no control given.
    pub shared_with_control: Option<bool>,
}

/// The control's top-1 per (sequence, position), for attribution.
pub type ControlTop1 = HashMap<(usize, usize), usize>;

pub fn control_top1(control: &[PositionMetrics]) -> ControlTop1 {
    control
        .iter()
        .filter_map(|m| m.cand_top1.map(|c| ((m.seq, m.pos), c)))
        .collect()
}

/// Every flip among `positions` for which `counted` holds, in plan order.
pub fn flips(
    positions: &[PositionMetrics],
    floor: f64,
    control: Option<&ControlTop1>,
    counted: impl Fn(&PositionMetrics) -> bool,
) -> Vec<Flip> {
    positions
        .iter()
        .filter(|m| counted(m))
        .filter_map(|m| {
            let kind = classify(m, floor)?;
            let cand = m.cand_top1?;
            // a control without a row here cannot share the flip: it counts as introduced
            let shared = control.map(|ct| ct.get(&(m.seq, m.pos)) == Some(&cand));
            Some(Flip {
                seq: m.seq,
                pos: m.pos,
                kind,
                oracle_top1: m.oracle.top1,
                oracle_top2: m.oracle.top2,
                oracle_p1: m.oracle.p1,
                oracle_p2: m.oracle.p2,
                candidate_token: cand,
                margin: m.oracle.margin,
                cosine: m.cosine_centred,
                shared_with_control: shared,
            })
        })
        .collect()
}

/// Confident flips the control does not share (all confident flips when there is no control).
pub fn introduced(flips: &[Flip]) -> usize {
    flips
        .iter()
        .filter(|f| f.kind == FlipKind::Confident && f.shared_with_control != Some(true))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::metrics::{OracleView, RowHealth, RowSource};

    fn pm(pos: usize, margin: f64, cand: usize) -> PositionMetrics {
        PositionMetrics {
            seq: 0,
            pos,
            oracle: OracleView {
                top1: 1,
                top2: 2,
                p1: 0.5,
                p2: 0.5 - margin,
                l1: 0.0,
                l2: 0.0,
                margin,
            },
            source: RowSource::Argmax,
            health: RowHealth::Unchecked,
            cand_top1: Some(cand),
            matched: cand == 1,
            rank: None,
            cosine: None,
            cosine_centred: None,
            kl_oc: None,
            kl_co: None,
            delta_p: None,
            top10_overlap: None,
        }
    }

    #[test]
    fn floor_is_inclusive_and_control_must_flip_to_the_same_token() {
        let ps = vec![
            pm(0, 0.1, 7),
            pm(1, 0.0999, 7),
            pm(2, 0.9, 1),
            pm(3, 0.5, 8),
            pm(4, 0.5, 9),
        ];
        let ctrl = control_top1(&[pm(3, 0.5, 8), pm(4, 0.5, 5)]);
        let f = flips(&ps, 0.1, Some(&ctrl), |_| true);
        let kinds: Vec<_> = f
            .iter()
            .map(|f| (f.pos, f.kind, f.shared_with_control))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, FlipKind::Confident, Some(false)),
                (1, FlipKind::Tie, Some(false)),
                (3, FlipKind::Confident, Some(true)),
                (4, FlipKind::Confident, Some(false)),
            ]
        );
        assert_eq!(introduced(&f), 2);
    }
}
