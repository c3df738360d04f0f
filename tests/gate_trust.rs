//! "A verdict that cannot be fooled, and no data lost": every way a hostile tester got `qgate run` to say
//! PASS, or to delete files it had not written, planted from the committed HF fixtures
//! (`fixtures/hf/dense-gva-untied.*`: 3 sequences of 1, 17 and 150 tokens, 168 positions, vocabulary 384,
//! written by HF transformers 5.23.0). Each test fails on the code before the fix and passes after.
mod common;

use qgate::capture::{write_capture, Capture, CaptureMeta, FloatKind, SeqData};
use std::path::{Path, PathBuf};
use std::process::Command;

const MODEL: &str = "dense-gva-untied";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
fn hf(dtype: &str) -> PathBuf {
    root().join(format!("fixtures/hf/{MODEL}.{dtype}.capture.safetensors"))
}
fn model_dir() -> PathBuf {
    root().join(format!("fixtures/models/{MODEL}"))
}

/// One sequence of a capture, read whole.
struct Seq {
    tokens: Vec<i64>,
    logits: Vec<Vec<f32>>,
    rollout: Option<Vec<i64>>,
}

fn read(path: &Path) -> Vec<Seq> {
    let c = Capture::open(path).unwrap();
    (0..c.len())
        .map(|i| {
            let s = c.seq(i);
            let logits = match &s.logits {
                Some(l) => (0..l.rows).map(|r| l.row(r)).collect(),
                None => Vec::new(),
            };
            Seq {
                tokens: s.tokens.clone(),
                logits,
                rollout: s.rollout.clone(),
            }
        })
        .collect()
}

const V: usize = 384;

fn logits_seq(tokens: &[i64], rows: &[Vec<f32>], rollout: Option<Vec<i64>>) -> SeqData {
    SeqData {
        tokens: tokens.to_vec(),
        logits: (!rows.is_empty()).then(|| (rows.len(), V, rows.concat())),
        logits_kind: Some(FloatKind::F32),
        rollout,
        ..Default::default()
    }
}

/// `seqs` with every logits row replaced by `f(seq, pos, row)`; tokens and rollouts kept.
fn map_rows(seqs: &[Seq], f: impl Fn(usize, usize, &[f32]) -> Vec<f32>) -> Vec<SeqData> {
    seqs.iter()
        .enumerate()
        .map(|(s, q)| {
            let rows: Vec<Vec<f32>> = q
                .logits
                .iter()
                .enumerate()
                .map(|(t, r)| f(s, t, r))
                .collect();
            logits_seq(&q.tokens, &rows, q.rollout.clone())
        })
        .collect()
}

/// `seqs` with the first `keep(seq, rows)` logits rows of each sequence; tokens and rollouts kept.
fn keep_rows(seqs: &[Seq], keep: impl Fn(usize, usize) -> usize) -> Vec<SeqData> {
    seqs.iter()
        .enumerate()
        .map(|(s, q)| {
            let n = keep(s, q.logits.len());
            logits_seq(&q.tokens, &q.logits[..n], q.rollout.clone())
        })
        .collect()
}

fn write(path: &Path, label: &str, runtime: &str, seqs: &[SeqData]) -> String {
    write_capture(path, &CaptureMeta::new(label, runtime, "f32", V), seqs).unwrap();
    path.display().to_string()
}

fn argmax(r: &[f32]) -> usize {
    let mut best = 0;
    for (j, &x) in r.iter().enumerate() {
        if x > r[best] {
            best = j;
        }
    }
    best
}

/// Token ids of a row sorted by logit, highest first.
fn ranked(r: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..r.len()).collect();
    idx.sort_by(|&a, &b| r[b].total_cmp(&r[a]).then(a.cmp(&b)));
    idx
}

/// Softmax margin p1 − p2 of a row.
fn prob_margin(r: &[f32]) -> f64 {
    let rk = ranked(r);
    let m = r[rk[0]] as f64;
    let z: f64 = r.iter().map(|&x| ((x as f64) - m).exp()).sum();
    (1.0 - ((r[rk[1]] as f64) - m).exp()) / z
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn qgate(args: &[&str], cache: &Path) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(args)
        .env("QGATE_ORACLE_CACHE", cache)
        .output()
        .unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).to_string(),
        stderr: String::from_utf8_lossy(&o.stderr).to_string(),
    }
}

/// At (sequence, position, oracle row): the token the planted candidate picks, or `None` for the oracle's.
type Pick = dyn Fn(usize, usize, &[f32]) -> Option<usize>;

struct Fx {
    dir: tempfile::TempDir,
    oracle: Vec<Seq>,
}

impl Fx {
    fn new() -> Fx {
        Fx {
            dir: tempfile::tempdir().unwrap(),
            oracle: read(&hf("f32")),
        }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.p(name).display().to_string()
    }
    /// A policy file: the release policy with `(from, to)` replacements.
    fn policy(&self, name: &str, edits: &[(&str, &str)]) -> String {
        let mut t = qgate::gate::policy::DEFAULT_POLICY.to_string();
        for (a, b) in edits {
            assert!(t.contains(a), "{a}");
            t = t.replace(a, b);
        }
        std::fs::write(self.p(name), t).unwrap();
        self.s(name)
    }
    /// The default policy without the cosine / KL rules and with rollouts off (top-1 flips only), with
    /// `extra` edits.
    fn flips_policy(&self, name: &str, extra: &[(&str, &str)]) -> String {
        let mut edits = vec![
            ("min_cosine = 0.98", ""),
            ("max_mean_kl = 0.1", ""),
            ("rollout_prefix = \"full\"", "rollout_prefix = \"off\""),
        ];
        edits.extend_from_slice(extra);
        self.policy(name, &edits)
    }
    /// A flips-only policy: no cosine / KL (argmax-only candidates), rollouts and collapse off.
    fn flips_only(&self) -> String {
        self.flips_policy(
            "flips-only.toml",
            &[("fail_on_collapse = true", "fail_on_collapse = false")],
        )
    }
    /// `qgate run` against the HF f32 capture as the oracle.
    fn run(&self, extra: &[&str]) -> Run {
        let oracle = hf("f32").display().to_string();
        let out = self.s("out");
        let mut a = vec!["run", "--oracle", oracle.as_str(), "--out", out.as_str()];
        a.extend_from_slice(extra);
        qgate(&a, &self.p("cache"))
    }
    /// summary.json, validated against the published schema.
    fn summary(&self) -> serde_json::Value {
        let v = serde_json::from_str(&std::fs::read_to_string(self.p("out/summary.json")).unwrap())
            .unwrap();
        common::assert_valid_summary(&v);
        v
    }
    fn report(&self) -> String {
        std::fs::read_to_string(self.p("out/report.md")).unwrap()
    }
    /// Argmax-only candidate: the oracle's top-1 everywhere except where `pick` says otherwise.
    fn argmax_capture(&self, name: &str, pick: &Pick) -> String {
        let seqs: Vec<SeqData> = self
            .oracle
            .iter()
            .enumerate()
            .map(|(s, q)| SeqData {
                tokens: q.tokens.clone(),
                argmax: Some(
                    q.logits
                        .iter()
                        .enumerate()
                        .map(|(t, r)| pick(s, t, r).unwrap_or_else(|| argmax(r)) as i64)
                        .collect(),
                ),
                rollout: q.rollout.clone(),
                ..Default::default()
            })
            .collect();
        write(&self.p(name), name, "coreai", &seqs)
    }
}

/// HF's bf16 capture with the oracle's own rollouts (HF's bf16 rollout departs from the f32 one at a step
/// whose margin this HF oracle capture does not record, which would fail the rollout rule first).
fn bf16_with_oracle_rollouts(fx: &Fx) -> Vec<Seq> {
    let mut bf16 = read(&hf("bf16"));
    for (b, o) in bf16.iter_mut().zip(&fx.oracle) {
        b.rollout = o.rollout.clone();
    }
    bf16
}

// 1. Uncovered rows count as nothing.
#[test]
fn coverage_is_a_rule_and_llm_runner_rows_pass() {
    let fx = Fx::new();
    let bf16 = bf16_with_oracle_rollouts(&fx);
    // one logits row of 168 planned positions (the hostile capture passed as `1/1 exact`)
    let one: Vec<SeqData> = bf16
        .iter()
        .enumerate()
        .map(|(s, q)| {
            let rows = if s == 2 {
                q.logits[..1].to_vec()
            } else {
                Vec::new()
            };
            logits_seq(&q.tokens, &rows, q.rollout.clone())
        })
        .collect();
    let one = write(
        &fx.p("one-row.capture.safetensors"),
        "one-row",
        "coreai",
        &one,
    );
    let r = fx.run(&["--bundle", &one]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("coverage 1/168 = 0.6% of the planned positions < min_coverage 90.0%")
            && r.stderr.contains("sequence(s) with no compared row: 0, 1")
            && r.stderr.contains("[min_coverage]"),
        "{}",
        r.stderr
    );
    assert!(
        r.stdout.contains("0.6%"),
        "terminal shows coverage: {}",
        r.stdout
    );
    assert!(fx.report().contains("| 1/168 (0.6%) |"), "{}", fx.report());

    // llm-runner's T−1 rows per sequence (the 1-token sequence has none): 165/168 passes the default
    let t1: Vec<SeqData> = bf16
        .iter()
        .map(|q| {
            logits_seq(
                &q.tokens,
                &q.logits[..q.logits.len() - 1],
                q.rollout.clone(),
            )
        })
        .collect();
    let t1 = write(
        &fx.p("t-minus-1.capture.safetensors"),
        "t-minus-1",
        "llm-runner",
        &t1,
    );
    let r = fx.run(&["--bundle", &t1]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let s = fx.summary();
    assert_eq!(s["candidates"][0]["coverage"]["compared"], 165);
    assert_eq!(s["candidates"][0]["coverage"]["planned"], 168);
    assert_eq!(
        s["candidates"][0]["coverage"]["sequences_without_rows"],
        serde_json::json!([0])
    );
    assert!(fx.report().contains("no compared row in sequence(s) [0]"));
}

// 2. A "tie-flip" may be any token.
#[test]
fn a_tie_is_only_between_near_top_tokens() {
    let fx = Fx::new();
    let pol = fx.flips_only();
    let below: usize = fx
        .oracle
        .iter()
        .flat_map(|q| q.logits.iter())
        .filter(|r| prob_margin(r) < 0.1)
        .count();
    assert!(below > 50, "the fixture has many flat positions ({below})");
    // at every position below the floor, the oracle's rank-200 token (p ≈ 1e-4)
    let far = fx.argmax_capture("rank200.capture.safetensors", &|_, _, r| {
        (prob_margin(r) < 0.1).then(|| ranked(r)[199])
    });
    let r = fx.run(&["--bundle", &far, "--gate", &pol]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("{below} confident flip(s) > 0 allowed")),
        "{}",
        r.stderr
    );
    let s = fx.summary();
    assert_eq!(s["candidates"][0]["tie_flips"], 0);
    assert_eq!(s["candidates"][0]["confident_flips"], below);

    // the oracle's own top-2 where it is within 1 nat and the floor: those are ties, and pass
    let near = fx.argmax_capture("near.capture.safetensors", &|_, _, r| {
        let rk = ranked(r);
        (prob_margin(r) < 0.1 && r[rk[0]] - r[rk[1]] <= 1.0).then(|| rk[1])
    });
    let r = fx.run(&["--bundle", &near, "--gate", &pol]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ties = fx.summary()["candidates"][0]["tie_flips"].as_u64().unwrap();
    assert!(ties > 20, "{ties}");
    let reason = fx.summary()["candidates"][0]["verdict"]["reason"].to_string();
    assert!(reason.contains(&format!("{ties} tie-flip(s)")), "{reason}");
    // the logit gap is part of the rule: with a gap of 0 nats none of those changes is a tie
    let wide = fx.flips_policy(
        "tight-gap.toml",
        &[("tie_max_logit_gap = 1.0", "tie_max_logit_gap = 0.0")],
    );
    let r = fx.run(&["--bundle", &near, "--gate", &wide]);
    assert_eq!(r.code, 1, "{}", r.stderr);
}

/// 12 confident flips to the oracle's top-2 at positions where the oracle's margin is at least 0.2
/// (the first `n` such positions).
fn twelve_flips(fx: &Fx, name: &str, n: usize) -> String {
    let mut at: Vec<(usize, usize)> = Vec::new();
    for (s, q) in fx.oracle.iter().enumerate().rev() {
        for (t, r) in q.logits.iter().enumerate() {
            if prob_margin(r) >= 0.2 && at.len() < n {
                at.push((s, t));
            }
        }
    }
    assert_eq!(at.len(), n);
    fx.argmax_capture(name, &move |s, t, r| {
        if at.contains(&(s, t)) {
            Some(ranked(r)[1])
        } else {
            None
        }
    })
}

// 3. The control is trusted blindly.
#[test]
fn a_control_must_earn_its_role() {
    let fx = Fx::new();
    let pol = fx.flips_only();
    let cand = twelve_flips(&fx, "cand.capture.safetensors", 12);
    let r = fx.run(&["--bundle", &cand, "--gate", &pol]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("12 confident flip(s)"), "{}", r.stderr);
    std::fs::remove_dir_all(fx.p("out")).unwrap(); // this test's own report
                                                   // the same path as control
    let r = fx.run(&["--bundle", &cand, "--gate", &pol, "--control", &cand]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("a candidate cannot be its own control"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    // a relabelled copy
    let copy = fx.s("fp16-control.capture.safetensors");
    let seqs: Vec<SeqData> = {
        let c = Capture::open(&cand).unwrap();
        (0..c.len())
            .map(|i| SeqData {
                tokens: c.seq(i).tokens,
                argmax: c.seq(i).argmax,
                rollout: c.seq(i).rollout,
                ..Default::default()
            })
            .collect()
    };
    write(Path::new(&copy), "fp16", "coreai", &seqs);
    let r = fx.run(&["--bundle", &cand, "--gate", &pol, "--control", &copy]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("fp16-control.capture.safetensors: control is identical to the candidate"),
        "{}",
        r.stderr
    );
    // a near copy (one more change): its own confident flips refuse it
    let near = twelve_flips(&fx, "near-copy.capture.safetensors", 13);
    let r = fx.run(&["--bundle", &cand, "--gate", &pol, "--control", &near]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "refused as control: 13 confident flip(s) of its own against the oracle > 1 allowed"
        ),
        "{}",
        r.stderr
    );
    assert!(!fx.p("out").exists(), "no report for a refused run");
    // a real control (HF's f16 run) is accepted, and attribution records what it chose
    let f16 = hf("f16").display().to_string();
    let r = fx.run(&["--bundle", &cand, "--gate", &pol, "--control", &f16]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let s = fx.summary();
    let flips = s["candidates"][0]["flips"].as_array().unwrap();
    assert!(flips
        .iter()
        .filter(|f| f["kind"] == "confident")
        .all(|f| f["control_token"].is_u64() && f["shared_with_control"] == false));
    assert!(
        fx.report().contains("introduced (control chose "),
        "{}",
        fx.report()
    );
}

// 4. `--oracle FILE` accepts any capture.
#[test]
fn the_oracle_must_prove_where_it_came_from() {
    let fx = Fx::new();
    let pol = fx.flips_only();
    let cand = twelve_flips(&fx, "cand.capture.safetensors", 12);
    let cache = fx.p("cache");
    let out = fx.s("out");
    let run = |oracle: &str, extra: &[&str]| {
        let mut a = vec![
            "run",
            "--oracle",
            oracle,
            "--bundle",
            cand.as_str(),
            "--gate",
            pol.as_str(),
            "--out",
            out.as_str(),
        ];
        a.extend_from_slice(extra);
        qgate(&a, &cache)
    };
    // the candidate as its own oracle, even with --trust-oracle
    let r = run(&cand, &["--trust-oracle"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("a capture cannot be its own oracle"),
        "{}",
        r.stderr
    );
    // a relabelled copy claiming to be HF's: the same data is refused too
    let fake = fx.s("fake-oracle.capture.safetensors");
    std::fs::copy(&cand, &fake).unwrap();
    let r = run(&fake, &["--trust-oracle"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // another bundle's capture (full logits, runtime coreai) is no oracle without --trust-oracle
    let bf16 = read(&hf("bf16"));
    let other: Vec<SeqData> = bf16
        .iter()
        .map(|q| logits_seq(&q.tokens, &q.logits, q.rollout.clone()))
        .collect();
    let other = write(
        &fx.p("other-bundle.capture.safetensors"),
        "int8",
        "coreai",
        &other,
    );
    let r = run(&other, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("is not a qgate or HF oracle capture (runtime `coreai`"),
        "{}",
        r.stderr
    );
    let r = run(&other, &["--trust-oracle"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    // a truncated oracle (HF's, its last rows dropped) would shrink the plan every candidate is judged on
    let short: Vec<SeqData> = fx
        .oracle
        .iter()
        .map(|q| {
            logits_seq(
                &q.tokens,
                &q.logits[..q.logits.len().min(2)],
                q.rollout.clone(),
            )
        })
        .collect();
    let short = write(
        &fx.p("short-oracle.capture.safetensors"),
        "hf-f32",
        "transformers-5.23.0",
        &short,
    );
    let r = run(&short, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("an oracle capture needs a row at every position"),
        "{}",
        r.stderr
    );
    assert!(std::fs::read_to_string(fx.p("out/report.md"))
        .unwrap()
        .contains("oracle provenance unverified"));
    // --model is no longer ignored: HF's capture records no weights hashes
    let hf32 = hf("f32").display().to_string();
    let m = model_dir().display().to_string();
    let r = run(&hf32, &["--model", &m]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("records no weights sha256") && r.stderr.contains(MODEL),
        "{}",
        r.stderr
    );
    // … and a broken config is refused
    let broken = fx.p("broken-model");
    std::fs::create_dir(&broken).unwrap();
    for e in std::fs::read_dir(model_dir()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    std::fs::write(broken.join("config.json"), "{\"model_type\": ").unwrap();
    let r = run(&hf32, &["--model", &broken.display().to_string()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("config.json"), "{}", r.stderr);
    // a qgate oracle capture is verified against --model's weights; another model's are refused
    let oc = fx.s("qgate-oracle.capture.safetensors");
    let plan = root().join("fixtures/plans/tiny.plan.safetensors");
    let _ = plan;
    let o = qgate(
        &[
            "oracle",
            "--model",
            &m,
            "--dtype",
            "f32",
            "--plan",
            &hf32,
            "--out",
            &oc,
            "--rollout",
            "4",
        ],
        &cache,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r = run(&oc, &["--model", &m]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(std::fs::read_to_string(fx.p("out/report.md"))
        .unwrap()
        .contains("weights sha256 verified against --model"));
    let other_model = root()
        .join("fixtures/models/dense-vl-tied")
        .display()
        .to_string();
    let r = run(&oc, &["--model", &other_model]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("computed from other weights than --model"),
        "{}",
        r.stderr
    );
}

// 5. Data loss.
#[test]
fn a_report_directory_holding_user_files_is_never_replaced() {
    let fx = Fx::new();
    let bf16 = hf("bf16").display().to_string();
    let r = fx.run(&["--bundle", &bf16]);
    assert!(r.code == 0 || r.code == 1, "{}", r.stderr);
    let s = fx.summary();
    assert_eq!(
        s["report_files"],
        serde_json::json!([
            "report.md",
            "positions.csv",
            "summary.json",
            "positions.svg"
        ])
    );
    // a second run replaces the directory holding only qgate's report
    let r = fx.run(&["--bundle", &bf16]);
    assert!(r.code == 0 || r.code == 1, "{}", r.stderr);
    // the user's notes and the very capture being gated, beside the report
    std::fs::write(fx.p("out/notes.md"), "my notes").unwrap();
    let gated = fx.p("out/candidate.capture.safetensors");
    std::fs::copy(hf("bf16"), &gated).unwrap();
    let m = model_dir().display().to_string();
    let o = qgate(
        &[
            "run",
            "--oracle",
            "f32",
            "--model",
            &m,
            "--bundle",
            &gated.display().to_string(),
            "--out",
            &fx.s("out"),
        ],
        &fx.p("cache"),
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("refusing to replace this directory: it holds 2 entries qgate did not write (candidate.capture.safetensors, notes.md)"),
        "{}",
        o.stderr
    );
    assert_eq!(
        std::fs::read_to_string(fx.p("out/notes.md")).unwrap(),
        "my notes"
    );
    assert!(gated.is_file() && fx.p("out/summary.json").is_file());
    // refused before any work: the oracle never ran, nothing was cached
    assert!(
        !fx.p("cache").exists() || std::fs::read_dir(fx.p("cache")).unwrap().next().is_none(),
        "the oracle ran before --out was checked"
    );
    // a report from before the manifest (four fixed names) is still replaceable; a sub-directory is not
    std::fs::remove_file(fx.p("out/notes.md")).unwrap();
    std::fs::remove_file(&gated).unwrap();
    let mut legacy = fx.summary();
    legacy.as_object_mut().unwrap().remove("report_files");
    std::fs::write(fx.p("out/summary.json"), legacy.to_string()).unwrap();
    let r = fx.run(&["--bundle", &bf16]);
    assert!(r.code == 0 || r.code == 1, "{}", r.stderr);
    std::fs::create_dir(fx.p("out/plots")).unwrap();
    let r = fx.run(&["--bundle", &bf16]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(fx.p("out/plots").is_dir());
    // capture outputs: an existing non-capture file is never replaced, nor an input
    let notes = fx.p("notes.txt");
    std::fs::write(&notes, "keep me").unwrap();
    let plan = root()
        .join("fixtures/plans/tiny.plan.safetensors")
        .display()
        .to_string();
    let o = qgate(
        &[
            "oracle",
            "--model",
            &m,
            "--dtype",
            "f32",
            "--plan",
            &plan,
            "--out",
            &notes.display().to_string(),
        ],
        &fx.p("cache"),
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("exists and is not a qgate capture"),
        "{}",
        o.stderr
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep me");
    let o = qgate(
        &[
            "oracle", "--model", &m, "--dtype", "f32", "--plan", &plan, "--out", &plan,
        ],
        &fx.p("cache"),
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("is also an input of this run"),
        "{}",
        o.stderr
    );
}

#[test]
fn rules_that_cannot_be_applied_fail_and_bad_policies_exit_2() {
    let fx = Fx::new();
    let bf16 = read(&hf("bf16"));
    // a candidate without a rollout does not skip rollout_prefix = "full"
    let no_roll: Vec<SeqData> = bf16
        .iter()
        .map(|q| logits_seq(&q.tokens, &q.logits, None))
        .collect();
    let no_roll = write(
        &fx.p("no-rollout.capture.safetensors"),
        "no-rollout",
        "coreai",
        &no_roll,
    );
    let r = fx.run(&["--bundle", &no_roll]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("rollout_prefix = full required by the policy but not applied: the candidate holds no rollout"),
        "{}",
        r.stderr
    );
    // sequences = [99]: exit 2 before anything is compared
    let pol = fx.policy("seq99.toml", &[("sequences = \"all\"", "sequences = [99]")]);
    let r = fx.run(&["--bundle", &no_roll, "--gate", &pol]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("sequences lists index 99, but the plan has 3 sequence(s)"),
        "{}",
        r.stderr
    );
    // exit 3: no candidate is reported as passing
    let f16 = hf("f16").display().to_string();
    let r = fx.run(&["--bundle", &f16, "--require-confident-prompt", "--json"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let s: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    common::assert_valid_summary(&s);
    assert_eq!(s["candidates"][0]["verdict"]["status"], "not_judged");
    assert!(s["ship"].is_null());
    assert_eq!(s["exit_code"], 3);
    // no rule reads as passed (or failed) for a candidate nothing was applied to
    let rules = s["candidates"][0]["verdict"]["rules"].as_array().unwrap();
    assert!(!rules.is_empty());
    assert!(rules.iter().all(|r| r[1] == "not_evaluated"), "{rules:?}");
}

// The false FAIL every user of the community's 8-token gates hit.
#[test]
fn a_shorter_rollout_without_eos_is_compared_over_the_common_length() {
    let fx = Fx::new();
    // HF's bf16 logits; the rollout: the oracle's first 8 steps (the community's 8-token gate)
    let bf16 = bf16_with_oracle_rollouts(&fx);
    let eight: Vec<SeqData> = bf16
        .iter()
        .map(|q| {
            let r = q.rollout.as_ref().unwrap();
            logits_seq(&q.tokens, &q.logits, Some(r[..r.len().min(8)].to_vec()))
        })
        .collect();
    let eight = write(
        &fx.p("eight.capture.safetensors"),
        "eight-steps",
        "coreai",
        &eight,
    );
    let pol = fx.policy(
        "no-kl.toml",
        &[("max_mean_kl = 0.1", ""), ("min_cosine = 0.98", "")],
    );
    let r = fx.run(&["--bundle", &eight, "--gate", &pol]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        fx.report().contains("compared over the common length"),
        "{}",
        fx.report()
    );
    // a real divergence still fails: step 2 of seq 2 replaced by a token the oracle ranks 100th
    let mut div: Vec<SeqData> = bf16
        .iter()
        .map(|q| {
            let r = q.rollout.as_ref().unwrap();
            logits_seq(&q.tokens, &q.logits, Some(r[..r.len().min(8)].to_vec()))
        })
        .collect();
    div[2].rollout.as_mut().unwrap()[0] = ranked(fx.oracle[2].logits.last().unwrap())[99] as i64;
    let div = write(&fx.p("div.capture.safetensors"), "div", "coreai", &div);
    let r = fx.run(&["--bundle", &div, "--gate", &pol]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("rollout of seq 2 diverges at step 0"),
        "{}",
        r.stderr
    );
}

#[test]
fn symptoms_decide_and_a_masked_vocabulary_tail_is_not_garbage() {
    let fx = Fx::new();
    // collapse: position 0 agrees, every later position flips; a lenient flip limit would let it pass
    let lenient = fx.flips_policy(
        "lenient.toml",
        &[(
            "max_introduced_confident_flips = 0",
            "max_introduced_confident_flips = 1000",
        )],
    );
    let collapsed = fx.argmax_capture("collapse.capture.safetensors", &|_, t, r| {
        (t > 0).then(|| ranked(r)[5])
    });
    let r = fx.run(&["--bundle", &collapsed, "--gate", &lenient]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("[collapse]"), "{}", r.stderr);
    let off = fx.flips_policy(
        "lenient-no-collapse.toml",
        &[
            (
                "max_introduced_confident_flips = 0",
                "max_introduced_confident_flips = 1000",
            ),
            ("fail_on_collapse = true", "fail_on_collapse = false"),
        ],
    );
    let r = fx.run(&["--bundle", &collapsed, "--gate", &off]);
    assert_eq!(r.code, 0, "the switch turns the rule off: {}", r.stderr);
    // degenerate repetition in the rollout (the oracle's does not repeat)
    let seqs: Vec<SeqData> = read(&hf("bf16"))
        .iter()
        .map(|q| logits_seq(&q.tokens, &q.logits, Some(vec![7; 10])))
        .collect();
    let rep = write(&fx.p("rep.capture.safetensors"), "rep", "coreai", &seqs);
    let norollout = fx.policy(
        "no-roll.toml",
        &[("rollout_prefix = \"full\"", "rollout_prefix = \"off\"")],
    );
    let r = fx.run(&["--bundle", &rep, "--gate", &norollout]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("degenerate repetition in seq 0")
            && r.stderr.contains("[degenerate_repetition]"),
        "{}",
        r.stderr
    );
    // a −inf-masked vocabulary tail (the ids above every oracle top-1) is not garbage; −inf inside the
    // vocabulary is
    let k = fx
        .oracle
        .iter()
        .flat_map(|q| q.logits.iter().map(|r| argmax(r)))
        .max()
        .unwrap()
        + 1;
    assert!(k <= V - 2, "the fixture leaves a tail to mask ({k})");
    let bf16 = bf16_with_oracle_rollouts(&fx);
    let masked = map_rows(&bf16, |_, _, r| {
        let mut r = r.to_vec();
        r[k..].fill(f32::NEG_INFINITY);
        r
    });
    let masked_p = write(
        &fx.p("masked.capture.safetensors"),
        "masked",
        "coreai",
        &masked,
    );
    // The random fixture model puts ~2 % of its probability on those ids (more than 0.1 % in 151 of the
    // 168 rows): masking them hides what the candidate cannot produce, so those rows are garbage (the
    // metrics over ids 0..k would not see it).
    let r = fx.run(&["--bundle", &masked_p]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("garbage logits: 0 NaN/Inf (or overflowing) row(s) and 0 constant row(s), ")
            && r.stderr.contains("row(s) with a −inf-masked vocabulary tail that hides more than 0.1% of the oracle's probability (first: ids 376.. masked"),
        "{}",
        r.stderr
    );
    // An oracle that, like a trained model on its padding ids, gives them negligible probability
    // (40 below the row's top logit): the masked tail is not garbage.
    let low = map_rows(&fx.oracle, |_, _, r| {
        let low = r[argmax(r)] - 40.0;
        let mut r = r.to_vec();
        r[k..].fill(low);
        r
    });
    let low = write(&fx.p("low-tail-oracle.st"), "oracle", "test", &low);
    let out = fx.s("out");
    let run_low = |cand: &str| {
        qgate(
            &[
                "run",
                "--oracle",
                &low,
                "--trust-oracle",
                "--out",
                &out,
                "--bundle",
                cand,
            ],
            &fx.p("cache"),
        )
    };
    let r = run_low(&masked_p);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s = fx.summary();
    assert_eq!(s["candidates"][0]["garbage"]["non_finite_rows"], 0);
    assert!(s["candidates"][0]["cosine"]["min"].as_f64().unwrap() > 0.98);
    let csv = std::fs::read_to_string(fx.p("out/positions.csv")).unwrap();
    assert!(csv.lines().filter(|l| l.ends_with(",masked_tail")).count() == 168);
    let mut holes = masked;
    holes[1].logits.as_mut().unwrap().2[5] = f32::NEG_INFINITY;
    let holes = write(
        &fx.p("holes.capture.safetensors"),
        "holes",
        "coreai",
        &holes,
    );
    let r = run_low(&holes);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("garbage logits: 1 NaN/Inf (or overflowing) row(s)"),
        "{}",
        r.stderr
    );
}

// The ship decision is by size, never by the order the candidates were given in; report.md drops into
// a model card (starts at `##`, no local paths, ids in code spans, provenance of every number).
#[test]
fn ship_by_size_only_and_a_report_fit_for_a_model_card() {
    let fx = Fx::new();
    let (f16, bf16) = (
        hf("f16").display().to_string(),
        hf("bf16").display().to_string(),
    );
    let pol = fx.policy(
        "no-roll.toml",
        &[("rollout_prefix = \"full\"", "rollout_prefix = \"off\"")],
    );
    let r = fx.run(&["--bundle", &f16, "--bundle", &bf16, "--gate", &pol]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("ship: not decided") && r.stderr.contains("hf-f16, hf-bf16"),
        "{}",
        r.stderr
    );
    assert!(fx.summary()["ship"].is_null());
    let r = fx.run(&[
        "--bundle",
        &f16,
        "--bundle",
        &bf16,
        "--gate",
        &pol,
        "--size",
        "hf-f16=2MB",
        "--size",
        "hf-bf16=1.5MB",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("ship: hf-bf16 (smallest size)"),
        "{}",
        r.stderr
    );
    // Equal smallest sizes: not decided (never the first one given), in either order.
    for (a, b) in [(&f16, &bf16), (&bf16, &f16)] {
        let r = fx.run(&[
            "--bundle",
            a,
            "--bundle",
            b,
            "--gate",
            &pol,
            "--size",
            "hf-f16=1.5MB",
            "--size",
            "hf-bf16=1.5MB",
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(
            r.stderr.contains("ship: not decided")
                && r.stderr.contains("same smallest size (1500000 bytes)"),
            "{}",
            r.stderr
        );
        assert!(fx.summary()["ship"].is_null());
    }
    let r = fx.run(&["--bundle", &f16, "--gate", &pol, "--size", "int9=1MB"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no candidate is labelled `int9` (labels: hf-f16)"),
        "{}",
        r.stderr
    );
    let md = fx.report();
    assert!(md.starts_with("## qgate report\n"), "{md}");
    assert!(!md.lines().any(|l| l.starts_with("# ")), "{md}");
    let tmp = fx.dir.path().display().to_string();
    let fixtures = root().display().to_string();
    assert!(
        !md.contains(&tmp) && !md.contains(&fixtures),
        "local paths in report.md"
    );
    let plan = qgate::oracle::plan_sha256(&Capture::open(hf("f32")).unwrap().plan());
    assert!(md.contains(&format!("- Plan: sha256 `{plan}`")), "{md}");
    assert!(
        md.contains(&format!("- qgate {} on 20", env!("CARGO_PKG_VERSION"))),
        "{md}"
    );
    // token ids never appear bare (GitHub would link `#123` to an issue)
    for l in md.lines().filter(|l| l.starts_with('|')) {
        let bare = l
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .any(|(_, part)| part.contains('#'));
        assert!(!bare, "bare #id outside a code span: {l}");
    }
}

// Inputs that cannot be gated together are refused before the oracle runs (it may take hours).
#[test]
fn captures_of_different_plans_are_refused_before_the_oracle_runs() {
    let fx = Fx::new();
    let f16 = hf("f16").display().to_string();
    let other = root()
        .join("fixtures/captures/stub-coreai.capture.safetensors")
        .display()
        .to_string();
    let m = model_dir().display().to_string();
    let out = fx.s("out");
    let r = qgate(
        &[
            "run", "--oracle", "f32", "--model", &m, "--bundle", &f16, "--bundle", &other, "--out",
            &out,
        ],
        &fx.p("cache"),
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("but the first candidate"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        !fx.p("cache").exists() || std::fs::read_dir(fx.p("cache")).unwrap().next().is_none(),
        "the oracle ran before the inputs were checked"
    );
    // a tokenizer that cannot be loaded, and a --junit inside the report directory: also before it
    let missing = fx.s("missing-tokenizer.json");
    let junit = fx.s("out/junit.xml");
    for extra in [
        ["--tokenizer", missing.as_str()],
        ["--junit", junit.as_str()],
    ] {
        let mut a = vec![
            "run", "--oracle", "f32", "--model", &m, "--bundle", &f16, "--out", &out,
        ];
        a.extend_from_slice(&extra);
        let r = qgate(&a, &fx.p("cache"));
        assert_eq!(r.code, 2, "{extra:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(
            !fx.p("cache").exists() || std::fs::read_dir(fx.p("cache")).unwrap().next().is_none(),
            "{extra:?}: the oracle ran before the inputs were checked"
        );
    }
}

// ---- A second review (2026-11-30): more ways a candidate reached PASS ----

/// The candidate's rollout of (sequence, oracle's rollout), or none.
type RolloutEdit = dyn Fn(usize, &[i64]) -> Option<Vec<i64>>;

// A rollout rule applied to some sequences only, or to none, or to the prefill's token alone, passed.
#[test]
fn the_rollout_rule_applies_to_every_counted_sequence_and_step() {
    let fx = Fx::new();
    let bf16 = bf16_with_oracle_rollouts(&fx);
    let pol = fx.policy(
        "no-kl.toml",
        &[("max_mean_kl = 0.1", ""), ("min_cosine = 0.98", "")],
    );
    let with_rollouts = |f: &RolloutEdit| -> Vec<SeqData> {
        bf16.iter()
            .enumerate()
            .map(|(s, q)| logits_seq(&q.tokens, &q.logits, f(s, q.rollout.as_ref().unwrap())))
            .collect()
    };
    // the rollouts that went wrong dropped: only seq 0's is kept
    let dropped = with_rollouts(&|s, r| (s == 0).then(|| r.to_vec()));
    let dropped = write(&fx.p("dropped.st"), "dropped", "coreai", &dropped);
    let r = fx.run(&["--bundle", &dropped, "--gate", &pol]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "not applied to seq 1: the candidate holds no rollout for it (2 counted sequence(s) not compared)"
        ),
        "{}",
        r.stderr
    );
    // one step each: the token the prefill chose, the decode path never run
    let one = with_rollouts(&|_, r| Some(r[..1].to_vec()));
    let one = write(&fx.p("one-step.st"), "one-step", "coreai", &one);
    let r = fx.run(&["--bundle", &one, "--gate", &pol]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("rollout of seq 0 holds 1 step(s) of the oracle's")
            && r.stderr.contains("decode path is not exercised"),
        "{}",
        r.stderr
    );
    // one sequence stopping early (an EOS the capture left out) while the others go on
    // (seq 1's oracle rollout is 5 steps: it stops with EOS; seq 2's runs 16)
    let early = with_rollouts(&|s, r| Some(if s == 2 { r[..5].to_vec() } else { r.to_vec() }));
    let early = write(&fx.p("early.st"), "early", "coreai", &early);
    let r = fx.run(&["--bundle", &early, "--gate", &pol]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("rollout of seq 2 stops after 5 step(s) where the oracle goes on"),
        "{}",
        r.stderr
    );
    // two steps are enough to be compared over the common length
    let two = with_rollouts(&|_, r| Some(r[..2].to_vec()));
    let two = write(&fx.p("two-step.st"), "two-step", "coreai", &two);
    let r = fx.run(&["--bundle", &two, "--gate", &pol]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // an oracle computed with `--rollout 0` (empty rollouts): nothing was compared
    let empty: Vec<SeqData> = fx
        .oracle
        .iter()
        .map(|q| logits_seq(&q.tokens, &q.logits, Some(Vec::new())))
        .collect();
    let empty = write(&fx.p("no-rollout-oracle.st"), "oracle", "test", &empty);
    let full = with_rollouts(&|_, r| Some(r.to_vec()));
    let full = write(&fx.p("full.st"), "full", "coreai", &full);
    let out = fx.s("out");
    let r = qgate(
        &[
            "run",
            "--oracle",
            &empty,
            "--trust-oracle",
            "--out",
            &out,
            "--bundle",
            &full,
            "--gate",
            &pol,
        ],
        &fx.p("cache"),
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("not applied to seq 0: the oracle's rollout is empty (an oracle computed with --rollout 0"),
        "{}",
        r.stderr
    );
}

// Finite logits near f32::MAX overflowed the comparison's lane sums: a row's KL became 0 and its cosine
// NaN, which no threshold caught (fail-open per row). Planted at every row: the oracle's top-1 at f32::MAX
// and two ids of the same kernel lane (±8, ±16 within the 64-wide block) at ±MAX/4. On this fixture the
// code before the fix still failed the candidate, by the cosine being "not computable" and by the one row
// whose sums did not overflow (mean KL ~5e37): no wrong PASS end to end, but for the wrong reasons. Now
// every such row is garbage, whatever the others do.
#[test]
fn overflowing_logits_are_garbage_not_a_pass() {
    let fx = Fx::new();
    let bf16 = bf16_with_oracle_rollouts(&fx);
    let seqs = map_rows(&bf16, |s, pos, r| {
        let t = argmax(&fx.oracle[s].logits[pos]);
        let mut r = r.to_vec();
        r[t] = f32::MAX;
        r[t ^ 8] = f32::MAX / 4.0;
        r[t ^ 16] = -f32::MAX / 4.0;
        r
    });
    let p = write(&fx.p("huge.st"), "huge", "coreai", &seqs);
    // the release policy, and one that gates on KL without a cosine floor (where KL 0 passed before)
    let kl_only = fx.policy("kl-only.toml", &[("min_cosine = 0.98", "")]);
    for extra in [vec!["--gate", kl_only.as_str()], vec![]] {
        let mut a = vec!["--bundle", p.as_str()];
        a.extend(extra);
        let r = fx.run(&a);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr
                .contains("garbage logits: 168 NaN/Inf (or overflowing) row(s)"),
            "{}",
            r.stderr
        );
        std::fs::remove_dir_all(fx.p("out")).unwrap(); // this test's own report
    }
}

// `positions = "last"` judged the candidate's own last row: a capture holding row 0 only was "covered".
#[test]
fn last_means_the_plans_last_position() {
    let fx = Fx::new();
    let bf16 = bf16_with_oracle_rollouts(&fx);
    let pol = fx.policy(
        "last.toml",
        &[("positions = \"all\"", "positions = \"last\"")],
    );
    let first = keep_rows(&bf16, |_, _| 1);
    let first = write(&fx.p("first-rows.st"), "first-rows", "coreai", &first);
    let r = fx.run(&["--bundle", &first, "--gate", &pol]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("coverage 1/3 = 33.3%")
            && r.stderr.contains("sequence(s) with no compared row: 1, 2"),
        "{}",
        r.stderr
    );
    // llm-runner's rows (all but the last of each sequence): uncovered, and the message says why
    let t1 = keep_rows(&bf16, |_, n| n - 1);
    let t1 = write(&fx.p("t-minus-1.st"), "t-minus-1", "llm-runner", &t1);
    let r = fx.run(&["--bundle", &t1, "--gate", &pol]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("llm-runner discards row T−1"),
        "{}",
        r.stderr
    );
    // every row: judged at the plan's last positions, passes
    let all = keep_rows(&bf16, |_, n| n);
    let all = write(&fx.p("all-rows.st"), "all-rows", "coreai", &all);
    let r = fx.run(&["--bundle", &all, "--gate", &pol]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(fx.summary()["candidates"][0]["coverage"]["compared"], 3);
}

// Coverage pooled over the plan let one sequence's long-context tail go unjudged (16 of 150 rows
// dropped: 152/168 = 90.5 % ≥ 90 %).
#[test]
fn one_sequences_tail_cannot_hide_in_the_pooled_coverage() {
    let fx = Fx::new();
    let bf16 = bf16_with_oracle_rollouts(&fx);
    let cut = keep_rows(&bf16, |s, n| if s == 2 { 134 } else { n });
    let cut = write(&fx.p("cut.st"), "cut", "coreai", &cut);
    let r = fx.run(&["--bundle", &cut]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("coverage of seq 2 is 134/150 = 89.3% < min_coverage 90.0%")
            && r.stderr.contains("[min_coverage]"),
        "{}",
        r.stderr
    );
    assert_eq!(
        fx.summary()["candidates"][0]["coverage"]["short_sequences"][0]["seq"],
        2
    );
}

// A control that is the candidate cast to another dtype (f16 where the candidate stored f32) was not
// "identical", and excused the candidate's confident flip.
#[test]
fn a_control_that_is_the_candidate_in_another_dtype_is_refused() {
    let fx = Fx::new();
    let pol = fx.flips_policy("flips-logits.toml", &[]);
    // HF's bf16 logits with one confident flip planted (the oracle's top-2 raised above its top-1)
    let bf16 = bf16_with_oracle_rollouts(&fx);
    let (fs, ft) = fx
        .oracle
        .iter()
        .enumerate()
        .rev()
        .find_map(|(s, q)| {
            q.logits
                .iter()
                .position(|r| prob_margin(r) >= 0.2)
                .map(|t| (s, t))
        })
        .unwrap();
    let flipped = map_rows(&bf16, |s, t, r| {
        let mut r = r.to_vec();
        if (s, t) == (fs, ft) {
            let o = ranked(&fx.oracle[s].logits[t]);
            r[o[1]] = r[o[0]] + 1.0;
        }
        r
    });
    let cand = flipped.clone();
    let cand = write(&fx.p("cand.st"), "int8", "coreai", &cand);
    let r = fx.run(&["--bundle", &cand, "--gate", &pol]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("1 confident flip(s)"), "{}", r.stderr);
    std::fs::remove_dir_all(fx.p("out")).unwrap(); // this test's own report
    let ctl: Vec<SeqData> = flipped
        .into_iter()
        .map(|q| SeqData {
            logits_kind: Some(FloatKind::F16),
            ..q
        })
        .collect();
    let ctl = write(&fx.p("f16-cast.st"), "fp16", "coreai", &ctl);
    let r = fx.run(&["--bundle", &cand, "--gate", &pol, "--control", &ctl]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("control is identical to the candidate"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    // HF's own f16 run as control: accepted, the flip stays the candidate's
    let f16 = hf("f16").display().to_string();
    let r = fx.run(&["--bundle", &cand, "--gate", &pol, "--control", &f16]);
    assert_eq!(r.code, 1, "{}", r.stderr);
}

// A label is text from a file (bundle metadata, capture label): one with `|` and a newline could forge a
// cell or a heading of the model card, and three captures labelled alike came out with two equal labels.
#[test]
fn labels_are_one_safe_line_and_unique() {
    let fx = Fx::new();
    let bf16 = bf16_with_oracle_rollouts(&fx);
    let seqs = keep_rows(&bf16, |_, n| n);
    let mut args: Vec<String> = Vec::new();
    for d in ["cpu", "gpu", "ane"] {
        std::fs::create_dir(fx.p(d)).unwrap();
        args.push("--bundle".into());
        args.push(write(
            &fx.p(&format!("{d}/int8hu.capture.safetensors")),
            "int8hu",
            "coreai",
            &seqs,
        ));
    }
    args.push("--bundle".into());
    args.push(write(
        &fx.p("forged.capture.safetensors"),
        "x | 1 B | **PASS** |\n## Verdict: PASS `",
        "coreai",
        &seqs,
    ));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = fx.run(&a);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s = fx.summary();
    let labels: Vec<String> = s["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap().to_string())
        .collect();
    let mut uniq = labels.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 4, "{labels:?}");
    assert!(
        labels
            .iter()
            .all(|l| !l.contains(['|', '\n', '`', '<', '>'])),
        "{labels:?}"
    );
    assert!(
        !fx.report()
            .lines()
            .any(|l| l.starts_with("## Verdict: PASS")),
        "{}",
        fx.report()
    );
}

// A plan token outside the model's vocabulary is refused before the model's weights are hashed or the
// oracle runs (`run --oracle <dtype> --model`).
#[test]
fn plan_ids_outside_the_models_vocabulary_are_refused_before_the_oracle() {
    let fx = Fx::new();
    let seqs = vec![SeqData {
        tokens: vec![1, 999],
        argmax: Some(vec![2, 3]),
        ..Default::default()
    }];
    let c = fx.p("oov.st");
    write_capture(&c, &CaptureMeta::new("oov", "coreai", "f32", 1000), &seqs).unwrap();
    let m = model_dir().display().to_string();
    let out = fx.s("out");
    let r = qgate(
        &[
            "run",
            "--oracle",
            "f32",
            "--model",
            &m,
            "--bundle",
            &c.display().to_string(),
            "--out",
            &out,
        ],
        &fx.p("cache"),
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "plan sequence 0, position 1: token id 999 is outside the model's vocabulary of 384"
        ),
        "{}",
        r.stderr
    );
    assert!(!fx.p("cache").exists() || std::fs::read_dir(fx.p("cache")).unwrap().next().is_none());
}

// The oracle cache reused any readable capture with the right name, plan and dtype: a file planted there
// (here HF's bf16 logits labelled as a qgate f32 oracle) became the oracle, reported as "computed by qgate
// from the model's weights".
#[test]
fn a_cached_oracle_is_reused_only_when_it_proves_to_be_one() {
    let fx = Fx::new();
    let m = model_dir().display().to_string();
    let bf16 = hf("f16").display().to_string();
    let out = fx.s("out");
    let args = [
        "run", "--oracle", "f32", "--model", &m, "--bundle", &bf16, "--out", &out,
    ];
    let first = qgate(&args, &fx.p("cache"));
    assert!(
        first.stderr.contains("running the f32 oracle"),
        "{}",
        first.stderr
    );
    let cached: Vec<PathBuf> = std::fs::read_dir(fx.p("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".capture.safetensors"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let r = qgate(&args, &fx.p("cache"));
    assert!(r.stderr.contains("reusing cached oracle"), "{}", r.stderr);
    let planted = keep_rows(&read(&hf("bf16")), |_, n| n);
    write_capture(
        &cached[0],
        &CaptureMeta::new("oracle-f32", "qgate-oracle", "f32", V),
        &planted,
    )
    .unwrap();
    let r = qgate(&args, &fx.p("cache"));
    assert!(
        r.stderr
            .contains("not a qgate oracle of these weights; recomputing"),
        "{}",
        r.stderr
    );
    assert_eq!(r.code, first.code, "{}", r.stderr);
}
