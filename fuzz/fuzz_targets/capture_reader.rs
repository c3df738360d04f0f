//! `cargo fuzz run capture_reader`: arbitrary bytes → a file → `Capture::open` → read everything.
//! The reader must return an error for bad input and never panic, abort or read out of bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../src/capture.rs"]
#[allow(dead_code)]
mod capture;
#[path = "../shim/error.rs"]
mod error;
#[path = "../shim/scratch.rs"]
mod scratch;
#[path = "../shim/touch.rs"]
mod touch;

fuzz_target!(|data: &[u8]| {
    let path = scratch::scratch("input.capture.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(c) = capture::Capture::open(&path) {
        std::hint::black_box(touch::touch_all(&c));
    }
});
