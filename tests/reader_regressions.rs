//! Every reader of user files on hostile input (issue 11, "no panic on any input"). Files under
//! `tests/data/<reader>/` are inputs the reader's fuzz target found, or kept as its seeds: `err_*` must be
//! refused with an input error naming the file, `ok_*` must be read. Each is replayed exactly as the fuzz
//! target drives the reader (`fuzz/shim/replay_import.rs` for the importers). The named tests below are
//! the panics and runaway allocations found in the readers, each built from scratch.
use qgate::error::Error;
use qgate::gate::policy::Policy;
use qgate::model::config::TextConfig;
use std::path::{Path, PathBuf};
use std::process::Command;

mod error {
    pub use qgate::error::*;
}
mod import {
    pub use qgate::import::*;
}
#[path = "../fuzz/shim/import_check.rs"]
mod import_check;
#[path = "../fuzz/shim/replay_import.rs"]
mod replay_import;

fn data_dir(reader: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(reader)
}

/// Replay every stored input of `reader`; returns how many there were.
fn replay_dir(reader: &str, read: &dyn Fn(&Path) -> Result<(), Error>) -> usize {
    let mut n = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(data_dir(reader))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let r = read(&p);
        if name.starts_with("err_") {
            match r {
                Err(Error::Input { path, problem }) => {
                    assert_eq!(path, p, "{reader}/{name}: the error names the file");
                    assert!(!problem.is_empty() && !problem.contains('\n'), "{name}");
                }
                Err(other) => panic!("{reader}/{name}: expected an input error, got {other}"),
                Ok(()) => panic!("{reader}/{name}: must be refused"),
            }
        } else if name.starts_with("ok_") {
            assert!(r.is_ok(), "{reader}/{name}: {:?}", r.err());
        } else {
            continue;
        }
        n += 1;
    }
    assert!(n > 0, "{reader}: no stored inputs");
    n
}

#[test]
fn npz_stored_inputs() {
    replay_dir("npz_reader", &|p| replay_import::npz(p).map(|_| ()));
}

#[test]
fn llm_runner_stored_inputs() {
    replay_dir("llm_runner_reader", &|p| {
        replay_import::llm_runner(p).map(|_| ())
    });
}

#[test]
fn transcript_stored_inputs() {
    replay_dir("transcript_reader", &|p| {
        replay_import::transcript(p).map(|_| ())
    });
}

#[test]
fn policy_stored_inputs() {
    replay_dir("policy_reader", &|p| Policy::load(Some(p)).map(|_| ()));
}

/// As the fuzz target does: the bytes are both `config.json` and `generation_config.json` of a model
/// directory; the error must name the stored file's copy.
#[test]
fn config_stored_inputs() {
    replay_dir("config_reader", &|p| {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(p).unwrap();
        std::fs::write(dir.path().join("config.json"), &bytes).unwrap();
        std::fs::write(dir.path().join("generation_config.json"), &bytes).unwrap();
        match TextConfig::from_dir(dir.path()) {
            Ok(_) => Ok(()),
            Err(Error::Input { path, problem }) => {
                assert_eq!(path.parent(), Some(dir.path()), "{problem}");
                Err(Error::input(p, problem))
            }
            Err(e) => Err(e),
        }
    });
}

fn qgate(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// llm-runner: a large first row followed by many positions without one made the reader reserve
/// `row × positions` bytes (here 1 TiB) before it saw the second position: an abort, not an error.
#[test]
fn llm_runner_first_row_times_positions_is_not_reserved() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let row = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 4 << 20]);
    let n: usize = 1 << 18;
    let mut s = String::from("{\"context_tokens\": [1], \"continuation_tokens\": [");
    s.push_str(&vec!["2"; n].join(","));
    s.push_str("], \"positions\": [{\"logits_base64\": \"");
    s.push_str(&row);
    s.push_str("\"}");
    s.push_str(&",{}".repeat(n - 1));
    s.push_str("]}");
    let f = dir.path().join("huge-reserve.logits.json");
    std::fs::write(&f, s).unwrap();
    let out = dir.path().join("out.capture.safetensors");
    let (code, err) = qgate(&[
        "import".as_ref(),
        "--from".as_ref(),
        "llm-runner".as_ref(),
        f.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("positions[1] has no `logits_base64` but positions[0] has"),
        "{err}"
    );
    assert!(err.contains("huge-reserve.logits.json"), "{err}");
}

/// config.json: `num_hidden_layers` is only a number, but the default `layer_types` list was built
/// from it before anything was checked (10^15 entries: an abort). It is bounded first now.
#[test]
fn config_layer_count_is_bounded_before_the_layer_list_is_built() {
    let v = serde_json::json!({"model_type": "qwen3_5_text", "num_hidden_layers": 1_000_000_000_000_000u64});
    let e = TextConfig::from_json(&v).unwrap_err();
    assert!(
        e.contains("num_hidden_layers 1000000000000000 is larger than"),
        "{e}"
    );
    // sizes whose products would overflow are refused too, and a nonsensical rotary factor
    for (k, v) in [
        ("hidden_size", serde_json::json!(1u64 << 40)),
        ("vocab_size", serde_json::json!(1u64 << 40)),
        ("partial_rotary_factor", serde_json::json!(-0.5)),
        ("rope_theta", serde_json::json!(0.0)),
    ] {
        let mut cfg = serde_json::json!({"model_type": "qwen3_5_text", "num_hidden_layers": 4});
        cfg[k] = v;
        let e = TextConfig::from_json(&cfg).unwrap_err();
        assert!(e.contains(k), "{k}: {e}");
    }
}

/// npz: the vocabulary is known only after every sequence was read, so an id beyond it in a sequence
/// without logits used to go into the capture unchecked. Now the import refuses it (and a capture
/// with such an id no longer opens).
#[test]
fn npz_ids_are_held_to_the_final_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    // seq0: logits of 5 values per row; seq1: tokens only, one of them 9
    let f = dir.path().join("late-vocab.npz");
    std::fs::copy(
        data_dir("npz_reader").join("ok_two_seqs_late_vocab.npz"),
        &f,
    )
    .unwrap();
    let out = dir.path().join("out.capture.safetensors");
    let (code, err) = qgate(&[
        "import".as_ref(),
        "--from".as_ref(),
        "npz".as_ref(),
        f.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("tokens[0] = 9 is outside the vocabulary (vocab_size 5)"),
        "{err}"
    );
    assert!(!out.exists(), "no capture is left behind");
}

/// npz: `ndarray-npy` allocates an `.npy` header's declared length (v2/v3: up to 4 GiB) before reading it.
/// A 12-byte header asking for 4 GiB, alone (`.npy` with a plan) and inside an archive, under a 3 GB
/// address-space limit: main aborted (134), now one line and exit 2.
#[test]
fn npy_header_length_is_bounded_before_it_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let bad = |name: &str| {
        let p = dir.path().join(name);
        std::fs::copy(data_dir("npz_reader").join(name), &p).unwrap();
        p
    };
    let npy = bad("err_npy_v2_header_len_4g.npy");
    let npz = bad("err_npz_v2_header_len_4g.npz");
    let plan = dir.path().join("plan.safetensors");
    let meta = qgate::capture::CaptureMeta::new("plan", "test", "none", 8);
    let seq = qgate::capture::SeqData {
        tokens: vec![1, 2, 3],
        ..Default::default()
    };
    qgate::capture::write_capture(&plan, &meta, &[seq]).unwrap();
    let out = dir.path().join("out.capture.safetensors");
    let q = |args: &str| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v 3000000 && exec \"$0\" {args}"))
            .arg(env!("CARGO_BIN_EXE_qgate"))
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    for (args, file) in [
        (
            format!(
                "import --from npz '{}' --plan '{}' --out '{}'",
                npy.display(),
                plan.display(),
                out.display()
            ),
            &npy,
        ),
        (
            format!(
                "import --from npz '{}' --vocab-size 8 --out '{}'",
                npz.display(),
                out.display()
            ),
            &npz,
        ),
    ] {
        let (code, err) = q(&args);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(".npy header of 4294967280 bytes"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
    }
}
