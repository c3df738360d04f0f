//! Running the oracle over a plan: teacher-forced logits for every position of every sequence, then a
//! greedy rollout with the recurrent single-step path, written as a `qgate-capture/1` file.
use crate::capture::{CaptureMeta, CaptureWriter, FloatKind, TensorSpec};
use crate::error::{io_err, Error, Result};
use crate::model::config::TextConfig;
use crate::model::precision::Precision;
use crate::model::streaming::{self, Streamer};
use crate::model::weights::WeightStore;
use crate::model::{argmax, Cache, Model};
use candle_core::{Device, Tensor};
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
    pub rollout: Rollout,
}

/// A greedy continuation and, per step, the (softmax-probability, logit) top1−top2 margin of the row that
/// chose the token, written as `seq.{i}.rollout_margin` so the gate can tell a tie from a confident
/// divergence at any step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollout {
    pub tokens: Vec<i64>,
    pub margins: Vec<(f32, f32)>,
}

impl Rollout {
    /// Take the greedy token of `row` (first index on ties, as torch.argmax) and record its margins.
    pub fn push_argmax(&mut self, row: &[f32]) -> u32 {
        let next = argmax(row);
        self.tokens.push(next as i64);
        self.margins.push(row_margins(row));
        next as u32
    }
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

/// As [`run_sequence`], with the logits written to `sink` encoded as `kind` (the capture's bytes) and the
/// rollout returned. On a GPU in bf16/f16 the logits stay in the model dtype from the head's product to
/// the file (the same values: a bf16 capture of f32-widened bf16 values holds the same bits), so neither
/// the device nor the host holds an f32 copy of the `[T, V]` block; they are copied from the device once
/// and written from that buffer (no encoded copy).
pub fn run_sequence_into(
    model: &Model,
    tokens: &[i64],
    rollout: usize,
    kind: FloatKind,
    sink: &mut impl Write,
) -> Result<Rollout> {
    let v = model.cfg.vocab_size;
    let ids = token_ids(tokens)?;
    let mut cache = model.new_cache();
    // On a GPU the head writes the logits in row blocks (`logits_native_blocks`); each is copied from
    // the device and written in turn, in order.
    let blocks = model.forward_native_blocks(&ids, &mut cache)?;
    let Some(last_block) = blocks.last() else {
        return Err(Error::Internal(
            "an empty sequence has no logits (the plan check refuses one)".into(),
        ));
    };
    // the last row, for the rollout's first step (bf16/f16 → f32 is exact)
    let last_rows = last_block.dim(0)?;
    let mut last: Vec<f32> = last_block
        .narrow(0, last_rows.saturating_sub(1), 1)?
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    if last.len() != v {
        return Err(Error::Internal(format!(
            "the head wrote rows of {} logits, the model's vocabulary is {v}",
            last.len()
        )));
    }
    for block in &blocks {
        let logits = block.flatten_all()?;
        let written = match (logits.dtype(), kind) {
            // 16-bit logits in the capture's dtype: their bits, copied once from the device (or the
            // host tensor) and written as they are
            (candle_core::DType::BF16, FloatKind::BF16) => {
                use half::slice::HalfFloatSliceExt;
                write_u16_le(sink, logits.to_vec1::<half::bf16>()?.reinterpret_cast())
            }
            (candle_core::DType::F16, FloatKind::F16) => {
                use half::slice::HalfFloatSliceExt;
                write_u16_le(sink, logits.to_vec1::<half::f16>()?.reinterpret_cast())
            }
            _ => {
                let x: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
                let mut bytes = Vec::with_capacity(x.len() * kind.size());
                encode_into(&mut bytes, kind, &x);
                sink.write_all(&bytes)
            }
        };
        written.map_err(|e| io_err("spill file", e))?;
    }
    drop(blocks);
    let mut out = Rollout::default();
    for step in 0..rollout {
        let next = out.push_argmax(&last);
        if model.cfg.eos_token_ids.contains(&(next as i64)) || step + 1 == rollout {
            break;
        }
        last = model
            .forward(&[next], &mut cache)?
            .flatten_all()?
            .to_vec1()?;
    }
    Ok(out)
}

/// 16-bit values as little-endian bytes: on a little-endian CPU their memory as it is (no copy).
fn write_u16_le(sink: &mut impl Write, bits: &[u16]) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        sink.write_all(bytemuck::cast_slice(bits))
    } else {
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        sink.write_all(&bytes)
    }
}

/// Teacher-forced logits `[T, V]` and the greedy rollout of up to `rollout` tokens (stopping after an EOS
/// token, which is kept: the stop is a token too).
pub fn run_sequence(model: &Model, tokens: &[i64], rollout: usize) -> Result<SequenceResult> {
    let v = model.cfg.vocab_size;
    let ids = token_ids(tokens)?;
    let mut cache = model.new_cache();
    let logits: Vec<f32> = model.forward(&ids, &mut cache)?.flatten_all()?.to_vec1()?;
    let mut out = Rollout::default();
    let mut last: Vec<f32> = logits[logits.len() - v..].to_vec();
    for step in 0..rollout {
        let next = out.push_argmax(&last);
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

/// In memory (every layer loaded once) or layer-streamed (see `model::streaming`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    /// Stream when the in-memory footprint exceeds the memory budget.
    Auto,
    Stream,
    InMemory,
}

#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub mode: Execution,
    /// Where the oracle runs (`--device`); memory budgets are then the device's.
    pub device: Device,
    /// Memory budget in bytes (decides `Auto`, and whether streamed runs do rollouts in memory).
    pub max_memory: u64,
    /// Head rows converted at a time when streaming.
    pub head_chunk: usize,
    /// Streaming: read and convert the next layer's weights on a background thread while the current
    /// layer computes (same numbers either way).
    pub prefetch: bool,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            mode: Execution::Auto,
            device: Device::Cpu,
            max_memory: default_memory_budget(),
            head_chunk: streaming::DEFAULT_HEAD_CHUNK,
            prefetch: true,
        }
    }
}

impl ExecOptions {
    /// Options for the parsed `--device`, `--max-memory` (default: on a GPU nine tenths of its free
    /// memory, else `default_memory_budget`), `--stream` / `--no-stream`.
    pub fn from_args(
        device: Device,
        max_memory: Option<&str>,
        stream: bool,
        no_stream: bool,
    ) -> Result<ExecOptions> {
        let max_memory = match max_memory {
            Some(m) => parse_bytes(m).ok_or_else(|| {
                Error::usage(format!(
                    "--max-memory `{m}`: expected a size such as 8GiB, 24G or 6000MB"
                ))
            })?,
            None => match crate::model::device::free_device_memory(&device) {
                Some(free) => free / 10 * 9,
                None => default_memory_budget(),
            },
        };
        let mode = match (stream, no_stream) {
            (true, _) => Execution::Stream,
            (_, true) => Execution::InMemory,
            _ => Execution::Auto,
        };
        Ok(ExecOptions {
            mode,
            device,
            max_memory,
            head_chunk: streaming::DEFAULT_HEAD_CHUNK,
            prefetch: true,
        })
    }
}

/// Three quarters of physical memory (`MemTotal` in /proc/meminfo; on macOS `sysctl hw.memsize`), else
/// 8 GiB.
pub fn default_memory_budget() -> u64 {
    physical_memory().map(|b| b / 4 * 3).unwrap_or(8 << 30)
}

/// Physical memory in bytes: `sysctl hw.memsize` (macOS).
#[cfg(target_os = "macos")]
fn physical_memory() -> Option<u64> {
    let mut bytes: u64 = 0;
    let mut len = std::mem::size_of::<u64>();
    // SAFETY: the name is NUL-terminated; `bytes`/`len` describe a writable u64 for the kernel to fill.
    let rc = unsafe {
        libc::sysctlbyname(
            c"hw.memsize".as_ptr(),
            (&mut bytes as *mut u64).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0 && len == std::mem::size_of::<u64>() && bytes > 0).then_some(bytes)
}

/// Physical memory in bytes: `MemTotal` in /proc/meminfo (Linux).
#[cfg(not(target_os = "macos"))]
fn physical_memory() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
}

/// `8GiB`, `512MiB`, `6G`, `1.5GB`, `1000000`: a byte count (K/M/G/T and their `iB` forms are powers of
/// 1024, `KB`/`MB`/`GB`/`TB` powers of 1000).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return None,
    };
    let bytes = num * mult;
    (bytes.is_finite() && bytes >= 1.0).then_some(bytes as u64)
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub struct OracleRequest<'a> {
    pub model_dir: &'a Path,
    pub precision: Precision,
    pub plan: &'a [Vec<i64>],
    pub rollout: usize,
    pub out: &'a Path,
    pub progress: bool,
    pub exec: ExecOptions,
}

fn token_ids(tokens: &[i64]) -> Result<Vec<u32>> {
    tokens
        .iter()
        .map(|&t| {
            u32::try_from(t).map_err(|_| Error::usage(format!("token id {t} is not a valid id")))
        })
        .collect()
}

/// Append logits rows to the spill in the capture's dtype.
fn encode_into(bytes: &mut Vec<u8>, kind: FloatKind, values: &[f32]) {
    for x in values {
        match kind {
            FloatKind::F32 => bytes.extend_from_slice(&x.to_le_bytes()),
            FloatKind::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes()),
            FloatKind::F16 => bytes.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes()),
        }
    }
}

/// Load the model (or stream it), run every sequence, and write the capture (temp file + rename). Logits
/// are spilled to an anonymous temp file as they are produced so that memory holds one sequence (one
/// head chunk when streaming) at a time.
pub fn run_oracle(req: &OracleRequest) -> Result<PathBuf> {
    run_oracle_as(req, crate::shard::ORACLE_RUNTIME, Default::default())
}

/// [`run_oracle`] with the capture's `runtime` and extra metadata set by the caller (a shard's partial).
pub fn run_oracle_as(
    req: &OracleRequest,
    runtime: &str,
    more: serde_json::Map<String, serde_json::Value>,
) -> Result<PathBuf> {
    let cfg = TextConfig::from_dir(req.model_dir)?;
    check_plan(req.plan, &cfg)?;
    let mut ws = WeightStore::open(req.model_dir)?;
    ws.set_device(&req.exec.device);
    let max_len = req.plan.iter().map(Vec::len).max().unwrap_or(0) + req.rollout;
    let footprint = streaming::in_memory_footprint(&cfg, &ws, max_len);
    let stream = match req.exec.mode {
        Execution::Stream => true,
        Execution::InMemory => false,
        Execution::Auto => footprint > req.exec.max_memory,
    };
    let mut spill = tempfile::tempfile().map_err(|e| io_err(std::env::temp_dir(), e))?;
    let rollouts = if stream {
        if req.exec.mode == Execution::Auto {
            eprintln!(
                "qgate: the in-memory oracle would need ~{:.1} GiB (budget {:.1} GiB): streaming layers",
                gib(footprint),
                gib(req.exec.max_memory)
            );
        }
        ws.set_streaming(true);
        run_streamed(&cfg, &ws, req, &mut spill)?
    } else {
        ws.set_streaming(true); // positioned reads: the checkpoint stays out of the resident set
        let model = Model::from_store(cfg.clone(), &ws, req.precision)?;
        announce_unused(&ws, &cfg);
        run_in_memory(req, &model, &mut spill)?
    };
    let label = format!("oracle-{}", req.precision.name());
    let execution = if stream { "streamed" } else { "in-memory" };
    write_capture_from_spill(
        req, &cfg, &ws, spill, &rollouts, &label, runtime, execution, more,
    )
}

/// Run an already loaded model over the plan and write the capture: the quantization simulator's
/// fake-quantized model (`label`, `runtime` and `more` metadata set by the caller), in memory.
pub fn run_model(
    req: &OracleRequest,
    model: &Model,
    ws: &WeightStore,
    label: &str,
    runtime: &str,
    more: serde_json::Map<String, serde_json::Value>,
) -> Result<PathBuf> {
    check_plan(req.plan, &model.cfg)?;
    announce_unused(ws, &model.cfg);
    let mut spill = tempfile::tempfile().map_err(|e| io_err(std::env::temp_dir(), e))?;
    let rollouts = run_in_memory(req, model, &mut spill)?;
    write_capture_from_spill(
        req,
        &model.cfg,
        ws,
        spill,
        &rollouts,
        label,
        runtime,
        "in-memory",
        more,
    )
}

/// The plan fits the model: sequences that are not empty, every token id inside the vocabulary (checked
/// before the weights load, not when the sequence that holds it comes up).
pub fn check_plan(plan: &[Vec<i64>], cfg: &TextConfig) -> Result<()> {
    if plan.is_empty() {
        return Err(Error::usage("the plan has no sequences"));
    }
    if let Some(i) = plan.iter().position(Vec::is_empty) {
        return Err(Error::usage(format!("plan sequence {i} is empty")));
    }
    let v = cfg.vocab_size;
    for (i, seq) in plan.iter().enumerate() {
        if let Some((p, &t)) = seq
            .iter()
            .enumerate()
            .find(|(_, &t)| t < 0 || t as u64 >= v as u64)
        {
            return Err(Error::usage(format!(
                "plan sequence {i}, position {p}: token id {t} is outside the model's vocabulary of {v} (a plan made with another tokenizer?)"
            )));
        }
    }
    Ok(())
}

/// Every sequence through the in-memory model, logits spilled in order.
fn run_in_memory(
    req: &OracleRequest,
    model: &Model,
    spill: &mut std::fs::File,
) -> Result<Vec<Rollout>> {
    let kind = logits_kind(req.precision);
    let total: u64 = req.plan.iter().map(|s| s.len() as u64).sum();
    let bar = progress_bar(req.progress, total);
    let mut rollouts = Vec::with_capacity(req.plan.len());
    for seq in req.plan {
        rollouts.push(run_sequence_into(model, seq, req.rollout, kind, spill)?);
        bar.inc(seq.len() as u64);
    }
    bar.finish_and_clear();
    Ok(rollouts)
}

/// Names of unused checkpoint tensors kept in a capture's metadata (`unused_tensors`; the count is
/// `unused_tensors_count`).
pub const UNUSED_NAMES_KEPT: usize = 100;

/// Say which stored tensors the model did not read, once per checkpoint and process (a sweep's
/// simulations load the same checkpoint again): a vision tower and an MTP head in one note (a text
/// decoder never reads them, as in HF), anything else as a warning. HF transformers also loads a
/// checkpoint with tensors its config has no place for, warning "Some weights of the model checkpoint
/// were not used", so this is a warning and not an error; the names are in the capture's metadata.
pub fn announce_unused(ws: &WeightStore, cfg: &TextConfig) {
    static SEEN: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    if let Ok(mut seen) = SEEN.lock() {
        if seen.contains(&ws.dir) {
            return;
        }
        seen.push(ws.dir.clone());
    }
    let u = ws.unused();
    if let Some(line) = ignored_note(&u) {
        eprintln!("qgate: note: {line}");
    }
    if let Some(line) = unused_warning(&u, cfg, &ws.decoder_prefix) {
        eprintln!("qgate: warning: {}: {line}", ws.dir.display());
    }
}

/// The one line about tensors a text decoder is expected to leave unread.
pub fn ignored_note(u: &crate::model::weights::UnusedTensors) -> Option<String> {
    let count =
        |n: usize, what: &str| format!("{n} {what} tensor{}", if n == 1 { "" } else { "s" });
    let mut parts = Vec::new();
    if u.vision_tower > 0 {
        parts.push(format!(
            "{} ignored (text decoder only)",
            count(u.vision_tower, "vision-tower")
        ));
    }
    if u.mtp_head > 0 {
        parts.push(format!(
            "{} ignored (HF does not build the MTP head)",
            count(u.mtp_head, "MTP-head")
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The one-line warning about stored tensors the model did not read (none: `None`).
pub fn unused_warning(
    u: &crate::model::weights::UnusedTensors,
    cfg: &TextConfig,
    decoder_prefix: &str,
) -> Option<String> {
    if u.unexpected.is_empty() {
        return None;
    }
    let n_layers = cfg.layer_types.len();
    let beyond = u
        .unexpected
        .iter()
        .filter_map(|n| {
            let rest = n.strip_prefix(decoder_prefix)?.strip_prefix("layers.")?;
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .filter(|&l| l >= n_layers)
        .max();
    let hint = match beyond {
        Some(last) => format!(
            " (config.json declares {n_layers} layers, the checkpoint holds layers up to {last}: is the config right?)"
        ),
        None => String::new(),
    };
    const SHOWN: usize = 4;
    let mut names = u
        .unexpected
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if u.unexpected.len() > SHOWN {
        names.push_str(&format!(", … ({} more)", u.unexpected.len() - SHOWN));
    }
    let n = u.unexpected.len();
    let counted = if n == 1 {
        "1 checkpoint tensor was".to_string()
    } else {
        format!("{n} checkpoint tensors were")
    };
    Some(format!(
        "{counted} NOT used by the model{hint}: {names}. The oracle runs without them, as HF \
         transformers does (\"Some weights of the model checkpoint were not used\"); the names are in \
         the capture's metadata (unused_tensors)"
    ))
}

/// Header first, then each sequence's tokens, logits (copied from the spill), rollout and its margins.
#[allow(clippy::too_many_arguments)]
fn write_capture_from_spill(
    req: &OracleRequest,
    cfg: &TextConfig,
    ws: &WeightStore,
    mut spill: std::fs::File,
    rollouts: &[Rollout],
    label: &str,
    runtime: &str,
    execution: &str,
    more: serde_json::Map<String, serde_json::Value>,
) -> Result<PathBuf> {
    let v = cfg.vocab_size;
    let kind = logits_kind(req.precision);
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
    extra.insert("model_type".into(), cfg.model_type.clone().into());
    extra.insert("execution".into(), execution.into());
    extra.insert(
        "device".into(),
        crate::model::device::device_name(ws.device()).into(),
    );
    if ws.device().is_cpu() {
        // the kernel set that computed these logits (`--kernels`; `cpu`)
        extra.insert(
            "cpu_kernels".into(),
            crate::model::cpu::active().name().into(),
        );
    }
    extra.insert("weights_sha256".into(), weights.into());
    extra.insert("plan_sha256".into(), plan_sha256(req.plan).into());
    extra.insert("rollout_max".into(), req.rollout.into());
    extra.insert("eos_token_ids".into(), cfg.eos_token_ids.clone().into());
    extra.insert(
        "reference".into(),
        "HF transformers 5.23.0 eager forward; torch fallbacks for causal conv and delta rule"
            .into(),
    );
    let unused = ws.unused();
    extra.insert(
        "unused_tensors".into(),
        unused
            .unexpected
            .iter()
            .take(UNUSED_NAMES_KEPT)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
    );
    extra.insert(
        "unused_tensors_count".into(),
        unused.unexpected.len().into(),
    );
    extra.insert(
        "ignored_tensors".into(),
        serde_json::json!({ "vision_tower": unused.vision_tower, "mtp_head": unused.mtp_head }),
    );
    extra.extend(more);

    let mut specs = Vec::new();
    for (i, (seq, ro)) in req.plan.iter().zip(rollouts).enumerate() {
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
            &[ro.tokens.len()],
        ));
        specs.push(TensorSpec::new(
            format!("seq.{i}.rollout_margin"),
            Dtype::F32,
            &[ro.tokens.len(), 2],
        ));
    }
    let mut w = CaptureWriter::create(req.out, &meta, &specs)?;
    spill
        .seek(SeekFrom::Start(0))
        .map_err(|e| io_err("spill file", e))?;
    let mut buf = vec![0u8; 1 << 20];
    for (seq, ro) in req.plan.iter().zip(rollouts) {
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
        w.write_i64(&ro.tokens)?;
        w.write_f32(
            &ro.margins
                .iter()
                .flat_map(|&(p, l)| [p, l])
                .collect::<Vec<f32>>(),
        )?;
    }
    w.finish()
}

/// The teacher-forced pass layer by layer over all sequences, the head in chunks written into the spill
/// at each row's place, then the rollouts: in memory from the kept caches when the whole model fits the
/// budget, else streaming every layer once per generated token (all sequences in lockstep).
fn run_streamed(
    cfg: &TextConfig,
    ws: &WeightStore,
    req: &OracleRequest,
    spill: &mut std::fs::File,
) -> Result<Vec<Rollout>> {
    let v = cfg.vocab_size;
    let kind = logits_kind(req.precision);
    let mut st = Streamer::new(cfg, ws, req.precision, req.exec.head_chunk)?;
    // With prefetch the next block is read from the checkpoint, converted and uploaded on the prefetch
    // thread while the current one computes, on a GPU too: its uploads are enqueued on the device's one
    // stream before the block is handed over, so every kernel that reads them runs after them.
    st.set_prefetch(req.exec.prefetch);
    let ids = req
        .plan
        .iter()
        .map(|s| token_ids(s))
        .collect::<Result<Vec<_>>>()?;
    // Where each sequence's `[T, V]` block starts in the spill.
    let mut offsets = Vec::with_capacity(ids.len());
    let mut total = 0u64;
    for s in &ids {
        offsets.push(total);
        total += (s.len() * v * kind.size()) as u64;
    }
    spill.set_len(total).map_err(|e| io_err("spill file", e))?;

    let n_layers = cfg.layer_types.len();
    let bar = layer_bar(
        req.progress,
        (n_layers + st.head_chunks()) as u64,
        "oracle (streamed)",
    );
    let keep = req.rollout > 0;
    let mut xs = ids
        .iter()
        .map(|s| st.embed(s))
        .collect::<Result<Vec<_>>>()?;
    let mut caches: Vec<Cache> = ids.iter().map(|_| Cache::default()).collect();
    st.layers(&mut xs, &mut caches, keep, &mut |l, _| {
        bar.set_message(format!("layer {}/{n_layers}", l + 1));
        bar.inc(1);
    })?;
    let hidden = st.final_norm(&xs)?;
    drop(xs);
    let mut last: Vec<Vec<f32>> = ids.iter().map(|_| vec![0f32; v]).collect();
    let mut bytes = Vec::new();
    st.head(
        &hidden,
        &mut |s, first, logits| {
            let (t, n) = logits.dims2()?;
            let vals: Vec<f32> = logits.flatten_all()?.to_vec1()?;
            for r in 0..t {
                let row = &vals[r * n..(r + 1) * n];
                bytes.clear();
                encode_into(&mut bytes, kind, row);
                let at = offsets[s] + ((r * v + first) * kind.size()) as u64;
                spill
                    .seek(SeekFrom::Start(at))
                    .and_then(|_| spill.write_all(&bytes))
                    .map_err(|e| io_err("spill file", e))?;
            }
            last[s][first..first + n].copy_from_slice(&vals[(t - 1) * n..t * n]);
            Ok(())
        },
        &mut |_| {
            bar.set_message("head");
            bar.inc(1);
        },
    )?;
    bar.finish_and_clear();
    drop(hidden);
    announce_unused(ws, cfg); // every layer and the head have been read once now
    if req.rollout == 0 {
        return Ok(ids.iter().map(|_| Rollout::default()).collect());
    }

    let eos = &cfg.eos_token_ids;
    let weights = streaming::weights_f32_bytes(ws);
    if weights + streaming::activation_bytes(cfg, 1) <= req.exec.max_memory {
        // The whole model fits: single steps in memory from the streamed caches.
        let model = Model::from_store(cfg.clone(), ws, req.precision)?;
        let mut out = Vec::with_capacity(ids.len());
        for (s, mut cache) in caches.into_iter().enumerate() {
            let mut ro = Rollout::default();
            let mut row = std::mem::take(&mut last[s]);
            for step in 0..req.rollout {
                let next = ro.push_argmax(&row);
                if eos.contains(&(next as i64)) || step + 1 == req.rollout {
                    break;
                }
                row = model
                    .forward(&[next], &mut cache)?
                    .flatten_all()?
                    .to_vec1()?;
            }
            out.push(ro);
        }
        return Ok(out);
    }

    // Stream every layer once per generated token, all unfinished sequences together.
    let bar = layer_bar(
        req.progress,
        (req.rollout.saturating_sub(1) * (n_layers + st.head_chunks())) as u64,
        "rollout (streamed)",
    );
    let mut out: Vec<Rollout> = ids.iter().map(|_| Rollout::default()).collect();
    let mut active: Vec<usize> = (0..ids.len()).collect();
    for step in 0..req.rollout {
        let mut next_active = Vec::new();
        let mut next_tokens = Vec::new();
        for &s in &active {
            let next = out[s].push_argmax(&last[s]);
            if !(eos.contains(&(next as i64)) || step + 1 == req.rollout) {
                next_active.push(s);
                next_tokens.push(next);
            }
        }
        active = next_active;
        if active.is_empty() {
            break;
        }
        let mut xs: Vec<Tensor> = next_tokens
            .iter()
            .map(|&t| st.embed(&[t]))
            .collect::<Result<_>>()?;
        let mut sub: Vec<Cache> = active
            .iter()
            .map(|&s| std::mem::take(&mut caches[s]))
            .collect();
        st.layers(&mut xs, &mut sub, true, &mut |l, _| {
            bar.set_message(format!("step {}, layer {}/{n_layers}", step + 1, l + 1));
            bar.inc(1);
        })?;
        for (&s, c) in active.iter().zip(sub) {
            caches[s] = c;
        }
        let hidden = st.final_norm(&xs)?;
        st.head(
            &hidden,
            &mut |i, first, logits| {
                let vals: Vec<f32> = logits.flatten_all()?.to_vec1()?;
                last[active[i]][first..first + vals.len()].copy_from_slice(&vals);
                Ok(())
            },
            &mut |_| bar.inc(1),
        )?;
    }
    bar.finish_and_clear();
    Ok(out)
}

fn layer_bar(enabled: bool, total: u64, msg: &'static str) -> crate::progress::Progress {
    crate::progress::Progress::new(enabled, total, msg, "layers+head chunks")
}

pub fn progress_bar(enabled: bool, total: u64) -> crate::progress::Progress {
    crate::progress::Progress::new(enabled, total, "oracle", "positions")
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
        assert_eq!(parse_bytes("8G"), Some(8 << 30));
        assert_eq!(parse_bytes("1.5 GB"), Some(1_500_000_000));
        assert_eq!(parse_bytes("512mib"), Some(512 << 20));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("8 parsecs"), None);
        assert_eq!(parse_bytes("0"), None);
    }

    /// The logits written block by block (the GPU's head, forced on the CPU) are the one-block bytes,
    /// in order, and the rollout starts from the last row.
    #[test]
    fn logits_in_row_blocks_write_the_same_capture_bytes() {
        use crate::capture::FloatKind;
        use crate::model::{precision::Precision, Model};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/models/dense-gva-untied");
        let tokens: Vec<i64> = (0..21i64).map(|i| (i * 41 + 3) % 300).collect();
        for (prec, kind) in [
            (Precision::F32, FloatKind::F32),
            (Precision::BF16, FloatKind::BF16),
            (Precision::BF16, FloatKind::F32),
        ] {
            let mut model = Model::load_on(&dir, prec, &candle_core::Device::Cpu, true).unwrap();
            let mut one = Vec::new();
            let want = super::run_sequence_into(&model, &tokens, 4, kind, &mut one).unwrap();
            assert_eq!(one.len(), tokens.len() * model.cfg.vocab_size * kind.size());
            for rows in [1, 4, 20] {
                model.set_head_block_rows(rows);
                let mut blocks = Vec::new();
                let got = super::run_sequence_into(&model, &tokens, 4, kind, &mut blocks).unwrap();
                assert!(
                    blocks == one,
                    "{} as {kind:?}, blocks of {rows}: bytes differ",
                    prec.name()
                );
                assert_eq!(got.tokens, want.tokens);
                assert_eq!(got.margins, want.margins);
            }
        }
    }
}
