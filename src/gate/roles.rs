//! Who may play which role. The oracle must not be one of the candidates, and a control must earn its
//! role: it is refused when it is identical to a candidate (the same file, or the same per-position data
//! under another label), or when it has more confident flips of its own than the policy allows — a
//! control that disagrees with the oracle where the oracle is confident would "explain away" exactly the
//! flips the gate exists to catch.
use super::policy::Policy;
use super::summary::CandidateSummary;
use crate::capture::Capture;
use crate::error::{Error, Result};

/// The same file, or byte-identical per-position data (logits, else top-k, else argmax) in every sequence.
pub fn same_data(a: &Capture, b: &Capture) -> bool {
    if let (Ok(pa), Ok(pb)) = (a.path.canonicalize(), b.path.canonicalize()) {
        if pa == pb {
            return true;
        }
    }
    if a.len() != b.len() || a.is_empty() {
        return false;
    }
    let mut any = false;
    for i in 0..a.len() {
        let (x, y) = (a.seq(i), b.seq(i));
        let same = match (&x.logits, &y.logits, &x.top_logits, &y.top_logits) {
            (Some(lx), Some(ly), _, _) => {
                lx.kind == ly.kind && lx.rows == ly.rows && lx.bytes() == ly.bytes()
            }
            (None, None, Some(tx), Some(ty)) => {
                tx.kind == ty.kind
                    && tx.bytes() == ty.bytes()
                    && x.top_ids.as_ref().map(|t| t.to_vec())
                        == y.top_ids.as_ref().map(|t| t.to_vec())
            }
            (None, None, None, None) => match (&x.argmax, &y.argmax) {
                (Some(ax), Some(ay)) => ax == ay,
                (None, None) => true,
                _ => false,
            },
            _ => false,
        };
        if !same {
            return false;
        }
        any |= x.rows() > 0;
    }
    any
}

/// The oracle must not be a candidate or the control under another name.
pub fn check_oracle_is_not_a_candidate(oracle: &Capture, others: &[&Capture]) -> Result<()> {
    for c in others {
        if same_data(oracle, c) {
            return Err(Error::input(
                &oracle.path,
                format!(
                    "the oracle holds the same data as the candidate {} (label `{}`): a capture cannot be its own oracle",
                    c.path.display(),
                    c.meta.label
                ),
            ));
        }
    }
    Ok(())
}

/// The control must differ from every candidate.
pub fn check_control_is_not_a_candidate(control: &Capture, cands: &[&Capture]) -> Result<()> {
    for c in cands {
        if same_data(control, c) {
            return Err(Error::input(
                &control.path,
                format!(
                    "control is identical to the candidate {} (label `{}`): a candidate cannot be its own control",
                    c.path.display(),
                    c.meta.label
                ),
            ));
        }
    }
    Ok(())
}

/// The control's own confident flips (against the oracle, under the same tie rule) must stay within
/// `max_control_confident_flips`.
pub fn check_control_earns_role(
    control: &Capture,
    summary: &CandidateSummary,
    policy: &Policy,
) -> Result<()> {
    let allowed = policy
        .max_control_confident_flips
        .allowed(summary.coverage.planned);
    if summary.confident_flips > allowed {
        let first = summary
            .flips
            .iter()
            .find(|f| f.kind == super::margin_rule::FlipKind::Confident)
            .map(|f| {
                format!(
                    " (first at seq {} pos {}: oracle margin {:.4}, control token {} instead of {})",
                    f.seq, f.pos, f.margin, f.candidate_token, f.oracle_top1
                )
            })
            .unwrap_or_default();
        return Err(Error::input(
            &control.path,
            format!(
                "refused as control: {} confident flip(s) of its own against the oracle > {allowed} allowed (max_control_confident_flips){first}; a control must agree with the oracle where the oracle is confident",
                summary.confident_flips
            ),
        ));
    }
    Ok(())
}
