//! Stand-in for the `tokenizers` crate in the fuzz build (the real one is a large, partly C build).
//! It offers only what `src/import/transcript.rs` names; loading always fails, so a fuzzed
//! `TranscriptSource` runs without a tokenizer. The fuzz target drives re-tokenisation through
//! `transcript::parse`'s closure instead. A drift from the real API shows up as a compile error.
use std::path::Path;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub struct Tokenizer(());

pub struct Encoding(Vec<u32>);

impl Encoding {
    pub fn get_ids(&self) -> &[u32] {
        &self.0
    }
}

impl Tokenizer {
    pub fn from_file<P: AsRef<Path>>(_file: P) -> Result<Tokenizer, Error> {
        Err("no tokenizer in the fuzz build".into())
    }
    pub fn encode(&self, _input: &str, _add_special_tokens: bool) -> Result<Encoding, Error> {
        Err("no tokenizer in the fuzz build".into())
    }
}
