//! positions.csv: one row per (candidate, sequence, position), every metric; empty cell = not computed.
use crate::gate::margin_rule::FlipKind;
use crate::gate::metrics::{PositionMetrics, RowHealth};
use std::fmt::Write;

pub const HEADER: &str = "candidate,seq,pos,counted,oracle_top1,oracle_top2,oracle_p1,oracle_p2,margin,candidate_top1,match,flip,rank_of_oracle_top1,cosine,cosine_centred,kl_oracle_candidate,kl_candidate_oracle,delta_p,top10_overlap,row";

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.8}")).unwrap_or_default()
}

fn quote(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One capture's compared positions with what the gate decided about each.
pub struct Rows<'a> {
    pub label: &'a str,
    pub positions: &'a [PositionMetrics],
    /// Whether the policy counts each position.
    pub counted: &'a [bool],
    /// The gate's flip classification of each position.
    pub flips: &'a [Option<FlipKind>],
}

pub fn render(cands: &[Rows<'_>]) -> String {
    let mut o = String::from(HEADER);
    o.push('\n');
    for r in cands {
        let l = quote(r.label);
        for ((m, &counted), kind) in r.positions.iter().zip(r.counted).zip(r.flips) {
            let flip = match kind {
                Some(FlipKind::Confident) => "confident",
                Some(FlipKind::Tie) => "tie",
                None => "",
            };
            let row = match m.health {
                RowHealth::Ok => "ok",
                RowHealth::MaskedTail { .. } => "masked_tail",
                RowHealth::MaskedTailHidesOracle { .. } => "masked_tail_hides_oracle",
                RowHealth::NonFinite => "non_finite",
                RowHealth::Constant => "constant",
                RowHealth::Unchecked => "unchecked",
            };
            let _ = writeln!(
                o,
                "{l},{},{},{},{},{},{:.8},{:.8},{:.8},{},{},{flip},{},{},{},{},{},{},{},{row}",
                m.seq,
                m.pos,
                counted,
                m.oracle.top1,
                m.oracle.top2,
                m.oracle.p1,
                m.oracle.p2,
                m.oracle.margin,
                m.cand_top1.map(|c| c.to_string()).unwrap_or_default(),
                m.matched,
                m.rank.map(|r| r.to_string()).unwrap_or_default(),
                opt(m.cosine),
                opt(m.cosine_centred),
                opt(m.kl_oc),
                opt(m.kl_co),
                opt(m.delta_p),
                m.top10_overlap.map(|c| c.to_string()).unwrap_or_default(),
            );
        }
    }
    o
}
