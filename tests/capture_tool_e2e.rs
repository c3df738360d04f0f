//! The Mac side feeding the gate: a capture written by `capture/coreai_capture.py` (against its stub
//! runtime) and a recorded `llm-runner` JSON sample, imported, are both read and gated by `qgate run`
//! against a real oracle run on the same plan. The stub's and the sample's logits come from toy models, not
//! from the fixture checkpoint, so the verdict must be a FAIL with every position compared.
mod common;

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
fn qgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}
fn summary(dir: &std::path::Path) -> serde_json::Value {
    let v =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    common::assert_valid_summary(&v);
    v
}

#[test]
fn stub_capture_tool_output_is_gated_against_the_oracle() {
    let tmp = tempfile::tempdir().unwrap();
    let oracle = tmp.path().join("oracle.safetensors");
    let o = qgate(&[
        "oracle",
        "--model",
        "fixtures/models/dense-vl-tied",
        "--dtype",
        "bf16",
        "--plan",
        "fixtures/captures/stub-coreai.plan.safetensors",
        "--out",
        oracle.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("report");
    let r = qgate(&[
        "run",
        "--bundle",
        "fixtures/captures/stub-coreai.capture.safetensors",
        "--oracle",
        oracle.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        r.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let s = summary(&out);
    let text = s.to_string();
    assert!(text.contains("stub-coreai"), "label missing: {text}");
    // 3 sequences of 6, 3 and 9 tokens: every position compared.
    assert!(text.contains("\"positions_compared\":18"), "{text}");
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("FAIL"));
}

#[test]
fn llm_runner_sample_is_imported_and_gated() {
    let tmp = tempfile::tempdir().unwrap();
    let cap = tmp.path().join("runner.capture.safetensors");
    let i = qgate(&[
        "import",
        "--from",
        "llm-runner",
        "fixtures/llm-runner/raw-full-f16.json",
        "--out",
        cap.to_str().unwrap(),
        "--vocab-size",
        "384",
    ]);
    assert!(i.status.success(), "{}", String::from_utf8_lossy(&i.stderr));
    let oracle = tmp.path().join("oracle.safetensors");
    let o = qgate(&[
        "oracle",
        "--model",
        "fixtures/models/dense-vl-tied",
        "--dtype",
        "f32",
        "--plan",
        cap.to_str().unwrap(),
        "--out",
        oracle.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("report");
    let r = qgate(&[
        "run",
        "--bundle",
        cap.to_str().unwrap(),
        "--oracle",
        oracle.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        r.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    // 6 tokens, 5 rows (llm-runner drops the row after the last token): 5 positions compared.
    let text = summary(&out).to_string();
    assert!(text.contains("\"positions_compared\":5"), "{text}");
}
