//! `cargo fuzz run policy_reader`: arbitrary bytes → `Policy::parse` (as `qgate run --gate FILE`
//! reads a policy) → every accessor and a command-line override. Never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../shim/error.rs"]
mod error;

// `policy.rs` names `super::metrics::MarginSpace`: both sit at the crate root here.
#[path = "../shim/metrics.rs"]
mod metrics;
#[path = "../../src/gate/policy.rs"]
#[allow(dead_code)]
mod policy;

use metrics::MarginSpace;
use policy::Policy;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = Policy::parse(text, Path::new("fuzz.toml")) else {
        return;
    };
    assert!(p.validate().is_ok(), "a parsed policy is valid");
    let _ = std::hint::black_box(p.rollout());
    for s in [0, 1, 7, usize::MAX] {
        std::hint::black_box(p.counts_sequence(s));
    }
    let mut q = p.clone();
    let _ = q.override_with(Some(MarginSpace::Logit), Some(0.5), true);
    let mut q = p.clone();
    let _ = q.override_with(Some(MarginSpace::Prob), None, false);
    // What qgate writes into summary.json must serialise.
    let _ = std::hint::black_box(serde_json::to_string(&p));
});
