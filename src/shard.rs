//! Sharded oracle runs: `qgate oracle --shard i/N` computes sequences `i, i+N, i+2N, …` of a plan into a
//! *partial* capture; `qgate merge` joins the N partials into the capture the unsharded run writes, byte for
//! byte when every shard ran with the same model directory, device and execution mode.
//!
//! A partial is an ordinary `qgate-capture/1` file (its sequences renumbered `0..k`) with runtime
//! `qgate-oracle-shard` and a `shard` metadata object:
//!
//! | key | meaning |
//! |---|---|
//! | `index`, `count` | this is shard `index` of `count` (0-based) |
//! | `plan_sha256` | the whole plan's hash (the partial's own `plan_sha256` is of its own tokens) |
//! | `plan_sequences` | how many sequences the whole plan has |
//! | `sequences` | the plan index of each of this partial's sequences |
//!
//! A partial is never accepted as an oracle or a candidate: `qgate run` refuses it and names `qgate merge`.
//!
//! `merge` refuses (exit 2, one line naming the file) partials that disagree on anything that decides the
//! numbers — model weights hashes, dtype, qgate version, rollout length, EOS ids, vocabulary, the plan —
//! a missing or repeated shard, sequences that are not the shard's stride, or tokens whose hash is not the
//! plan's. Partials computed on different device kinds (CPU and GPU) are refused too: their numbers differ
//! within the oracle's tolerance but not bit for bit, so their union would be no run's output.
use crate::capture::{Capture, CaptureMeta, CaptureWriter, TensorSpec};
use crate::error::{Error, Result};
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The runtime string of a partial capture.
pub const SHARD_RUNTIME: &str = "qgate-oracle-shard";
/// The runtime string of a whole oracle capture.
pub const ORACLE_RUNTIME: &str = "qgate-oracle";

/// Shard `index` of `count` (0-based): the plan's sequences `index, index + count, …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Parse `i/N` with `0 ≤ i < N`.
    pub fn parse(spec: &str) -> Result<Shard> {
        let bad = || {
            Error::usage(format!(
                "--shard `{spec}`: expected i/N with 0 ≤ i < N (shard i of N, counting from 0), e.g. 0/4"
            ))
        };
        let (i, n) = spec.trim().split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// The plan indices this shard computes.
    pub fn sequences(&self, plan_len: usize) -> Vec<usize> {
        (self.index..plan_len).step_by(self.count).collect()
    }

    /// The shard's sub-plan. More shards than sequences (some shard would compute nothing) is a usage
    /// error.
    pub fn select(&self, plan: &[Vec<i64>]) -> Result<Vec<Vec<i64>>> {
        if self.count > plan.len() {
            return Err(Error::usage(format!(
                "--shard {}/{}: the plan has only {} sequence(s), so some shards would compute nothing; use at most {} shards",
                self.index,
                self.count,
                plan.len(),
                plan.len()
            )));
        }
        let idx = self.sequences(plan.len());
        Ok(idx.into_iter().map(|i| plan[i].clone()).collect())
    }

    /// The `shard` metadata object of a partial computed from `plan`.
    pub fn metadata(&self, plan: &[Vec<i64>]) -> Value {
        json!({
            "index": self.index,
            "count": self.count,
            "plan_sha256": crate::oracle::plan_sha256(plan),
            "plan_sequences": plan.len(),
            "sequences": self.sequences(plan.len()),
        })
    }
}

/// What a partial says about itself.
#[derive(Debug, Clone, PartialEq)]
struct ShardInfo {
    shard: Shard,
    plan_sha256: String,
    plan_sequences: usize,
    sequences: Vec<usize>,
}

/// The shard description of a capture, if it is a partial (`None` for any other capture).
pub fn shard_of(c: &Capture) -> Option<(usize, usize)> {
    let s = c.meta.extra.get("shard")?;
    Some((
        s.get("index")?.as_u64()? as usize,
        s.get("count")?.as_u64()? as usize,
    ))
}

/// Refuse a partial capture where a whole one is needed (`role`: "oracle", "candidate", "control").
pub fn refuse_partial(c: &Capture, role: &str) -> Result<()> {
    if c.meta.runtime == SHARD_RUNTIME || c.meta.extra.contains_key("shard") {
        let which = shard_of(c)
            .map(|(i, n)| format!("shard {i}/{n}"))
            .unwrap_or_else(|| "a shard".into());
        return Err(Error::input(
            &c.path,
            format!(
                "is {which} of an oracle run (a partial capture), not a whole {role}; join all shards first with `qgate merge --out FILE PARTS…`"
            ),
        ));
    }
    Ok(())
}

fn read_info(c: &Capture) -> Result<ShardInfo> {
    let bad = |what: &str| {
        Error::input(
            &c.path,
            format!("is not a qgate oracle shard ({what}); `qgate merge` joins the partial captures of `qgate oracle --shard i/N`"),
        )
    };
    if c.meta.runtime != SHARD_RUNTIME {
        return Err(bad(&format!("runtime `{}`", c.meta.runtime)));
    }
    let s = c
        .meta
        .extra
        .get("shard")
        .ok_or_else(|| bad("no `shard` metadata"))?;
    let num = |k: &str| {
        s.get(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| bad(&format!("`shard.{k}` missing or not a number")))
    };
    let index = num("index")?;
    let count = num("count")?;
    let plan_sequences = num("plan_sequences")?;
    let plan_sha256 = s
        .get("plan_sha256")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`shard.plan_sha256` missing"))?
        .to_string();
    if plan_sha256.len() != 64 || !plan_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("`shard.plan_sha256` is not a SHA-256 in hex"));
    }
    let sequences = s
        .get("sequences")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("`shard.sequences` missing"))?
        .iter()
        .map(|v| v.as_u64().map(|x| x as usize))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("`shard.sequences` is not a list of indices"))?;
    if count == 0 || index >= count {
        return Err(bad(&format!("shard {index}/{count} is out of range")));
    }
    // How many sequences the shard must hold, by arithmetic (the numbers come from the file: nothing is
    // allocated from them before they are checked against what the file holds).
    let expected = if index < plan_sequences {
        (plan_sequences - index - 1) / count + 1
    } else {
        0
    };
    if count > plan_sequences || expected != sequences.len() {
        return Err(Error::input(
            &c.path,
            format!(
                "shard {index}/{count} of a plan of {plan_sequences} sequences lists {} sequences; `qgate oracle --shard` never writes that",
                sequences.len()
            ),
        ));
    }
    let shard = Shard { index, count };
    if sequences != shard.sequences(plan_sequences) {
        return Err(Error::input(
            &c.path,
            format!(
                "shard {index}/{count} lists plan sequences {sequences:?}, not every {count}th from {index} of {plan_sequences}"
            ),
        ));
    }
    if sequences.len() != c.len() {
        return Err(Error::input(
            &c.path,
            format!(
                "shard {index}/{count} lists {} sequences but holds {}",
                sequences.len(),
                c.len()
            ),
        ));
    }
    let own = crate::oracle::plan_sha256(&c.plan());
    if c.meta.extra.get("plan_sha256").and_then(Value::as_str) != Some(own.as_str()) {
        return Err(Error::input(
            &c.path,
            "the shard's recorded plan_sha256 does not match its own tokens (edited after qgate wrote it?)",
        ));
    }
    Ok(ShardInfo {
        shard,
        plan_sha256,
        plan_sequences,
        sequences,
    })
}

/// Metadata keys every shard must agree on exactly (they decide the numbers or name the run).
const MUST_AGREE: &[&str] = &[
    "qgate_version",
    "model_type",
    "weights_sha256",
    "rollout_max",
    "eos_token_ids",
    "reference",
    "cpu_kernels",
];

/// The device kind of a `device` string: `cpu`, `cuda`, `metal`.
fn device_kind(d: &str) -> &str {
    d.split(':').next().unwrap_or(d)
}

/// Join partial captures into the whole-plan capture at `out` (temp file + rename). Returns the path.
pub fn merge(parts: &[Capture], out: &Path) -> Result<PathBuf> {
    let first = parts
        .first()
        .ok_or_else(|| Error::usage("qgate merge: no partial captures given"))?;
    let infos = parts.iter().map(read_info).collect::<Result<Vec<_>>>()?;
    let count = infos[0].shard.count;
    // Shard index → part. A map, not a vector of `count` slots: `count` comes from the files.
    let mut slot: std::collections::BTreeMap<usize, usize> = Default::default();
    for (k, (c, info)) in parts.iter().zip(&infos).enumerate() {
        if info.shard.count != count
            || info.plan_sha256 != infos[0].plan_sha256
            || info.plan_sequences != infos[0].plan_sequences
        {
            return Err(Error::input(
                &c.path,
                format!(
                    "is shard {}/{} of plan {}… ({} sequences), but {} is shard {}/{} of plan {}… ({} sequences): not parts of one run",
                    info.shard.index,
                    info.shard.count,
                    short(&info.plan_sha256),
                    info.plan_sequences,
                    first.path.display(),
                    infos[0].shard.index,
                    count,
                    short(&infos[0].plan_sha256),
                    infos[0].plan_sequences
                ),
            ));
        }
        if let Some(&j) = slot.get(&info.shard.index) {
            return Err(Error::input(
                &c.path,
                format!(
                    "is shard {}/{count} again (also {})",
                    info.shard.index,
                    parts[j].path.display()
                ),
            ));
        }
        slot.insert(info.shard.index, k);
        check_agrees(first, c)?;
    }
    if slot.len() < count {
        // At most `parts.len() + 4` indices are visited: the first few missing ones are named.
        let mut missing: Vec<String> = (0..count)
            .filter(|i| !slot.contains_key(i))
            .take(4)
            .map(|i| format!("{i}/{count}"))
            .collect();
        if count - slot.len() > missing.len() {
            missing.push(format!("… ({} in all)", count - slot.len()));
        }
        return Err(Error::usage(format!(
            "qgate merge: shard(s) {} missing; all {count} shards of the run are needed",
            missing.join(", ")
        )));
    }
    let n = infos[0].plan_sequences;
    // Where plan sequence `s` lives: (part, sequence within the part).
    let mut place = vec![(0usize, 0usize); n];
    for (k, info) in infos.iter().enumerate() {
        for (j, &s) in info.sequences.iter().enumerate() {
            place[s] = (k, j);
        }
    }
    let plan: Vec<Vec<i64>> = place.iter().map(|&(k, j)| parts[k].seq(j).tokens).collect();
    let sha = crate::oracle::plan_sha256(&plan);
    if sha != infos[0].plan_sha256 {
        return Err(Error::input(
            &first.path,
            format!(
                "the shards' tokens hash to plan {}…, not the plan {}… they name",
                short(&sha),
                short(&infos[0].plan_sha256)
            ),
        ));
    }

    let meta = merged_meta(parts, &sha)?;
    let mut specs = Vec::new();
    for (i, &(k, j)) in place.iter().enumerate() {
        let v = parts[k].seq(j);
        let path = &parts[k].path;
        let logits = v.logits.ok_or_else(|| {
            Error::input(
                path,
                format!("sequence {j} has no logits (not an oracle shard)"),
            )
        })?;
        let rollout = v.rollout.as_ref().ok_or_else(|| {
            Error::input(
                path,
                format!("sequence {j} has no rollout (not an oracle shard)"),
            )
        })?;
        let margins = v.rollout_margin.as_ref().ok_or_else(|| {
            Error::input(
                path,
                format!("sequence {j} has no rollout_margin (not an oracle shard)"),
            )
        })?;
        if logits.rows != v.tokens.len() || margins.len() != rollout.len() {
            return Err(Error::input(
                path,
                format!("sequence {j} does not hold one logits row per token"),
            ));
        }
        specs.push(TensorSpec::new(
            format!("seq.{i}.tokens"),
            Dtype::I64,
            &[v.tokens.len()],
        ));
        specs.push(TensorSpec::new(
            format!("seq.{i}.logits"),
            logits.kind.dtype(),
            &[logits.rows, logits.cols],
        ));
        specs.push(TensorSpec::new(
            format!("seq.{i}.rollout"),
            Dtype::I64,
            &[rollout.len()],
        ));
        specs.push(TensorSpec::new(
            format!("seq.{i}.rollout_margin"),
            Dtype::F32,
            &[rollout.len(), 2],
        ));
    }
    let mut w = CaptureWriter::create(out, &meta, &specs)?;
    for &(k, j) in &place {
        let v = parts[k].seq(j);
        w.write_i64(&v.tokens)?;
        if let Some(l) = &v.logits {
            w.write_bytes(l.bytes())?;
        }
        w.write_i64(v.rollout.as_deref().unwrap_or(&[]))?;
        let m: Vec<f32> = v
            .rollout_margin
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(p, l)| [p, l])
            .collect();
        w.write_f32(&m)?;
    }
    w.finish()
}

/// The first 12 characters of a hash for messages (the whole string when it is shorter or not ASCII).
fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// `c` agrees with `first` on everything that decides the numbers.
fn check_agrees(first: &Capture, c: &Capture) -> Result<()> {
    let (a, b) = (&first.meta, &c.meta);
    let differ = |what: &str, x: String, y: String| {
        Err(Error::input(
            &c.path,
            format!(
                "{what} is {y}, but {} has {x}: shards of one run must agree",
                first.path.display()
            ),
        ))
    };
    if a.dtype != b.dtype {
        return differ("dtype", a.dtype.clone(), b.dtype.clone());
    }
    if a.label != b.label {
        return differ("label", a.label.clone(), b.label.clone());
    }
    if a.vocab_size != b.vocab_size {
        return differ(
            "vocab_size",
            a.vocab_size.to_string(),
            b.vocab_size.to_string(),
        );
    }
    for key in MUST_AGREE {
        let (x, y) = (a.extra.get(*key), b.extra.get(*key));
        if x != y {
            let show = |v: Option<&Value>| v.map(|v| v.to_string()).unwrap_or("absent".into());
            let what = if *key == "weights_sha256" {
                "the model's weights hashes".to_string()
            } else {
                format!("`{key}`")
            };
            return differ(&what, show(x), show(y));
        }
    }
    let dev = |m: &CaptureMeta| {
        m.extra
            .get("device")
            .and_then(Value::as_str)
            .unwrap_or("cpu")
            .to_string()
    };
    let (da, db) = (dev(a), dev(b));
    if device_kind(&da) != device_kind(&db) {
        return Err(Error::input(
            &c.path,
            format!(
                "was computed on {db}, {} on {da}: CPU and GPU runs agree within tolerance, not bit for bit, so their union would be no run's output; compute every shard on one kind of device",
                first.path.display()
            ),
        ));
    }
    Ok(())
}

/// The whole run's metadata: the first shard's, without `shard`, runtime `qgate-oracle`, the whole plan's
/// hash, and the devices / execution modes of all shards where they differ (`cuda:0,cuda:1`).
fn merged_meta(parts: &[Capture], plan_sha: &str) -> Result<CaptureMeta> {
    let mut meta = parts[0].meta.clone();
    meta.runtime = ORACLE_RUNTIME.to_string();
    meta.extra.remove("shard");
    meta.extra
        .insert("plan_sha256".into(), Value::String(plan_sha.to_string()));
    for key in ["device", "execution", "model_dir"] {
        let mut seen: Vec<String> = Vec::new();
        for p in parts {
            if let Some(v) = p.meta.extra.get(key).and_then(Value::as_str) {
                if !seen.iter().any(|s| s == v) {
                    seen.push(v.to_string());
                }
            }
        }
        if seen.len() > 1 {
            meta.extra.insert(key.into(), Value::String(seen.join(",")));
        }
    }
    Ok(meta)
}
