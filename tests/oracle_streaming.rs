//! The layer-streamed oracle gives bit-identical logits and rollouts to the in-memory oracle on every
//! fixture model in every dtype: head in small vocabulary chunks (so chunk edges and a partial last
//! chunk are exercised), MoE experts converted one at a time, rollouts streamed per token or in memory
//! from the streamed caches.
use qgate::capture::Capture;
use qgate::model::precision::Precision;
use qgate::oracle::{run_oracle, ExecOptions, Execution, OracleRequest};
use std::path::{Path, PathBuf};

const MODELS: [&str; 4] = [
    "dense-vl-tied",
    "dense-gva-untied",
    "moe-fused",
    "moe-experts",
];
const ROLLOUT: usize = 12;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

fn oracle(model: &Path, prec: Precision, plan: &[Vec<i64>], exec: ExecOptions, out: &Path) {
    run_oracle(&OracleRequest {
        model_dir: model,
        precision: prec,
        plan,
        rollout: ROLLOUT,
        out,
        progress: false,
        exec,
    })
    .expect("oracle runs");
}

fn assert_same(a: &Path, b: &Path, what: &str) {
    let (a, b) = (Capture::open(a).unwrap(), Capture::open(b).unwrap());
    assert_eq!(a.len(), b.len());
    assert_eq!(a.meta.extra["execution"], "in-memory");
    assert_eq!(b.meta.extra["execution"], "streamed");
    for i in 0..a.len() {
        let (sa, sb) = (a.seq(i), b.seq(i));
        let (la, lb) = (sa.logits.unwrap(), sb.logits.unwrap());
        assert_eq!(la.rows, sa.tokens.len());
        assert!(
            la.bytes() == lb.bytes(),
            "{what}: seq {i} logits differ (first row {:?})",
            (0..la.rows).find(|&r| la.row(r) != lb.row(r))
        );
        assert_eq!(sa.rollout, sb.rollout, "{what}: seq {i} rollout differs");
        assert_eq!(
            sa.rollout_margin, sb.rollout_margin,
            "{what}: seq {i} rollout margins differ"
        );
        assert!(!sa.rollout.unwrap().is_empty());
    }
}

#[test]
fn streamed_oracle_is_bit_identical_to_in_memory() {
    let plan = Capture::open(fixture("plans/tiny.plan.safetensors"))
        .unwrap()
        .plan();
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let model = fixture(&format!("models/{name}"));
        for prec in [Precision::F32, Precision::BF16, Precision::F16] {
            let what = format!("{name} {}", prec.name());
            let mem = tmp.path().join(format!("{name}.{}.mem", prec.name()));
            let exec = |mode, max_memory| ExecOptions {
                mode,
                max_memory,
                head_chunk: 100, // vocab 384: chunks of 100, 100, 100, 84
                prefetch: true,
                ..Default::default()
            };
            oracle(&model, prec, &plan, exec(Execution::InMemory, 1), &mem);
            // Budget of one byte: the rollouts stream too.
            let streamed = tmp.path().join(format!("{name}.{}.stream", prec.name()));
            oracle(&model, prec, &plan, exec(Execution::Stream, 1), &streamed);
            assert_same(&mem, &streamed, &format!("{what}, streamed rollouts"));
            // Without the prefetch thread: every block loaded on the computing thread.
            let serial = ExecOptions {
                prefetch: false,
                ..exec(Execution::Stream, 1)
            };
            oracle(&model, prec, &plan, serial, &streamed);
            assert_same(
                &mem,
                &streamed,
                &format!("{what}, streamed without prefetch"),
            );
            if prec == Precision::F32 {
                // A budget the model fits: rollouts in memory from the streamed caches.
                oracle(
                    &model,
                    prec,
                    &plan,
                    exec(Execution::Stream, 1 << 40),
                    &streamed,
                );
                assert_same(&mem, &streamed, &format!("{what}, in-memory rollouts"));
            }
        }
    }
}

#[test]
fn auto_mode_streams_above_the_budget() {
    let plan = Capture::open(fixture("plans/tiny.plan.safetensors"))
        .unwrap()
        .plan();
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("models/moe-fused");
    let run = |max_memory, out: &Path| {
        let exec = ExecOptions {
            mode: Execution::Auto,
            max_memory,
            head_chunk: 1 << 15,
            prefetch: true,
            ..Default::default()
        };
        oracle(&model, Precision::BF16, &plan[..2], exec, out);
        Capture::open(out).unwrap().meta.extra["execution"].clone()
    };
    assert_eq!(run(1 << 40, &tmp.path().join("a")), "in-memory");
    assert_eq!(run(1 << 10, &tmp.path().join("b")), "streamed");
}
