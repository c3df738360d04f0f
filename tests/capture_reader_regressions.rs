//! The capture reader on hostile input: files under `tests/data/capture_reader/` (inputs the
//! `capture_reader` fuzz target found or that are kept as its seeds; `err_*` must be refused, `ok_*` must
//! open) and hand-built headers that lie. Every case is opened and then read completely with the same
//! accessor walk as the fuzz target (`fuzz/shim/touch.rs`): no panic, an `Input` error naming the file.
use qgate::error::Error;
use std::path::{Path, PathBuf};

mod capture {
    pub use qgate::capture::*;
}
#[path = "../fuzz/shim/touch.rs"]
mod touch;

fn open_and_touch(p: &Path) -> Result<f64, Error> {
    let c = capture::Capture::open(p)?;
    Ok(touch::touch_all(&c))
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/capture_reader")
}

#[test]
fn stored_inputs_behave() {
    let mut n = 0;
    for e in std::fs::read_dir(data_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let r = open_and_touch(&p);
        if name.starts_with("err_") {
            match r {
                Err(Error::Input { path, problem }) => {
                    assert_eq!(path, p, "{name}");
                    assert!(!problem.is_empty());
                }
                Err(other) => panic!("{name}: expected an input error, got {other}"),
                Ok(_) => panic!("{name}: must be refused"),
            }
        } else if name.starts_with("ok_") {
            assert!(r.is_ok(), "{name}: {:?}", r.err());
        } else {
            continue;
        }
        n += 1;
    }
    assert!(n > 0, "no stored inputs found");
}

fn header_file(dir: &Path, name: &str, header: &str, data: &[u8]) -> PathBuf {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

const META: &str = r#""__metadata__":{"qgate.capture":"{\"format\":\"qgate-capture/1\",\"label\":\"x\",\"runtime\":\"x\",\"dtype\":\"f16\",\"vocab_size\":4}"}"#;

#[test]
fn lying_headers_are_refused_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        // offsets past the end of the file
        (
            "past_end",
            format!(
                r#"{{{META},"seq.0.tokens":{{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}}}"#
            ),
            vec![0u8; 8],
        ),
        // shape and byte count disagree
        (
            "size_lie",
            format!(
                r#"{{{META},"seq.0.tokens":{{"dtype":"I64","shape":[3],"data_offsets":[0,16]}}}}"#
            ),
            vec![0u8; 16],
        ),
        // shape product overflows
        (
            "overflow",
            format!(
                r#"{{{META},"seq.0.tokens":{{"dtype":"I64","shape":[2],"data_offsets":[0,16]}},"seq.0.logits":{{"dtype":"F16","shape":[4611686018427387904,4],"data_offsets":[16,16]}}}}"#
            ),
            vec![0u8; 16],
        ),
        // logits wider than vocab_size
        (
            "vocab_lie",
            format!(
                r#"{{{META},"seq.0.tokens":{{"dtype":"I64","shape":[1],"data_offsets":[0,8]}},"seq.0.logits":{{"dtype":"F16","shape":[1,5],"data_offsets":[8,18]}}}}"#
            ),
            vec![0u8; 18],
        ),
        // more rows than tokens
        (
            "rows_lie",
            format!(
                r#"{{{META},"seq.0.tokens":{{"dtype":"I64","shape":[1],"data_offsets":[0,8]}},"seq.0.argmax":{{"dtype":"I64","shape":[2],"data_offsets":[8,24]}}}}"#
            ),
            vec![0u8; 24],
        ),
        // logits of an integer dtype
        (
            "dtype_lie",
            format!(
                r#"{{{META},"seq.0.tokens":{{"dtype":"I64","shape":[1],"data_offsets":[0,8]}},"seq.0.logits":{{"dtype":"I16","shape":[1,4],"data_offsets":[8,16]}}}}"#
            ),
            vec![0u8; 16],
        ),
        // two spellings of sequence 0: which one won used to depend on hash order
        (
            "non_canonical_index",
            format!(
                r#"{{{META},"seq.0.tokens":{{"dtype":"I64","shape":[1],"data_offsets":[0,8]}},"seq.00.tokens":{{"dtype":"I64","shape":[2],"data_offsets":[8,24]}}}}"#
            ),
            vec![0u8; 24],
        ),
        // a header length larger than the file
        ("header_len_lie", String::new(), Vec::new()),
    ];
    for (name, header, data) in cases {
        let p = if name == "header_len_lie" {
            let p = dir.path().join(name);
            let mut b = 1_000_000u64.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            std::fs::write(&p, b).unwrap();
            p
        } else {
            header_file(dir.path(), name, &header, &data)
        };
        match open_and_touch(&p) {
            Err(Error::Input { path, .. }) => assert_eq!(path, p, "{name}"),
            other => panic!(
                "{name}: expected an input error, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}
