//! `qgate run --oracle <dtype>`: find the model, then reuse a cached oracle capture for exactly these
//! weights, tokens, dtype and qgate version from `oracles/`, or run the oracle and cache it there.
use crate::capture::Capture;
use crate::error::{Error, Result};
use crate::gate::provenance::{self, Provenance};
use crate::model::precision::Precision;
use crate::model::weights::{resolve_model_dir, WeightStore};
use crate::oracle::{plan_sha256, run_oracle, ExecOptions, OracleRequest};
use sha2::{Digest, Sha256};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Where cached oracle runs live: `$QGATE_ORACLE_CACHE`, else `oracles/` in the working directory.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("QGATE_ORACLE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("oracles"))
}

/// The model directory for the oracle: `--model`, else the bundle's `metadata.json` `source.hf_model_id`
/// resolved in the local Hugging Face cache.
pub fn model_dir_for(model: Option<&Path>, bundle_dir: Option<&Path>) -> Result<PathBuf> {
    if let Some(m) = model {
        return resolve_model_dir(&m.to_string_lossy());
    }
    if let Some(b) = bundle_dir {
        let meta_path = b.join("metadata.json");
        if let Ok(text) = std::fs::read_to_string(&meta_path) {
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::input(&meta_path, format!("not valid JSON ({e})")))?;
            if let Some(id) = v.pointer("/source/hf_model_id").and_then(|x| x.as_str()) {
                return resolve_model_dir(id);
            }
        }
    }
    Err(Error::usage(
        "the oracle needs the model: pass --model DIR (a Hugging Face checkpoint directory or Org/Name in the \
         local HF cache), use a bundle whose metadata.json names source.hf_model_id, or pass an oracle \
         capture file to --oracle",
    ))
}

/// The `--oracle` values that name a dtype to run (anything else must be an oracle capture file).
pub const ORACLE_DTYPES: [&str; 3] = ["bf16", "f32", "f16"];

/// The oracle capture a run compares with, and what qgate could verify about where it came from.
pub struct ResolvedOracle {
    pub path: PathBuf,
    pub provenance: Provenance,
}

/// `--oracle`: a dtype (run the oracle on `device`, or reuse its cached capture) or an existing
/// oracle capture file, whose provenance is checked (`gate::provenance`): against `--model`'s weights when
/// given (the model's config is read, so a broken one is refused), else by its kind; `trust` accepts
/// any capture and says so.
pub fn resolve_oracle(
    oracle: &str,
    model: Option<&Path>,
    bundle_dir: Option<&Path>,
    plan: &Capture,
    device: &candle_core::Device,
    trust: bool,
) -> Result<ResolvedOracle> {
    if ORACLE_DTYPES.contains(&oracle) {
        let exec = ExecOptions::from_args(device.clone(), None, false, false)?;
        return Ok(ResolvedOracle {
            path: oracle_capture_for(model, bundle_dir, oracle, plan, exec)?,
            provenance: Provenance::ComputedHere,
        });
    }
    let p = PathBuf::from(oracle);
    if !p.is_file() {
        return Err(Error::usage(format!(
            "--oracle `{oracle}` is neither a dtype (bf16, f32, f16) nor an existing oracle capture file"
        )));
    }
    let cap = Capture::open(&p)?;
    let provenance = match model {
        Some(m) => {
            let dir = resolve_model_dir(&m.to_string_lossy())?;
            crate::model::config::TextConfig::from_dir(&dir)?;
            let hashes = WeightStore::open(&dir)?.weights_sha256()?;
            provenance::check(&cap, Some((&dir, &hashes)), trust)?
        }
        None => provenance::check(&cap, None, trust)?,
    };
    Ok(ResolvedOracle {
        path: p,
        provenance,
    })
}

pub fn oracle_capture_for(
    model: Option<&Path>,
    bundle_dir: Option<&Path>,
    dtype: &str,
    plan: &Capture,
    exec: ExecOptions,
) -> Result<PathBuf> {
    let precision = Precision::parse(dtype).ok_or_else(|| {
        Error::usage(format!(
            "--oracle `{dtype}`: expected f32, bf16, f16 or a capture file"
        ))
    })?;
    let dir = model_dir_for(model, bundle_dir)?;
    let tokens = plan.plan();
    // Rollouts as long as the longest candidate rollout (at least the default 16).
    let rollout = (0..plan.len())
        .filter_map(|i| plan.seq(i).rollout.map(|r| r.len()))
        .max()
        .unwrap_or(0)
        .max(16);
    let weights = WeightStore::open(&dir)?.weights_sha256()?;
    let plan_hash = plan_sha256(&tokens);
    let mut h = Sha256::new();
    for (f, s) in &weights {
        h.update(format!("{f}={s};"));
    }
    // `oracle=2`: the oracle refuses non-finite values; a capture cached by an earlier build (which could
    // hold NaN logits of a broken checkpoint) is never reused.
    h.update(format!(
        "plan={plan_hash};dtype={};rollout={rollout};qgate={};oracle=2",
        precision.name(),
        env!("CARGO_PKG_VERSION")
    ));
    if !exec.device.is_cpu() {
        // GPU reductions add in another order: its logits are not the CPU oracle's bit for bit.
        h.update(format!(
            ";device={}",
            crate::model::device::device_name(&exec.device)
        ));
    }
    let key = hex::encode(h.finalize());
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let path = cache_dir().join(format!(
        "{name}.{}.{}.capture.safetensors",
        precision.name(),
        &key[..16]
    ));
    if path.is_file() {
        if let Ok(c) = Capture::open(&path) {
            if c.plan() == tokens && c.meta.dtype == precision.name() {
                eprintln!("qgate: reusing cached oracle {}", path.display());
                return Ok(path);
            }
        }
        eprintln!(
            "qgate: cached oracle {} is unreadable or stale; recomputing",
            path.display()
        );
    }
    eprintln!(
        "qgate: running the {} oracle on {} ({} sequences)…",
        precision.name(),
        dir.display(),
        tokens.len()
    );
    run_oracle(&OracleRequest {
        model_dir: &dir,
        precision,
        plan: &tokens,
        rollout,
        out: &path,
        progress: std::io::stderr().is_terminal(),
        exec,
    })
}
