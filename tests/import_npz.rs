//! `qgate import --from npz`: numpy archives and bare `.npy` logits, written here with `ndarray-npy`
//! (plus an fp16 element type, since numpy's `<f2` is what fp16 runtimes dump).
use half::f16;
use ndarray::{Array, Array1, Array2, ArrayD, IxDyn};
use ndarray_npy::{NpzWriter, WritableElement, WriteDataError, WriteNpyExt};
use py_literal::Value as PyValue;
use qgate::capture::{write_capture, Capture, CaptureMeta, FloatKind, SeqData};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Command;

/// numpy float16 (`<f2`).
#[derive(Clone, Copy)]
struct H(f16);
impl WritableElement for H {
    fn type_descriptor() -> PyValue {
        PyValue::String("<f2".into())
    }
    fn write<W: Write>(&self, mut w: W) -> Result<(), WriteDataError> {
        w.write_all(&self.0.to_le_bytes())?;
        Ok(())
    }
    fn write_slice<W: Write>(s: &[Self], mut w: W) -> Result<(), WriteDataError> {
        for x in s {
            w.write_all(&x.0.to_le_bytes())?;
        }
        Ok(())
    }
}

const V: usize = 64;

/// Logits with every kind of fp16 value worth checking: signed zero, subnormals, the max, infinities.
fn logit(seq: usize, t: usize, v: usize) -> f16 {
    match (t + v + seq) % 11 {
        0 => f16::NEG_ZERO,
        1 => f16::from_bits(1), // smallest subnormal
        2 => f16::MAX,
        3 => f16::from_bits(0x8001),
        _ => f16::from_f32((seq * 1000 + t * V + v) as f32 * 0.125 - 30.0),
    }
}

fn f16_logits(seq: usize, rows: usize) -> Array2<H> {
    Array2::from_shape_fn((rows, V), |(t, v)| H(logit(seq, t, v)))
}

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
    let mut a: Vec<String> = vec!["import".into(), "--from".into(), "npz".into()];
    a.extend(files.iter().map(|f| f.to_str().unwrap().to_string()));
    a.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    qgate(&refs)
}

fn write_npz(path: &Path, f: impl FnOnce(&mut NpzWriter<File>)) {
    let mut w = NpzWriter::new_compressed(File::create(path).unwrap());
    f(&mut w);
    w.finish().unwrap();
}

#[test]
fn f16_archive_round_trips_bit_exactly_with_all_fields() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("mlx-int4.npz");
    write_npz(&npz, |w| {
        w.add_array("seq0_tokens", &Array1::from(vec![3i64, 9, 27]))
            .unwrap();
        w.add_array("seq0_logits", &f16_logits(0, 3)).unwrap();
        w.add_array("seq0_rollout", &Array1::from(vec![1i32, 2, 63]))
            .unwrap();
        // seq 1: fewer rows than tokens, plus top-k and argmax, int32 ids
        w.add_array("seq1_tokens", &Array1::from(vec![5i32, 6, 7, 8]))
            .unwrap();
        w.add_array("seq1_logits", &f16_logits(1, 2)).unwrap();
        w.add_array(
            "seq1_top_ids",
            &Array2::from_shape_vec((2, 2), vec![4i64, 5, 6, 7]).unwrap(),
        )
        .unwrap();
        w.add_array(
            "seq1_top_logits",
            &Array2::from_shape_vec((2, 2), vec![1.5f32, 1.25, -0.5, -1.0]).unwrap(),
        )
        .unwrap();
        w.add_array("seq1_argmax", &Array1::from(vec![4u16, 6]))
            .unwrap();
    });
    let out = dir.path().join("c.capture.safetensors");
    let (code, err) = import(&[&npz], &out, &[]);
    assert_eq!(code, 0, "{err}");
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c.meta.label, "mlx-int4");
    assert_eq!(c.meta.dtype, "f16");
    assert_eq!(c.meta.vocab_size, V);
    assert_eq!(c.meta.runtime, "npz");
    assert_eq!(c.meta.extra["imported_from"][0]["file"], "mlx-int4.npz");
    for (i, rows) in [(0usize, 3usize), (1, 2)] {
        let s = c.seq(i);
        let l = s.logits.as_ref().unwrap();
        assert_eq!(l.kind, FloatKind::F16, "f16 stays f16");
        assert_eq!((l.rows, l.cols), (rows, V));
        // the stored bytes are the fp16 bits themselves
        for t in 0..rows {
            for v in 0..V {
                let o = (t * V + v) * 2;
                let bits = u16::from_le_bytes([l.bytes()[o], l.bytes()[o + 1]]);
                assert_eq!(bits, logit(i, t, v).to_bits(), "seq {i} row {t} col {v}");
            }
            let row = l.row(t);
            assert_eq!(row[0].to_bits(), logit(i, t, 0).to_f32().to_bits());
        }
    }
    let s0 = c.seq(0);
    assert_eq!(s0.tokens, vec![3, 9, 27]);
    assert_eq!(s0.rollout, Some(vec![1, 2, 63]));
    let s1 = c.seq(1);
    assert_eq!(s1.tokens, vec![5, 6, 7, 8]);
    assert_eq!(s1.top_ids.unwrap().row(1), vec![6, 7]);
    assert_eq!(s1.top_logits.unwrap().row(0), vec![1.5, 1.25]);
    assert_eq!(s1.argmax, Some(vec![4, 6]));
}

#[test]
fn f32_and_f64_archives_store_f32() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.npz");
    let vals: Vec<f32> = (0..2 * V).map(|k| k as f32 * 0.1 - 3.3).collect();
    write_npz(&a, |w| {
        w.add_array("seq0_tokens", &Array1::from(vec![1i64, 2]))
            .unwrap();
        w.add_array(
            "seq0_logits",
            &Array2::from_shape_vec((2, V), vals.clone()).unwrap(),
        )
        .unwrap();
    });
    let out = dir.path().join("a.capture.safetensors");
    let (code, err) = import(&[&a], &out, &["--label", "fp32-ref"]);
    assert_eq!(code, 0, "{err}");
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.meta.dtype, "f32");
    assert_eq!(c.meta.label, "fp32-ref");
    let l = c.seq(0).logits.unwrap();
    assert_eq!(l.kind, FloatKind::F32);
    assert_eq!(l.row(1), vals[V..].to_vec());

    // f64 logits (numpy's default float) are narrowed to f32 and the metadata says so
    let b = dir.path().join("b.npz");
    write_npz(&b, |w| {
        w.add_array("seq0_tokens", &Array1::from(vec![1i64]))
            .unwrap();
        w.add_array(
            "seq0_logits",
            &Array2::from_shape_fn((1, V), |(_, v)| v as f64 / 3.0),
        )
        .unwrap();
    });
    let out = dir.path().join("b.capture.safetensors");
    let (code, err) = import(&[&b], &out, &[]);
    assert_eq!(code, 0, "{err}");
    let c = Capture::open(&out).unwrap();
    assert_eq!(c.meta.extra["import"]["f64_narrowed_to_f32"], true);
    assert_eq!(c.seq(0).logits.unwrap().row(0)[5], (5.0f64 / 3.0) as f32);
}

#[test]
fn npy_logits_take_tokens_from_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("p.plan.safetensors");
    let meta = CaptureMeta::new("plan", "plan", "none", V);
    write_capture(
        &plan,
        &meta,
        &[SeqData {
            tokens: vec![10, 11, 12],
            ..Default::default()
        }],
    )
    .unwrap();
    let npy = dir.path().join("hf-bf16-logits.npy");
    // HF-style [1, T, V]
    let arr: ArrayD<H> = Array::from_shape_fn(IxDyn(&[1, 3, V]), |ix| H(logit(0, ix[1], ix[2])));
    arr.write_npy(File::create(&npy).unwrap()).unwrap();
    let out = dir.path().join("n.capture.safetensors");
    // without the plan: usage error
    let (code, err) = import(&[&npy], &out, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--plan"), "{err}");
    let (code, err) = import(&[&npy], &out, &["--plan", plan.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let c = Capture::open(&out).unwrap();
    let s = c.seq(0);
    assert_eq!(s.tokens, vec![10, 11, 12]);
    let l = s.logits.unwrap();
    assert_eq!((l.rows, l.cols, l.kind), (3, V, FloatKind::F16));
    assert_eq!(l.row(2)[7].to_bits(), logit(0, 2, 7).to_f32().to_bits());

    // a plan with a different vocab is refused
    let plan2 = dir.path().join("p2.plan.safetensors");
    write_capture(
        &plan2,
        &CaptureMeta::new("plan", "plan", "none", V + 1),
        &[SeqData {
            tokens: vec![10, 11, 12],
            ..Default::default()
        }],
    )
    .unwrap();
    let (code, err) = import(&[&npy], &out, &["--plan", plan2.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("hf-bf16-logits.npy") && err.contains("vocab"),
        "{err}"
    );
}

#[test]
fn malformed_archives_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let toks = || Array1::from(vec![1i64, 2, 3]);
    type Build = Box<dyn Fn(&mut NpzWriter<File>)>;
    let cases: Vec<(&str, Build, &str)> = vec![
        (
            "unknown_array",
            Box::new(move |w| {
                w.add_array("seq0_tokens", &toks()).unwrap();
                w.add_array("weights", &toks()).unwrap();
            }),
            "unexpected array `weights`",
        ),
        (
            "no_tokens",
            Box::new(|w| {
                w.add_array("seq0_logits", &f16_logits(0, 1)).unwrap();
            }),
            "seq0_tokens is missing",
        ),
        (
            "gap",
            Box::new(move |w| {
                w.add_array("seq0_tokens", &toks()).unwrap();
                w.add_array("seq2_tokens", &toks()).unwrap();
            }),
            "seq1_* is missing",
        ),
        (
            "int_logits",
            Box::new(move |w| {
                w.add_array("seq0_tokens", &toks()).unwrap();
                w.add_array("seq0_logits", &Array2::<i32>::zeros((3, V)))
                    .unwrap();
            }),
            "is not float16/float32/float64",
        ),
        (
            "flat_logits",
            Box::new(move |w| {
                w.add_array("seq0_tokens", &toks()).unwrap();
                w.add_array("seq0_logits", &Array1::<f32>::zeros(V))
                    .unwrap();
            }),
            "expected [T, V]",
        ),
        (
            "too_many_rows",
            Box::new(|w| {
                w.add_array("seq0_tokens", &Array1::from(vec![1i64]))
                    .unwrap();
                w.add_array("seq0_logits", &f16_logits(0, 2)).unwrap();
            }),
            "only 1 tokens",
        ),
        (
            "inconsistent_rows",
            Box::new(move |w| {
                w.add_array("seq0_tokens", &toks()).unwrap();
                w.add_array("seq0_logits", &f16_logits(0, 3)).unwrap();
                w.add_array("seq0_argmax", &Array1::from(vec![1i64, 2]))
                    .unwrap();
            }),
            "inconsistent rows",
        ),
        (
            "vocab_mismatch_between_seqs",
            Box::new(move |w| {
                w.add_array("seq0_tokens", &toks()).unwrap();
                w.add_array("seq0_logits", &f16_logits(0, 3)).unwrap();
                w.add_array("seq1_tokens", &toks()).unwrap();
                w.add_array("seq1_logits", &Array2::<f32>::zeros((3, V + 1)))
                    .unwrap();
            }),
            "inconsistent rows",
        ),
        (
            "token_outside_vocab",
            Box::new(|w| {
                w.add_array("seq0_tokens", &Array1::from(vec![1i64, V as i64]))
                    .unwrap();
                w.add_array("seq0_logits", &f16_logits(0, 2)).unwrap();
            }),
            "outside the vocabulary",
        ),
        (
            "top_ids_alone",
            Box::new(move |w| {
                w.add_array("seq0_tokens", &toks()).unwrap();
                w.add_array("seq0_top_ids", &Array2::<i64>::zeros((3, 2)))
                    .unwrap();
            }),
            "seq0_top_logits is missing",
        ),
        (
            "rollout_only_without_vocab",
            Box::new(move |w| {
                w.add_array("seq0_tokens", &toks()).unwrap();
                w.add_array("seq0_rollout", &toks()).unwrap();
            }),
            "--vocab-size",
        ),
    ];
    for (name, build, problem) in cases {
        let f = dir.path().join(format!("{name}.npz"));
        write_npz(&f, |w| build(w));
        let out = dir.path().join(format!("{name}.capture.safetensors"));
        let (code, err) = import(&[&f], &out, &[]);
        assert_eq!(code, 2, "{name}: {err}");
        if problem != "--vocab-size" {
            assert!(err.contains(&format!("{name}.npz")), "{name}: {err}");
        }
        assert!(err.contains(problem), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
        assert!(!out.exists(), "{name}");
    }
    // not a zip at all, and a truncated archive
    let junk = dir.path().join("junk.npz");
    std::fs::write(&junk, b"PK\x03\x04 definitely not a zip").unwrap();
    let good = dir.path().join("good.npz");
    write_npz(&good, |w| {
        w.add_array("seq0_tokens", &toks()).unwrap();
        w.add_array("seq0_logits", &f16_logits(0, 3)).unwrap();
    });
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.npz");
    std::fs::write(&cut, &bytes[..bytes.len() - 30]).unwrap();
    for f in [&junk, &cut] {
        let out = dir.path().join("x.capture.safetensors");
        let (code, err) = import(&[f], &out, &[]);
        assert_eq!(code, 2, "{err}");
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(name) && err.contains("npz"), "{err}");
        assert!(!out.exists());
    }
}
