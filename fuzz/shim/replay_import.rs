//! The import readers driven the way the fuzz targets drive them, from a file on disk. Shared by the
//! fuzz targets and (by `#[path]`) `tests/reader_regressions.rs`, so a stored input replays exactly.
//! Each function returns the result of its primary configuration (the one `tests/data/<reader>/` names
//! `ok_`/`err_` by); the other configurations run only to show that they do not panic.
use super::error::Result;
use super::import::llm_runner::{self, LlmRunnerSource, Rows};
use super::import::npz::NpzSource;
use super::import::transcript::{self, TranscriptSource};
use super::import::{Plan, SeqSource, TranscriptSide};
use super::import_check::check_seq;
use std::path::Path;

/// Open an importer and load every sequence, checking each against the importer's promises.
fn load_all(src: Result<impl SeqSource>, vocab: Option<usize>) -> Result<usize> {
    let mut src = src?;
    for i in 0..src.len() {
        check_seq(&src.load(i)?, vocab);
    }
    std::hint::black_box(src.notes());
    Ok(src.len())
}

/// `.npz` (primary: no vocabulary given; also with vocab 64), or, for a file starting with the
/// `.npy` magic, bare logits against a 16-token plan.
pub fn npz(path: &Path) -> Result<usize> {
    let files = vec![path.to_path_buf()];
    let npy = std::fs::read(path)
        .map(|b| b.starts_with(b"\x93NUMPY"))
        .unwrap_or(false);
    if npy {
        let plan = Plan {
            path: "plan.safetensors".into(),
            // ids 0 and 1: within any vocabulary the logits' width implies
            seqs: vec![(0..16).map(|t| t % 2).collect()],
            vocab_size: 64,
        };
        // `NpzSource` picks the mode by extension: the fuzz target names such a scratch file `.npy`,
        // and a stored one must be named so too.
        return load_all(NpzSource::open(&files, Some(&plan), None), None);
    }
    let _ = load_all(NpzSource::open(&files, None, Some(64)), Some(64));
    load_all(NpzSource::open(&files, None, None), None)
}

/// llm-runner JSON: `parse` with no, a small and the fixtures' vocabulary, then `LlmRunnerSource`
/// alone (primary) and against a 4-token plan of vocab 384.
pub fn llm_runner(path: &Path) -> Result<usize> {
    let data = std::fs::read(path).unwrap_or_default();
    for vocab in [None, Some(8), Some(384)] {
        if let Ok(ev) = llm_runner::parse(&data, vocab) {
            assert!(!ev.tokens.is_empty());
            match &ev.rows {
                Rows::Full(r) => {
                    assert_eq!(r.rows + 1, ev.tokens.len(), "T-1 rows");
                    assert_eq!(r.bytes.len(), r.rows * r.vocab * r.kind.size());
                }
                Rows::TopK(t) => {
                    assert_eq!(t.rows + 1, ev.tokens.len(), "T-1 rows");
                    assert_eq!(t.ids.len(), t.rows * t.k);
                }
            }
        }
    }
    let files = vec![path.to_path_buf()];
    // The committed fixtures' token sequences start 1, 2, 3…: the extra-token path runs.
    let plan = Plan {
        path: "plan.safetensors".into(),
        seqs: vec![(1..=4).collect()],
        vocab_size: 384,
    };
    let _ = load_all(
        LlmRunnerSource::open(&files, Some(&plan), Some(384)),
        Some(384),
    );
    load_all(LlmRunnerSource::open(&files, None, None), None)
}

/// Transcript JSON: `parse` on both sides with a byte tokenizer and with none, then
/// `TranscriptSource` (no tokenizer) on both sides, with and without a vocabulary. Primary: oracle
/// side, no vocabulary.
pub fn transcript(path: &Path) -> Result<usize> {
    let data = std::fs::read(path).unwrap_or_default();
    for side in [TranscriptSide::Engine, TranscriptSide::Oracle] {
        let mut bytes_tok =
            |t: &str, _special: bool| Some(Ok(t.bytes().map(i64::from).collect::<Vec<_>>()));
        let mut no_tok = |_: &str, _: bool| None;
        for tok in [
            &mut bytes_tok as &mut transcript::Tokenize<'_>,
            &mut no_tok as &mut transcript::Tokenize<'_>,
        ] {
            if let Ok(t) = transcript::parse(&data, side, tok) {
                assert!(!t.tokens.is_empty());
            }
        }
    }
    let files = vec![path.to_path_buf()];
    let open = |vocab, side| TranscriptSource::open(&files, None, vocab, None, side);
    let _ = load_all(open(Some(248320), TranscriptSide::Oracle), Some(248320));
    let _ = load_all(open(None, TranscriptSide::Engine), None);
    let _ = load_all(open(Some(248320), TranscriptSide::Engine), Some(248320));
    load_all(open(None, TranscriptSide::Oracle), None)
}
