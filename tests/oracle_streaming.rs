//! The layer-streamed oracle gives bit-identical logits and rollouts to the in-memory oracle on every
//! fixture model in every dtype: head in small vocabulary chunks (so chunk edges and a partial last
//! chunk are exercised), MoE experts converted one at a time, rollouts streamed per token or in memory
//! from the streamed caches.
mod common;
use common::bits;
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

/// The portable kernels (what a GPU runs; on the CPU with `set_portable_kernels`) streamed layer by layer
/// give the in-memory portable model's hidden states and logits bit for bit. In bf16/f16 these kernels
/// store activations in the model dtype (`act_io`): the streamed layer loop must add a bf16 mixer output
/// into the f32 residual stream as the in-memory one does (it once failed with "dtype mismatch in add").
#[test]
fn streamed_portable_kernels_match_in_memory() {
    use qgate::model::config::TextConfig;
    use qgate::model::streaming::Streamer;
    use qgate::model::weights::WeightStore;
    use qgate::model::{Cache, Model};
    let dev = candle_core::Device::Cpu;
    for name in ["dense-gva-untied", "moe-experts"] {
        let dir = fixture(&format!("models/{name}"));
        let cfg = TextConfig::from_dir(&dir).unwrap();
        let ids: Vec<u32> = (0..19u32)
            .map(|i| (i * 53 + 7) % cfg.vocab_size as u32)
            .collect();
        for prec in [Precision::F32, Precision::BF16, Precision::F16] {
            let what = format!("{name} {}", prec.name());
            let model = Model::load_on(&dir, prec, &dev, true).unwrap();
            let want_hidden = model.hidden_states(&ids, &mut model.new_cache()).unwrap();
            let want_logits = model.logits(&want_hidden).unwrap();
            let mut ws = WeightStore::open(&dir).unwrap();
            ws.set_streaming(true);
            ws.set_portable_kernels(true);
            for prefetch in [true, false] {
                let mut st = Streamer::new(&cfg, &ws, prec, 100).unwrap();
                st.set_prefetch(prefetch);
                let mut xs = vec![st.embed(&ids).unwrap()];
                let mut caches = vec![Cache::default()];
                st.layers(&mut xs, &mut caches, false, &mut |_, _| {})
                    .unwrap_or_else(|e| panic!("{what}: streamed layers: {e}"));
                let hidden = st.final_norm(&xs).unwrap().remove(0);
                assert_eq!(
                    bits(&hidden),
                    bits(&want_hidden),
                    "{what} prefetch {prefetch}: hidden states"
                );
                // The head in vocabulary chunks of 100, joined: the in-memory head's logits.
                let v = cfg.vocab_size;
                let mut logits = vec![0u32; ids.len() * v];
                st.head(
                    std::slice::from_ref(&hidden),
                    &mut |_, first, chunk| {
                        let n = chunk.dim(1)?;
                        let bits = bits(chunk);
                        for r in 0..ids.len() {
                            logits[r * v + first..r * v + first + n]
                                .copy_from_slice(&bits[r * n..(r + 1) * n]);
                        }
                        Ok(())
                    },
                    &mut |_| {},
                )
                .unwrap();
                assert_eq!(
                    logits,
                    bits(&want_logits),
                    "{what} prefetch {prefetch}: logits"
                );
            }
            // Decode steps streamed from kept caches (the streamed rollout's path) against the in-memory
            // model's single-token steps.
            let mut st = Streamer::new(&cfg, &ws, prec, cfg.vocab_size).unwrap();
            st.set_prefetch(true);
            let mut xs = vec![st.embed(&ids).unwrap()];
            let mut caches = vec![Cache::default()];
            st.layers(&mut xs, &mut caches, true, &mut |_, _| {})
                .unwrap();
            let mut mem_cache = model.new_cache();
            model.forward(&ids, &mut mem_cache).unwrap();
            for (step, tok) in [5u32, 77, 130].into_iter().enumerate() {
                let want = model.forward(&[tok], &mut mem_cache).unwrap();
                let mut xs = vec![st.embed(&[tok]).unwrap()];
                st.layers(&mut xs, &mut caches, true, &mut |_, _| {})
                    .unwrap_or_else(|e| panic!("{what}: streamed step {step}: {e}"));
                let hidden = st.final_norm(&xs).unwrap();
                let mut got = Vec::new();
                st.head(
                    &hidden,
                    &mut |_, _, chunk| {
                        got = bits(chunk);
                        Ok(())
                    },
                    &mut |_| {},
                )
                .unwrap();
                assert_eq!(got, bits(&want), "{what}: decode step {step}");
            }
        }
    }
}
