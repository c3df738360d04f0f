//! `qgate import --from transcript`: the zoo's `coreai-gate-transcript/1` and `coreai-verify-transcript/1`
//! records (shapes from `shared/reference/coreai_formats.md` §2) become rollout-only captures.
use qgate::capture::{write_capture, Capture, CaptureMeta, SeqData};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn qgate(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn import(files: &[&Path], out: &Path, extra: &[&str]) -> (i32, String) {
    let mut a: Vec<String> = vec!["import".into(), "--from".into(), "transcript".into()];
    a.extend(files.iter().map(|f| f.to_str().unwrap().to_string()));
    a.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    qgate(&refs)
}

/// The published Qwen3.5 0.8B gate transcript (values as in the reference; key order as written).
fn gate_pass() -> Value {
    json!({"result": "PASS", "arch": "qwen3.5", "bundle": "qwen3_5_0_8b_decode_int8hu_block32_sym",
     "artifact": "mlboydaisuke/qwen3.5-0.8B-CoreAI@1b8c0203c0f3",
     "source_model": {"hf_id": "Qwen/Qwen3.5-0.8B", "revision": null},
     "protocol": {"prompt": "The capital of France is", "max_new_tokens": 16, "greedy": true,
       "oracle_dtype": "fp32", "engine_variant": "coreai-pipelined", "warmup": "off",
       "env": {"COREAI_CHUNK_THRESHOLD": "1"},
       "tie_rule": "a first divergence passes only where the oracle's top-2 margin < 0.1"},
     "input_ids": [760, 6511, 314, 9338, 369],
     "oracle": {"gen_ids": [11751, 13, 198, 760, 6511, 314, 9338, 369, 11751, 13, 198, 760, 6511, 314, 9338, 369],
       "gen_text": " Paris.\nThe capital of France is Paris.\nThe capital of France is",
       "top2_margins": [0.031928353011608124, 0.16588357090950012, 0.19909869134426117, 0.15157420933246613,
         0.26463383436203003, 0.9227474927902222, 0.14306463301181793, 0.8543682098388672,
         0.33684197068214417, 0.901140570640564, 0.8256220817565918, 0.576010525226593,
         0.9035829901695251, 0.9802873134613037, 0.9682793021202087, 0.994062066078186]},
     "engine": {"gen_text": " Paris.\nThe capital of France is Paris.\nThe capital of France is"},
     "match": {"exact_prefix": 16, "of": 16, "first_divergence": null},
     "schema": "coreai-gate-transcript/1", "generated_at": "2026-07-28T04:31:00+00:00",
     "environment": {"platform": "macOS-27.0-arm64-arm-64bit-Mach-O", "python": "3.14.6", "runner": "/x/llm-runner"},
     "recheck": {"engine_side_only": "…", "full_gate": "…"}})
}

/// A tiny word-level tokenizer.json (whitespace/punctuation split) for the re-tokenisation tests.
fn tokenizer(dir: &Path) -> PathBuf {
    let vocab = json!({"[UNK]": 0, "The": 1, "capital": 2, "of": 3, "France": 4, "is": 5,
                       "Paris": 6, ".": 7, "G": 8, ",": 9, "H": 10, "I": 11});
    let t = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}});
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, t.to_string()).unwrap();
    p
}

fn write(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).unwrap();
    p
}

#[test]
fn gate_transcript_oracle_side_needs_no_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "gate-qwen3.5-0.8b.json", &gate_pass());
    let out = dir.path().join("o.capture.safetensors");
    let (code, err) = import(
        &[&f],
        &out,
        &["--transcript-side", "oracle", "--vocab-size", "248320"],
    );
    assert_eq!(code, 0, "{err}");
    let c = Capture::open(&out).unwrap();
    let s = c.seq(0);
    assert_eq!(s.tokens, vec![760, 6511, 314, 9338, 369]);
    assert_eq!(
        s.rollout.as_deref(),
        Some(
            &[
                11751, 13, 198, 760, 6511, 314, 9338, 369, 11751, 13, 198, 760, 6511, 314, 9338,
                369
            ][..]
        )
    );
    assert_eq!(s.rows(), 0, "rollout-only");
    assert!(s.logits.is_none() && s.top_ids.is_none());
    assert_eq!(c.meta.vocab_size, 248320);
    assert_eq!(c.meta.dtype, "none");
    assert_eq!(c.meta.label, "gate-qwen3.5-0.8b");
    assert_eq!(c.meta.extra["import"]["retokenized"], false);
    assert_eq!(
        c.meta.extra["import"]["files"][0]["schema"],
        "coreai-gate-transcript/1"
    );
}

#[test]
fn gate_transcript_engine_text_needs_a_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "gate.json", &gate_pass());
    let out = dir.path().join("e.capture.safetensors");
    let (code, err) = import(&[&f], &out, &["--vocab-size", "248320"]);
    assert_eq!(code, 2);
    assert!(err.contains("gate.json"), "{err}");
    assert!(err.contains("--tokenizer"), "{err}");
    assert!(err.contains("engine.gen_text"), "{err}");
    assert!(!out.exists());
}

#[test]
fn engine_text_is_retokenized_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let mut g = gate_pass();
    g["input_ids"] = json!([1, 2, 3, 4, 5]);
    g["engine"]["gen_text"] = json!(" Paris. The capital");
    let f = write(dir.path(), "gate.json", &g);
    let out = dir.path().join("e.capture.safetensors");
    let (code, err) = import(
        &[&f],
        &out,
        &["--vocab-size", "16", "--tokenizer", tok.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.seq(0).tokens, vec![1, 2, 3, 4, 5]);
    assert_eq!(c.seq(0).rollout, Some(vec![6, 7, 1, 2]));
    let imp = &c.meta.extra["import"];
    assert_eq!(imp["retokenized"], true);
    assert_eq!(imp["tokenizer"]["file"], "tokenizer.json");
    assert_eq!(imp["tokenizer"]["sha256"].as_str().unwrap().len(), 64);
    assert!(imp["files"][0]["rollout_from"]
        .as_str()
        .unwrap()
        .contains("re-tokenized"));
}

#[test]
fn recorded_engine_ids_are_used_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = gate_pass();
    g["result"] = json!("FAIL");
    g["engine"] = json!({"gen_text": " Lyon.", "gen_ids": [55, 13]});
    let f = write(dir.path(), "fail.json", &g);
    let out = dir.path().join("e.capture.safetensors");
    let (code, err) = import(&[&f], &out, &["--vocab-size", "248320"]);
    assert_eq!(code, 0, "{err}");
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.seq(0).rollout, Some(vec![55, 13]));
    assert_eq!(c.meta.runtime, "llm-runner (from transcript)");
}

#[test]
fn verify_transcript_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let v = json!({"schema": "coreai-verify-transcript/1", "generated_at": "2026-07-30T10:00:00+00:00",
        "bundle": "/b/qwen3_0_6b_4bit_dynamic", "backend": "stock", "driver": "llm-runner",
        "oracle_model": "Qwen/Qwen3-0.6B", "oracle_revision": null, "oracle_dtype": "fp32",
        "prompt": "The alphabet begins", "margin_floor": 0.1, "input_ids": [1, 2, 3],
        "oracle_ids": [8, 9, 10, 9, 15], "oracle_text": " G, H,", "bundle_text": " G, H, I",
        "margins": [0.99, 0.98, 0.97, 0.96, 0.95], "result": "PASS", "verdict": "…",
        "environment": {"platform": "macOS-27.0", "python": "3.14.6", "runner": null}});
    let f = write(dir.path(), "verify.json", &v);
    // oracle side: oracle_ids, EOS (15) included as the transcript records it
    let out = dir.path().join("o.capture.safetensors");
    let (code, err) = import(
        &[&f],
        &out,
        &["--vocab-size", "16", "--transcript-side", "oracle"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        Capture::open(&out).unwrap().seq(0).rollout,
        Some(vec![8, 9, 10, 9, 15])
    );
    // engine side: bundle_text re-tokenized
    let out = dir.path().join("e.capture.safetensors");
    let (code, err) = import(
        &[&f],
        &out,
        &["--vocab-size", "16", "--tokenizer", tok.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        Capture::open(&out).unwrap().seq(0).rollout,
        Some(vec![8, 9, 10, 9, 11])
    );
}

#[test]
fn plan_supplies_vocab_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("p.plan.safetensors");
    write_capture(
        &plan,
        &CaptureMeta::new("plan", "plan", "none", 248320),
        &[SeqData {
            tokens: vec![760, 6511, 314, 9338, 369],
            ..Default::default()
        }],
    )
    .unwrap();
    let f = write(dir.path(), "gate.json", &gate_pass());
    let out = dir.path().join("o.capture.safetensors");
    let (code, err) = import(
        &[&f],
        &out,
        &[
            "--transcript-side",
            "oracle",
            "--plan",
            plan.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(Capture::open(&out).unwrap().meta.vocab_size, 248320);

    let mut g = gate_pass();
    g["input_ids"] = json!([760, 6511, 314, 9338]);
    let f = write(dir.path(), "short.json", &g);
    let out = dir.path().join("s.capture.safetensors");
    let (code, err) = import(
        &[&f],
        &out,
        &[
            "--transcript-side",
            "oracle",
            "--plan",
            plan.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("short.json") && err.contains("position 4"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn malformed_transcripts_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut g = gate_pass();
        f(&mut g);
        serde_json::to_string(&g).unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad_json",
            "{\"schema\": ".into(),
            "not valid transcript JSON",
        ),
        (
            "no_schema",
            edit(&|g| {
                g.as_object_mut().unwrap().remove("schema");
            }),
            "no `schema` key",
        ),
        (
            "future_schema",
            edit(&|g| g["schema"] = json!("coreai-gate-transcript/2")),
            "unknown transcript schema `coreai-gate-transcript/2`",
        ),
        (
            "error_record",
            edit(&|g| {
                g["result"] = json!("ERROR");
                g["engine"] = json!({"gen_text": null});
            }),
            "no engine output",
        ),
        (
            "float_ids",
            edit(&|g| g["input_ids"] = json!([1.5, 2])),
            "input_ids[0]",
        ),
        (
            "huge_id",
            edit(&|g| g["oracle"]["gen_ids"] = json!([248320])),
            "outside the vocabulary",
        ),
    ];
    for (name, body, problem) in cases {
        let f = dir.path().join(format!("{name}.json"));
        std::fs::write(&f, body).unwrap();
        let out = dir.path().join(format!("{name}.capture.safetensors"));
        let side = if name == "error_record" {
            "engine"
        } else {
            "oracle"
        };
        let (code, err) = import(
            &[&f],
            &out,
            &["--vocab-size", "248320", "--transcript-side", side],
        );
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains(&format!("{name}.json")), "{name}: {err}");
        assert!(err.contains(problem), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
        assert!(!out.exists(), "{name}");
    }
    // a tokenizer that is not one
    let f = write(dir.path(), "gate.json", &gate_pass());
    let bad_tok = dir.path().join("tok.json");
    std::fs::write(&bad_tok, "{}").unwrap();
    let out = dir.path().join("t.capture.safetensors");
    let (code, err) = import(
        &[&f],
        &out,
        &[
            "--vocab-size",
            "248320",
            "--tokenizer",
            bad_tok.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("tok.json") && err.contains("tokenizer"),
        "{err}"
    );
}
