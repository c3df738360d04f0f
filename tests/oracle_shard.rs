//! `qgate oracle --shard i/N` + `qgate merge`: the merged capture is the unsharded run byte for byte, and
//! anything that is not all shards of one run is refused with one line (exit 2).
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
fn qgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qgate"))
}
fn plan() -> PathBuf {
    root().join("fixtures/plans/tiny.plan.safetensors")
}
fn model(name: &str) -> PathBuf {
    root().join("fixtures/models").join(name)
}

fn oracle(model: &Path, dtype: &str, shard: Option<&str>, out: &Path, extra: &[&str]) -> Output {
    let mut c = qgate();
    c.args(["oracle", "--model"])
        .arg(model)
        .args(["--dtype", dtype, "--rollout", "4", "--plan"])
        .arg(plan())
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("QGATE_PROGRESS_INTERVAL", "1000");
    if let Some(s) = shard {
        c.args(["--shard", s]);
    }
    c.output().unwrap()
}

fn ok(o: &Output) {
    assert_eq!(
        o.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn merge(parts: &[&Path], out: &Path) -> Output {
    qgate()
        .arg("merge")
        .args(parts)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn bad_input(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

/// Rewrite the `qgate.capture` metadata of a capture file in place.
fn edit_meta(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta_s = header["__metadata__"]["qgate.capture"]
        .as_str()
        .unwrap()
        .to_string();
    let mut meta: serde_json::Value = serde_json::from_str(&meta_s).unwrap();
    f(&mut meta);
    header["__metadata__"]["qgate.capture"] = serde_json::Value::String(meta.to_string());
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn merged_shards_equal_the_unsharded_run_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let m = model("dense-gva-untied");
    for (dtype, n) in [("f32", 2usize), ("bf16", 3)] {
        let whole = d.path().join(format!("whole.{dtype}.st"));
        ok(&oracle(&m, dtype, None, &whole, &[]));
        let parts: Vec<PathBuf> = (0..n)
            .map(|i| d.path().join(format!("part{i}of{n}.{dtype}.st")))
            .collect();
        // Shards in reverse order, to show the order given does not matter.
        for i in (0..n).rev() {
            ok(&oracle(
                &m,
                dtype,
                Some(&format!("{i}/{n}")),
                &parts[i],
                &[],
            ));
        }
        let merged = d.path().join(format!("merged.{dtype}.st"));
        let refs: Vec<&Path> = parts.iter().rev().map(PathBuf::as_path).collect();
        ok(&merge(&refs, &merged));
        let (a, b) = (
            std::fs::read(&whole).unwrap(),
            std::fs::read(&merged).unwrap(),
        );
        assert!(
            a == b,
            "{dtype}: merged capture differs from the unsharded run"
        );
        // And the merged capture is a qgate oracle that `run` accepts against its model.
        let cand = root().join(format!(
            "fixtures/hf/dense-gva-untied.{dtype}.capture.safetensors"
        ));
        let o = qgate()
            .args(["run", "--bundle"])
            .arg(&cand)
            .arg("--oracle")
            .arg(&merged)
            .arg("--model")
            .arg(&m)
            .arg("--out")
            .arg(d.path().join(format!("report-{dtype}")))
            .output()
            .unwrap();
        assert!(
            matches!(o.status.code(), Some(0) | Some(1)),
            "run on the merged oracle: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn a_streamed_shard_merges_with_an_in_memory_one_to_the_same_numbers() {
    let d = tempfile::tempdir().unwrap();
    let m = model("moe-experts");
    let whole = d.path().join("whole.st");
    ok(&oracle(&m, "f32", None, &whole, &["--no-stream"]));
    let (p0, p1) = (d.path().join("p0.st"), d.path().join("p1.st"));
    ok(&oracle(&m, "f32", Some("0/2"), &p0, &["--stream"]));
    ok(&oracle(&m, "f32", Some("1/2"), &p1, &["--no-stream"]));
    let merged = d.path().join("merged.st");
    ok(&merge(&[&p0, &p1], &merged));
    let a = qgate::capture::Capture::open(&whole).unwrap();
    let b = qgate::capture::Capture::open(&merged).unwrap();
    assert_eq!(a.len(), b.len());
    for i in 0..a.len() {
        let (x, y) = (a.seq(i), b.seq(i));
        assert_eq!(x.tokens, y.tokens);
        assert!(
            x.logits.unwrap().bytes() == y.logits.unwrap().bytes(),
            "seq {i} logits differ"
        );
        assert_eq!(x.rollout, y.rollout);
        assert_eq!(x.rollout_margin, y.rollout_margin);
    }
    // The mixed execution modes are recorded, not hidden.
    assert_eq!(b.meta.extra["execution"], "streamed,in-memory");
}

#[test]
fn a_partial_capture_is_never_an_oracle_a_candidate_or_a_control() {
    let d = tempfile::tempdir().unwrap();
    let m = model("dense-gva-untied");
    let p0 = d.path().join("p0.st");
    ok(&oracle(&m, "f32", Some("0/2"), &p0, &[]));
    let cand = root().join("fixtures/hf/dense-gva-untied.f32.capture.safetensors");
    for trust in [false, true] {
        let mut c = qgate();
        c.args(["run", "--bundle"])
            .arg(&cand)
            .arg("--oracle")
            .arg(&p0)
            .arg("--out")
            .arg(d.path().join("r"));
        if trust {
            c.arg("--trust-oracle");
        }
        bad_input(&c.output().unwrap(), &["shard 0/2", "qgate merge"]);
    }
    let o = qgate()
        .args(["run", "--bundle"])
        .arg(&p0)
        .args(["--oracle", "f32", "--model"])
        .arg(&m)
        .arg("--out")
        .arg(d.path().join("r2"))
        .output()
        .unwrap();
    bad_input(&o, &["shard 0/2", "candidate", "qgate merge"]);
    assert!(!d.path().join("r").exists() && !d.path().join("r2").exists());
}

#[test]
fn merge_refuses_what_is_not_all_shards_of_one_run() {
    let d = tempfile::tempdir().unwrap();
    let m = model("dense-gva-untied");
    let p = |n: &str| d.path().join(n);
    ok(&oracle(&m, "f32", Some("0/2"), &p("a0"), &[]));
    ok(&oracle(&m, "f32", Some("1/2"), &p("a1"), &[]));
    ok(&oracle(&m, "bf16", Some("1/2"), &p("b1"), &[]));
    ok(&oracle(
        &model("dense-vl-tied"),
        "f32",
        Some("1/2"),
        &p("v1"),
        &[],
    ));
    ok(&oracle(&m, "f32", Some("1/3"), &p("t1"), &[]));
    let out = p("merged.st");

    bad_input(&merge(&[&p("a0")], &out), &["shard(s) 1/2 missing"]);
    bad_input(&merge(&[&p("a0"), &p("a0")], &out), &["shard 0/2 again"]);
    bad_input(&merge(&[&p("a0"), &p("b1")], &out), &["dtype"]);
    bad_input(&merge(&[&p("a0"), &p("v1")], &out), &["weights hashes"]);
    bad_input(
        &merge(&[&p("a0"), &p("t1")], &out),
        &["not parts of one run"],
    );
    let whole = p("whole.st");
    ok(&oracle(&m, "f32", None, &whole, &[]));
    bad_input(
        &merge(&[&p("a0"), &whole], &out),
        &["not a qgate oracle shard"],
    );
    bad_input(
        &merge(&[&p("a0"), &p("a1")], &p("a1")),
        &["is also an input"],
    );

    // Edited metadata: another plan's hash, a wrong stride, a wrong own-tokens hash.
    std::fs::copy(p("a1"), p("e1")).unwrap();
    edit_meta(&p("e1"), |m| {
        m["shard"]["plan_sha256"] = "0".repeat(64).into()
    });
    bad_input(
        &merge(&[&p("a0"), &p("e1")], &out),
        &["not parts of one run"],
    );
    std::fs::copy(p("a1"), p("e2")).unwrap();
    edit_meta(&p("e2"), |m| {
        m["shard"]["sequences"] = serde_json::json!([2])
    });
    bad_input(&merge(&[&p("a0"), &p("e2")], &out), &["not every 2th"]);
    std::fs::copy(p("a1"), p("e3")).unwrap();
    edit_meta(&p("e3"), |m| m["plan_sha256"] = "1".repeat(64).into());
    bad_input(
        &merge(&[&p("a0"), &p("e3")], &out),
        &["does not match its own tokens"],
    );
    // Both shards relabelled to claim another plan: the tokens do not hash to it.
    std::fs::copy(p("a0"), p("f0")).unwrap();
    edit_meta(&p("f0"), |m| {
        m["shard"]["plan_sha256"] = "0".repeat(64).into()
    });
    bad_input(&merge(&[&p("f0"), &p("e1")], &out), &["hash to plan"]);
    // A hash that is not hex (its first 12 bytes end inside a character: the message must not panic).
    std::fs::copy(p("a1"), p("e4")).unwrap();
    edit_meta(&p("e4"), |m| m["shard"]["plan_sha256"] = "aéééééé".into());
    bad_input(&merge(&[&p("a0"), &p("e4")], &out), &["not a SHA-256"]);
    // A shard claiming a run of 10^12 shards over 10^12 sequences (consistent with the one sequence it
    // holds): refused as incomplete without allocating anything per shard or per sequence.
    ok(&oracle(&m, "f32", Some("0/3"), &p("s0"), &[]));
    edit_meta(&p("s0"), |m| {
        m["shard"]["count"] = 1_000_000_000_000u64.into();
        m["shard"]["plan_sequences"] = 1_000_000_000_000u64.into();
    });
    bad_input(
        &merge(&[&p("s0")], &out),
        &["shard(s) 1/1000000000000, 2/1000000000000", "in all)"],
    );
    // More sequences listed than the stride allows: refused before any comparison of lists.
    std::fs::copy(p("a1"), p("e5")).unwrap();
    edit_meta(&p("e5"), |m| {
        m["shard"]["plan_sequences"] = 1_000_000_000_000u64.into()
    });
    bad_input(&merge(&[&p("a0"), &p("e5")], &out), &["never writes that"]);
    assert!(!out.exists(), "no output after a refused merge");
}

#[test]
fn shard_specs_are_checked_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let m = model("dense-gva-untied");
    let out = d.path().join("x.st");
    for bad in ["3/3", "1", "a/2", "0/0", "2/x"] {
        bad_input(
            &oracle(&m, "f32", Some(bad), &out, &[]),
            &["--shard", "i/N"],
        );
    }
    // The tiny plan has 3 sequences: a 4th shard would compute nothing.
    bad_input(
        &oracle(&m, "f32", Some("3/4"), &out, &[]),
        &["would compute nothing"],
    );
    // Even the shards that hold a sequence: a run of more shards than sequences can never be merged.
    for bad in ["0/4", "0/1000000000000"] {
        bad_input(
            &oracle(&m, "f32", Some(bad), &out, &[]),
            &["would compute nothing", "at most 3 shards"],
        );
    }
    bad_input(
        &oracle(&m, "f32", None, &out, &["--device", "cpu,cpu"]),
        &["several devices are for GPUs"],
    );
    assert!(!out.exists());
}
