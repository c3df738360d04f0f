//! What `qgate sweep` decides from a gated ladder of simulated schemes: the scheme that ships, why each
//! smaller one was rejected, and which components an ablation found sensitive. Pure functions over the
//! candidates' summaries; the command only simulates and prints.
use super::decision::{ExitCode, Status};
use super::outcome::Rejection;
use super::summary::{CandidateSummary, Role};

/// Every gated scheme that did not pass and is smaller than the one that ships (all of them when nothing
/// ships), largest first.
pub fn rejected_smaller(cands: &[CandidateSummary], ship: Option<&str>) -> Vec<Rejection> {
    let ship_size = ship.and_then(|l| {
        cands
            .iter()
            .find(|c| c.id.label == l)
            .and_then(|c| c.id.size_bytes)
    });
    let mut rejected: Vec<Rejection> = cands
        .iter()
        .filter(|c| c.role == Role::Candidate && c.verdict.status != Status::Pass)
        .filter(|c| match (ship_size, c.id.size_bytes) {
            (Some(ship), Some(sz)) => sz < ship,
            _ => ship_size.is_none(),
        })
        .map(|c| Rejection {
            label: c.id.label.clone(),
            size_bytes: c.id.size_bytes,
            failed_rule: c.verdict.failed_rule,
            reason: c.verdict.reason.clone(),
        })
        .collect();
    rejected.sort_by_key(|r| std::cmp::Reverse(r.size_bytes));
    rejected
}

/// The components whose ablation variant does not pass.
pub fn sensitive(variants: &[(String, CandidateSummary)]) -> Vec<String> {
    variants
        .iter()
        .filter(|r| r.1.verdict.status != Status::Pass)
        .map(|r| r.0.clone())
        .collect()
}

/// A sweep passes when something ships: failing smaller schemes are its point. A rejected prompt keeps
/// its own exit code (nothing was judged). When schemes pass but none is chosen (the same smallest size,
/// sizes unknown) the sweep fails with the ship note, not as if nothing passed.
pub fn sweep_verdict(
    cands: &[CandidateSummary],
    ship: Option<&str>,
    ship_note: &str,
    gate_code: ExitCode,
    gate_line: &str,
) -> (ExitCode, String) {
    if gate_code == ExitCode::PromptRejected {
        return (gate_code, gate_line.to_string());
    }
    let any_pass = cands
        .iter()
        .any(|c| c.role == Role::Candidate && c.verdict.status == Status::Pass);
    match ship {
        Some(l) => (
            ExitCode::Pass,
            format!("SHIP: {l} — the smallest scheme that passes the policy"),
        ),
        None if any_pass => (
            ExitCode::GateFailed,
            format!("SHIP: {}", ship_note.trim_start_matches("ship: ")),
        ),
        None => (
            ExitCode::GateFailed,
            "SHIP: none — no simulated scheme passes the policy".to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::decision::{Status, Verdict};

    fn passing(label: &str) -> CandidateSummary {
        let mut c = crate::gate::summary::test_candidate(label);
        c.verdict = Verdict {
            status: Status::Pass,
            failed_rule: None,
            reason: "pass".into(),
            rules: Vec::new(),
        };
        c
    }

    #[test]
    fn passing_schemes_that_tie_are_not_decided_not_nothing_passes() {
        let cands = [passing("int8hu"), passing("int8hu-headsym")];
        let note = "ship: not decided — int8hu and int8hu-headsym pass at the same smallest size (10 bytes)";
        let (code, line) = sweep_verdict(&cands, None, note, ExitCode::GateFailed, "x");
        assert_eq!(code, ExitCode::GateFailed);
        assert!(line.starts_with("SHIP: not decided — int8hu and"), "{line}");
        let (code, line) = sweep_verdict(&[], None, "ship: none", ExitCode::GateFailed, "x");
        assert_eq!(code, ExitCode::GateFailed);
        assert!(line.contains("no simulated scheme passes"), "{line}");
        let (code, _) = sweep_verdict(&cands, Some("int8hu"), note, ExitCode::GateFailed, "x");
        assert_eq!(code, ExitCode::Pass);
    }
}
