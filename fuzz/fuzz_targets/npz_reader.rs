//! `cargo fuzz run npz_reader`: arbitrary bytes → an `.npz` (or, after the `.npy` magic, a bare `.npy`
//! with a 16-token plan) → the npz importer, driven as `qgate import` drives it
//! (`shim/replay_import.rs`: every configuration, every sequence loaded and checked against the
//! importer's promises in `shim/import_check.rs`). Bad input must be an error, never a panic, an
//! abort or an allocation the file does not back.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../src/capture.rs"]
#[allow(dead_code)]
mod capture;
#[path = "../shim/error.rs"]
mod error;
#[path = "../../src/import/mod.rs"]
#[allow(dead_code)]
mod import;
#[path = "../shim/import_check.rs"]
mod import_check;
#[path = "../shim/replay_import.rs"]
#[allow(dead_code)]
mod replay_import;
#[path = "../shim/scratch.rs"]
mod scratch;

fn name(data: &[u8]) -> &'static str {
    if data.starts_with(b"\x93NUMPY") {
        "input.npy"
    } else {
        "input.npz"
    }
}

fuzz_target!(|data: &[u8]| {
    let path = scratch::scratch(name(data));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = replay_import::npz(&path);
});
