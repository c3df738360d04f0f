//! `qgate plan` on every committed fixture model: each has a tokenizer, and the plans it writes hold the
//! token ids Hugging Face's tokenizer and chat template give (references written by fixtures/gen/: the
//! random models' `hf/tiny-prompts.tokens.json`, the trained models' `hf/trained-prompts.tokens.json`, the
//! latter also the exact sequences of the committed `plans/trained.plan.safetensors`).
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn plan(model: &Path, prompts: &Path, chat: bool, out: &Path) -> Vec<Vec<i64>> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qgate"));
    cmd.args(["plan", "--quiet", "--model"])
        .arg(model)
        .arg("--prompts")
        .arg(prompts)
        .arg("--out")
        .arg(out);
    if chat {
        cmd.arg("--chat");
    }
    let r = cmd.output().unwrap();
    assert!(
        r.status.success(),
        "qgate plan on {}: {}",
        model.display(),
        String::from_utf8_lossy(&r.stderr)
    );
    let cap = qgate::capture::Capture::open(out).unwrap();
    (0..cap.len()).map(|i| cap.seq(i).tokens.clone()).collect()
}

fn ids(v: &serde_json::Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn reference(name: &str) -> serde_json::Value {
    let p = root().join("fixtures/hf").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn every_fixture_model_has_a_tokenizer_and_plans_like_hf() {
    let tmp = tempfile::tempdir().unwrap();
    let models: Vec<PathBuf> = {
        let mut m: Vec<PathBuf> = std::fs::read_dir(root().join("fixtures/models"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        m.sort();
        m
    };
    assert!(
        models.len() >= 6,
        "expected the 4 random, 2 trained and the planted model"
    );
    let tiny = reference("tiny-prompts.tokens.json");
    let trained = reference("trained-prompts.tokens.json");
    for (k, model) in models.iter().enumerate() {
        let name = model.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            model.join("tokenizer.json").is_file() && model.join("tokenizer_config.json").is_file(),
            "{name} has no tokenizer"
        );
        let cases: Vec<(PathBuf, bool, Vec<Vec<i64>>)> = if name.starts_with("trained-") {
            vec![
                (
                    root().join("fixtures/prompts/trained.plain.txt"),
                    false,
                    ids(&trained["plain"]),
                ),
                (
                    root().join("fixtures/prompts/trained.chat.txt"),
                    true,
                    ids(&trained["chat"]),
                ),
            ]
        } else {
            vec![
                (
                    root().join("fixtures/prompts/tiny.txt"),
                    false,
                    ids(&tiny["plain"]),
                ),
                (
                    root().join("fixtures/prompts/tiny.txt"),
                    true,
                    ids(&tiny["chat"]),
                ),
            ]
        };
        let mut all = Vec::new();
        for (j, (prompts, chat, want)) in cases.into_iter().enumerate() {
            let out = tmp.path().join(format!("{k}.{j}.plan.safetensors"));
            let got = plan(model, &prompts, chat, &out);
            assert_eq!(got, want, "{name}: {} (chat {chat})", prompts.display());
            all.extend(got);
        }
        if name.starts_with("trained-") {
            // the committed plan is the plain prompts followed by the chat-templated ones
            let committed = qgate::capture::Capture::open(
                root().join("fixtures/plans/trained.plan.safetensors"),
            )
            .unwrap();
            let seqs: Vec<Vec<i64>> = (0..committed.len())
                .map(|i| committed.seq(i).tokens.clone())
                .collect();
            assert_eq!(seqs, all, "{name}: plans/trained.plan.safetensors");
        }
    }
}
