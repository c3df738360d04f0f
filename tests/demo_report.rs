//! The README's main command (its first `cargo run --release -- run` block) on the embedded default: the
//! trained tiny Qwen3.5's f32 oracle computed by qgate, gating HF-run fake-quantized candidates
//! (fixtures/demo/, written by fixtures/gen/make_trained.py, each with its bundle size in its metadata) with
//! the f16 control. The terminal summary and report.md are snapshot-tested; the verdict is whatever the
//! trained model says (the snapshot records it, nothing here picks it).
mod common;

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The arguments after `qgate` of the README's main command.
fn readme_main_command() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("```sh\ncargo run --release -- run ")
        .expect("README has a `cargo run --release -- run` block");
    let block = &readme[start + "```sh\n".len()..];
    let block = &block[..block.find("\n```").unwrap()];
    let words: Vec<String> = block
        .replace("\\\n", " ")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(words[..4], ["cargo", "run", "--release", "--"]);
    words[4..].to_vec()
}

#[test]
fn readme_main_command_on_the_trained_model_snapshot() {
    let args = readme_main_command();
    assert_eq!(args[0], "run");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    // the README's --out, replaced by a temporary folder
    let mut argv: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--out" {
            it.next();
            continue;
        }
        argv.push(a.clone());
    }
    let r = Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(&argv)
        .arg("--out")
        .arg(&out)
        .arg("--quiet")
        .current_dir(root())
        .env("QGATE_ORACLE_CACHE", tmp.path().join("oracles"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&r.stdout).to_string();
    let stderr = String::from_utf8_lossy(&r.stderr).to_string();
    let code = r.status.code().unwrap_or(-1);
    assert!(code == 0 || code == 1, "exit {code}: {stdout}{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    common::assert_valid_summary(&summary);
    assert_eq!(summary["exit_code"], code);
    // every gated candidate's size came from its capture's metadata, so the ship decision is by size
    let cands = summary["candidates"].as_array().unwrap();
    assert!(cands.iter().filter(|c| c["role"] == "candidate").count() >= 5);
    for c in cands.iter().filter(|c| c["role"] == "candidate") {
        assert!(c["size_bytes"].as_u64().is_some(), "{c}");
    }
    if summary["ship"].is_string() {
        assert_eq!(summary["ship_basis"], "smallest_size");
    }
    let date = summary["date"].as_str().unwrap().to_string();
    let report = std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .replace(&format!(" on {date} (UTC)"), " on <date> (UTC)")
        .replace(
            &format!("qgate {} on", env!("CARGO_PKG_VERSION")),
            "qgate <version> on",
        );
    // the oracle cache key (weights, plan, dtype and qgate version) changes with every version
    let report = match report.find("trained-dense.f32.") {
        Some(i) => {
            let key_end = report[i..].find(".capture.safetensors").map(|j| i + j);
            match key_end {
                Some(j) => format!("{}trained-dense.f32.<key>{}", &report[..i], &report[j..]),
                None => report,
            }
        }
        None => report,
    };
    assert!(report.starts_with("## "), "report.md starts at ##");
    assert!(!report.contains(&root().display().to_string()));
    let terminal = stdout.replace(&out.display().to_string(), "<out>");
    insta::assert_snapshot!("demo_terminal", terminal);
    insta::assert_snapshot!("demo_report", report);
}
