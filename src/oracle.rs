//! Running the oracle over a plan: teacher-forced logits for every position of every sequence, then a
//! greedy rollout with the recurrent single-step path, written as a `qgate-capture/1` file.
use crate::capture::{CaptureMeta, CaptureWriter, FloatKind, TensorSpec};
use crate::error::{io_err, Error, Result};
use crate::model::precision::Precision;
use crate::model::weights::WeightStore;
use crate::model::{argmax, Model};
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Canonical hash of a plan's token sequences (not of the file bytes): two captures over the same tokens
/// share it, whatever else they hold.
pub fn plan_sha256(plan: &[Vec<i64>]) -> String {
    let mut h = Sha256::new();
    h.update(b"qgate-plan/1");
    for seq in plan {
        h.update((seq.len() as u64).to_le_bytes());
        for t in seq {
            h.update(t.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// How logits are stored: exactly as the oracle produced them (bf16 values as BF16, f16 as F16).
pub fn logits_kind(prec: Precision) -> FloatKind {
    match prec {
        Precision::F32 => FloatKind::F32,
        Precision::BF16 => FloatKind::BF16,
        Precision::F16 => FloatKind::F16,
    }
}

pub struct SequenceResult {
    pub logits: Vec<f32>,
    pub rollout: Vec<i64>,
}

/// Teacher-forced logits `[T, V]` and the greedy rollout of up to `rollout` tokens (stopping after an EOS
/// token, which is kept: the stop is a token too).
pub fn run_sequence(model: &Model, tokens: &[i64], rollout: usize) -> Result<SequenceResult> {
    let v = model.cfg.vocab_size;
    let ids: Vec<u32> = tokens
        .iter()
        .map(|&t| {
            u32::try_from(t).map_err(|_| Error::usage(format!("token id {t} is not a valid id")))
        })
        .collect::<Result<_>>()?;
    let mut cache = model.new_cache();
    let logits: Vec<f32> = model.forward(&ids, &mut cache)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::new();
    let mut last: Vec<f32> = logits[logits.len() - v..].to_vec();
    for step in 0..rollout {
        let next = argmax(&last) as u32;
        out.push(next as i64);
        if model.cfg.eos_token_ids.contains(&(next as i64)) || step + 1 == rollout {
            break;
        }
        last = model
            .forward(&[next], &mut cache)?
            .flatten_all()?
            .to_vec1()?;
    }
    Ok(SequenceResult {
        logits,
        rollout: out,
    })
}

pub struct OracleRequest<'a> {
    pub model_dir: &'a Path,
    pub precision: Precision,
    pub plan: &'a [Vec<i64>],
    pub rollout: usize,
    pub out: &'a Path,
    pub progress: bool,
}

/// Load the model, run every sequence, and write the capture (temp file + rename). Logits are spilled to
/// an anonymous temp file as they are produced so that memory holds one sequence at a time.
pub fn run_oracle(req: &OracleRequest) -> Result<PathBuf> {
    let model = Model::load(req.model_dir, req.precision)?;
    let ws = WeightStore::open(req.model_dir)?;
    let label = format!("oracle-{}", req.precision.name());
    run_model(req, &model, &ws, &label, "qgate-oracle", Default::default())
}

/// Run an already loaded model over the plan and write the capture: the oracle, or the quantization
/// simulator's fake-quantized model (`label`, `runtime` and `extra` metadata set by the caller).
pub fn run_model(
    req: &OracleRequest,
    model: &Model,
    ws: &WeightStore,
    label: &str,
    runtime: &str,
    more: serde_json::Map<String, serde_json::Value>,
) -> Result<PathBuf> {
    let v = model.cfg.vocab_size;
    if req.plan.is_empty() {
        return Err(Error::usage("the plan has no sequences"));
    }
    let kind = logits_kind(req.precision);
    let total: u64 = req.plan.iter().map(|s| s.len() as u64).sum();
    let bar = progress_bar(req.progress, total);
    let mut spill = tempfile::tempfile().map_err(|e| io_err(std::env::temp_dir(), e))?;
    let mut rollouts = Vec::with_capacity(req.plan.len());
    for seq in req.plan {
        let r = run_sequence(model, seq, req.rollout)?;
        let mut bytes = Vec::with_capacity(r.logits.len() * kind.size());
        for x in &r.logits {
            match kind {
                FloatKind::F32 => bytes.extend_from_slice(&x.to_le_bytes()),
                FloatKind::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes()),
                FloatKind::F16 => bytes.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes()),
            }
        }
        spill
            .write_all(&bytes)
            .map_err(|e| io_err("spill file", e))?;
        rollouts.push(r.rollout);
        bar.inc(seq.len() as u64);
    }
    bar.finish_and_clear();

    let mut meta = CaptureMeta::new(label, runtime, req.precision.name(), v);
    let weights: Vec<serde_json::Value> = ws
        .weights_sha256()?
        .into_iter()
        .map(|(f, h)| serde_json::json!({ "file": f, "sha256": h }))
        .collect();
    let extra = &mut meta.extra;
    extra.insert("qgate_version".into(), env!("CARGO_PKG_VERSION").into());
    extra.insert(
        "model_dir".into(),
        req.model_dir.display().to_string().into(),
    );
    extra.insert("model_type".into(), model.cfg.model_type.clone().into());
    extra.insert("weights_sha256".into(), weights.into());
    extra.insert("plan_sha256".into(), plan_sha256(req.plan).into());
    extra.insert("rollout_max".into(), req.rollout.into());
    extra.insert(
        "eos_token_ids".into(),
        model.cfg.eos_token_ids.clone().into(),
    );
    extra.insert(
        "reference".into(),
        "HF transformers 5.23.0 eager forward; torch fallbacks for causal conv and delta rule"
            .into(),
    );
    extra.extend(more);

    let mut specs = Vec::new();
    for (i, (seq, ro)) in req.plan.iter().zip(&rollouts).enumerate() {
        specs.push(TensorSpec::new(
            format!("seq.{i}.tokens"),
            Dtype::I64,
            &[seq.len()],
        ));
        specs.push(TensorSpec::new(
            format!("seq.{i}.logits"),
            kind.dtype(),
            &[seq.len(), v],
        ));
        specs.push(TensorSpec::new(
            format!("seq.{i}.rollout"),
            Dtype::I64,
            &[ro.len()],
        ));
    }
    let mut w = CaptureWriter::create(req.out, &meta, &specs)?;
    spill
        .seek(SeekFrom::Start(0))
        .map_err(|e| io_err("spill file", e))?;
    let mut buf = vec![0u8; 1 << 20];
    for (seq, ro) in req.plan.iter().zip(&rollouts) {
        w.write_i64(seq)?;
        let mut left = seq.len() * v * kind.size();
        while left > 0 {
            let n = left.min(buf.len());
            spill
                .read_exact(&mut buf[..n])
                .map_err(|e| io_err("spill file", e))?;
            w.write_bytes(&buf[..n])?;
            left -= n;
        }
        w.write_i64(ro)?;
    }
    w.finish()
}

pub fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} positions, ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("oracle");
    bar
}
