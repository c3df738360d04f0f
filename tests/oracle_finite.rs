//! The oracle refuses a checkpoint that makes NaN/Inf (exit 2, naming the first layer where they appear,
//! nothing written or cached) on every path: in memory, layer-streamed, portable kernels, teacher-forced
//! and rollout steps, `qgate simulate`, `qgate run --oracle <dtype>`. Checkpoint tensors the model does
//! not read are listed (a warning, as HF warns) and recorded in the capture's metadata.
use assert_cmd::Command;
use qgate::capture::Capture;
use qgate::model::precision::Precision;
use qgate::model::Model;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

fn plan() -> PathBuf {
    fixture("plans/tiny.plan.safetensors")
}

fn qgate() -> Command {
    let mut c = Command::cargo_bin("qgate").unwrap();
    c.env("RAYON_NUM_THREADS", "2");
    c
}

fn copy_model(name: &str, dst: &Path) -> PathBuf {
    let dir = dst.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(&format!("models/{name}"))).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

/// The safetensors file of `dir` that holds `tensor`.
fn shard_of(dir: &Path, tensor: &str) -> PathBuf {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            if st.names().contains(&tensor) {
                return p;
            }
        }
    }
    panic!("{tensor} is in no shard of {}", dir.display());
}

/// A new payload for a stored tensor (`name`, dtype, bytes), or `None` to keep it.
type Edit<'a> = &'a dyn Fn(&str, safetensors::Dtype, &[u8]) -> Option<Vec<u8>>;
/// A tensor to add: name, dtype, shape, bytes.
type Added = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Rewrite the checkpoint `file` with `f(name, dtype, bytes)` applied to every tensor
/// (returning `None` keeps it as is); `extra` tensors are added.
fn rewrite(file: &Path, f: Edit, extra: Vec<Added>) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<Added> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let data = f(&n, v.dtype(), v.data()).unwrap_or_else(|| v.data().to_vec());
            (n, v.dtype(), v.shape().to_vec(), data)
        })
        .collect();
    owned.extend(extra);
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(file, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Set element `index` of `tensor` (an F32/BF16 tensor of the model in `dir`) to `value`.
fn plant(dir: &Path, tensor: &str, index: usize, value: f32) {
    let file = shard_of(dir, tensor);
    rewrite(
        &file,
        &|n, dt, data| {
            (n == tensor).then(|| {
                let mut d = data.to_vec();
                match dt {
                    safetensors::Dtype::F32 => {
                        d[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes())
                    }
                    safetensors::Dtype::BF16 => d[2 * index..2 * index + 2]
                        .copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
                    other => panic!("{tensor} is {other:?}"),
                }
                d
            })
        },
        Vec::new(),
    );
}

/// Exit 2 with one line on stderr holding every needle; returns stderr.
fn expect_refused(out: &std::process::Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    let error_lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(error_lines.len(), 1, "one error line expected: {err}");
    for n in needles {
        assert!(error_lines[0].contains(n), "`{n}` not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Regular files under `dir` (recursively; none when it does not exist).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn oracle_cmd(model: &Path, dtype: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    qgate()
        .args(["oracle", "--model"])
        .arg(model)
        .args(["--dtype", dtype, "--plan"])
        .arg(plan())
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

const QKV2: &str = "model.language_model.layers.2.linear_attn.in_proj_qkv.weight";

#[test]
fn nan_weight_is_refused_in_memory_and_streamed_naming_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model("dense-vl-tied", tmp.path());
    plant(&m, QKV2, 5, f32::NAN);
    let outdir = tmp.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("oracle.safetensors");
    for (dtype, extra) in [
        ("bf16", vec![]),
        ("f32", vec![]),
        ("f32", vec!["--stream"]),
        ("bf16", vec!["--stream", "--no-prefetch"]),
    ] {
        let o = oracle_cmd(&m, dtype, &out, &extra);
        expect_refused(
            &o,
            &[
                "non-finite values (NaN/Inf) first appear in the output of layer 2 of 4 (0-based; linear_attention",
                QKV2,
                "holds NaN",
                "nothing written",
                &m.display().to_string(),
            ],
        );
        assert!(
            files_under(&outdir).is_empty(),
            "{dtype} {extra:?}: files left: {:?}",
            files_under(&outdir)
        );
    }
}

#[test]
fn inf_in_a_full_attention_layer_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model("dense-gva-untied", tmp.path());
    // dense-gva-untied: layer 1 is full attention
    let name = "model.layers.1.self_attn.o_proj.weight";
    plant(&m, name, 0, f32::INFINITY);
    let out = tmp.path().join("o.safetensors");
    for extra in [vec![], vec!["--stream"]] {
        let o = oracle_cmd(&m, "bf16", &out, &extra);
        expect_refused(
            &o,
            &[
                "layer 1 of 5 (0-based; full_attention",
                name,
                "holds Inf",
                "checkpoint is broken",
            ],
        );
        assert!(!out.exists());
    }
}

/// An embedding row that only a rollout step reads: the teacher-forced pass is finite, the rollout
/// is not. In memory, streamed with the model in memory for the rollout, and streamed step by step.
#[test]
fn nan_reached_only_by_a_rollout_step_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let good = fixture("models/dense-gva-untied");
    let reference = tmp.path().join("good.safetensors");
    let o = oracle_cmd(&good, "f32", &reference, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cap = Capture::open(&reference).unwrap();
    let plan_tokens: Vec<i64> = cap.plan().concat();
    // A token the rollout feeds back (not the last, which is never fed) that no prompt holds.
    let fed = (0..cap.len())
        .flat_map(|i| {
            let r = cap.seq(i).rollout.unwrap_or_default();
            r[..r.len().saturating_sub(1)].to_vec()
        })
        .find(|t| !plan_tokens.contains(t))
        .expect("a rollout token outside the prompts");
    let m = copy_model("dense-gva-untied", tmp.path());
    let hidden = 64; // dense-gva-untied hidden_size
    plant(
        &m,
        "model.embed_tokens.weight",
        fed as usize * hidden + 3,
        f32::NAN,
    );
    let out = tmp.path().join("o.safetensors");
    for extra in [
        vec![],
        vec!["--stream"],
        vec!["--stream", "--max-memory", "1000"],
    ] {
        let o = oracle_cmd(&m, "f32", &out, &extra);
        expect_refused(
            &o,
            &[
                "first appear in the output of the embedding (`model.embed_tokens.weight`)",
                "holds NaN",
            ],
        );
        assert!(!out.exists(), "{extra:?}");
    }
}

/// The portable kernels (what `--device cuda` runs; here on the CPU) check the same stages, with the
/// probes read back once per forward call; and the check leaves every number of a good model as it was.
#[test]
fn portable_kernels_refuse_non_finite_too() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model("dense-vl-tied", tmp.path());
    plant(
        &m,
        "model.language_model.layers.3.mlp.up_proj.weight",
        7,
        f32::NAN,
    );
    let tokens: Vec<u32> = (0..12).map(|i| (i * 29 + 3) % 380).collect();
    for portable in [false, true] {
        let model =
            Model::load_on(&m, Precision::F32, &candle_core::Device::Cpu, portable).unwrap();
        let mut cache = model.new_cache();
        let err = model.forward(&tokens, &mut cache).unwrap_err().to_string();
        assert!(
            err.contains("layer 3 of 4 (0-based; full_attention")
                && err.contains("layers.3.mlp.up_proj.weight` holds NaN"),
            "portable={portable}: {err}"
        );
        let mut cache = model.new_cache();
        let err = model
            .hidden_states(&tokens, &mut cache)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer 3 of 4 (0-based; full_attention"),
            "{err}"
        );
    }
}

#[test]
fn simulate_refuses_non_finite() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model("dense-gva-untied", tmp.path());
    let name = "model.layers.3.mlp.down_proj.weight";
    plant(&m, name, 11, f32::NAN);
    let out = tmp.path().join("sim.safetensors");
    let o = qgate()
        .args(["simulate", "--model"])
        .arg(&m)
        .arg("--plan")
        .arg(plan())
        .args(["--scheme", "int8lin", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    expect_refused(
        &o,
        &["layer 3 of 5 (0-based; linear_attention", name, "holds NaN"],
    );
    assert!(!out.exists());

    // A finite checkpoint whose fake quantization overflows: a weight of 1e7 gives a per-block int8
    // scale of ~7.9e4, beyond f16 (the default scale dtype): the simulation is broken, not the model.
    let m2 = tmp.path().join("overflow");
    std::fs::create_dir(&m2).unwrap();
    for e in std::fs::read_dir(fixture("models/dense-gva-untied")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m2.join(e.file_name())).unwrap();
    }
    plant(&m2, name, 11, 1.0e7);
    let o = qgate()
        .args(["simulate", "--model"])
        .arg(&m2)
        .arg("--plan")
        .arg(plan())
        .args(["--scheme", "int8lin", "--compute", "f32", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    expect_refused(
        &o,
        &[
            "layer 3 of 5 (0-based; linear_attention",
            "fake quantization",
            "simulated quantization is broken",
        ],
    );
    assert!(!out.exists());
}

/// `qgate run --oracle f32`: the oracle refuses, and its cache holds nothing afterwards.
#[test]
fn run_with_oracle_dtype_caches_nothing_for_a_broken_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // A well-formed candidate: the good model's own oracle capture.
    let bundle = tmp.path().join("candidate.capture.safetensors");
    let o = oracle_cmd(&fixture("models/dense-vl-tied"), "bf16", &bundle, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = copy_model("dense-vl-tied", tmp.path());
    plant(&m, QKV2, 5, f32::NAN);
    let cache = tmp.path().join("oracles");
    let report = tmp.path().join("report");
    let o = qgate()
        .args(["run", "--oracle", "f32", "--model"])
        .arg(&m)
        .arg("--bundle")
        .arg(&bundle)
        .arg("--out")
        .arg(&report)
        .env("QGATE_ORACLE_CACHE", &cache)
        .output()
        .unwrap();
    expect_refused(
        &o,
        &["layer 2 of 4 (0-based; linear_attention", QKV2, "holds NaN"],
    );
    let cached = files_under(&cache);
    assert!(cached.is_empty(), "the oracle cache holds {cached:?}");
    assert!(!report.join("report.md").exists());
}

fn meta(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    Capture::open(path).unwrap().meta.extra
}

/// Names of the stored tensors of `dir` with prefix `p`, sorted.
fn stored_with_prefix(dir: &Path, p: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let f = e.unwrap().path();
        if f.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&f).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            out.extend(
                st.names()
                    .into_iter()
                    .filter(|n| n.starts_with(p))
                    .map(|n| n.to_string()),
            );
        }
    }
    out.sort();
    out
}

/// A config that declares fewer layers than the checkpoint holds: the oracle runs (as HF does) but
/// warns, naming the unused layer's tensors, and records them in the capture; the vision tower and the
/// MTP head are summed up in one note, not warned about.
#[test]
fn unused_layer_tensors_are_warned_about_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_model("dense-vl-tied", tmp.path());
    let cfg_path = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["num_hidden_layers"] = 3.into();
    cfg["text_config"]["layer_types"] =
        serde_json::json!(["linear_attention", "linear_attention", "linear_attention"]);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let layer3 = stored_with_prefix(&m, "model.language_model.layers.3.");
    assert!(layer3.len() > 5, "{layer3:?}");
    let vision = stored_with_prefix(&m, "model.visual.").len();
    let mtp = stored_with_prefix(&m, "mtp.").len();
    assert!(vision > 0 && mtp > 0);

    for extra in [vec![], vec!["--stream"]] {
        let out = tmp.path().join(format!("o{}.safetensors", extra.len()));
        let o = oracle_cmd(&m, "f32", &out, &extra);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        let warn: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
        assert_eq!(warn.len(), 1, "{err}");
        let w = warn[0];
        assert!(
            w.contains(&format!(
                "{} checkpoint tensors were NOT used",
                layer3.len()
            )) && w.contains("config.json declares 3 layers, the checkpoint holds layers up to 3")
                && w.contains(&layer3[0])
                && w.contains("Some weights of the model checkpoint were not used"),
            "{w}"
        );
        let note: Vec<&str> = err.lines().filter(|l| l.contains("note")).collect();
        assert_eq!(note.len(), 1, "{err}");
        assert!(
            note[0].contains(&format!(
                "{vision} vision-tower tensor{} ignored (text decoder only)",
                if vision == 1 { "" } else { "s" }
            )) && note[0].contains(&format!("{mtp} MTP-head tensors ignored")),
            "{}",
            note[0]
        );
        let md = meta(&out);
        let listed: Vec<String> = md["unused_tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(listed, layer3, "{extra:?}");
        assert_eq!(md["unused_tensors_count"], layer3.len());
        assert_eq!(md["ignored_tensors"]["vision_tower"], vision);
        assert_eq!(md["ignored_tensors"]["mtp_head"], mtp);
    }
}

/// A checkpoint whose every decoder tensor is used raises no warning, on either path: in particular
/// the streamed MoE oracle, which reads only the experts some token routes to, does not report the
/// others. An extra stray tensor is reported.
#[test]
fn a_complete_checkpoint_reports_nothing_unused_and_a_stray_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["moe-experts", "moe-fused", "dense-gva-untied"] {
        for extra in [vec![], vec!["--stream"]] {
            let out = tmp
                .path()
                .join(format!("{name}{}.safetensors", extra.len()));
            let o = oracle_cmd(&fixture(&format!("models/{name}")), "bf16", &out, &extra);
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            assert!(o.status.success(), "{err}");
            assert!(!err.contains("warning"), "{name} {extra:?}: {err}");
            let md = meta(&out);
            assert_eq!(md["unused_tensors_count"], 0, "{name} {extra:?}");
            assert_eq!(md["unused_tensors"], serde_json::json!([]));
        }
    }
    let m = copy_model("moe-fused", tmp.path());
    let stray = "model.layers.0.mlp.stray_bias".to_string();
    rewrite(
        &m.join("model.safetensors"),
        &|_, _, _| None,
        vec![(
            stray.clone(),
            safetensors::Dtype::F32,
            vec![2],
            vec![0u8; 8],
        )],
    );
    let out = tmp.path().join("stray.safetensors");
    let o = oracle_cmd(&m, "bf16", &out, &["--stream"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 checkpoint tensor was NOT used") && err.contains(&stray),
        "{err}"
    );
    assert_eq!(meta(&out)["unused_tensors"], serde_json::json!([stray]));
}
