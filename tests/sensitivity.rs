//! The sensitivity map, the mix search and `qgate locate` on the planted fixture
//! (`fixtures/models/planted-mlp2`, `fixtures/gen/make_planted.py`): every part quantizes to int4 exactly
//! except layer 2's MLP (heavy-tailed weights), so the right answers are known. `--sensitivity int4` ranks
//! `L2 mlp` first (and only it introduces confident flips), computed with prefix reuse it gives the same
//! numbers as one full simulation per part, `--search int4:int8` keeps `L2 mlp` at int8 and everything
//! else at int4, the mix round-trips (`qgate simulate --scheme <mix>` + `qgate run` passes), and
//! `qgate locate int4lin` names layer 2's MLP. Gate: the built-in release policy, rollouts included.
mod common;

use qgate::capture::Capture;
use qgate::commands::simulate::{simulate, SimRequest};
use qgate::gate::policy::Policy;
use qgate::model::precision::Precision;
use qgate::oracle::{run_oracle, OracleRequest};
use qgate::quant::linear::ScaleDtype;
use qgate::quant::scheme::{Method, Scheme};
use qgate::quant::sensitivity::{self, Mode};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

fn qgate(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qgate"));
    c.env("QGATE_ORACLE_CACHE", cache)
        .env_remove("GITHUB_STEP_SUMMARY")
        .env_remove("GITHUB_ACTIONS");
    c
}

/// `qgate sweep` on the planted fixture with `args`, writing its report to `out`.
fn sweep(cache: &Path, args: &[impl AsRef<std::ffi::OsStr>], out: &Path) -> std::process::Output {
    qgate(cache)
        .args(["sweep", "--model"])
        .arg(fixture("models/planted-mlp2"))
        .arg("--plan")
        .arg(fixture("planted/planted.plan.safetensors"))
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn prefix_reuse_gives_the_numbers_of_full_simulations_and_ranks_the_planted_part_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("models/planted-mlp2");
    let plan = Capture::open(fixture("planted/planted.plan.safetensors"))
        .unwrap()
        .plan();
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
    let control_path = tmp.path().join("f16.capture.safetensors");
    simulate(SimRequest {
        model_dir: &dir,
        plan: &plan,
        scheme: Scheme::parse("f16").unwrap(),
        compute: Precision::F16,
        scale_dtype: ScaleDtype::F16,
        rollout: 0,
        out: &control_path,
        progress: false,
        device: candle_core::Device::Cpu,
    })
    .unwrap();
    let (oracle, control) = (
        Capture::open(&oracle_path).unwrap(),
        Capture::open(&control_path).unwrap(),
    );
    let policy = Policy::load(None).unwrap();
    let int4 = Method::parse("int4-b32-symclip").unwrap();
    let map = |mode| {
        sensitivity::run(&sensitivity::Request {
            model_dir: &dir,
            plan: &plan,
            oracle: &oracle,
            control: &control,
            policy: &policy,
            method: int4,
            compute: Precision::F16,
            scale_dtype: ScaleDtype::F16,
            mode,
            progress: false,
            device: candle_core::Device::Cpu,
            scratch: tmp.path(),
            only: None,
        })
        .unwrap()
    };
    let fast = map(Mode::PrefixReuse);
    let naive = map(Mode::Naive);
    // 4 layers × (mixer, MLP) + head + embedding
    assert_eq!(fast.parts.len(), 10);
    for (a, b) in fast.parts.iter().zip(&naive.parts) {
        assert_eq!(a.part, b.part);
        assert_eq!(
            (a.introduced_confident_flips, a.confident_flips, a.tie_flips),
            (b.introduced_confident_flips, b.confident_flips, b.tie_flips),
            "{}",
            a.label
        );
        assert_eq!(a.mean_kl, b.mean_kl, "{}: KL", a.label);
        assert_eq!(a.min_cosine, b.min_cosine, "{}: cosine", a.label);
        assert_eq!(a.bytes_low, b.bytes_low, "{}: bytes", a.label);
        assert_eq!(a.positions_counted, 192);
    }
    // prefix reuse ran fewer layers: 4 (streams) + 4+4+3+3+2+2+1+1 (layer parts) + 0 (head) + 4 (embed)
    assert_eq!(fast.layer_passes, 4 + 20 + 4);
    assert_eq!(naive.layer_passes, 40);
    let ranked = fast.ranked(&policy);
    assert_eq!(ranked[0].label, "L2 mlp");
    assert!(ranked[0].introduced_confident_flips >= 10, "{ranked:?}");
    for r in &ranked[1..] {
        assert_eq!(r.introduced_confident_flips, 0, "{}", r.label);
        assert!(r.harm(&policy) < ranked[0].harm(&policy) / 100.0);
    }
}

#[test]
fn search_keeps_the_planted_part_high_and_the_mix_round_trips_to_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("oracles");
    let out = tmp.path().join("sweep");
    let dir = fixture("models/planted-mlp2");
    let plan = fixture("planted/planted.plan.safetensors");
    let o = qgate(&cache)
        .args(["sweep", "--model"])
        .arg(&dir)
        .arg("--plan")
        .arg(&plan)
        .args([
            "--oracle",
            "bf16",
            "--schemes",
            "int4lin",
            "--sensitivity",
            "int4",
            "--search",
            "int4:int8",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("SHIP: mix-int4-int8"), "{stderr}");
    for f in [
        "report.md",
        "summary.json",
        "sensitivity.md",
        "sensitivity.csv",
        "sensitivity.svg",
        "search.md",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    common::assert_valid_summary(&json);
    let s = &json["ladder"]["search"];
    assert_eq!(s["found"], "mix");
    assert_eq!(s["high_parts"], serde_json::json!(["L2 mlp"]));
    let mix = s["mix"].as_str().unwrap().to_string();
    assert_eq!(
        mix,
        "attn=int4-b32-symclip,gdn=int4-b32-symclip,mlp=int4-b32-symclip,head=int4-b32-symclip,embed=int4-b32-symclip,mlp@2=int8-b32-symclip"
    );
    assert!(s["saved_bytes"].as_u64().unwrap() > 0);
    assert!(s["size_bytes"].as_u64().unwrap() < s["all_high_bytes"].as_u64().unwrap());
    // every step recorded: all-high (pass), all-low (fail), promote L2 mlp (pass)
    let steps = s["steps"].as_array().unwrap();
    assert_eq!(steps[0]["action"], "all_high");
    assert_eq!(steps[0]["status"], "pass");
    assert_eq!(steps[1]["action"], "all_low");
    assert_eq!(steps[1]["status"], "fail");
    assert!(steps[1]["introduced_confident_flips"].as_u64().unwrap() > 0);
    assert_eq!(steps.last().unwrap()["status"], "pass");
    // the sensitivity map in summary.json and the CSV rank the planted part first
    let parts = json["ladder"]["sensitivity"]["parts"].as_array().unwrap();
    let worst = parts
        .iter()
        .max_by_key(|p| p["introduced_confident_flips"].as_u64().unwrap())
        .unwrap();
    assert_eq!(worst["label"], "L2 mlp");
    let csv = std::fs::read_to_string(out.join("sensitivity.csv")).unwrap();
    assert!(csv.lines().any(|l| l.starts_with("L2 mlp,mlp,2,")), "{csv}");
    let svg = std::fs::read_to_string(out.join("sensitivity.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("layer 3") && svg.contains("MLP / experts"));

    // round trip: simulate the mix and gate it with `qgate run` (release policy, f16 control)
    let cap = tmp.path().join("mix.capture.safetensors");
    let ctl = tmp.path().join("f16.capture.safetensors");
    for (scheme, path) in [(mix.as_str(), &cap), ("f16", &ctl)] {
        let o = qgate(&cache)
            .args(["simulate", "--model"])
            .arg(&dir)
            .arg("--plan")
            .arg(&plan)
            .args(["--scheme", scheme, "--out"])
            .arg(path)
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = qgate(&cache)
        .args(["run", "--bundle"])
        .arg(&cap)
        .arg("--control")
        .arg(&ctl)
        .args(["--oracle", "bf16", "--model"])
        .arg(&dir)
        .arg("--out")
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("PASS"), "{stdout}");
    // and all-int4 (the search's first low step) does not pass the same gate
    let cap4 = tmp.path().join("int4.capture.safetensors");
    let o = qgate(&cache)
        .args(["simulate", "--model"])
        .arg(&dir)
        .arg("--plan")
        .arg(&plan)
        .args(["--scheme", "int4lin", "--out"])
        .arg(&cap4)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let o = qgate(&cache)
        .args(["run", "--bundle"])
        .arg(&cap4)
        .arg("--control")
        .arg(&ctl)
        .args(["--oracle", "bf16", "--model"])
        .arg(&dir)
        .arg("--out")
        .arg(tmp.path().join("run4"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn locate_names_the_planted_layer_and_block() {
    let tmp = tempfile::tempdir().unwrap();
    let o = qgate(&tmp.path().join("oracles"))
        .args(["locate", "--model"])
        .arg(fixture("models/planted-mlp2"))
        .arg("--plan")
        .arg(fixture("planted/planted.plan.safetensors"))
        .args(["--scheme", "int4lin", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["basis"], "introduced_flips");
    assert!(j["introduced_confident_flips"].as_u64().unwrap() > 0);
    assert_eq!(j["entry_layer"], 2);
    assert_eq!(j["entry_block"], "mlp");
    // every block before the planted one is exact (int4 on the grid weights changes nothing)
    let layers = j["layers"].as_array().unwrap();
    for l in &layers[..5] {
        assert_eq!(l["mean_rel_err"].as_f64(), Some(0.0), "{l}");
    }
    assert!(layers[5]["mean_rel_err"].as_f64().unwrap() > 0.1);
    assert!(j["note"].as_str().unwrap().contains("layer 2 mlp"));
}

#[test]
fn bad_search_and_sensitivity_arguments_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for args in [
        vec!["--search", "int4"],
        vec!["--search", "int4:int4"],
        vec!["--search", "int4:int3"],
        vec!["--sensitivity", "int5"],
        vec!["--sensitivity-naive"],
        vec!["--sensitivity", "int4", "--sensitivity-parts", "mlp@x"],
        vec!["--sensitivity", "int4", "--sensitivity-parts", "head@1"],
        vec!["--sensitivity-parts", "head"],
        // checked before the oracle runs, not after the ladder
        vec!["--sensitivity", "int4", "--sensitivity-parts", "mlp@99"],
        vec!["--ablate", "int5"],
        vec!["--ablate", "int4", "--ablate-base", "int3lin"],
    ] {
        let o = sweep(&tmp.path().join("oracles"), &args, &tmp.path().join("out"));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(!tmp.path().join("out").exists());
        assert!(
            !tmp.path().join("oracles").exists(),
            "{args:?}: the oracle ran before the arguments were checked"
        );
    }
}

/// Outputs that would lose a user's file, or fail only after hours of work, are refused before the oracle
/// runs (exit 2, one line, the user's file unchanged).
#[test]
fn sweep_outputs_are_checked_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let notes = tmp.path().join("notes.txt");
    std::fs::write(&notes, "keep me").unwrap();
    let out = tmp.path().join("out");
    let s = |p: &Path| p.display().to_string();
    for (args, needle) in [
        (
            vec!["--junit".to_string(), s(&notes)],
            "is not a JUnit XML file",
        ),
        (
            vec!["--junit".to_string(), s(&out.join("junit.xml"))],
            "is inside the report directory",
        ),
        (
            vec!["--captures".to_string(), s(&out.join("caps"))],
            "is inside the report directory",
        ),
        (
            vec!["--captures".to_string(), s(&notes.join("caps"))],
            "is not a directory",
        ),
    ] {
        let o = sweep(&tmp.path().join("oracles"), &args, &out);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep me");
        assert!(!out.exists());
        assert!(!tmp.path().join("oracles").exists(), "{args:?}");
    }
}
