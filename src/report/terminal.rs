//! The short table `qgate run` prints (the verdict line goes to stderr as well).
use crate::gate::decision::Status;
use crate::gate::outcome::RunSummary;
use std::fmt::Write;

pub fn render(s: &RunSummary) -> String {
    let mut o = String::new();
    let w = s
        .candidates
        .iter()
        .map(|c| c.id.label.len())
        .max()
        .unwrap_or(9)
        .max(9);
    let _ = writeln!(
        o,
        "{:<w$}  {:>9}  {:>13}  {:>5}  {:>9}  {:>10}  {:>8}  {:>10}  verdict",
        "candidate", "coverage", "exact", "ties", "confident", "introduced", "min cos", "mean KL"
    );
    for c in &s.candidates {
        let _ = writeln!(
            o,
            "{:<w$}  {:>9}  {:>13}  {:>5}  {:>9}  {:>10}  {:>8}  {:>10}  {}",
            c.id.label,
            c.coverage
                .fraction
                .map(|f| format!("{:.1}%", 100.0 * f))
                .unwrap_or("n/a".into()),
            format!("{}/{}", c.exact, c.positions_counted),
            c.tie_flips,
            c.confident_flips,
            c.introduced_confident_flips,
            c.cosine
                .as_ref()
                .map(|x| format!("{:.4}", x.min))
                .unwrap_or("n/a".into()),
            c.kl.as_ref()
                .map(|x| format!("{:.6}", x.mean))
                .unwrap_or("n/a".into()),
            match (c.verdict.status, c.verdict.failed_rule) {
                (Status::Fail, Some(r)) => format!("FAIL ({r})"),
                (st, _) => st.name().to_uppercase(),
            }
        );
    }
    let _ = writeln!(
        o,
        "margin: {} space, floor {}; tie-flips only within {} nats of the oracle's top-1",
        s.margin_space.name(),
        s.margin_floor,
        s.policy.tie_max_logit_gap
    );
    let _ = writeln!(
        o,
        "oracle positions that can judge (margin >= floor): {} of {} counted; oracle provenance: {}",
        s.prompt.positions_counted - s.prompt.below_floor,
        s.prompt.positions_counted,
        s.oracle.provenance.describe()
    );
    for p in &s.sim_vs_bundle {
        let _ = writeln!(
            o,
            "simulation vs bundle: {} vs {}: {}",
            p.simulated, p.bundle, p.finding
        );
    }
    let _ = writeln!(o, "{}", s.verdict);
    o
}
