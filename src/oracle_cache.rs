//! `qgate run --oracle <dtype>`: find the model, then reuse a cached oracle capture for exactly these
//! weights, tokens, dtype and qgate version from the oracle cache ([`cache_dir`]), or run the oracle and
//! cache it there.
use crate::capture::Capture;
use crate::error::{Error, Result};
use crate::gate::provenance::{self, Provenance};
use crate::model::precision::Precision;
use crate::model::weights::{resolve_model_dir, WeightStore};
use crate::oracle::{plan_sha256, run_oracle, ExecOptions, OracleRequest};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The environment variable that overrides the oracle cache location.
pub const CACHE_ENV: &str = "QGATE_ORACLE_CACHE";

/// Where cached oracle runs live: `$QGATE_ORACLE_CACHE` when set, else `qgate/oracles` in the platform's
/// cache directory ([`platform_cache_dir`]), never the working directory.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(&|k| std::env::var_os(k))
}

/// [`cache_dir`] with the environment given as a lookup (tests).
pub fn cache_dir_from(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    if let Some(p) = env(CACHE_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    match platform_cache_dir(env) {
        Some(c) => c.join("qgate").join("oracles"),
        // No home directory at all (a bare container): the system temporary directory, not the cwd.
        None => std::env::temp_dir().join("qgate").join("oracles"),
    }
}

/// The per-user cache directory: `$XDG_CACHE_HOME` (when absolute) or `~/.cache` on Linux and other
/// Unixes, `~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows.
pub fn platform_cache_dir(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let abs = |k: &str| env(k).map(PathBuf::from).filter(|p| p.is_absolute());
    if cfg!(windows) {
        return abs("LOCALAPPDATA");
    }
    if cfg!(target_os = "macos") {
        return abs("HOME").map(|h| h.join("Library").join("Caches"));
    }
    abs("XDG_CACHE_HOME").or_else(|| abs("HOME").map(|h| h.join(".cache")))
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
    /// The oracle capture, opened (and validated) once.
    pub capture: Capture,
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
        let path = oracle_capture_for(model, bundle_dir, oracle, plan, exec)?;
        return Ok(ResolvedOracle {
            capture: Capture::open(&path)?,
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
        capture: cap,
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
    // the plan fits the model before the weights are hashed (tens of GB read) or the oracle runs
    crate::oracle::check_plan(&tokens, &crate::model::config::TextConfig::from_dir(&dir)?)?;
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
    if exec.device.is_cpu() {
        // the CPU kernel set (`--kernels`): a capture records which one computed it
        h.update(format!(";kernels={}", crate::model::cpu::active().name()));
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
        // reused only when it proves to be a qgate oracle of these weights and this plan: a file that
        // merely has the right name (copied there, or left by another tool) is recomputed
        let verified = Capture::open(&path).is_ok_and(|c| {
            c.meta.runtime == crate::shard::ORACLE_RUNTIME
                && c.plan() == tokens
                && c.meta.dtype == precision.name()
                && crate::gate::provenance::check(&c, Some((&dir, &weights)), false).is_ok()
        });
        if verified {
            eprintln!("qgate: reusing cached oracle {}", path.display());
            return Ok(path);
        }
        eprintln!(
            "qgate: cached oracle {} is unreadable, stale or not a qgate oracle of these weights; recomputing",
            path.display()
        );
    }
    // The cache is written after the run: a read-only cache is found before it.
    crate::outputs::probe_writable(&cache_dir())?;
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
        progress: crate::progress::enabled(),
        exec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<OsString> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn the_override_wins() {
        let e = env(&[("QGATE_ORACLE_CACHE", "/ci/oracles"), ("HOME", "/home/u")]);
        assert_eq!(cache_dir_from(&e), PathBuf::from("/ci/oracles"));
    }

    #[test]
    #[cfg(all(unix, not(target_os = "macos")))]
    fn xdg_then_home_never_the_working_directory() {
        let e = env(&[("XDG_CACHE_HOME", "/x/cache"), ("HOME", "/home/u")]);
        assert_eq!(cache_dir_from(&e), PathBuf::from("/x/cache/qgate/oracles"));
        let e = env(&[("XDG_CACHE_HOME", "relative"), ("HOME", "/home/u")]);
        assert_eq!(
            cache_dir_from(&e),
            PathBuf::from("/home/u/.cache/qgate/oracles")
        );
        let e = env(&[("QGATE_ORACLE_CACHE", ""), ("HOME", "/home/u")]);
        assert_eq!(
            cache_dir_from(&e),
            PathBuf::from("/home/u/.cache/qgate/oracles")
        );
        let none = env(&[]);
        let d = cache_dir_from(&none);
        assert!(d.is_absolute(), "{}", d.display());
        assert!(d.starts_with(std::env::temp_dir()), "{}", d.display());
    }

    #[test]
    #[cfg(target_os = "macos")]
    fn macos_library_caches() {
        let e = env(&[("HOME", "/Users/u"), ("XDG_CACHE_HOME", "/x")]);
        assert_eq!(
            cache_dir_from(&e),
            PathBuf::from("/Users/u/Library/Caches/qgate/oracles")
        );
    }
}
