//! Issue 11, "no panic on any input": a capture tensor of the wrong dtype or shape is refused when the
//! capture is opened (exit 2, one line naming the file and the tensor), never a panic (exit 101) or a
//! silent misread. The planted captures are committed fixtures with one tensor added.
use assert_cmd::Command;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The HF oracle fixture: 3 sequences, seq.1 has a 5-step rollout.
fn oracle_fixture() -> PathBuf {
    root().join("fixtures/hf/dense-gva-untied.f32.capture.safetensors")
}

fn candidate_fixture() -> PathBuf {
    root().join("fixtures/hf/dense-gva-untied.f16.capture.safetensors")
}

/// Copy `src` to `dst` with one more tensor appended to the data section.
fn plant(src: &Path, dst: &Path, name: &str, dtype: &str, shape: &[usize], data: &[u8]) {
    let b = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let body = &b[8 + n..];
    let end = body.len();
    header.insert(
        name.to_string(),
        json!({"dtype": dtype, "shape": shape, "data_offsets": [end, end + data.len()]}),
    );
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
    out.extend_from_slice(data);
    std::fs::write(dst, out).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `qgate run` with these captures; returns (exit code, stderr).
fn run(dir: &Path, oracle: &Path, bundle: &Path) -> (Option<i32>, String) {
    let o = Command::cargo_bin("qgate")
        .unwrap()
        .arg("run")
        .arg("--oracle")
        .arg(oracle)
        .arg("--bundle")
        .arg(bundle)
        .arg("--out")
        .arg(dir.join("report"))
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn assert_refused(code: Option<i32>, err: &str, file: &Path, tensor: &str, problem: &str) {
    assert_eq!(code, Some(2), "expected exit 2, got {code:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains(tensor))
        .unwrap_or_else(|| panic!("no line names `{tensor}`: {err}"));
    assert!(line.contains(&file.display().to_string()), "{line}");
    assert!(line.contains(problem), "{line}");
}

#[test]
fn rollout_margin_of_shape_g_is_refused_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let oracle = dir.path().join("oracle-margin-g.capture.safetensors");
    // seq.1.rollout has 5 steps; the margin is [5] instead of [5, 2]
    plant(
        &oracle_fixture(),
        &oracle,
        "seq.1.rollout_margin",
        "F32",
        &[5],
        &f32_bytes(&[0.5; 5]),
    );
    let (code, err) = run(dir.path(), &oracle, &candidate_fixture());
    assert_refused(
        code,
        &err,
        &oracle,
        "seq.1.rollout_margin",
        "expected F32 [G, 2], found F32 [5]",
    );
}

#[test]
fn rollout_margin_stored_as_i64_is_refused_not_reread_as_f32() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle-margin-i64.capture.safetensors");
    plant(
        &candidate_fixture(),
        &bundle,
        "seq.1.rollout_margin",
        "I64",
        &[5, 2],
        &i64_bytes(&[1; 10]),
    );
    let (code, err) = run(dir.path(), &oracle_fixture(), &bundle);
    assert_refused(
        code,
        &err,
        &bundle,
        "seq.1.rollout_margin",
        "expected F32 [G, 2], found I64 [5, 2]",
    );
}

#[test]
fn rollout_margin_longer_than_the_rollout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let oracle = dir.path().join("oracle-margin-long.capture.safetensors");
    plant(
        &oracle_fixture(),
        &oracle,
        "seq.1.rollout_margin",
        "F32",
        &[7, 2],
        &f32_bytes(&[0.5; 14]),
    );
    let (code, err) = run(dir.path(), &oracle, &candidate_fixture());
    assert_refused(
        code,
        &err,
        &oracle,
        "seq.1.rollout_margin",
        "7 steps but the rollout has 5",
    );
}

/// `qgate import --plan` opens the plan as a capture: the same refusal, not a panic.
#[test]
fn import_with_a_planted_plan_is_refused_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.capture.safetensors");
    plant(
        &oracle_fixture(),
        &plan,
        "seq.0.rollout_margin",
        "F32",
        &[16],
        &f32_bytes(&[0.5; 16]),
    );
    let o = Command::cargo_bin("qgate")
        .unwrap()
        .args(["import", "--from", "llm-runner"])
        .arg(root().join("fixtures/llm-runner/raw-top5.json"))
        .arg("--plan")
        .arg(&plan)
        .arg("--out")
        .arg(dir.path().join("out.capture.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_refused(
        o.status.code(),
        &err,
        &plan,
        "seq.0.rollout_margin",
        "expected F32 [G, 2]",
    );
}

/// A token id outside the vocabulary is refused at open, naming the tensor and the element.
#[test]
fn rollout_id_outside_the_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle-ids.capture.safetensors");
    // an argmax row naming token 384 of a 384-token vocabulary (main accepted it without a word)
    plant(
        &candidate_fixture(),
        &bundle,
        "seq.0.argmax",
        "I64",
        &[1],
        &i64_bytes(&[384]),
    );
    let (code, err) = run(dir.path(), &oracle_fixture(), &bundle);
    assert_refused(
        code,
        &err,
        &bundle,
        "seq.0.argmax",
        "element 0 is token id 384, outside the vocabulary 0..384",
    );
}
