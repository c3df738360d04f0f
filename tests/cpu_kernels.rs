//! Every CPU kernel set this machine runs (`--kernels avx512|avx2|portable`) against Hugging Face
//! transformers 5.23.0's own outputs on the committed tiny checkpoints: f32 within 1e-4 with HF's argmax
//! and rollouts, bf16/f16 agreeing wherever HF is confident, bf16 layers fed HF's inputs bit-identical
//! where the rounding points are HF's. A set this CPU cannot run is reported as skipped, never passed.
//! Also: the sets agree with each other bit for bit, and no result depends on the thread count.
//!
//! One test function on purpose: the kernel set is process-wide (`cpu::select`), so the sets run one
//! after the other in this binary, not concurrently.
use qgate::capture::Capture;
use qgate::model::cpu::{self, Kernels};
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

fn load(model_name: &str, prec: Precision) -> Model {
    Model::load(&fixture(&format!("models/{model_name}")), prec).expect("model loads")
}

struct Outcome {
    max_abs: f32,
    argmax_mismatch: usize,
    confident_mismatch: usize,
    rollouts_equal: usize,
    sequences: usize,
    /// Our logits of every sequence, for the cross-set and thread-count comparisons.
    logits: Vec<Vec<f32>>,
}

fn against_hf(model_name: &str, prec: Precision) -> Option<Outcome> {
    let path = fixture(&format!(
        "hf/{model_name}.{}.capture.safetensors",
        prec.name()
    ));
    if !path.exists() {
        return None;
    }
    let hf = Capture::open(&path).expect("HF capture");
    let model = load(model_name, prec);
    let v = model.cfg.vocab_size;
    let mut o = Outcome {
        max_abs: 0.0,
        argmax_mismatch: 0,
        confident_mismatch: 0,
        rollouts_equal: 0,
        sequences: hf.len(),
        logits: Vec::new(),
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
            o.max_abs = o.max_abs.max(d);
            if argmax(&want) != argmax(got) {
                o.argmax_mismatch += 1;
                let mut sorted = want.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] >= 0.1 {
                    o.confident_mismatch += 1;
                }
            }
        }
        o.rollouts_equal += usize::from(ours.rollout.tokens == hf_rollout);
        o.logits.push(ours.logits);
    }
    Some(o)
}

/// Fraction (rows, elements) of layer outputs bit-identical to HF's when each layer is fed HF's input.
fn per_layer_bf16(model_name: &str) -> (usize, usize, usize, usize) {
    let bytes = std::fs::read(fixture(&format!(
        "hf-layers/{model_name}.bf16.layers.safetensors"
    )))
    .expect("layer references");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("layer references parse");
    let model = load(model_name, Precision::BF16);
    let stream: Vec<Vec<f32>> = (0..st.len())
        .map(|i| {
            let t = st.tensor(&format!("hidden.{i}")).expect("hidden state");
            t.data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect()
        })
        .collect();
    let h = model.cfg.hidden_size;
    let t = stream[0].len() / h;
    let (mut rows_same, mut rows, mut elems_same, mut elems) = (0, 0, 0, 0);
    let mut cache = model.new_cache();
    for (l, lc) in Model::layer_caches(&mut cache).iter_mut().enumerate() {
        let x = candle_core::Tensor::from_vec(stream[l].clone(), (t, h), &candle_core::Device::Cpu)
            .expect("tensor");
        let got: Vec<f32> = model
            .layer_forward(l, &x, lc)
            .and_then(|y| Ok(y.flatten_all()?.to_vec1()?))
            .expect("layer runs");
        let want = &stream[l + 1];
        for r in 0..t {
            let same = (0..h)
                .filter(|&c| got[r * h + c] == want[r * h + c])
                .count();
            elems_same += same;
            elems += h;
            rows_same += usize::from(same == h);
            rows += 1;
        }
    }
    (rows_same, rows, elems_same, elems)
}

/// `f` run in a rayon pool of `threads` threads.
fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(f)
}

#[test]
fn every_cpu_kernel_set_matches_hf_and_the_others() {
    let mut tested = Vec::new();
    // f32 logits of the first set tested, per model: every other set must give the same bits
    let mut first_f32: Vec<(Kernels, Vec<Vec<f32>>)> = Vec::new();
    for kernels in Kernels::ALL {
        if !kernels.supported() {
            eprintln!(
                "skipped: --kernels {kernels}: this CPU cannot run them (no {})",
                match kernels {
                    Kernels::Avx512 => "AVX-512",
                    Kernels::Avx2 => "AVX2+FMA",
                    Kernels::Portable => "-",
                }
            );
            continue;
        }
        cpu::select(kernels).expect("supported kernels select");
        assert_eq!(cpu::active(), kernels);
        for (mi, m) in MODELS.iter().enumerate() {
            let o = against_hf(m, Precision::F32).expect("every model has an HF f32 capture");
            eprintln!(
                "{kernels} {m} f32: max |Δlogit| {:.3e}, argmax mismatches {}, rollouts {}/{}",
                o.max_abs, o.argmax_mismatch, o.rollouts_equal, o.sequences
            );
            assert!(
                o.max_abs <= 1e-4,
                "{kernels} {m}: max |Δlogit| {} > 1e-4",
                o.max_abs
            );
            assert_eq!(
                o.argmax_mismatch, 0,
                "{kernels} {m}: argmax differs from HF"
            );
            assert_eq!(
                o.rollouts_equal, o.sequences,
                "{kernels} {m}: rollout differs from HF's"
            );
            match first_f32.get(mi) {
                Some((k0, l0)) => assert!(
                    *l0 == o.logits,
                    "{kernels} {m}: f32 logits differ from the {k0} kernels' (the sets must agree bit for bit)"
                ),
                None => first_f32.push((kernels, o.logits)),
            }
            for prec in [Precision::BF16, Precision::F16] {
                if let Some(o) = against_hf(m, prec) {
                    assert_eq!(
                        o.confident_mismatch,
                        0,
                        "{kernels} {m} {}: argmax differs where HF's top1−top2 gap ≥ 0.1",
                        prec.name()
                    );
                }
            }
            let (rs, r, es, e) = per_layer_bf16(m);
            eprintln!(
                "{kernels} {m} bf16 per layer: {rs}/{r} rows, {es}/{e} elements bit-identical to HF"
            );
            assert!(
                rs * 100 >= r * 95,
                "{kernels} {m}: only {rs}/{r} layer rows bit-identical"
            );
            assert!(
                es * 1000 >= e * 995,
                "{kernels} {m}: only {es}/{e} layer elements bit-identical"
            );
        }
        // Thread-count independence: the same logits with 1, 2 and 3 threads (f32 and bf16).
        for prec in [Precision::F32, Precision::BF16] {
            let run = |threads: usize| {
                with_threads(threads, || {
                    against_hf("dense-vl-tied", prec)
                        .expect("HF capture")
                        .logits
                })
            };
            let one = run(1);
            for threads in [2, 3] {
                assert!(
                    run(threads) == one,
                    "{kernels} {}: logits with {threads} threads differ from 1 thread",
                    prec.name()
                );
            }
        }
        eprintln!("{kernels}: checked against HF, the other sets and 1/2/3 threads");
        tested.push(kernels);
    }
    assert!(
        tested.contains(&Kernels::Portable) && tested.contains(&Kernels::detect()),
        "the portable set and the detected one are always tested"
    );
}

/// `--kernels` on the command line: a set this CPU lacks, or an unknown name, is one line on stderr
/// and exit 2 before anything runs; `-v` names the set chosen.
#[test]
fn kernels_flag_refuses_what_this_cpu_cannot_run_and_v_prints_the_choice() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("o.capture.safetensors");
    let plan = fixture("hf/dense-vl-tied.f32.capture.safetensors");
    let model = fixture("models/dense-vl-tied");
    let run = |kernels: &str| {
        assert_cmd::Command::cargo_bin("qgate")
            .expect("qgate binary")
            .args([
                "-v",
                "oracle",
                "--dtype",
                "f32",
                "--rollout",
                "1",
                "--kernels",
                kernels,
            ])
            .arg("--model")
            .arg(&model)
            .arg("--plan")
            .arg(&plan)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("qgate runs")
    };
    let mut cases = vec![(
        "sse9".to_string(),
        "expected auto, avx512, avx2 or portable",
    )];
    match Kernels::ALL.into_iter().find(|k| !k.supported()) {
        Some(k) => cases.push((k.name().to_string(), "this CPU cannot run them")),
        None => eprintln!("skipped: every kernel set runs on this CPU, none to refuse"),
    }
    for (value, why) in cases {
        let o = run(&value);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "--kernels {value}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "--kernels {value}: {err}");
        assert!(err.contains(why) && err.contains(&value), "{err}");
        assert!(!out.exists(), "nothing written");
    }
    let o = run("portable");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("qgate: CPU kernels: portable"), "{err}");
    let cap = Capture::open(&out).expect("oracle capture");
    assert_eq!(
        cap.meta.extra.get("cpu_kernels").and_then(|v| v.as_str()),
        Some("portable"),
        "the capture records the kernels"
    );
}
