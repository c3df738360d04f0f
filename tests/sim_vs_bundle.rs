//! `qgate run` with a simulated capture and a real bundle's capture of the same scheme names the case
//! "the simulation passes, the bundle fails" as a runtime (lowering) problem.
mod common;

use qgate::capture::{write_capture, Capture, FloatKind, SeqData};
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn simulation_passes_bundle_fails_is_named_a_lowering_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = tmp.path().join("sim.capture.safetensors");
    let model = root().join("fixtures/models/dense-gva-untied");
    let plan = root().join("fixtures/plans/tiny.plan.safetensors");
    let s = Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(["simulate", "--scheme", "int8hu-headsym", "--model"])
        .arg(&model)
        .arg("--plan")
        .arg(&plan)
        .arg("--out")
        .arg(&sim)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));

    // The "bundle": the same numbers with one garbage (constant) row, as a broken delegate would give.
    let c = Capture::open(&sim).unwrap();
    let mut seqs = Vec::new();
    for i in 0..c.len() {
        let v = c.seq(i);
        let l = v.logits.unwrap();
        let mut rows: Vec<f32> = (0..l.rows).flat_map(|r| l.row(r)).collect();
        if i == 2 {
            rows[3 * l.cols..4 * l.cols]
                .iter_mut()
                .for_each(|x| *x = 0.5);
        }
        seqs.push(SeqData {
            tokens: v.tokens.clone(),
            logits: Some((l.rows, l.cols, rows)),
            logits_kind: Some(FloatKind::F16),
            rollout: v.rollout.clone(),
            ..Default::default()
        });
    }
    let bundle = tmp
        .path()
        .join("qwen3_5_tiny_decode_int8hu_block32_sym.capture.safetensors");
    let meta = qgate::capture::CaptureMeta::new(
        "qwen3_5_tiny_decode_int8hu_block32_sym",
        "coreai-python",
        "f16",
        c.meta.vocab_size,
    );
    write_capture(&bundle, &meta, &seqs).unwrap();

    let out = tmp.path().join("report");
    let r = Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(["run", "--oracle", "bf16", "--json", "--model"])
        .arg(&model)
        .arg("--bundle")
        .arg(&sim)
        .arg("--bundle")
        .arg(&bundle)
        .arg("--out")
        .arg(&out)
        .env("QGATE_ORACLE_CACHE", tmp.path().join("oracles"))
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    common::assert_valid_summary(&summary);
    let pairs = summary["sim_vs_bundle"]
        .as_array()
        .expect("sim_vs_bundle present");
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    let p = &pairs[0];
    assert_eq!(p["simulated_verdict"], "pass");
    assert_eq!(p["bundle_verdict"], "fail");
    assert!(p["finding"].as_str().unwrap().contains("lowering"), "{p}");
    // Every row but the garbage one agrees: 168 positions, 167 comparable, all equal.
    assert_eq!(p["positions"], 167);
    assert_eq!(p["top1_agree"], 167);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Simulation vs bundle"));
    // the simulation passes and the bundle fails: nothing ships (a simulation is not an artifact)
    assert!(summary["ship"].is_null(), "{}", summary["ship"]);
    assert!(
        summary["ship_note"]
            .as_str()
            .unwrap()
            .contains("only simulations pass"),
        "{}",
        summary["ship_note"]
    );
}
