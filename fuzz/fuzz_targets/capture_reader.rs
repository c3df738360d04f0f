//! `cargo fuzz run capture_reader`: arbitrary bytes → a file → `Capture::open` → read everything.
//! The reader must return an error for bad input and never panic, abort or read out of bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

#[path = "../../src/capture.rs"]
#[allow(dead_code)]
mod capture;
#[path = "../shim/error.rs"]
mod error;
#[path = "../shim/touch.rs"]
mod touch;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        std::env::temp_dir().join(format!("qgate-fuzz-{}.capture.safetensors", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(path, data).is_err() {
        return;
    }
    if let Ok(c) = capture::Capture::open(path) {
        std::hint::black_box(touch::touch_all(&c));
    }
});
