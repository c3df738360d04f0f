//! Who may play which role. The oracle must not be one of the candidates, and a control must earn its
//! role: it is refused when it is identical to a candidate (the same file, or the same per-position data
//! under another label), or when it has more confident flips of its own than the policy allows — a
//! control that disagrees with the oracle where the oracle is confident would "explain away" exactly the
//! flips the gate exists to catch.
use super::policy::Policy;
use super::summary::CandidateSummary;
use crate::capture::{Capture, FloatKind};
use crate::error::{Error, Result};

/// The same file, or the same per-position data (logits — byte-identical, or equal after rounding to the
/// coarser of two dtypes —, else top-k, else argmax) in every sequence.
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
            (Some(lx), Some(ly), _, _) if lx.kind == ly.kind => {
                lx.rows == ly.rows && lx.bytes() == ly.bytes()
            }
            // another dtype: the same values once the finer one is rounded to the coarser (a cast copy)
            (Some(lx), Some(ly), _, _) => {
                lx.rows == ly.rows && lx.cols == ly.cols && {
                    let coarse = coarser(lx.kind, ly.kind);
                    let (mut a, mut b) = (vec![0f32; lx.cols], vec![0f32; ly.cols]);
                    (0..lx.rows).all(|r| {
                        lx.row_into(r, &mut a);
                        ly.row_into(r, &mut b);
                        a.iter().zip(&b).all(|(&u, &v)| {
                            round_to(u, coarse).to_bits() == round_to(v, coarse).to_bits()
                        })
                    })
                }
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

/// The coarser of two logits dtypes (f16 and bf16: bf16, whose 8-bit mantissa both hold exactly in range).
fn coarser(a: FloatKind, b: FloatKind) -> FloatKind {
    match (a, b) {
        (FloatKind::F32, k) | (k, FloatKind::F32) => k,
        (FloatKind::F16, FloatKind::F16) => FloatKind::F16,
        _ => FloatKind::BF16,
    }
}

/// `x` rounded to `kind` (round to nearest even, as a cast), back in f32.
fn round_to(x: f32, kind: FloatKind) -> f32 {
    match kind {
        FloatKind::F32 => x,
        FloatKind::F16 => half::f16::from_f32(x).to_f32(),
        FloatKind::BF16 => half::bf16::from_f32(x).to_f32(),
    }
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
