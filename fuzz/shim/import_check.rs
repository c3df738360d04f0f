//! What every importer promises about a sequence it returns (shared by the import fuzz targets):
//! the byte and element counts match the declared shapes, rows never outnumber tokens, and the ids
//! lie in the vocabulary when it is known. A broken promise here would surface later as a capture
//! writer error (exit 101) or a capture that does not open; the fuzz targets assert it.
use super::import::SeqBytes;

pub fn check_seq(s: &SeqBytes, vocab: Option<usize>) {
    let t = s.tokens.len();
    assert!(t > 0, "an imported sequence has tokens");
    let in_vocab = |ids: &[i64]| {
        ids.iter()
            .all(|&id| id >= 0 && vocab.is_none_or(|v| (id as u64) < v as u64))
    };
    assert!(in_vocab(&s.tokens), "tokens in the vocabulary");
    let mut rows = Vec::new();
    if let Some(l) = &s.logits {
        assert!(l.vocab > 0);
        assert_eq!(
            Some(l.bytes.len()),
            l.rows
                .checked_mul(l.vocab)
                .and_then(|n| n.checked_mul(l.kind.size())),
            "logits bytes match [rows, vocab]"
        );
        if let Some(v) = vocab {
            assert_eq!(l.vocab, v, "logits width is the vocabulary");
        }
        rows.push(l.rows);
    }
    if let Some(tp) = &s.top {
        assert!(tp.k > 0);
        assert_eq!(
            Some(tp.ids.len()),
            tp.rows.checked_mul(tp.k),
            "top_ids [R, K]"
        );
        assert_eq!(tp.ids.len(), tp.logits.len(), "top_logits [R, K]");
        assert!(in_vocab(&tp.ids), "top ids in the vocabulary");
        rows.push(tp.rows);
    }
    if let Some(a) = &s.argmax {
        assert!(in_vocab(a), "argmax in the vocabulary");
        rows.push(a.len());
    }
    if let Some(g) = &s.rollout {
        assert!(in_vocab(g), "rollout in the vocabulary");
    }
    for &r in &rows {
        assert!(r <= t, "{r} rows for {t} tokens");
        assert_eq!(r, rows[0], "rows agree");
    }
    std::hint::black_box(s.rows());
}
