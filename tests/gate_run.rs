//! `qgate run` end to end on synthesised captures with planted flips, garbage rows and craters.
mod common;

use qgate::capture::{write_capture, CaptureMeta, FloatKind, SeqData};
use std::path::{Path, PathBuf};
use std::process::Command;

const V: usize = 64;
/// (length, tie positions) per sequence; every other position is confident.
const SEQS: [(usize, &[usize]); 2] = [(12, &[3, 8]), (10, &[2])];

fn tokens(s: usize, t: usize) -> Vec<i64> {
    (0..t).map(|i| ((s * 7 + i * 3) % V) as i64).collect()
}

fn top1(s: usize, t: usize) -> usize {
    (s * 13 + t * 5 + 1) % V
}
fn top2(s: usize, t: usize) -> usize {
    (top1(s, t) + 17) % V
}

/// Oracle row: a spike at top1, top2 slightly (tie) or far (confident) below, the rest low.
fn oracle_row(s: usize, t: usize) -> Vec<f32> {
    let mut r: Vec<f32> = (0..V)
        .map(|j| -3.0 + ((j * 31 + t * 7 + s) % 17) as f32 / 17.0)
        .collect();
    let tie = SEQS[s].1.contains(&t);
    r[top1(s, t)] = 5.0;
    r[top2(s, t)] = if tie { 4.95 } else { 2.0 };
    r
}

fn jitter(r: &mut [f32], seed: usize) {
    for (j, x) in r.iter_mut().enumerate() {
        *x += (((j * 7919 + seed * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.002;
    }
}

type Rows = Box<dyn Fn(usize, usize) -> Vec<f32>>;
type Rollout = Box<dyn Fn(usize) -> Vec<i64>>;

fn oracle_rollout(s: usize) -> Vec<i64> {
    (0..6).map(|i| (10 + s + i) as i64).collect()
}

fn write(
    dir: &Path,
    name: &str,
    label: &str,
    kind: FloatKind,
    rows: &dyn Fn(usize, usize) -> Vec<f32>,
    rollout: Option<&dyn Fn(usize) -> Vec<i64>>,
) -> PathBuf {
    let seqs: Vec<SeqData> = SEQS
        .iter()
        .enumerate()
        .map(|(s, &(t, _))| SeqData {
            tokens: tokens(s, t),
            logits: Some((t, V, (0..t).flat_map(|p| rows(s, p)).collect())),
            logits_kind: Some(kind),
            rollout: rollout.map(|f| f(s)),
            ..Default::default()
        })
        .collect();
    let p = dir.join(name);
    let dtype = if kind == FloatKind::F32 { "f32" } else { "f16" };
    write_capture(&p, &CaptureMeta::new(label, "test", dtype, V), &seqs).unwrap();
    p
}

fn good(s: usize, t: usize) -> Vec<f32> {
    let mut r = oracle_row(s, t);
    jitter(&mut r, s * 100 + t);
    r
}

fn swap(mut r: Vec<f32>, a: usize, b: usize) -> Vec<f32> {
    r.swap(a, b);
    r
}

/// Candidate with confident flips at (0,5) and (1,4), tie-flips at (0,3) and (0,8).
fn flips(s: usize, t: usize) -> Vec<f32> {
    let r = good(s, t);
    if [(0, 5), (1, 4), (0, 3), (0, 8)].contains(&(s, t)) {
        swap(r, top1(s, t), top2(s, t))
    } else {
        r
    }
}

/// Control: the same flip at (0,5); at (1,4) it flips to a different token.
fn control(s: usize, t: usize) -> Vec<f32> {
    let mut r = good(s, t);
    if (s, t) == (0, 5) {
        r = swap(r, top1(s, t), top2(s, t));
    }
    if (s, t) == (1, 4) {
        r[(top1(s, t) + 1) % V] = 9.0;
    }
    r
}

struct Fx {
    dir: tempfile::TempDir,
}

impl Fx {
    fn new() -> Fx {
        let fx = Fx {
            dir: tempfile::tempdir().unwrap(),
        };
        let d = fx.dir.path();
        write(
            d,
            "oracle.capture.safetensors",
            "oracle-f32",
            FloatKind::F32,
            &oracle_row,
            Some(&oracle_rollout),
        );
        let cands: Vec<(&str, Rows, Option<Rollout>)> = vec![
            ("good-int8", Box::new(good), Some(Box::new(oracle_rollout))),
            ("flips-int4", Box::new(flips), None),
            ("control-fp16", Box::new(control), None),
            (
                "nan",
                Box::new(|s, t| {
                    let mut r = good(s, t);
                    if (s, t) == (1, 3) {
                        r[5] = f32::NAN;
                    }
                    r
                }),
                None,
            ),
            (
                "constant",
                Box::new(|s, t| {
                    if (s, t) == (0, 7) {
                        vec![0.5; V]
                    } else {
                        good(s, t)
                    }
                }),
                None,
            ),
            (
                "crater",
                Box::new(|s, t| {
                    let mut r = good(s, t);
                    if (s, t) == (0, 6) {
                        let k = top1(s, t);
                        for (j, x) in r.iter_mut().enumerate() {
                            if j != k {
                                *x += ((j * 37 % 29) as f32 / 29.0 - 0.5) * 3.0;
                            }
                        }
                    }
                    r
                }),
                None,
            ),
            (
                "rollout-diverges",
                Box::new(good),
                Some(Box::new(|s| {
                    let mut r = oracle_rollout(s);
                    if s == 1 {
                        r[2] = 63; // a real token (ids must lie in the vocabulary of 64)
                    }
                    r
                })),
            ),
        ];
        for (label, rows, rollout) in &cands {
            write(
                d,
                &format!("{label}.capture.safetensors"),
                label,
                FloatKind::F16,
                rows,
                rollout.as_deref(),
            );
        }
        fx
    }
    fn p(&self, name: &str) -> String {
        self.dir
            .path()
            .join(format!("{name}.capture.safetensors"))
            .display()
            .to_string()
    }
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.dir.path().join("out");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qgate"));
        // the synthetic oracle is no qgate or HF capture: accepted only with --trust-oracle
        cmd.arg("run")
            .arg("--oracle")
            .arg(self.p("oracle"))
            .arg("--trust-oracle")
            .arg("--out")
            .arg(&out);
        for a in args {
            cmd.arg(a);
        }
        let o = cmd.output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    }
    fn summary(&self) -> serde_json::Value {
        let t = std::fs::read_to_string(self.dir.path().join("out/summary.json")).unwrap();
        let v = serde_json::from_str(&t).unwrap();
        common::assert_valid_summary(&v);
        v
    }
    fn report(&self) -> String {
        let t = std::fs::read_to_string(self.dir.path().join("out/report.md")).unwrap();
        let date = self.summary()["date"].as_str().unwrap().to_string();
        t.replace(&self.dir.path().display().to_string(), "<tmp>")
            .replace(&format!(" on {date} (UTC)"), " on <date> (UTC)")
    }
}

#[test]
fn planted_counts_control_attribution_and_report_snapshot() {
    let fx = Fx::new();
    // the synthetic control has 2 confident flips of its own in 22 positions: more than the default
    // 1 % (at least 1) allows, so it is refused …
    let (code, _, err) = fx.run(&[
        "--bundle",
        &fx.p("flips-int4"),
        "--control",
        &fx.p("control-fp16"),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("refused as control: 2 confident flip(s)"),
        "{err}"
    );
    // … and accepted by a policy that allows 2
    let pol = fx.dir.path().join("control-2.toml");
    std::fs::write(
        &pol,
        qgate::gate::policy::DEFAULT_POLICY.replace(
            "max_control_confident_flips = \"1%\"",
            "max_control_confident_flips = 2",
        ),
    )
    .unwrap();
    let (code, _, err) = fx.run(&[
        "--bundle",
        &fx.p("flips-int4"),
        "--bundle",
        &fx.p("good-int8"),
        "--control",
        &fx.p("control-fp16"),
        "--gate",
        &pol.display().to_string(),
    ]);
    assert_eq!(code, 1, "{err}");
    let s = fx.summary();
    assert_eq!(s["schema"], "qgate-report/1");
    let c = &s["candidates"][0];
    assert_eq!(c["label"], "flips-int4");
    assert_eq!(c["positions_compared"], 22);
    assert_eq!(c["confident_flips"], 2);
    assert_eq!(c["tie_flips"], 2);
    assert_eq!(c["shared_with_control"], 1);
    assert_eq!(c["introduced_confident_flips"], 1);
    assert_eq!(c["exact"], 18);
    assert_eq!(
        c["verdict"]["failed_rule"],
        "max_introduced_confident_flips"
    );
    let g = &s["candidates"][1];
    assert_eq!(g["confident_flips"], 0);
    assert_eq!(g["tie_flips"], 0);
    assert_eq!(g["verdict"]["status"], "pass");
    assert_eq!(g["rollout"]["sequences_exact"], 2);
    assert_eq!(s["candidates"][2]["role"], "control");
    assert_eq!(s["ship"], "good-int8");
    assert_eq!(s["prompt"]["below_floor"], 3);
    assert!(
        err.contains(
            "FAIL: flips-int4: 1 introduced confident flip(s) > 0 allowed (first at seq 1 pos 4"
        ),
        "{err}"
    );
    for f in ["positions.csv", "positions.svg", "report.md"] {
        assert!(fx.dir.path().join("out").join(f).is_file(), "{f}");
    }
    let csv = std::fs::read_to_string(fx.dir.path().join("out/positions.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * 22);
    assert_eq!(
        csv.lines()
            .filter(|l| l.starts_with("flips-int4,") && l.contains(",confident,"))
            .count(),
        2
    );
    insta::assert_snapshot!("report_flips_with_control", fx.report());
}

#[test]
fn good_candidate_passes_and_without_control_all_confident_flips_count() {
    let fx = Fx::new();
    let (code, out, err) = fx.run(&["--bundle", &fx.p("good-int8")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("PASS"));
    let (code, _, _) = fx.run(&["--bundle", &fx.p("flips-int4")]);
    assert_eq!(code, 1);
    assert_eq!(
        fx.summary()["candidates"][0]["introduced_confident_flips"],
        2
    );
    // a floor above every margin does not make far tokens ties: the planted swaps at confident
    // positions put the oracle's top-2 3 nats below its top-1 (> tie_max_logit_gap), so they stay
    // confident; only the two 0.05-nat swaps are ties
    let (code, _, err) = fx.run(&["--bundle", &fx.p("flips-int4"), "--margin-floor", "0.95"]);
    assert_eq!(code, 1, "{err}");
    let s = fx.summary();
    assert_eq!(s["candidates"][0]["tie_flips"], 2);
    assert_eq!(s["candidates"][0]["confident_flips"], 2);
    assert_eq!(
        s["candidates"][0]["verdict"]["failed_rule"],
        "max_introduced_confident_flips"
    );
    // prompt validation: three oracle positions are ties
    let (code, _, err) = fx.run(&["--bundle", &fx.p("good-int8"), "--require-confident-prompt"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("PROMPT REJECTED: 3 of 22"), "{err}");
}

#[test]
fn garbage_rows_craters_and_rollouts_fail_by_name() {
    let fx = Fx::new();
    let (code, _, err) = fx.run(&["--bundle", &fx.p("nan")]);
    assert_eq!(code, 1);
    assert!(err.contains("garbage logits: 1 NaN/Inf (or overflowing) row(s) and 0 constant row(s) (first: NaN/Inf at seq 1 pos 3)"), "{err}");
    let (code, _, err) = fx.run(&["--bundle", &fx.p("constant")]);
    assert_eq!(code, 1);
    assert!(err.contains("first: constant at seq 0 pos 7"), "{err}");
    let (code, _, err) = fx.run(&["--bundle", &fx.p("crater")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("min cosine") && err.contains("at seq 0 pos 6"),
        "{err}"
    );
    let s = fx.summary();
    let sy = &s["candidates"][0]["symptoms"];
    assert_eq!(sy.as_array().unwrap().len(), 1, "{sy}");
    assert_eq!(sy[0]["kind"], "cosine_crater");
    assert_eq!(sy[0]["pos"], 6);
    let (code, _, err) = fx.run(&["--bundle", &fx.p("rollout-diverges")]);
    assert_eq!(code, 1);
    assert!(err.contains("rollout of seq 1 diverges at step 2 (oracle margin unknown): exact prefix 2 < required 6"), "{err}");
}

fn write_partial(dir: &Path, name: &str, f: &dyn Fn(usize, usize, &[f32]) -> SeqData) -> String {
    let seqs: Vec<SeqData> = SEQS
        .iter()
        .enumerate()
        .map(|(s, &(t, _))| {
            let rows: Vec<f32> = (0..t).flat_map(|p| good(s, p)).collect();
            f(s, t, &rows)
        })
        .collect();
    let p = dir.join(name);
    write_capture(&p, &CaptureMeta::new(name, "test", "f16", V), &seqs).unwrap();
    p.display().to_string()
}

#[test]
fn top_k_and_argmax_candidates_report_what_they_can_and_mismatches_exit_2() {
    let fx = Fx::new();
    let d = fx.dir.path();
    let topk = write_partial(d, "topk.capture.safetensors", &|s, t, rows| {
        let mut ids = Vec::new();
        let mut lg = Vec::new();
        for p in 0..t {
            let r = &rows[p * V..(p + 1) * V];
            let mut idx: Vec<usize> = (0..V).collect();
            idx.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
            // the top-k entries are stored in scrambled order: the gate must sort them
            for &j in idx[..10].iter().rev() {
                ids.push(j as i64);
                lg.push(r[j]);
            }
        }
        SeqData {
            tokens: tokens(s, t),
            top: Some((t, 10, ids, lg)),
            ..Default::default()
        }
    });
    // argmax-only, rows for all but the last position, with one planted confident flip at (0, 5)
    let argmax = write_partial(d, "argmax.capture.safetensors", &|s, t, _| SeqData {
        tokens: tokens(s, t),
        argmax: Some(
            (0..t - 1)
                .map(|p| {
                    if (s, p) == (0, 5) {
                        top2(s, p) as i64
                    } else {
                        top1(s, p) as i64
                    }
                })
                .collect(),
        ),
        ..Default::default()
    });
    // release policy: cosine / KL are required but not computable
    let (code, _, err) = fx.run(&["--bundle", &topk]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "min cosine required by the policy (0.98) but not computable from a top_k capture"
        ),
        "{err}"
    );
    let flips_only = d.join("flips-only.toml");
    // (no rollouts in these captures: a rollout rule that cannot be applied would fail them)
    let pol = qgate::gate::policy::DEFAULT_POLICY
        .replace("min_cosine = 0.98", "")
        .replace("max_mean_kl = 0.1", "")
        .replace("rollout_prefix = \"full\"", "rollout_prefix = \"off\"");
    std::fs::write(&flips_only, pol).unwrap();
    let g = flips_only.display().to_string();
    let (code, _, err) = fx.run(&["--bundle", &topk, "--bundle", &argmax, "--gate", &g]);
    assert_eq!(code, 1, "{err}");
    let s = fx.summary();
    let (t, a) = (&s["candidates"][0], &s["candidates"][1]);
    assert_eq!(t["verdict"]["status"], "pass");
    assert_eq!(t["exact"], 22);
    assert!(t["kl"].is_null() && t["cosine"].is_null() && t["delta_p"].is_null());
    // computed from the stored top-10 (the synthetic rows have ties below the top-2, so not exactly 10)
    assert!(t["top10_overlap_mean"].as_f64().unwrap() > 9.0);
    assert_eq!(
        t["not_computed"],
        serde_json::json!(["cosine", "kl", "delta_p"])
    );
    assert_eq!(a["positions_compared"], 20);
    assert_eq!(a["positions_not_compared"], 2);
    assert_eq!(a["confident_flips"], 1);
    assert_eq!(
        a["verdict"]["failed_rule"],
        "max_introduced_confident_flips"
    );
    assert!(a["top10_overlap_mean"].is_null());
    let md = fx.report();
    assert!(
        md.contains("n/a — not computable from top-k capture"),
        "{md}"
    );
    assert!(
        md.contains("n/a — not computable from argmax-only capture"),
        "{md}"
    );

    // mismatched tokens and vocabularies: exit 2, first difference named, no report written
    std::fs::remove_dir_all(d.join("out")).unwrap();
    let bad_tok = write_partial(d, "badtok.capture.safetensors", &|s, t, rows| {
        let mut tk = tokens(s, t);
        if s == 1 {
            tk[4] += 1;
        }
        SeqData {
            tokens: tk,
            logits: Some((t, V, rows.to_vec())),
            ..Default::default()
        }
    });
    let (code, _, err) = fx.run(&["--bundle", &bad_tok]);
    assert_eq!(code, 2);
    assert!(err.contains("first at sequence 1 position 4"), "{err}");
    assert!(!d.join("out").exists());
    let wide = d.join("wide.capture.safetensors");
    let seqs: Vec<SeqData> = SEQS
        .iter()
        .enumerate()
        .map(|(s, &(t, _))| SeqData {
            tokens: tokens(s, t),
            logits: Some((t, V + 1, vec![0.0; t * (V + 1)])),
            ..Default::default()
        })
        .collect();
    write_capture(
        &wide,
        &CaptureMeta::new("wide", "test", "f16", V + 1),
        &seqs,
    )
    .unwrap();
    let (code, _, err) = fx.run(&["--bundle", &wide.display().to_string()]);
    assert_eq!(code, 2);
    assert!(err.contains("vocab size 65 but the oracle"), "{err}");
    let (code, _, err) = fx.run(&["--bundle", &topk, "--margin-space", "logit"]);
    assert_eq!(code, 2);
    assert!(err.contains("pass --margin-floor as well"), "{err}");
}

#[test]
fn bundle_directory_gives_name_size_and_mode() {
    let fx = Fx::new();
    let b = fx.dir.path().join("qwen3_5_0_8b_decode_int8hu");
    std::fs::create_dir(&b).unwrap();
    std::fs::write(
        b.join("metadata.json"),
        r#"{"metadata_version":"0.2","kind":"llm","name":"qwen3_5_0_8b_decode_int8hu"}"#,
    )
    .unwrap();
    std::fs::write(b.join("model.aimodel"), vec![0u8; 1234]).unwrap();
    std::fs::copy(fx.p("good-int8"), b.join("plan.capture.safetensors")).unwrap();
    let (code, _, err) = fx.run(&["--bundle", &b.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    let c = &fx.summary()["candidates"][0];
    assert_eq!(c["label"], "qwen3_5_0_8b_decode_int8hu");
    assert_eq!(c["size_bytes"], 1234);
    assert_eq!(c["mode"], "int8hu");
    // a --size that contradicts the measured size, or names a label twice, is refused
    let b_s = b.display().to_string();
    for extra in [
        vec!["--size", "qwen3_5_0_8b_decode_int8hu=1MB"],
        vec![
            "--size",
            "qwen3_5_0_8b_decode_int8hu=1234",
            "--size",
            "qwen3_5_0_8b_decode_int8hu=1234",
        ],
    ] {
        let mut a = vec!["--bundle", b_s.as_str()];
        a.extend(extra);
        let (code, _, err) = fx.run(&a);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("already has a size of 1234 bytes") || err.contains("more than once"),
            "{err}"
        );
    }
    // the asset as a link to the real file (an HF-cache layout): the target's size, not the link's
    #[cfg(unix)]
    {
        let l = fx.dir.path().join("qwen3_5_0_8b_decode_int4lin");
        std::fs::create_dir(&l).unwrap();
        std::fs::copy(b.join("metadata.json"), l.join("metadata.json")).unwrap();
        let blob = fx.dir.path().join("blob");
        std::fs::write(&blob, vec![0u8; 5000]).unwrap();
        std::os::unix::fs::symlink(&blob, l.join("model.aimodel")).unwrap();
        std::fs::copy(fx.p("good-int8"), l.join("plan.capture.safetensors")).unwrap();
        let (code, _, err) = fx.run(&["--bundle", &l.display().to_string()]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(fx.summary()["candidates"][0]["size_bytes"], 5000);
    }
    let empty = fx.dir.path().join("empty-bundle");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("metadata.json"), "{}").unwrap();
    let (code, _, err) = fx.run(&["--bundle", &empty.display().to_string()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bundle holds no *.capture.safetensors"),
        "{err}"
    );
}
