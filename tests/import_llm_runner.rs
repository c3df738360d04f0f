//! `qgate import --from llm-runner` on the recorded sample files in `fixtures/llm-runner/`
//! (built from the writer's documented schema; see that folder's `make_samples.py`).
use qgate::capture::{write_capture, Capture, CaptureMeta, FloatKind, SeqData};
use qgate::import::llm_runner;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/llm-runner")
        .join(name)
}

fn expected() -> Value {
    let s = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

fn qgate(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn write_plan(path: &Path, seqs: &[Vec<i64>], vocab: usize) {
    let meta = CaptureMeta::new("plan", "plan", "none", vocab);
    let data: Vec<SeqData> = seqs
        .iter()
        .map(|t| SeqData {
            tokens: t.clone(),
            ..Default::default()
        })
        .collect();
    write_capture(path, &meta, &data).unwrap();
}

/// Assert every decoded row equals the expected values bit for bit (signed zero and subnormals included).
fn assert_rows_exact(c: &Capture, seq: usize, want: &Value) {
    let s = c.seq(seq);
    let l = s.logits.expect("logits");
    let want = want.as_array().unwrap();
    assert_eq!(l.rows, want.len());
    for (r, wr) in want.iter().enumerate() {
        let got = l.row(r);
        let wr: Vec<f32> = wr
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), wr.len());
        for (v, (a, b)) in got.iter().zip(&wr).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "row {r} col {v}: {a} vs {b}");
        }
    }
}

#[test]
fn full_f16_rows_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.capture.safetensors");
    let f = fixture("raw-full-f16.json");
    let (code, stdout, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        f.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("1 sequences"), "{stdout}");
    let exp = &expected()["files"]["raw-full-f16.json"];
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c.meta.runtime, "llm-runner");
    assert_eq!(c.meta.dtype, "f16");
    assert_eq!(c.meta.vocab_size, 384);
    assert_eq!(c.meta.label, "raw-full-f16");
    let s = c.seq(0);
    // no plan: tokens are the file's T tokens, rows are C_0..C_{T-2}
    assert_eq!(s.tokens, ints(&exp["tokens"]));
    let l = s.logits.as_ref().unwrap();
    assert_eq!(l.kind, FloatKind::F16);
    assert_eq!(l.rows, exp["rows"].as_u64().unwrap() as usize);
    assert_eq!(l.rows, s.tokens.len() - 1);
    assert_eq!(
        hex::encode(Sha256::digest(l.bytes())),
        exp["logits_sha256"].as_str().unwrap(),
        "stored bytes are the file's fp16 bytes"
    );
    assert_rows_exact(&c, 0, &exp["logits"]);
    // provenance: file name + sha256
    let from = &c.meta.extra["imported_from"][0];
    assert_eq!(from["file"], "raw-full-f16.json");
    let sha = hex::encode(Sha256::digest(std::fs::read(&f).unwrap()));
    assert_eq!(from["sha256"], sha.as_str());
}

#[test]
fn plan_with_the_capture_tools_extra_token_keeps_all_plan_rows() {
    let dir = tempfile::tempdir().unwrap();
    let exp = &expected()["files"]["raw-full-f16.json"];
    let plan_tokens = ints(&exp["capture_tokens"]);
    let plan = dir.path().join("p.plan.safetensors");
    write_plan(&plan, std::slice::from_ref(&plan_tokens), 384);
    let out = dir.path().join("x.capture.safetensors");
    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        fixture("raw-full-f16.json").to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
        "--label",
        "int8hu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.meta.label, "int8hu");
    let s = c.seq(0);
    assert_eq!(s.tokens, plan_tokens, "the appended token is dropped");
    assert_eq!(
        s.rows(),
        plan_tokens.len(),
        "every plan position has its row"
    );
    assert_rows_exact(&c, 0, &exp["logits"]);
    assert_eq!(
        c.meta.extra["import"]["files"][0]["extra_token_dropped"],
        true
    );
    assert!(c.meta.extra["import"]["plan"]["sha256"].is_string());
}

#[test]
fn plan_equal_to_file_tokens_gives_t_minus_one_rows() {
    let dir = tempfile::tempdir().unwrap();
    let exp = &expected()["files"]["raw-full-f16.json"];
    let toks = ints(&exp["tokens"]);
    let plan = dir.path().join("p.plan.safetensors");
    write_plan(&plan, std::slice::from_ref(&toks), 384);
    let out = dir.path().join("x.capture.safetensors");
    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        fixture("raw-full-f16.json").to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.seq(0).tokens, toks);
    assert_eq!(c.seq(0).rows(), toks.len() - 1);
}

#[test]
fn plan_mismatch_is_bad_input_naming_the_position() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("p.plan.safetensors");
    write_plan(&plan, &[vec![17, 5, 301, 42, 383]], 384);
    let out = dir.path().join("x.capture.safetensors");
    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        fixture("raw-full-f16.json").to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("raw-full-f16.json"), "{stderr}");
    assert!(stderr.contains("position 2"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn f32_rows_need_the_vocab_size_and_then_decode_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.capture.safetensors");
    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        fixture("raw-full-f32-x86.json").to_str().unwrap(),
        "--vocab-size",
        "384",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let exp = &expected()["files"]["raw-full-f32-x86.json"];
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.meta.dtype, "f32");
    assert_eq!(c.seq(0).logits.unwrap().kind, FloatKind::F32);
    assert_eq!(
        hex::encode(Sha256::digest(c.seq(0).logits.unwrap().bytes())),
        exp["logits_sha256"].as_str().unwrap()
    );
    assert_rows_exact(&c, 0, &exp["logits"]);

    // a vocab that fits neither fp16 nor f32 rows is refused
    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        fixture("raw-full-f32-x86.json").to_str().unwrap(),
        "--vocab-size",
        "500",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("raw-full-f32-x86.json") && stderr.contains("vocab"),
        "{stderr}"
    );
}

#[test]
fn top_k_file_gives_top_rows() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.capture.safetensors");
    let f = fixture("raw-top5.json");
    // no full rows: the vocab size cannot be inferred
    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        f.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--vocab-size"), "{stderr}");
    assert!(!out.exists());

    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        f.to_str().unwrap(),
        "--vocab-size",
        "384",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let exp = &expected()["files"]["raw-top5.json"];
    let c = Capture::open(&out).unwrap();
    let s = c.seq(0);
    assert!(s.logits.is_none());
    assert_eq!(s.tokens, ints(&exp["tokens"]));
    let ids = s.top_ids.unwrap();
    let lg = s.top_logits.unwrap();
    let rows = exp["rows"].as_u64().unwrap() as usize;
    assert_eq!(
        (ids.rows, ids.cols),
        (rows, exp["k"].as_u64().unwrap() as usize)
    );
    assert_eq!(exp["top_ids"].as_array().unwrap().len(), rows);
    for (r, want) in exp["top_ids"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ids.row(r), ints(want), "row {r}");
    }
    for (r, want) in exp["top_logits"].as_array().unwrap().iter().enumerate() {
        let want: Vec<f32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(lg.row(r), want, "row {r}");
    }
}

#[test]
fn top_k_file_with_plan_takes_vocab_from_the_plan_and_drops_the_pad() {
    let dir = tempfile::tempdir().unwrap();
    let exp = &expected()["files"]["raw-top5.json"];
    let plan_tokens = ints(&exp["capture_tokens"]);
    let plan = dir.path().join("p.plan.safetensors");
    write_plan(&plan, std::slice::from_ref(&plan_tokens), 384);
    let out = dir.path().join("x.capture.safetensors");
    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        fixture("raw-top5.json").to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.meta.vocab_size, 384);
    assert_eq!(c.meta.dtype, "f32", "top-k logits are stored as f32");
    let s = c.seq(0);
    assert_eq!(s.tokens, plan_tokens);
    assert_eq!(s.rows(), plan_tokens.len());
    assert_eq!(s.top_ids.unwrap().row(0), ints(&exp["top_ids"][0]));
}

#[test]
fn several_files_are_sequences_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.capture.safetensors");
    let a = fixture("raw-full-f16.json");
    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        a.to_str().unwrap(),
        a.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c.seq(0).tokens, c.seq(1).tokens);
    assert_eq!(c.meta.extra["imported_from"].as_array().unwrap().len(), 2);
}

#[test]
fn generation_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.capture.safetensors");
    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        fixture("generation-full.json").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("generation-full.json"), "{stderr}");
    assert!(stderr.contains("generation schema"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!out.exists());
}

/// Each malformed variant of the f16 sample: exit 2, one line naming the file and the problem, no output.
#[test]
fn malformed_files_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("raw-full-f16.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut d = doc.clone();
        f(&mut d);
        serde_json::to_string(&d).unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "truncated",
            text[..text.len() / 2].to_string(),
            "not valid llm-runner JSON",
        ),
        ("not_json", "<html>".into(), "not valid llm-runner JSON"),
        ("array", "[1,2]".into(), "not valid llm-runner JSON"),
        (
            "bad_base64",
            edit(&|d| d["positions"][1]["logits_base64"] = "@@not base64@@".into()),
            "positions[1].logits_base64 is not valid base64",
        ),
        (
            "short_row",
            edit(&|d| d["positions"][2]["logits_base64"] = "AAAA".into()),
            "inconsistent rows",
        ),
        (
            "odd_row",
            edit(&|d| {
                for p in d["positions"].as_array_mut().unwrap() {
                    p["logits_base64"] = "AAAA".into(); // 3 bytes
                }
            }),
            "not a whole number of fp16 values",
        ),
        (
            "missing_row",
            edit(&|d| {
                d["positions"][3]
                    .as_object_mut()
                    .unwrap()
                    .remove("logits_base64");
            }),
            "inconsistent rows",
        ),
        (
            "wrong_target",
            edit(&|d| d["positions"][0]["target_token"] = 6.into()),
            "target_token",
        ),
        (
            "too_few_positions",
            edit(&|d| {
                d["positions"].as_array_mut().unwrap().pop();
            }),
            "positions for",
        ),
        (
            "text_mode",
            edit(&|d| d["context_tokens"] = serde_json::json!([17, 5])),
            "context_tokens",
        ),
        (
            "no_positions",
            edit(&|d| {
                d.as_object_mut().unwrap().remove("positions");
            }),
            "no `positions`",
        ),
        (
            "negative_token",
            edit(&|d| d["continuation_tokens"][0] = (-5).into()),
            "negative",
        ),
    ];
    for (name, body, problem) in cases {
        let f = dir.path().join(format!("{name}.json"));
        std::fs::write(&f, body).unwrap();
        let out = dir.path().join(format!("{name}.capture.safetensors"));
        let (code, _, stderr) = qgate(&[
            "import",
            "--from",
            "llm-runner",
            f.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains(&format!("{name}.json")), "{name}: {stderr}");
        assert!(stderr.contains(problem), "{name}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{name}: {stderr}");
        assert!(!out.exists(), "{name}: no partial output");
    }
    // a bad second file leaves no output even though the first one was fine
    let out = dir.path().join("two.capture.safetensors");
    let (code, _, stderr) = qgate(&[
        "import",
        "--from",
        "llm-runner",
        fixture("raw-full-f16.json").to_str().unwrap(),
        dir.path().join("bad_base64.json").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("bad_base64.json"), "{stderr}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("qgate-partial"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left behind");
}

/// Deterministic mutation fuzzing of the JSON reader: it returns errors, it never panics.
#[test]
fn reader_survives_mutations() {
    let base = std::fs::read(fixture("raw-top5.json")).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut oks = 0;
    for _ in 0..400 {
        let mut b = base.clone();
        for _ in 0..(next() % 4 + 1) {
            if b.is_empty() {
                break;
            }
            let i = (next() as usize) % b.len();
            match next() % 4 {
                0 => b[i] = next() as u8,
                1 => {
                    b.remove(i);
                }
                2 => b.insert(i, b"0123456789-.,:[]{}\"e"[(next() % 20) as usize]),
                _ => b.truncate(i),
            }
        }
        if llm_runner::parse(&b, Some(384)).is_ok() {
            oks += 1;
        }
        let _ = llm_runner::parse(&b, None);
    }
    assert!(oks < 400, "mutations must break some files");
}
