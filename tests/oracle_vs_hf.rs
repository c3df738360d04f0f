//! The oracle against Hugging Face transformers 5.23.0's own outputs on the committed tiny checkpoints
//! (fixtures/gen/make_fixtures.py writes both the checkpoints and HF's captures).
use qgate::capture::Capture;
use qgate::model::{argmax, precision::Precision, Model};
use qgate::oracle::run_sequence;
use std::path::PathBuf;

const MODELS: [&str; 4] = [
    "dense-vl-tied",
    "dense-gva-untied",
    "moe-fused",
    "moe-experts",
];

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

struct Comparison {
    rows: usize,
    max_abs: f32,
    argmax_mismatch: usize,
    confident_mismatch: usize,
    identical_rows: usize,
    rollouts_equal: usize,
    sequences: usize,
}

fn compare(model_name: &str, prec: Precision) -> Option<Comparison> {
    let hf_path = fixture(&format!(
        "hf/{model_name}.{}.capture.safetensors",
        prec.name()
    ));
    if !hf_path.exists() {
        return None;
    }
    let hf = Capture::open(&hf_path).expect("HF capture");
    let model = Model::load(&fixture(&format!("models/{model_name}")), prec).expect("model loads");
    let v = model.cfg.vocab_size;
    let mut c = Comparison {
        rows: 0,
        max_abs: 0.0,
        argmax_mismatch: 0,
        confident_mismatch: 0,
        identical_rows: 0,
        rollouts_equal: 0,
        sequences: hf.len(),
    };
    for i in 0..hf.len() {
        let seq = hf.seq(i);
        let hf_rollout = seq.rollout.clone().expect("HF rollout");
        let ours = run_sequence(&model, &seq.tokens, hf_rollout.len()).expect("oracle runs");
        let logits = seq.logits.expect("HF logits");
        for r in 0..logits.rows {
            let want = logits.row(r);
            let got = &ours.logits[r * v..(r + 1) * v];
            let d = want
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            c.max_abs = c.max_abs.max(d);
            c.identical_rows += usize::from(d == 0.0);
            let (a_hf, a_ours) = (argmax(&want), argmax(got));
            if a_hf != a_ours {
                c.argmax_mismatch += 1;
                let mut sorted = want.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] >= 0.1 {
                    c.confident_mismatch += 1;
                }
            }
            c.rows += 1;
        }
        c.rollouts_equal += usize::from(ours.rollout == hf_rollout);
    }
    eprintln!(
        "{model_name} {}: {} rows, max|Δ| {:.3e}, bit-identical rows {}/{} ({:.0}%), argmax mismatches {} (confident {}), rollouts equal {}/{}",
        prec.name(),
        c.rows,
        c.max_abs,
        c.identical_rows,
        c.rows,
        100.0 * c.identical_rows as f64 / c.rows as f64,
        c.argmax_mismatch,
        c.confident_mismatch,
        c.rollouts_equal,
        c.sequences
    );
    Some(c)
}

#[test]
fn f32_matches_hf_f32_within_1e_4_everywhere() {
    for m in MODELS {
        let c = compare(m, Precision::F32).expect("every model has an HF f32 capture");
        assert!(c.max_abs <= 1e-4, "{m}: max |Δlogit| {} > 1e-4", c.max_abs);
        assert_eq!(c.argmax_mismatch, 0, "{m}: argmax differs from HF f32");
        assert_eq!(
            c.rollouts_equal, c.sequences,
            "{m}: greedy rollout differs from HF's"
        );
    }
}

#[test]
fn bf16_and_f16_agree_with_hf_wherever_hf_is_confident() {
    let mut compared = 0;
    for prec in [Precision::BF16, Precision::F16] {
        for m in MODELS {
            let Some(c) = compare(m, prec) else { continue };
            compared += 1;
            assert_eq!(
                c.confident_mismatch,
                0,
                "{m} {}: argmax differs where HF's top1−top2 gap ≥ 0.1",
                prec.name()
            );
            assert!(
                c.identical_rows * 2 >= c.rows,
                "{m} {}: only {}/{} rows bit-identical to HF",
                prec.name(),
                c.identical_rows,
                c.rows
            );
        }
    }
    assert!(
        compared >= 6,
        "expected bf16 for all models and f16 for the dense ones"
    );
}
