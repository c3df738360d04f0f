//! `qgate oracle` / `qgate plan` as users run them: bad checkpoints exit 2 naming the problem, output is
//! deterministic across runs and thread counts, plans match HF's tokenizer and chat template.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
fn qgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qgate"))
}
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}
fn run_oracle(model: &Path, out: &Path, threads: &str) -> std::process::Output {
    qgate()
        .args(["oracle", "--model"])
        .arg(model)
        .args(["--dtype", "bf16", "--plan"])
        .arg(root().join("fixtures/plans/tiny.plan.safetensors"))
        .arg("--out")
        .arg(out)
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .unwrap()
}

/// Rewrite a checkpoint without `drop`, and with `reshape` given a different (same-size) shape.
fn rewrite_checkpoint(file: &Path, drop: Option<&str>, reshape: Option<(&str, Vec<usize>)>) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views = Vec::new();
    for (name, view) in st.tensors() {
        if Some(name.as_str()) == drop {
            continue;
        }
        let shape = match &reshape {
            Some((n, s)) if *n == name => s.clone(),
            _ => view.shape().to_vec(),
        };
        views.push((
            name,
            safetensors::tensor::TensorView::new(view.dtype(), shape, view.data()).unwrap(),
        ));
    }
    let data = safetensors::serialize(views, None).unwrap();
    std::fs::write(file, data).unwrap();
}

/// A copy of the moe-fused fixture at `dst` whose checkpoint lacks its last 100 bytes.
fn truncated_model(dst: &Path) -> PathBuf {
    copy_dir(&root().join("fixtures/models/moe-fused"), dst);
    let f = dst.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    dst.to_path_buf()
}

fn expect_bad_input(out: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected, got: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn loader_errors_exit_2_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("fixtures/models/moe-fused");
    let out = tmp.path().join("o.safetensors");

    let m = tmp.path().join("missing");
    copy_dir(&src, &m);
    rewrite_checkpoint(
        &m.join("model.safetensors"),
        Some("model.layers.1.linear_attn.A_log"),
        None,
    );
    expect_bad_input(
        &run_oracle(&m, &out, "2"),
        &[
            "model.layers.1.linear_attn.A_log",
            "missing tensor",
            "model.safetensors",
        ],
    );

    let s = tmp.path().join("shape");
    copy_dir(&src, &s);
    let name = "model.layers.0.linear_attn.in_proj_qkv.weight";
    let shape = {
        let b = std::fs::read(s.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&b).unwrap();
        let sh = st.tensor(name).unwrap().shape().to_vec();
        assert_ne!(sh[0], sh[1], "need a non-square tensor");
        vec![sh[1], sh[0]]
    };
    rewrite_checkpoint(&s.join("model.safetensors"), None, Some((name, shape)));
    expect_bad_input(
        &run_oracle(&s, &out, "2"),
        &[name, "shape", "model.safetensors"],
    );

    let t = tmp.path().join("type");
    copy_dir(&src, &t);
    let cfg = std::fs::read_to_string(t.join("config.json")).unwrap();
    let cfg = cfg
        .replace("\"qwen3_5_moe_text\"", "\"llama\"")
        .replace("\"qwen3_5_moe\"", "\"llama\"");
    std::fs::write(t.join("config.json"), cfg).unwrap();
    expect_bad_input(&run_oracle(&t, &out, "2"), &["config.json", "llama"]);

    let c = truncated_model(&tmp.path().join("truncated"));
    expect_bad_input(
        &run_oracle(&c, &out, "2"),
        &["model.safetensors", "truncated"],
    );

    assert!(!out.exists(), "no output may be written on failure");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".qgate-partial")
        })
        .collect();
    assert!(leftovers.is_empty(), "half-written files left behind");
}

#[test]
fn same_plan_gives_bit_identical_captures_across_runs_and_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = root().join("fixtures/models/dense-gva-untied");
    let mut files = Vec::new();
    for (i, threads) in ["1", "2", "2"].iter().enumerate() {
        let out = tmp.path().join(format!("o{i}.safetensors"));
        let r = run_oracle(&model, &out, threads);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        files.push(std::fs::read(&out).unwrap());
    }
    assert!(files[0].len() > 100_000);
    assert!(files[0] == files[1], "1 thread vs 2 threads differ");
    assert!(files[1] == files[2], "two runs with 2 threads differ");
}

#[test]
fn plan_tokenizes_like_hf_plain_and_through_the_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/hf/tiny-prompts.tokens.json")).unwrap(),
    )
    .unwrap();
    for (mode, flag) in [("plain", None), ("chat", Some("--chat"))] {
        let out = tmp.path().join(format!("{mode}.plan.safetensors"));
        let mut cmd = qgate();
        cmd.args(["plan", "--model"])
            .arg(root().join("fixtures/models/dense-vl-tied"));
        cmd.arg("--prompts")
            .arg(root().join("fixtures/prompts/tiny.txt"))
            .arg("--out")
            .arg(&out);
        if let Some(f) = flag {
            cmd.arg(f);
        }
        let r = cmd.output().unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let cap = qgate::capture::Capture::open(&out).unwrap();
        let expected = want[mode].as_array().unwrap();
        assert_eq!(cap.len(), expected.len());
        for (i, e) in expected.iter().enumerate() {
            let ids: Vec<i64> = e
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            assert_eq!(cap.seq(i).tokens, ids, "{mode} prompt {i}");
        }
    }
}

#[test]
fn device_flag_errors_are_one_line_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.capture.safetensors");
    let model = root().join("fixtures/models/dense-gva-untied");
    let plan = root().join("fixtures/hf/dense-gva-untied.f32.capture.safetensors");
    let run = |device: &str| {
        qgate()
            .args([
                "oracle",
                "--dtype",
                "f32",
                "--rollout",
                "0",
                "--device",
                device,
            ])
            .arg("--model")
            .arg(&model)
            .arg("--plan")
            .arg(&plan)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    expect_bad_input(&run("tpu"), &["--device tpu", "cpu, cuda or cuda:N"]);
    expect_bad_input(&run("cuda:x"), &["--device cuda:x"]);
    if !cfg!(feature = "cuda") {
        expect_bad_input(
            &run("cuda"),
            &["built without CUDA", "scripts/build-cuda.sh"],
        );
    }
    assert!(!out.exists(), "no output may be written on failure");
}

/// The output location and the plan are checked before the weights load (the oracle may take hours): with a
/// truncated checkpoint, the error is still the output's or the plan's.
#[test]
fn outputs_and_plans_are_checked_before_the_weights_load() {
    let tmp = tempfile::tempdir().unwrap();
    let m = truncated_model(&tmp.path().join("truncated"));
    let notes = tmp.path().join("notes.txt");
    std::fs::write(&notes, "keep me").unwrap();
    // under a regular file
    expect_bad_input(
        &run_oracle(&m, &notes.join("sub/o.capture.safetensors"), "2"),
        &["notes.txt", "is not a directory"],
    );
    // a directory nobody can create files in (even root): /proc
    if cfg!(target_os = "linux") {
        expect_bad_input(
            &run_oracle(&m, Path::new("/proc/qgate-test/o.capture.safetensors"), "2"),
            &["/proc", "cannot create files here"],
        );
    }
    // a plan token outside the model's vocabulary, named by sequence and position
    let plan = tmp.path().join("oov.plan.safetensors");
    let seqs = vec![
        qgate::capture::SeqData {
            tokens: vec![1, 2],
            ..Default::default()
        },
        qgate::capture::SeqData {
            tokens: vec![1, 999_999],
            ..Default::default()
        },
    ];
    qgate::capture::write_capture(
        &plan,
        &qgate::capture::CaptureMeta::new("plan", "qgate-plan", "none", 1_000_000),
        &seqs,
    )
    .unwrap();
    let out = tmp.path().join("o.capture.safetensors");
    let o = qgate()
        .args(["oracle", "--model"])
        .arg(&m)
        .args(["--dtype", "f32", "--plan"])
        .arg(&plan)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    expect_bad_input(
        &o,
        &["plan sequence 1, position 1: token id 999999 is outside the model's vocabulary"],
    );
    assert!(!out.exists());
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep me");
}
