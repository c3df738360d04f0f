//! Read everything an opened capture exposes, the way `qgate run` will: every sequence view, every
//! logits / top-k row, tokens, argmax, rollout and rollout margins. Shared by the fuzz target and (by `#[path]`) the
//! regression test, so both exercise the same accessors.
use super::capture::Capture;

/// Returns a checksum so that nothing is optimised away.
pub fn touch_all(c: &Capture) -> f64 {
    let mut acc = 0f64;
    acc += c.meta.vocab_size as f64 + c.meta.label.len() as f64;
    for i in 0..c.len() {
        let s = c.seq(i);
        acc += s.rows() as f64 + s.tokens.iter().map(|&t| t as f64).sum::<f64>();
        if let Some(l) = &s.logits {
            if l.rows > 0 {
                let mut buf = vec![0f32; l.cols];
                for r in 0..l.rows {
                    l.row_into(r, &mut buf);
                    acc += buf
                        .iter()
                        .map(|&x| x as f64)
                        .filter(|x| x.is_finite())
                        .sum::<f64>();
                }
                acc += l.row(l.rows - 1).len() as f64;
            }
            acc += l.bytes().len() as f64;
        }
        if let Some(t) = &s.top_ids {
            for r in 0..t.rows {
                acc += t.row(r).iter().map(|&x| x as f64).sum::<f64>();
            }
            acc += t.to_vec().len() as f64;
        }
        if let Some(t) = &s.top_logits {
            for r in 0..t.rows {
                acc += t
                    .row(r)
                    .iter()
                    .map(|&x| x as f64)
                    .filter(|x| x.is_finite())
                    .sum::<f64>();
            }
        }
        if let Some(a) = &s.argmax {
            acc += a.len() as f64;
        }
        if let Some(g) = &s.rollout {
            acc += g.len() as f64;
        }
        if let Some(m) = &s.rollout_margin {
            acc += m
                .iter()
                .map(|&(p, l)| p as f64 + l as f64)
                .filter(|x| x.is_finite())
                .sum::<f64>()
                + m.len() as f64;
        }
    }
    acc += c.plan().len() as f64;
    acc
}
