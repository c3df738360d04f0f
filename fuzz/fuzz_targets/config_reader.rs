//! `cargo fuzz run config_reader`: arbitrary bytes → `config.json` and `generation_config.json` of a
//! scratch model directory → `TextConfig::from_dir` (and `from_json` on the parsed value), as the
//! oracle reads a checkpoint's config. Never a panic, never an allocation the file does not ask for.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../src/model/config.rs"]
#[allow(dead_code)]
mod config;
#[path = "../shim/error.rs"]
mod error;
#[path = "../shim/scratch.rs"]
mod scratch;

use config::TextConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(c) = TextConfig::from_json(&v) {
            assert_eq!(c.layer_types.len(), c.num_hidden_layers);
            assert!(c.rotary_dim() <= c.head_dim);
            std::hint::black_box(c.is_moe());
        }
    }
    let dir = scratch::scratch("model");
    let _ = std::fs::create_dir_all(&dir);
    if std::fs::write(dir.join("config.json"), data).is_err()
        || std::fs::write(dir.join("generation_config.json"), data).is_err()
    {
        return;
    }
    std::hint::black_box(TextConfig::from_dir(&dir).ok());
});
