//! The simulator on the committed fixtures: the quantization ladder is ordered (f16 ≤ int8 ≤ int4 in
//! confident flips, cosines the other way), and `qgate sweep`'s ladder report is snapshot-tested.
mod common;

use qgate::capture::{write_capture, Capture, CaptureMeta, SeqData};
use qgate::commands::simulate::{simulate, SimRequest};
use qgate::gate::evaluate::{evaluate, Inputs};
use qgate::gate::policy::Policy;
use qgate::gate::provenance::Provenance;
use qgate::gate::summary::Identity;
use qgate::model::precision::Precision;
use qgate::oracle::{run_oracle, OracleRequest};
use qgate::quant::linear::ScaleDtype;
use qgate::quant::scheme::Scheme;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// The ordering plan: 6 sequences × 96 random tokens (576 positions; LCG, fixed seed). On the tiny plan's
/// 168 positions f16 and int8 differ by 0–1 flips; over 576 positions the mean cosine and mean KL separate
/// them clearly (dense: flips 0/0/57, mean cosine 0.99993 / 0.99981 / 0.961, KL 0.00045 / 0.0012 / 0.24;
/// MoE: flips 2/6/89, mean cosine 0.9985 / 0.9975 / 0.931, KL 0.010 / 0.019 / 0.41 for f16 / int8lin /
/// int4lin against the bf16 oracle).
fn long_plan(dir: &Path, vocab: usize) -> PathBuf {
    let mut s: u64 = 20260515;
    let seqs: Vec<SeqData> = (0..6)
        .map(|_| SeqData {
            tokens: (0..96)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // skip the lowest ids (specials / EOS in the fixtures)
                    (8 + (s >> 33) as usize % (vocab - 8)) as i64
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let p = dir.join("long.plan.safetensors");
    write_capture(&p, &CaptureMeta::new("plan", "test", "none", vocab), &seqs).unwrap();
    p
}

fn ladder_is_ordered(model: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture(&format!("models/{model}"));
    let plan_path = long_plan(tmp.path(), 384);
    let plan = Capture::open(&plan_path).unwrap().plan();
    let oracle_path = tmp.path().join("oracle.capture.safetensors");
    run_oracle(&OracleRequest {
        model_dir: &dir,
        precision: Precision::BF16,
        plan: &plan,
        rollout: 0,
        out: &oracle_path,
        progress: false,
        exec: Default::default(),
    })
    .unwrap();
    let oracle = Capture::open(&oracle_path).unwrap();
    let schemes = ["f16", "int8lin", "int4lin"];
    let caps: Vec<Capture> = schemes
        .iter()
        .map(|s| {
            let out = tmp.path().join(format!("{s}.capture.safetensors"));
            simulate(SimRequest {
                model_dir: &dir,
                plan: &plan,
                scheme: Scheme::parse(s).unwrap(),
                compute: Precision::F16,
                scale_dtype: ScaleDtype::F16,
                rollout: 0,
                out: &out,
                progress: false,
                device: candle_core::Device::Cpu,
            })
            .unwrap();
            Capture::open(&out).unwrap()
        })
        .collect();
    let ids: Vec<Identity> = schemes
        .iter()
        .zip(&caps)
        .map(|(s, c)| Identity {
            label: s.to_string(),
            capture: c.path.display().to_string(),
            bundle: None,
            mode: None,
            size_bytes: None,
            simulation: true,
        })
        .collect();
    let all: Vec<&Capture> = caps.iter().collect();
    let policy = Policy::load(None).unwrap();
    let ev = evaluate(Inputs {
        oracle: &oracle,
        provenance: Provenance::ComputedHere,
        all: &all,
        ids,
        n_candidates: all.len(),
        policy: &policy,
    })
    .unwrap();
    let c = &ev.run.candidates;
    let flips: Vec<usize> = c.iter().map(|x| x.introduced_confident_flips).collect();
    let cos_min: Vec<f64> = c.iter().map(|x| x.cosine.as_ref().unwrap().min).collect();
    let cos_mean: Vec<f64> = c.iter().map(|x| x.cosine.as_ref().unwrap().mean).collect();
    let kl: Vec<f64> = c.iter().map(|x| x.kl.as_ref().unwrap().mean).collect();
    eprintln!(
        "{model}: flips {flips:?}, cosine min {cos_min:?}, cosine mean {cos_mean:?}, KL {kl:?}"
    );
    assert!(flips[0] <= flips[1] && flips[1] <= flips[2], "{flips:?}");
    assert!(flips[2] > flips[0], "int4 must show flips: {flips:?}");
    assert!(
        cos_mean[0] >= cos_mean[1] && cos_mean[1] >= cos_mean[2],
        "{cos_mean:?}"
    );
    // The minimum cosine is one worst position out of 576: only int4's is asserted below the others (f16
    // and int8 are ordered on today's fixtures, 0.9997 / 0.9992, but a single position can swap them).
    assert!(cos_min[2] < cos_min[0].min(cos_min[1]), "{cos_min:?}");
    assert!(kl[0] <= kl[1] && kl[1] <= kl[2], "{kl:?}");
}

#[test]
fn ladder_is_ordered_on_the_dense_fixture() {
    ladder_is_ordered("dense-gva-untied");
}

#[test]
fn ladder_is_ordered_on_the_moe_fixture() {
    ladder_is_ordered("moe-fused");
}

#[test]
fn sweep_ladder_report_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    // The release policy with rollouts off: on this fixture every simulation (the f16 control included)
    // leaves the oracle's greedy rollout at step 6 of seq 0, past the plan, where the oracle's margin is
    // unknown, so the release policy rejects every rung there; the ladder is judged on the plan's positions.
    let release = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("gates/release.toml"),
    )
    .unwrap();
    assert!(release.contains("rollout_prefix = \"full\""));
    let gate = tmp.path().join("gate.toml");
    std::fs::write(
        &gate,
        release.replace("rollout_prefix = \"full\"", "rollout_prefix = \"off\""),
    )
    .unwrap();
    let junit = tmp.path().join("sweep.junit.xml");
    let o = Command::new(env!("CARGO_BIN_EXE_qgate"))
        .env("QGATE_ORACLE_CACHE", tmp.path().join("oracles"))
        .env_remove("GITHUB_STEP_SUMMARY")
        .env_remove("GITHUB_ACTIONS")
        .args(["sweep", "--model"])
        .arg(fixture("models/dense-gva-untied"))
        .arg("--plan")
        .arg(fixture("plans/tiny.plan.safetensors"))
        .args([
            "--oracle",
            "bf16",
            "--schemes",
            "f16,int8lin,int8hu-headsym,int4lin",
            "--ablate",
            "int4",
            "--gate",
        ])
        .arg(&gate)
        .arg("--out")
        .arg(&out)
        .arg("--junit")
        .arg(&junit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("SHIP: int8hu-headsym"), "{stderr}");
    assert!(out.join("summary.json").is_file());
    assert!(tmp
        .path()
        .join("sweep-captures/int4lin.capture.safetensors")
        .is_file());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let start = md.find("### Verdict").unwrap();
    let end = md.find("### Model card").unwrap();
    insta::assert_snapshot!("sweep_ladder", &md[start..end]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["ship"], "int8hu-headsym");
    assert_eq!(json["ladder"]["rejected_smaller"][0]["label"], "int4lin");
    common::assert_valid_summary(&json);
    // JUnit: the rejected rungs are skipped with their reason, the sweep's `ship` testcase passes
    let cases = common::parse_junit(&std::fs::read_to_string(&junit).unwrap());
    common::assert_junit_matches_summary(&cases, &json);
    assert!(cases.iter().all(|c| c.outcome != "failure"), "{cases:?}");
    assert!(cases
        .iter()
        .any(|c| c.classname == "sweep" && c.name == "ship" && c.outcome == "pass"));
    assert!(cases.iter().any(|c| c.classname == "int4lin"
        && c.outcome == "skipped"
        && c.message.contains("rejected")));
}
