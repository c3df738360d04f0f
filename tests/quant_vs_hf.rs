//! `qgate simulate --compute f32` against Hugging Face transformers running the same fake-quantized weights
//! (fixtures/gen/make_quant_refs.py quantizes the fixture checkpoints in torch and captures HF's logits).
use qgate::capture::Capture;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

fn simulate(model: &str, scheme: &str, head: Option<&str>, out: &Path) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qgate"));
    c.args(["simulate", "--model"])
        .arg(fixture(&format!("models/{model}")))
        .arg("--plan")
        .arg(fixture("plans/tiny.plan.safetensors"))
        .args([
            "--scheme",
            scheme,
            "--compute",
            "f32",
            "--rollout",
            "0",
            "--out",
        ])
        .arg(out);
    if let Some(h) = head {
        c.args(["--head", h]);
    }
    c.output().expect("qgate runs")
}

fn check(reference: &str) {
    let rp = fixture(&format!("quant/{reference}"));
    if !rp.exists() {
        eprintln!("skipping: {} missing", rp.display());
        return;
    }
    let hf = Capture::open(&rp).unwrap();
    let x = &hf.meta.extra;
    let model = x["model"].as_str().unwrap();
    let scheme = x["scheme"].as_str().unwrap();
    let head = x["head"].as_str();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sim.capture.safetensors");
    let o = simulate(model, scheme, head, &out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let sim = Capture::open(&out).unwrap();
    // the same weights skipped, and listed
    let mut want: Vec<String> = x["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut got: Vec<String> = sim.meta.extra["quant_skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    for n in &want {
        assert!(stderr.contains(n.as_str()), "{n} not named in {stderr}");
    }
    assert!(sim.meta.extra["size_bytes"].as_u64().unwrap() > 0);
    let mut max = 0f32;
    for s in 0..hf.len() {
        let (a, b) = (hf.seq(s).logits.unwrap(), sim.seq(s).logits.unwrap());
        assert_eq!((a.rows, a.cols), (b.rows, b.cols));
        for r in 0..a.rows {
            for (p, q) in a.row(r).iter().zip(b.row(r)) {
                max = max.max((p - q).abs());
            }
        }
    }
    eprintln!("{reference}: max |Δlogit| vs HF = {max:.3e}");
    assert!(max <= 2e-3, "{reference}: max |Δ| {max}");
}

#[test]
fn dense_int4_body_int8_sym_head_matches_hf() {
    check("dense-gva-untied.int4body-int8symhead.f32.capture.safetensors");
}

#[test]
fn tied_dense_int8hu_headsym_unties_and_matches_hf() {
    check("dense-vl-tied.int8hu-headsym.f32.capture.safetensors");
}

#[test]
fn moe_fused_mixed_scheme_matches_hf() {
    check("moe-fused.mixed.f32.capture.safetensors");
}
