//! What CI consumes from `qgate run`: `--junit` (parsed and checked against summary.json), the GitHub
//! Actions step summary and `::error` annotations, summary.json against the published JSON Schema,
//! `--json` on errors, exit codes in `--help`, progress lines off a terminal and `--quiet`, and the
//! oracle cache in the user's cache directory rather than the working directory.
mod common;

use common::{assert_junit_matches_summary, assert_valid_summary, parse_junit, repo};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fx(rel: &str) -> PathBuf {
    repo().join("fixtures").join(rel)
}

/// qgate with a private oracle cache and none of the CI variables of the machine running the tests.
fn qgate(tmp: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qgate"));
    c.env("QGATE_ORACLE_CACHE", tmp.join("oracles"))
        .env_remove("GITHUB_STEP_SUMMARY")
        .env_remove("GITHUB_ACTIONS")
        .env_remove("QGATE_PROGRESS_INTERVAL");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// HF's own f16 and bf16 runs of dense-gva-untied, and HF's bf16 run of another checkpoint on the same
/// plan (which must fail), gated against HF's f32 run of dense-gva-untied.
fn gate_three(tmp: &Path, extra: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut c = qgate(tmp);
    c.arg("run")
        .arg("--bundle")
        .arg(fx("hf/dense-gva-untied.f16.capture.safetensors"))
        .arg("--bundle")
        .arg(fx("hf/dense-gva-untied.bf16.capture.safetensors"))
        .arg("--bundle")
        .arg(fx("hf/dense-vl-tied.bf16.capture.safetensors"))
        .arg("--oracle")
        .arg(fx("hf/dense-gva-untied.f32.capture.safetensors"))
        .arg("--out")
        .arg(tmp.join("report"))
        .args(extra);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn junit_github_outputs_and_summary_schema_agree_with_the_verdict() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let junit = t.join("ci/junit.xml");
    let step = t.join("step-summary.md");
    std::fs::write(&step, "earlier step\n").unwrap();
    let o = gate_three(
        t,
        &["--junit", junit.to_str().unwrap()],
        &[
            ("GITHUB_STEP_SUMMARY", &step),
            ("GITHUB_ACTIONS", Path::new("true")),
        ],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("report/summary.json")).unwrap())
            .unwrap();
    assert_valid_summary(&summary);
    let cands = summary["candidates"].as_array().unwrap();
    let failed: Vec<&Value> = cands
        .iter()
        .filter(|c| c["verdict"]["status"] == "fail")
        .collect();
    assert!(!failed.is_empty(), "the other checkpoint must fail");
    assert!(cands.iter().any(|c| c["verdict"]["status"] == "pass"));

    let cases = parse_junit(&std::fs::read_to_string(&junit).unwrap());
    assert_junit_matches_summary(&cases, &summary);
    // every gated candidate × every rule the release policy enables, in the gate's order (every rule of
    // the release policy is on; rollouts are in the HF captures)
    let rules = [
        "garbage_rows",
        "min_coverage",
        "collapse",
        "max_introduced_confident_flips",
        "min_cosine",
        "max_mean_kl",
        "rollout_prefix",
        "degenerate_repetition",
    ];
    for c in cands {
        let label = c["label"].as_str().unwrap();
        let names: Vec<&str> = cases
            .iter()
            .filter(|k| k.classname == label)
            .map(|k| k.name.as_str())
            .collect();
        assert_eq!(names, rules, "{label}");
    }

    // GitHub: the table appended after what was there, one ::error per failed candidate (on stderr)
    let md = std::fs::read_to_string(&step).unwrap();
    assert!(
        md.starts_with("earlier step\n### ❌ qgate run: FAIL"),
        "{md}"
    );
    for c in cands {
        assert!(
            md.contains(&format!("| {} |", c["label"].as_str().unwrap())),
            "{md}"
        );
    }
    // where the oracle came from, and what ships (or why nothing does)
    assert!(md.contains("provenance: hf transformers"), "{md}");
    match summary["ship"].as_str() {
        Some(l) => assert!(md.contains(&format!("ships: **{l}**")), "{md}"),
        None => assert!(md.contains(summary["ship_note"].as_str().unwrap()), "{md}"),
    }
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("::error ")).collect();
    assert_eq!(errors.len(), failed.len(), "{err}");
    for f in &failed {
        let label = f["label"].as_str().unwrap();
        assert!(errors.iter().any(|l| l.contains(label)), "{err}");
    }
    assert!(
        !text(&o.stdout).contains("::error"),
        "annotations stay off stdout"
    );
}

#[test]
fn json_output_is_the_validated_summary_and_no_github_output_outside_actions() {
    let tmp = tempfile::tempdir().unwrap();
    let o = gate_three(tmp.path(), &["--json"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let printed: Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON object");
    assert_valid_summary(&printed);
    assert!(!text(&o.stderr).contains("::error"));
}

#[test]
fn schema_rejects_summaries_that_break_the_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let o = gate_three(tmp.path(), &["--json"], &[]);
    let good: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(common::schema_errors(&good).is_empty());
    let mut extra = good.clone();
    extra["candidates"][0]["a_field_added_later"] = Value::from(1);
    extra["a_top_level_field_added_later"] = Value::from("x");
    assert!(
        common::schema_errors(&extra).is_empty(),
        "new fields must not break the schema"
    );
    let broken = [
        ("/candidates", None),
        ("/candidates/0/verdict/status", Some(Value::from("PASS"))),
        ("/candidates/0/exact", Some(Value::from(-1))),
        ("/schema", Some(Value::from("qgate-report/2"))),
        ("/exit_code", Some(Value::from(2))),
    ];
    for (ptr, val) in broken {
        let mut b = good.clone();
        let (parent, key) = ptr.rsplit_once('/').unwrap();
        let obj = b.pointer_mut(parent).unwrap().as_object_mut().unwrap();
        match val {
            None => {
                obj.remove(key);
            }
            Some(v) => {
                obj.insert(key.to_string(), v);
            }
        }
        assert!(
            !common::schema_errors(&b).is_empty(),
            "{ptr} = {:?} passed the schema",
            b.pointer(ptr)
        );
    }
}

#[test]
fn errors_under_json_are_json_on_stdout_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.capture.safetensors");
    // a file that does not exist (qgate's own check)
    let o = qgate(tmp.path())
        .args(["run", "--json", "--oracle", "f32", "--bundle"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    assert_eq!(v["exit_code"], 2);
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("missing.capture.safetensors"), "{msg}");
    assert!(text(&o.stderr).contains("qgate: error:"));
    // a usage error clap rejects (no --bundle), and an unknown flag
    for args in [
        &["run", "--json", "--oracle", "f32"][..],
        &["sweep", "--json", "--nope"][..],
    ] {
        let o = qgate(tmp.path()).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let v: Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
        assert_eq!(v["exit_code"], 2);
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains("--bundle") || msg.contains("--nope"), "{msg}");
    }
    // without --json stdout stays empty
    let o = qgate(tmp.path())
        .args(["run", "--oracle", "f32", "--bundle"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty());
}

#[test]
fn junit_to_an_unwritable_place_is_one_line_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let o = gate_three(tmp.path(), &["--junit", dir.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(
        err.contains("a-directory") && err.contains("--junit"),
        "{err}"
    );
}

#[test]
fn help_lists_exit_codes_and_the_oracle_cache() {
    let tmp = tempfile::tempdir().unwrap();
    for args in [
        &["--help"][..],
        &["run", "--help"][..],
        &["help", "sweep"][..],
    ] {
        let o = qgate(tmp.path()).args(args).output().unwrap();
        assert!(o.status.success());
        let h = text(&o.stdout);
        for line in [
            "Exit codes:",
            "  0  pass",
            "  1  gate failed",
            "  2  bad input or usage",
            "  3  prompt rejected",
            "QGATE_ORACLE_CACHE",
        ] {
            assert!(h.contains(line), "{args:?} lacks {line:?}:\n{h}");
        }
    }
    let o = qgate(tmp.path()).arg("--version").output().unwrap();
    assert_eq!(
        text(&o.stdout).trim(),
        format!("qgate {}", env!("CARGO_PKG_VERSION"))
    );
}

fn oracle_cmd(tmp: &Path, extra: &[&str]) -> Output {
    qgate(tmp)
        .env("QGATE_PROGRESS_INTERVAL", "0")
        .args(["oracle", "--dtype", "f32", "--rollout", "2", "--model"])
        .arg(fx("models/dense-gva-untied"))
        .arg("--plan")
        .arg(fx("plans/tiny.plan.safetensors"))
        .arg("--out")
        .arg(tmp.join("o.capture.safetensors"))
        .args(extra)
        .output()
        .unwrap()
}

fn progress_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| {
            let b = l.as_bytes();
            b.len() > 21
                && b[4] == b'-'
                && b[10] == b'T'
                && b[19] == b'Z'
                && l[20..].starts_with(" qgate: ")
        })
        .collect()
}

#[test]
fn progress_is_timestamped_lines_off_a_terminal_and_quiet_silences_it() {
    let tmp = tempfile::tempdir().unwrap();
    // in memory: positions; streamed: layers, with the layer in the message
    let o = oracle_cmd(tmp.path(), &[]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    let lines = progress_lines(&err);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("positions") && l.contains("ETA")),
        "{err}"
    );
    assert!(lines.iter().any(|l| l.contains(": done, ")), "{err}");
    let o = oracle_cmd(tmp.path(), &["--stream"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        progress_lines(&err)
            .iter()
            .any(|l| l.contains("oracle (streamed) layer 1/") && l.contains("ETA")),
        "{err}"
    );
    let o = oracle_cmd(tmp.path(), &["--stream", "--quiet"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(progress_lines(&err).is_empty(), "{err}");
    assert!(
        err.contains("qgate: oracle f32"),
        "the closing line stays: {err}"
    );
}

#[test]
fn oracle_cache_goes_to_the_user_cache_directory_not_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (cwd, xdg, home) = (
        tmp.path().join("cwd"),
        tmp.path().join("xdg"),
        tmp.path().join("home"),
    );
    for d in [&cwd, &xdg, &home] {
        std::fs::create_dir_all(d).unwrap();
    }
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_qgate"))
            .env_remove("QGATE_ORACLE_CACHE")
            .env("XDG_CACHE_HOME", &xdg)
            .env("HOME", &home)
            .current_dir(&cwd)
            .args(["run", "--quiet", "--oracle", "f32", "--model"])
            .arg(fx("models/dense-gva-untied"))
            .arg("--bundle")
            .arg(fx("hf/dense-gva-untied.f16.capture.safetensors"))
            .arg("--out")
            .arg(tmp.path().join("report"))
            .output()
            .unwrap()
    };
    let o = run();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        !cwd.join("oracles").exists(),
        "oracles/ created in the working directory"
    );
    let cached: Vec<_> = std::fs::read_dir(xdg.join("qgate/oracles"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].starts_with("dense-gva-untied.f32."), "{cached:?}");
    assert_eq!(std::fs::read_dir(&cwd).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(&home).unwrap().count(),
        0,
        "XDG_CACHE_HOME wins over ~/.cache"
    );
    // the second run reuses it
    let o = run();
    assert_eq!(o.status.code(), Some(0));
    assert!(
        text(&o.stderr).contains("reusing cached oracle"),
        "{}",
        text(&o.stderr)
    );
}
