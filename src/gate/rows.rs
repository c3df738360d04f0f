//! One sequence's logits held in memory (not a capture file) against the oracle capture, row by row, with
//! the same kernels and metrics as `compare::compare`: the sensitivity map judges hundreds of one-part
//! variants without writing a `[T, V]` capture for each.
use super::kernel;
use super::metrics::{self, MarginSpace, OracleView, PositionMetrics, TOP_K_OVERLAP};
use crate::capture::Capture;
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Compare `logits` (`[rows, V]` row-major, f32) of sequence `seq` with the oracle's rows `0..rows`.
/// The oracle must hold full logits there (`compare::compare` checked that when the views were made).
pub fn compare_sequence(
    oracle: &Capture,
    seq: usize,
    logits: &[f32],
    space: MarginSpace,
) -> Result<Vec<PositionMetrics>> {
    let vocab = oracle.meta.vocab_size;
    let os = oracle.seq(seq);
    let Some(ol) = os.logits else {
        return Err(Error::input(
            &oracle.path,
            format!("oracle has no logits for seq.{seq}"),
        ));
    };
    if !logits.len().is_multiple_of(vocab) || logits.len() / vocab > ol.rows {
        return Err(Error::Internal(format!(
            "seq.{seq}: {} logits for a vocabulary of {vocab} and {} oracle rows",
            logits.len(),
            ol.rows
        )));
    }
    let rows = logits.len() / vocab;
    (0..rows)
        .into_par_iter()
        .map_init(
            || (vec![0f32; vocab], vec![0f32; vocab]),
            |(o, e), t| -> Result<PositionMetrics> {
                kernel::decode_row(&ol, t, o);
                let ost = kernel::oracle_row(o, e);
                if !ost.finite {
                    return Err(Error::input(
                        &oracle.path,
                        format!("oracle row seq.{seq} position {t} holds NaN/Inf logits"),
                    ));
                }
                let ov = OracleView::from_stats(&ost, space);
                let otop = kernel::top_k(o, TOP_K_OVERLAP);
                let c = &logits[t * vocab..(t + 1) * vocab];
                let ps = kernel::pair_row(o, e, &ost, c);
                let mut m = metrics::from_logits(seq, t, ov, &ost, &otop, &ps, c, None);
                m.cand_oracle_logit = m.cand_top1.and_then(|i| o.get(i).copied());
                Ok(m)
            },
        )
        .collect()
}
