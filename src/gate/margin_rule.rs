//! The margin rule, in the domain's words.
//!
//! At every compared position the candidate's top-1 either equals the oracle's top-1 (a match) or not (a
//! flip). A flip is a **tie-flip** — it passes, because the oracle itself could not tell the two tokens
//! apart — only when the candidate's token is a *near-top* token of the oracle, both:
//!
//! - within the floor of the oracle's top-1 in the run's margin space:
//!   prob: `p_o(top1) − p_o(cand) < floor`; logit: `l_o(top1) − l_o(cand) < floor`; and
//! - within `tie_max_logit_gap` nats of the oracle's top-1: `l_o(top1) − l_o(cand) ≤ gap`,
//!
//! so that at a flat position, where every probability is below the floor, a token the oracle found 100×
//! less likely than its top-1 (4.6 nats) is still a **confident flip**. Anything else is a confident flip,
//! whatever the oracle's top-1 − top-2 margin. When the candidate picks the oracle's top-2, the first gap is
//! exactly the oracle's margin, so "margin below the floor" and "tie" agree there.
//!
//! Control attribution: a candidate flip is **shared with the control** when the control (typically fp16
//! of the same plan) chose the *same* token at that position; otherwise it is **introduced**. The gate
//! decides on introduced confident flips; each flip records what the control chose.
use super::metrics::{MarginSpace, PositionMetrics};
use super::policy::Policy;
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlipKind {
    Tie,
    Confident,
}

/// The tie rule's three numbers, from the policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TieRule {
    pub space: MarginSpace,
    pub floor: f64,
    pub max_logit_gap: f64,
}

impl TieRule {
    pub fn of(policy: &Policy) -> TieRule {
        TieRule {
            space: policy.margin_space,
            floor: policy.margin_floor,
            max_logit_gap: policy.tie_max_logit_gap,
        }
    }

    /// Is a change from the oracle's top-1 to a token whose oracle logit is `l_cand` a tie?
    /// `p1`, `l1`: the oracle's top-1 probability and logit.
    pub fn is_tie(&self, p1: f64, l1: f32, l_cand: f32) -> bool {
        let raw = l1 as f64 - l_cand as f64;
        if !raw.is_finite() {
            return false; // NaN or ±inf never makes a tie
        }
        let gap = raw.max(0.0);
        if gap > self.max_logit_gap {
            return false;
        }
        let in_space = match self.space {
            MarginSpace::Prob => p1 - p1 * (-gap).exp(),
            MarginSpace::Logit => gap,
        };
        in_space < self.floor
    }
}

/// Classify one position; `None` when the candidate agrees with the oracle (or the row is garbage, which
/// the verdict handles separately). A flip whose token the oracle's row does not give a logit for is
/// confident (it cannot be shown to be a tie).
pub fn classify(m: &PositionMetrics, rule: &TieRule) -> Option<FlipKind> {
    let c = m.cand_top1?;
    if c == m.oracle.top1 {
        return None;
    }
    let tie = m
        .cand_oracle_logit
        .is_some_and(|lc| rule.is_tie(m.oracle.p1, m.oracle.l1, lc));
    Some(if tie {
        FlipKind::Tie
    } else {
        FlipKind::Confident
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
    /// The oracle's probability of the candidate's token.
    pub oracle_p_candidate: Option<f64>,
    /// `l_o(top1) − l_o(candidate's token)`, nats.
    pub oracle_logit_gap: Option<f64>,
    /// The oracle's top-1 − top-2 margin in the run's margin space.
    pub margin: f64,
    pub cosine: Option<f64>,
    /// `Some(true)`: the control chose the same token here. `None`: no control given.
    pub shared_with_control: Option<bool>,
    /// What the control chose at this position (`None`: no control, or no usable control row).
    pub control_token: Option<usize>,
}

/// The control's top-1 per (sequence, position), for attribution.
pub type ControlTop1 = HashMap<(usize, usize), usize>;

pub fn control_top1<'a>(control: impl IntoIterator<Item = &'a PositionMetrics>) -> ControlTop1 {
    control
        .into_iter()
        .filter_map(|m| m.cand_top1.map(|c| ((m.seq, m.pos), c)))
        .collect()
}

/// Every flip among `positions` for which `counted` holds, in plan order.
pub fn flips(
    positions: &[PositionMetrics],
    rule: &TieRule,
    control: Option<&ControlTop1>,
    counted: impl Fn(&PositionMetrics) -> bool,
) -> Vec<Flip> {
    positions
        .iter()
        .filter(|m| counted(m))
        .filter_map(|m| {
            let kind = classify(m, rule)?;
            let cand = m.cand_top1?;
            let control_token = control.and_then(|ct| ct.get(&(m.seq, m.pos)).copied());
            // a control without a row here cannot share the flip: it counts as introduced
            let shared = control.map(|_| control_token == Some(cand));
            let gap = m
                .cand_oracle_logit
                .map(|lc| (m.oracle.l1 as f64 - lc as f64).max(0.0));
            Some(Flip {
                seq: m.seq,
                pos: m.pos,
                kind,
                oracle_top1: m.oracle.top1,
                oracle_top2: m.oracle.top2,
                oracle_p1: m.oracle.p1,
                oracle_p2: m.oracle.p2,
                candidate_token: cand,
                oracle_p_candidate: gap.map(|g| m.oracle.p1 * (-g).exp()),
                oracle_logit_gap: gap,
                margin: m.oracle.margin,
                cosine: m.cosine_centred,
                shared_with_control: shared,
                control_token,
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

    /// Oracle row with top-1 logit 0 (token 1) and top-2 at `-top2_gap` (token 2); the candidate picks
    /// `cand`, whose oracle logit is `l_cand`.
    fn pm(pos: usize, p1: f64, top2_gap: f64, cand: usize, l_cand: f32) -> PositionMetrics {
        let p2 = p1 * (-top2_gap).exp();
        PositionMetrics {
            seq: 0,
            pos,
            oracle: OracleView {
                top1: 1,
                top2: 2,
                p1,
                p2,
                l1: 0.0,
                l2: -top2_gap as f32,
                margin: p1 - p2,
            },
            source: RowSource::Argmax,
            health: RowHealth::Unchecked,
            cand_top1: Some(cand),
            cand_oracle_logit: Some(l_cand),
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

    const RULE: TieRule = TieRule {
        space: MarginSpace::Prob,
        floor: 0.1,
        max_logit_gap: 1.0,
    };

    #[test]
    fn confident_near_tie_and_flat_positions() {
        // confident position (p1 0.9, top-2 far below): the top-2 is a confident flip
        assert_eq!(
            classify(&pm(0, 0.9, 3.0, 2, -3.0), &RULE),
            Some(FlipKind::Confident)
        );
        // near-tie: the top-2 at 0.02 nats below a 0.45 top-1 is a tie
        assert_eq!(
            classify(&pm(1, 0.45, 0.02, 2, -0.02), &RULE),
            Some(FlipKind::Tie)
        );
        // near-tie position, but the candidate picks a far token (rank 200, 5 nats down): confident
        assert_eq!(
            classify(&pm(2, 0.45, 0.02, 77, -5.0), &RULE),
            Some(FlipKind::Confident)
        );
        // flat position (p1 = 0.01): every probability gap is below the floor, yet a token 100× less
        // likely than the top-1 (4.6 nats) is not a tie
        assert_eq!(
            classify(&pm(3, 0.01, 0.05, 77, -4.61), &RULE),
            Some(FlipKind::Confident)
        );
        // … while a token within 1 nat at the same flat position is
        assert_eq!(
            classify(&pm(4, 0.01, 0.05, 77, -0.9), &RULE),
            Some(FlipKind::Tie)
        );
        // exactly at the gap: tie (the gap is inclusive); the floor is exclusive for ties
        assert_eq!(
            classify(&pm(5, 0.01, 0.05, 77, -1.0), &RULE),
            Some(FlipKind::Tie)
        );
        let at_floor = TieRule {
            space: MarginSpace::Logit,
            floor: 0.5,
            max_logit_gap: 1.0,
        };
        assert_eq!(
            classify(&pm(6, 0.5, 0.5, 2, -0.5), &at_floor),
            Some(FlipKind::Confident)
        );
        assert_eq!(
            classify(&pm(7, 0.5, 0.5, 2, -0.4999), &at_floor),
            Some(FlipKind::Tie)
        );
        // unknown oracle logit for the candidate's token: confident; a NaN never makes a tie
        let mut m = pm(8, 0.45, 0.02, 2, -0.02);
        m.cand_oracle_logit = None;
        assert_eq!(classify(&m, &RULE), Some(FlipKind::Confident));
        assert_eq!(
            classify(&pm(9, 0.45, 0.02, 2, f32::NAN), &RULE),
            Some(FlipKind::Confident)
        );
        assert_eq!(classify(&pm(10, 0.45, 0.02, 1, 0.0), &RULE), None);
    }

    #[test]
    fn control_must_choose_the_same_token_and_is_recorded() {
        let ps = vec![
            pm(0, 0.9, 3.0, 2, -3.0),
            pm(1, 0.45, 0.02, 2, -0.02),
            pm(2, 0.9, 3.0, 1, 0.0),
            pm(3, 0.9, 3.0, 8, -4.0),
            pm(4, 0.9, 3.0, 9, -4.0),
        ];
        let mut c3 = pm(3, 0.9, 3.0, 8, -4.0);
        c3.cand_top1 = Some(8);
        let mut c4 = pm(4, 0.9, 3.0, 5, -4.0);
        c4.cand_top1 = Some(5);
        let ctrl = control_top1(&[c3, c4]);
        let f = flips(&ps, &RULE, Some(&ctrl), |_| true);
        let kinds: Vec<_> = f
            .iter()
            .map(|f| (f.pos, f.kind, f.shared_with_control, f.control_token))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, FlipKind::Confident, Some(false), None),
                (1, FlipKind::Tie, Some(false), None),
                (3, FlipKind::Confident, Some(true), Some(8)),
                (4, FlipKind::Confident, Some(false), Some(5)),
            ]
        );
        assert_eq!(introduced(&f), 2);
    }
}
