//! The short table `qgate run` prints (the verdict line goes to stderr as well).
use crate::gate::summary::RunSummary;
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
        "{:<w$}  {:>13}  {:>5}  {:>9}  {:>10}  {:>8}  {:>10}  verdict",
        "candidate", "exact", "ties", "confident", "introduced", "min cos", "mean KL"
    );
    for c in &s.candidates {
        let _ = writeln!(
            o,
            "{:<w$}  {:>13}  {:>5}  {:>9}  {:>10}  {:>8}  {:>10}  {}",
            c.id.label,
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
            match c.verdict.failed_rule {
                Some(r) => format!("FAIL ({r})"),
                None => c.verdict.status.to_uppercase(),
            }
        );
    }
    let _ = writeln!(
        o,
        "margin: {} space, floor {}",
        s.margin_space.name(),
        s.margin_floor
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
