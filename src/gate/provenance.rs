//! Oracle provenance: the gate is only as good as its oracle, so `--oracle FILE` must prove where it came
//! from before anything is compared with it.
//!
//! - With `--model`: the capture must carry that model's weights sha256 (every weights file, same
//!   hashes), as `qgate oracle` records them; a capture without them, or with other hashes, is refused
//!   (exit 2, naming both).
//! - Without `--model`: a qgate oracle capture (runtime `qgate-oracle`, weights and plan hashes present, the
//!   plan hash matching its own tokens) or an HF transformers capture (runtime `transformers-…`) is
//!   accepted; anything else — a bundle's capture, a simulation, an import — is refused unless the user
//!   passes `--trust-oracle`, and the report then says "oracle provenance unverified".
//! - Never, even with `--trust-oracle`: an oracle that *is* one of the candidates (the same file, or the
//!   same per-position data under another label). That check is in `roles`.
use crate::capture::Capture;
use crate::error::{Error, Result};
use serde::Serialize;
use std::path::Path;

/// Where the oracle came from, as far as qgate could verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Provenance {
    /// Computed by this qgate run (or its cache, keyed by the weights' hashes) from `--model`.
    ComputedHere,
    /// A qgate oracle capture whose recorded weights hashes equal `--model`'s.
    VerifiedAgainstModel,
    /// A qgate oracle capture; no `--model` given, so the weights were not checked.
    QgateOracle,
    /// A capture written by HF transformers (qgate's fixture generator); weights not checked.
    HfTransformers,
    /// Accepted only because of `--trust-oracle`.
    Unverified,
}

impl Provenance {
    pub fn describe(&self) -> &'static str {
        match self {
            Provenance::ComputedHere => "computed by qgate from the model's weights",
            Provenance::VerifiedAgainstModel => {
                "qgate oracle capture, weights sha256 verified against --model"
            }
            Provenance::QgateOracle => "qgate oracle capture (weights not checked: no --model)",
            Provenance::HfTransformers => {
                "HF transformers capture (weights not checked: it records no weights hashes)"
            }
            Provenance::Unverified => "oracle provenance unverified (--trust-oracle)",
        }
    }
}

/// The weights hashes a capture records (`weights_sha256: [{file, sha256}]`), sorted.
pub fn recorded_weights(c: &Capture) -> Option<Vec<(String, String)>> {
    let arr = c.meta.extra.get("weights_sha256")?.as_array()?;
    let mut out = Vec::new();
    for v in arr {
        let f = v.get("file")?.as_str()?.to_string();
        let h = v.get("sha256")?.as_str()?.to_string();
        out.push((f, h));
    }
    out.sort();
    (!out.is_empty()).then_some(out)
}

fn is_qgate_oracle(c: &Capture) -> bool {
    c.meta.runtime == "qgate-oracle"
}

/// Check an `--oracle FILE` capture. `model`: the `--model` directory and its weights hashes.
pub fn check(
    oracle: &Capture,
    model: Option<(&Path, &[(String, String)])>,
    trust: bool,
) -> Result<Provenance> {
    let path = &oracle.path;
    // A shard holds only part of the plan: never an oracle, not even with --trust-oracle.
    crate::shard::refuse_partial(oracle, "oracle")?;
    if is_qgate_oracle(oracle) {
        let plan = crate::oracle::plan_sha256(&oracle.plan());
        match oracle.meta.extra.get("plan_sha256").and_then(|v| v.as_str()) {
            Some(p) if p == plan => {}
            Some(_) => {
                return Err(Error::input(
                    path,
                    "oracle capture's recorded plan_sha256 does not match its own tokens (edited after qgate wrote it?); refusing it as an oracle",
                ))
            }
            None => {
                if !trust {
                    return Err(Error::input(
                        path,
                        "says it is a qgate oracle but records no plan_sha256; refusing it as an oracle (pass --trust-oracle to use it anyway)",
                    ));
                }
            }
        }
    }
    if let Some((dir, hashes)) = model {
        let mut want: Vec<(String, String)> = hashes.to_vec();
        want.sort();
        return match recorded_weights(oracle) {
            Some(have) if have == want => Ok(Provenance::VerifiedAgainstModel),
            Some(have) => {
                let diff = want
                    .iter()
                    .find(|w| !have.contains(w))
                    .map(|w| format!("{} sha256 {}…", w.0, &w.1[..w.1.len().min(12)]))
                    .unwrap_or_else(|| "a different set of files".into());
                Err(Error::input(
                    path,
                    format!(
                        "oracle capture was computed from other weights than --model {} (the model has {diff}, the capture records {} file hash(es) that differ)",
                        dir.display(),
                        have.len()
                    ),
                ))
            }
            None => Err(Error::input(
                path,
                format!(
                    "oracle capture records no weights sha256, so it cannot be verified against --model {}; run `qgate oracle --model {}` (or `--oracle <dtype>`), or drop --model and pass --trust-oracle",
                    dir.display(),
                    dir.display()
                ),
            )),
        };
    }
    if is_qgate_oracle(oracle) && recorded_weights(oracle).is_some() {
        return Ok(Provenance::QgateOracle);
    }
    if oracle.meta.runtime.starts_with("transformers-") {
        return Ok(Provenance::HfTransformers);
    }
    if trust {
        return Ok(Provenance::Unverified);
    }
    Err(Error::input(
        path,
        format!(
            "is not a qgate or HF oracle capture (runtime `{}`, label `{}`); a candidate cannot vouch for itself. Use --oracle <dtype> with --model, a capture from `qgate oracle`, or pass --trust-oracle to accept it (the report will say \"oracle provenance unverified\")",
            oracle.meta.runtime, oracle.meta.label
        ),
    ))
}
