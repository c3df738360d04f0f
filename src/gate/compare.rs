//! Streams every oracle row once, compares it with each candidate's row at the same position (rayon across
//! rows, one decoded row per side per thread; never a whole `[T, V]` matrix in f32).
use super::kernel;
use super::metrics::{self, OracleView, PositionMetrics, TOP_K_OVERLAP};
use super::policy::Policy;
use crate::capture::{Capture, SeqView};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// The oracle's view at (sequence, position).
pub type OracleAt = (usize, usize, OracleView);

/// Per candidate: its compared positions in plan order, and how many oracle rows it had no row for.
#[derive(Debug, Clone, Default)]
pub struct Compared {
    pub positions: Vec<PositionMetrics>,
    pub not_compared: usize,
}

/// Check that a candidate was captured on exactly the oracle's plan (same sequences, same tokens, same vocab).
pub fn check_same_plan(oracle: &Capture, cand: &Capture) -> Result<()> {
    check_same_plan_as(oracle, "the oracle", cand)
}

/// [`check_same_plan`] against any reference capture, named `what` in the message ("the oracle", "the
/// first candidate"): run before the oracle, so that captures of different plans are refused before hours
/// of work.
pub fn check_same_plan_as(oracle: &Capture, what: &str, cand: &Capture) -> Result<()> {
    let name = |c: &Capture| c.path.display().to_string();
    if oracle.meta.vocab_size != cand.meta.vocab_size {
        return Err(Error::input(
            &cand.path,
            format!(
                "vocab size {} but {what} {} has {}",
                cand.meta.vocab_size,
                name(oracle),
                oracle.meta.vocab_size
            ),
        ));
    }
    if oracle.len() != cand.len() {
        return Err(Error::input(
            &cand.path,
            format!(
                "{} sequences but {what} {} has {} (captures of different plans)",
                cand.len(),
                name(oracle),
                oracle.len()
            ),
        ));
    }
    for i in 0..oracle.len() {
        let (a, b) = (oracle.seq(i).tokens, cand.seq(i).tokens);
        if a == b {
            continue;
        }
        let t = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        let diff = match (a.get(t), b.get(t)) {
            (Some(x), Some(y)) => format!("token {y} but {what} has {x}"),
            (Some(_), None) => format!(
                "sequence ends ({} tokens) but {what} has {}",
                b.len(),
                a.len()
            ),
            (None, _) => format!(
                "sequence has {} tokens but {what} ends at {}",
                b.len(),
                a.len()
            ),
        };
        return Err(Error::input(
            &cand.path,
            format!(
                "tokens differ from {what} {} first at sequence {i} position {t}: {diff}",
                name(oracle)
            ),
        ));
    }
    Ok(())
}

struct Scratch {
    o: Vec<f32>,
    e: Vec<f32>,
    c: Vec<f32>,
    ids: Vec<i64>,
    tl: Vec<f32>,
}

/// Compare every candidate with the oracle. Candidates must already have passed [`check_same_plan`].
/// Returns the oracle's view of every oracle row (plan order) and, per candidate, its compared positions.
pub fn compare(
    oracle: &Capture,
    cands: &[&Capture],
    policy: &Policy,
) -> Result<(Vec<OracleAt>, Vec<Compared>)> {
    let space = policy.margin_space;
    let tail_limit = policy.masked_tail_max_oracle_mass;
    let vocab = oracle.meta.vocab_size;
    let oseqs: Vec<SeqView<'_>> = (0..oracle.len()).map(|i| oracle.seq(i)).collect();
    for s in &oseqs {
        if s.logits.is_none() {
            return Err(Error::input(
                &oracle.path,
                format!(
                    "oracle has no logits for seq.{} (an oracle capture needs full logits)",
                    s.index
                ),
            ));
        }
        // a truncated oracle would shrink the plan every candidate is judged on
        if s.rows() != s.tokens.len() {
            return Err(Error::input(
                &oracle.path,
                format!(
                    "oracle has {} logits row(s) for the {} tokens of seq.{}: an oracle capture needs a row at every position",
                    s.rows(),
                    s.tokens.len(),
                    s.index
                ),
            ));
        }
    }
    let cseqs: Vec<Vec<SeqView<'_>>> = cands
        .iter()
        .map(|c| (0..c.len()).map(|i| c.seq(i)).collect())
        .collect();
    let items: Vec<(usize, usize)> = oseqs
        .iter()
        .flat_map(|s| (0..s.rows()).map(move |t| (s.index, t)))
        .collect();

    let rows: Vec<Result<(OracleView, Vec<Option<PositionMetrics>>)>> = items
        .par_iter()
        .map_init(
            || Scratch {
                o: vec![0f32; vocab],
                e: vec![0f32; vocab],
                c: vec![0f32; vocab],
                ids: Vec::new(),
                tl: Vec::new(),
            },
            |sc, &(s, t)| -> Result<(OracleView, Vec<Option<PositionMetrics>>)> {
                let Some(ol) = &oseqs[s].logits else {
                    return Err(Error::Internal("oracle row without logits".into()));
                };
                kernel::decode_row(ol, t, &mut sc.o);
                let ost = kernel::oracle_row(&sc.o, &mut sc.e);
                if !ost.finite {
                    return Err(Error::input(
                        &oracle.path,
                        format!("oracle row seq.{s} position {t} holds NaN/Inf logits (a broken oracle cannot judge)"),
                    ));
                }
                let ov = OracleView::from_stats(&ost, space);
                let otop = kernel::top_k(&sc.o, TOP_K_OVERLAP);
                let mut out = Vec::with_capacity(cands.len());
                for (ci, cs) in cseqs.iter().enumerate() {
                    let cv = &cs[s];
                    if t >= cv.rows() {
                        out.push(None);
                        continue;
                    }
                    let bad = |p: String| Error::input(&cands[ci].path, format!("seq.{s} position {t}: {p}"));
                    let mut m = if let Some(cl) = &cv.logits {
                        kernel::decode_row(cl, t, &mut sc.c);
                        let ps = kernel::pair_row(&sc.o, &sc.e, &ost, &sc.c);
                        // a −inf-masked vocabulary tail is not garbage: judge the row over the ids before it,
                        // unless the tail hides the oracle's top-1 or more than a negligible part of its
                        // probability (padding ids of a trained model): then the row stays garbage, since
                        // the metrics over the ids before it would not see what the mask removed
                        match (ps.finite, metrics::masked_tail(&sc.c)) {
                            (false, Some(k))
                                if ov.top1 < k
                                    && metrics::oracle_tail_mass(&sc.e, ost.z, k) <= tail_limit =>
                            {
                                let mut ek = vec![0f32; k];
                                let ostk = kernel::oracle_row(&sc.o[..k], &mut ek);
                                let psk = kernel::pair_row(&sc.o[..k], &ek, &ostk, &sc.c[..k]);
                                let otopk = kernel::top_k(&sc.o[..k], TOP_K_OVERLAP);
                                metrics::from_logits(s, t, ov, &ostk, &otopk, &psk, &sc.c[..k], Some(k))
                            }
                            // a tail over the oracle's top-1 hides its probability too: the same kind
                            (false, Some(k)) => {
                                let mut m = metrics::from_logits(s, t, ov, &ost, &otop, &ps, &sc.c, None);
                                m.health = metrics::RowHealth::MaskedTailHidesOracle { from: k };
                                m
                            }
                            _ => metrics::from_logits(s, t, ov, &ost, &otop, &ps, &sc.c, None),
                        }
                    } else if let (Some(ti), Some(tl)) = (&cv.top_ids, &cv.top_logits) {
                        sc.ids = ti.row(t);
                        sc.tl.resize(tl.cols, 0.0);
                        tl.row_into(t, &mut sc.tl);
                        metrics::from_top_k(s, t, ov, &otop, &sc.ids, &sc.tl, vocab).map_err(bad)?
                    } else if let Some(a) = &cv.argmax {
                        metrics::from_argmax(s, t, ov, a[t], vocab).map_err(bad)?
                    } else {
                        out.push(None);
                        continue;
                    };
                    m.cand_oracle_logit = m.cand_top1.and_then(|c| sc.o.get(c).copied());
                    out.push(Some(m));
                }
                Ok((ov, out))
            },
        )
        .collect();

    let mut result: Vec<Compared> = vec![Compared::default(); cands.len()];
    let mut views = Vec::with_capacity(items.len());
    for (r, &(s, t)) in rows.into_iter().zip(&items) {
        let (ov, ms) = r?;
        views.push((s, t, ov));
        for (ci, m) in ms.into_iter().enumerate() {
            match m {
                Some(m) => result[ci].positions.push(m),
                None => result[ci].not_compared += 1,
            }
        }
    }
    Ok((views, result))
}

/// The oracle's logit of `token` at (seq, pos), if the oracle holds that row.
pub fn oracle_logit_at(oracle: &Capture, seq: usize, pos: usize, token: i64) -> Option<f32> {
    let s = oracle.seq(seq);
    let l = s.logits?;
    if pos >= l.rows || token < 0 || token as usize >= l.cols {
        return None;
    }
    let mut o = vec![0f32; l.cols];
    kernel::decode_row(&l, pos, &mut o);
    o.get(token as usize).copied().filter(|x| x.is_finite())
}
