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
    /// Per rollout step: (probability margin, logit margin) of the row that chose the token.
    pub rollout_margin: Vec<(f32, f32)>,
}

/// top1 − top2 of one logits row, as softmax probabilities (f64 sums) and as logits.
pub fn row_margins(row: &[f32]) -> (f32, f32) {
    let (mut l1, mut l2) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in row {
        if x > l1 {
            l2 = l1;
            l1 = x;
        } else if x > l2 {
            l2 = x;
        }
    }
    let z: f64 = row.iter().map(|&x| ((x - l1) as f64).exp()).sum();
    let p_margin = (1.0 - ((l2 - l1) as f64).exp()) / z;
    (p_margin as f32, l1 - l2)
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
    let mut margins = Vec::new();
    let mut last: Vec<f32> = logits[logits.len() - v..].to_vec();
    for step in 0..rollout {
        let next = argmax(&last) as u32;
        out.push(next as i64);
        margins.push(row_margins(&last));
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
        rollout_margin: margins,
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
    let v = model.cfg.vocab_size;
    if req.plan.is_empty() {
        return Err(Error::usage("the plan has no sequences"));
    }
    let kind = logits_kind(req.precision);
    let total: u64 = req.plan.iter().map(|s| s.len() as u64).sum();
    let bar = progress_bar(req.progress, total);
    let mut spill = tempfile::tempfile().map_err(|e| io_err(std::env::temp_dir(), e))?;
    let mut rollouts = Vec::with_capacity(req.plan.len());
    let mut margins = Vec::with_capacity(req.plan.len());
    for seq in req.plan {
        let r = run_sequence(&model, seq, req.rollout)?;
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
        margins.push(r.rollout_margin);
        bar.inc(seq.len() as u64);
    }
    bar.finish_and_clear();

    let mut meta = CaptureMeta::new(
        &format!("oracle-{}", req.precision.name()),
        "qgate-oracle",
        req.precision.name(),
        v,
    );
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
        specs.push(TensorSpec::new(
            format!("seq.{i}.rollout_margin"),
            Dtype::F32,
            &[ro.len(), 2],
        ));
    }
    let mut w = CaptureWriter::create(req.out, &meta, &specs)?;
    spill
        .seek(SeekFrom::Start(0))
        .map_err(|e| io_err("spill file", e))?;
    let mut buf = vec![0u8; 1 << 20];
    for ((seq, ro), m) in req.plan.iter().zip(&rollouts).zip(&margins) {
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
        w.write_f32(&m.iter().flat_map(|&(p, l)| [p, l]).collect::<Vec<f32>>())?;
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
