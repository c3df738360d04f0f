//! `qgate-capture/1`: the one file format every part of qgate reads and writes.
//!
//! A capture is one `.safetensors` file. String metadata key `qgate.capture` holds a JSON object with at
//! least `format`, `label`, `runtime`, `dtype`, `vocab_size`. Tensors per sequence `i = 0..n-1`:
//! `seq.{i}.tokens` I64/I32 `[T]` (required), `seq.{i}.logits` F32/F16/BF16 `[R, V]` (row t = logits after
//! `tokens[0..=t]`, R ≤ T), `seq.{i}.top_ids` `[R, K]` + `seq.{i}.top_logits` `[R, K]`, `seq.{i}.argmax`
//! `[R]`, `seq.{i}.rollout` `[G]`, optionally `seq.{i}.rollout_margin` F32 `[G, 2]` (the producer's own
//! top1−top2 margin, softmax-probability and logit, at the row that chose each rollout token; oracles
//! write it so a rollout divergence can be judged tie or confident). A plan is a capture holding only tokens.
//!
//! # What [`Capture::open`] checks
//!
//! Every rule below is checked when the file is opened, before any row is read; a file that breaks one is
//! refused with one line naming the file and the tensor (`Error::Input`, exit 2). After a successful open
//! no accessor can panic or read out of bounds on the file's account.
//!
//! - The file is a valid safetensors file whose tensors exactly tile the data section (the `safetensors`
//!   crate checks offsets, sizes and overflow); metadata `qgate.capture` is JSON with
//!   `format = "qgate-capture/1"` and `1 ≤ vocab_size ≤ 2^24` ([`MAX_VOCAB`]).
//! - Tensor names are `seq.{i}.{field}` with a canonical decimal `i` (no `seq.01`), a known field, and
//!   the indices run `0..n` without a gap.
//!
//! | tensor | dtype | shape | also |
//! |---|---|---|---|
//! | `tokens` (required) | I64 / I32 | `[T]`, T ≥ 1 | every id in `0..vocab_size` |
//! | `logits` | F32 / F16 / BF16 | `[R, V]` | `V == vocab_size` |
//! | `top_ids` | I64 / I32 | `[R, K]`, 1 ≤ K ≤ vocab_size | ids in `0..vocab_size`; needs `top_logits` |
//! | `top_logits` | F32 / F16 / BF16 | same shape as `top_ids` | needs `top_ids` |
//! | `argmax` | I64 / I32 | `[R]` | ids in `0..vocab_size` |
//! | `rollout` | I64 / I32 | `[G]` | ids in `0..vocab_size` |
//! | `rollout_margin` | F32 | `[G, 2]` | G equals the rollout's length; needs `rollout` |
//!
//! Every per-position tensor of a sequence (`logits`, `top_ids`, `argmax`) has the same row count R, and
//! R ≤ T.
use crate::error::{io_err, Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "qgate-capture/1";
pub const META_KEY: &str = "qgate.capture";
/// Largest `vocab_size` a capture may declare (2^24; real vocabularies are below 2^20). Consumers size
/// per-row buffers by it, so a header must not be able to ask for more.
pub const MAX_VOCAB: usize = 1 << 24;

/// The `qgate.capture` JSON object. Unknown keys are kept (`extra`) so that tools can add provenance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureMeta {
    pub format: String,
    pub label: String,
    pub runtime: String,
    pub dtype: String,
    pub vocab_size: usize,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl CaptureMeta {
    pub fn new(label: &str, runtime: &str, dtype: &str, vocab_size: usize) -> Self {
        CaptureMeta {
            format: FORMAT.to_string(),
            label: label.to_string(),
            runtime: runtime.to_string(),
            dtype: dtype.to_string(),
            vocab_size,
            extra: Default::default(),
        }
    }
}

/// Element type of a logits-like tensor as stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatKind {
    F32,
    F16,
    BF16,
}

impl FloatKind {
    fn from_dtype(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(FloatKind::F32),
            Dtype::F16 => Some(FloatKind::F16),
            Dtype::BF16 => Some(FloatKind::BF16),
            _ => None,
        }
    }
    pub fn dtype(self) -> Dtype {
        match self {
            FloatKind::F32 => Dtype::F32,
            FloatKind::F16 => Dtype::F16,
            FloatKind::BF16 => Dtype::BF16,
        }
    }
    pub fn size(self) -> usize {
        match self {
            FloatKind::F32 => 4,
            _ => 2,
        }
    }
}

/// A borrowed `[rows, cols]` float matrix inside the mapped file, decoded row by row on demand.
#[derive(Clone, Copy)]
pub struct FloatRows<'a> {
    pub kind: FloatKind,
    pub rows: usize,
    pub cols: usize,
    bytes: &'a [u8],
}

impl<'a> FloatRows<'a> {
    /// Decode row `r` into `out` (length `cols`) as f32. Widening is exact for every stored kind.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let w = self.kind.size();
        let b = &self.bytes[r * self.cols * w..(r + 1) * self.cols * w];
        match self.kind {
            FloatKind::F32 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            FloatKind::F16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            FloatKind::BF16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        }
    }
    /// A `[R, 2]` matrix as pairs.
    pub fn row_pairs(&self) -> Vec<(f32, f32)> {
        (0..self.rows)
            .map(|r| self.row(r))
            .map(|v| (v[0], v[1]))
            .collect()
    }
    pub fn row(&self, r: usize) -> Vec<f32> {
        let mut v = vec![0f32; self.cols];
        self.row_into(r, &mut v);
        v
    }
    /// Raw little-endian bytes of the whole matrix.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// A borrowed `[rows, cols]` integer matrix (I64 or I32 on disk).
#[derive(Clone, Copy)]
pub struct IntRows<'a> {
    pub rows: usize,
    pub cols: usize,
    wide: bool,
    bytes: &'a [u8],
}

impl<'a> IntRows<'a> {
    pub fn to_vec(&self) -> Vec<i64> {
        if self.wide {
            self.bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect()
        } else {
            self.bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect()
        }
    }
    pub fn row(&self, r: usize) -> Vec<i64> {
        let w = if self.wide { 8 } else { 4 };
        let sub = IntRows {
            rows: 1,
            cols: self.cols,
            wide: self.wide,
            bytes: &self.bytes[r * self.cols * w..(r + 1) * self.cols * w],
        };
        sub.to_vec()
    }
}

#[derive(Debug, Clone)]
struct Slot {
    dtype: Dtype,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// One sequence's tensors, validated at open.
#[derive(Debug, Clone, Default)]
struct SeqSlots {
    tokens: Option<Slot>,
    logits: Option<Slot>,
    top_ids: Option<Slot>,
    top_logits: Option<Slot>,
    argmax: Option<Slot>,
    rollout: Option<Slot>,
    rollout_margin: Option<Slot>,
}

/// An opened, validated capture. The file is memory-mapped; rows are decoded on demand.
pub struct Capture {
    pub path: PathBuf,
    pub meta: CaptureMeta,
    mmap: Mmap,
    seqs: Vec<SeqSlots>,
}

/// What one sequence of a capture carries, borrowed from the mapped file.
pub struct SeqView<'a> {
    pub index: usize,
    pub tokens: Vec<i64>,
    pub logits: Option<FloatRows<'a>>,
    pub top_ids: Option<IntRows<'a>>,
    pub top_logits: Option<FloatRows<'a>>,
    pub argmax: Option<Vec<i64>>,
    pub rollout: Option<Vec<i64>>,
    /// Per rollout step: (probability margin, logit margin) of the row that chose the token.
    pub rollout_margin: Option<Vec<(f32, f32)>>,
}

impl SeqView<'_> {
    /// Number of positions with any per-position data (logits, top-k or argmax rows).
    pub fn rows(&self) -> usize {
        if let Some(l) = &self.logits {
            l.rows
        } else if let Some(t) = &self.top_ids {
            t.rows
        } else if let Some(a) = &self.argmax {
            a.len()
        } else {
            0
        }
    }
}

fn is_int(d: Dtype) -> bool {
    matches!(d, Dtype::I64 | Dtype::I32)
}

impl Capture {
    pub fn open(path: impl AsRef<Path>) -> Result<Capture> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| io_err(&path, e))?;
        // SAFETY: the map is read-only; a file truncated underneath us is the user's race, as with any mmap reader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_err(&path, e))?;
        let (header_len, md) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::input(&path, format!("not a valid safetensors file ({e})")))?;
        let data_start = 8 + header_len;
        let raw_meta = md
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| {
                Error::input(
                    &path,
                    format!("no `{META_KEY}` metadata: not a qgate capture"),
                )
            })?;
        let value: serde_json::Value = serde_json::from_str(raw_meta)
            .map_err(|e| Error::input(&path, format!("`{META_KEY}` metadata is not JSON ({e})")))?;
        match value.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(Error::input(
                    &path,
                    format!("unknown capture format `{other}` (this qgate reads `{FORMAT}`)"),
                ))
            }
            None => {
                return Err(Error::input(
                    &path,
                    format!("`{META_KEY}` metadata has no `format` field"),
                ))
            }
        }
        let meta: CaptureMeta = serde_json::from_value(value).map_err(|e| {
            Error::input(&path, format!("`{META_KEY}` metadata is incomplete ({e})"))
        })?;
        if meta.vocab_size == 0 {
            return Err(Error::input(&path, "vocab_size is 0"));
        }
        if meta.vocab_size > MAX_VOCAB {
            return Err(Error::input(
                &path,
                format!(
                    "vocab_size {} is larger than qgate accepts ({MAX_VOCAB})",
                    meta.vocab_size
                ),
            ));
        }

        let mut seqs: BTreeMap<usize, SeqSlots> = BTreeMap::new();
        for (name, info) in md.tensors() {
            let bad = |p: String| Error::input(&path, format!("tensor `{name}`: {p}"));
            let mut parts = name.splitn(3, '.');
            let (Some("seq"), Some(idx), Some(field)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad(
                    "unexpected tensor name (expected seq.{i}.<field>)".into()
                ));
            };
            let i: usize = idx
                .parse()
                .map_err(|_| bad("sequence index is not a number".into()))?;
            // Only the canonical spelling: `seq.00.x` or `seq.+0.x` beside `seq.0.x` would name the same
            // slot, and which one won would depend on hash order.
            if idx != i.to_string() {
                return Err(bad(format!(
                    "sequence index `{idx}` is not written canonically (expected `{i}`)"
                )));
            }
            let (s, e) = info.data_offsets;
            let slot = Slot {
                dtype: info.dtype,
                shape: info.shape.clone(),
                range: data_start + s..data_start + e,
            };
            let entry = seqs.entry(i).or_default();
            let target = match field {
                "tokens" => &mut entry.tokens,
                "logits" => &mut entry.logits,
                "top_ids" => &mut entry.top_ids,
                "top_logits" => &mut entry.top_logits,
                "argmax" => &mut entry.argmax,
                "rollout" => &mut entry.rollout,
                "rollout_margin" => &mut entry.rollout_margin,
                other => return Err(bad(format!("unknown field `{other}`"))),
            };
            *target = Some(slot);
        }
        if seqs.is_empty() {
            return Err(Error::input(&path, "empty capture: no sequences"));
        }
        let n = seqs.len();
        if seqs.keys().next_back() != Some(&(n - 1)) {
            return Err(Error::input(
                &path,
                format!("sequence indices are not 0..{}", n - 1),
            ));
        }
        let seqs: Vec<SeqSlots> = seqs.into_values().collect();
        for (i, s) in seqs.iter().enumerate() {
            validate_seq(&path, i, s, meta.vocab_size, &mmap)?;
        }
        Ok(Capture {
            path,
            meta,
            mmap,
            seqs,
        })
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn seq(&self, i: usize) -> SeqView<'_> {
        let s = &self.seqs[i];
        let ints = |slot: &Slot| IntRows {
            rows: slot.shape.first().copied().unwrap_or(0),
            cols: slot.shape.get(1).copied().unwrap_or(1),
            wide: slot.dtype == Dtype::I64,
            bytes: &self.mmap[slot.range.clone()],
        };
        let floats = |slot: &Slot| FloatRows {
            // validated at open: float kind and 2-D
            kind: FloatKind::from_dtype(slot.dtype).unwrap_or(FloatKind::F32),
            rows: slot.shape[0],
            cols: slot.shape[1],
            bytes: &self.mmap[slot.range.clone()],
        };
        SeqView {
            index: i,
            tokens: s
                .tokens
                .as_ref()
                .map(|t| ints(t).to_vec())
                .unwrap_or_default(),
            logits: s.logits.as_ref().map(floats),
            top_ids: s.top_ids.as_ref().map(ints),
            top_logits: s.top_logits.as_ref().map(floats),
            argmax: s.argmax.as_ref().map(|t| ints(t).to_vec()),
            rollout: s.rollout.as_ref().map(|t| ints(t).to_vec()),
            rollout_margin: s.rollout_margin.as_ref().map(|t| floats(t).row_pairs()),
        }
    }

    /// The token sequences: what makes this capture usable as a plan.
    pub fn plan(&self) -> Vec<Vec<i64>> {
        (0..self.len()).map(|i| self.seq(i).tokens).collect()
    }
}

/// The integers of an I64/I32 tensor (dtype already checked), without allocating.
fn int_values<'a>(slot: &Slot, mmap: &'a [u8]) -> impl Iterator<Item = i64> + 'a {
    let wide = slot.dtype == Dtype::I64;
    let bytes = mmap.get(slot.range.clone()).unwrap_or(&[]);
    bytes
        .chunks_exact(if wide { 8 } else { 4 })
        .map(move |c| match *c {
            [a, b, c, d, e, f, g, h] => i64::from_le_bytes([a, b, c, d, e, f, g, h]),
            [a, b, c, d] => i32::from_le_bytes([a, b, c, d]) as i64,
            _ => 0,
        })
}

fn validate_seq(path: &Path, i: usize, s: &SeqSlots, vocab: usize, mmap: &[u8]) -> Result<()> {
    let bad = |field: &str, p: String| Error::input(path, format!("tensor `seq.{i}.{field}`: {p}"));
    // Ids index vocabulary-sized rows downstream: every one must lie in 0..vocab.
    let check_ids = |field: &str, slot: &Slot| -> Result<()> {
        match int_values(slot, mmap)
            .enumerate()
            .find(|&(_, id)| id < 0 || id as u64 >= vocab as u64)
        {
            Some((j, id)) => Err(bad(
                field,
                format!("element {j} is token id {id}, outside the vocabulary 0..{vocab}"),
            )),
            None => Ok(()),
        }
    };
    let Some(tokens) = &s.tokens else {
        return Err(bad(
            "tokens",
            "missing (every sequence needs its tokens)".into(),
        ));
    };
    if !is_int(tokens.dtype) || tokens.shape.len() != 1 {
        return Err(bad(
            "tokens",
            format!(
                "expected I64/I32 [T], found {:?} {:?}",
                tokens.dtype, tokens.shape
            ),
        ));
    }
    let t = tokens.shape[0];
    if t == 0 {
        return Err(bad("tokens", "empty sequence".into()));
    }
    check_ids("tokens", tokens)?;
    let mut rows: Option<(usize, &str)> = None;
    let mut check_rows = |field: &'static str, r: usize| -> Result<()> {
        if r > t {
            return Err(bad(field, format!("{r} rows but only {t} tokens")));
        }
        match rows {
            Some((r0, f0)) if r0 != r => Err(bad(field, format!("{r} rows but {f0} has {r0}"))),
            _ => {
                rows = Some((r, field));
                Ok(())
            }
        }
    };
    if let Some(l) = &s.logits {
        if FloatKind::from_dtype(l.dtype).is_none() || l.shape.len() != 2 {
            return Err(bad(
                "logits",
                format!(
                    "expected F32/F16/BF16 [R, V], found {:?} {:?}",
                    l.dtype, l.shape
                ),
            ));
        }
        if l.shape[1] != vocab {
            return Err(bad(
                "logits",
                format!("vocab {} but metadata says vocab_size {vocab}", l.shape[1]),
            ));
        }
        check_rows("logits", l.shape[0])?;
    }
    match (&s.top_ids, &s.top_logits) {
        (Some(ids), Some(lg)) => {
            if !is_int(ids.dtype) || ids.shape.len() != 2 {
                return Err(bad(
                    "top_ids",
                    format!(
                        "expected I64/I32 [R, K], found {:?} {:?}",
                        ids.dtype, ids.shape
                    ),
                ));
            }
            if FloatKind::from_dtype(lg.dtype).is_none() || lg.shape != ids.shape {
                return Err(bad(
                    "top_logits",
                    format!(
                        "expected F32/F16/BF16 shaped like top_ids {:?}, found {:?} {:?}",
                        ids.shape, lg.dtype, lg.shape
                    ),
                ));
            }
            let k = ids.shape[1];
            if k == 0 {
                return Err(bad("top_ids", "K is 0".into()));
            }
            if k > vocab {
                return Err(bad(
                    "top_ids",
                    format!("K = {k} is larger than vocab_size {vocab}"),
                ));
            }
            check_rows("top_ids", ids.shape[0])?;
            check_ids("top_ids", ids)?;
        }
        (Some(_), None) => {
            return Err(bad(
                "top_logits",
                "missing (top_ids needs top_logits)".into(),
            ))
        }
        (None, Some(_)) => return Err(bad("top_ids", "missing (top_logits needs top_ids)".into())),
        (None, None) => {}
    }
    if let Some(a) = &s.argmax {
        if !is_int(a.dtype) || a.shape.len() != 1 {
            return Err(bad(
                "argmax",
                format!("expected I64/I32 [R], found {:?} {:?}", a.dtype, a.shape),
            ));
        }
        check_rows("argmax", a.shape[0])?;
        check_ids("argmax", a)?;
    }
    if let Some(r) = &s.rollout {
        if !is_int(r.dtype) || r.shape.len() != 1 {
            return Err(bad(
                "rollout",
                format!("expected I64/I32 [G], found {:?} {:?}", r.dtype, r.shape),
            ));
        }
        check_ids("rollout", r)?;
    }
    if let Some(m) = &s.rollout_margin {
        if m.dtype != Dtype::F32 || m.shape.len() != 2 || m.shape[1] != 2 {
            return Err(bad(
                "rollout_margin",
                format!("expected F32 [G, 2], found {:?} {:?}", m.dtype, m.shape),
            ));
        }
        let Some(r) = &s.rollout else {
            return Err(bad(
                "rollout_margin",
                format!("present without seq.{i}.rollout (a margin belongs to a rollout step)"),
            ));
        };
        if m.shape[0] != r.shape[0] {
            return Err(bad(
                "rollout_margin",
                format!("{} steps but the rollout has {}", m.shape[0], r.shape[0]),
            ));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Writing

/// Declares one tensor of a capture before its bytes are streamed.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: &[usize]) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }
    fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * (self.dtype.bitsize() / 8)
    }
}

/// Streams a capture to disk: header first (all shapes known up front), then each tensor's bytes in the
/// declared order. Writes to a temporary file beside the destination and renames on `finish`, so a crash
/// or an error never leaves a half-written capture under the final name.
pub struct CaptureWriter {
    dest: PathBuf,
    tmp: tempfile::NamedTempFile,
    out: BufWriter<File>,
    sizes: Vec<(String, usize)>,
    current: usize,
    written: usize,
}

impl CaptureWriter {
    pub fn create(
        dest: impl AsRef<Path>,
        meta: &CaptureMeta,
        specs: &[TensorSpec],
    ) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".qgate-partial-")
            .tempfile_in(&dir)
            .map_err(|e| io_err(&dir, e))?;
        let file = tmp.reopen().map_err(|e| io_err(tmp.path(), e))?;
        let mut header = serde_json::Map::new();
        let mut md = serde_json::Map::new();
        let meta_json = serde_json::to_string(meta).map_err(|e| Error::Internal(e.to_string()))?;
        md.insert(META_KEY.to_string(), serde_json::Value::String(meta_json));
        header.insert("__metadata__".to_string(), serde_json::Value::Object(md));
        let mut offset = 0usize;
        let mut sizes = Vec::with_capacity(specs.len());
        for s in specs {
            let n = s.nbytes();
            header.insert(
                s.name.clone(),
                serde_json::json!({ "dtype": s.dtype, "shape": s.shape, "data_offsets": [offset, offset + n] }),
            );
            offset += n;
            sizes.push((s.name.clone(), n));
        }
        let mut hbytes = serde_json::to_vec(&header).map_err(|e| Error::Internal(e.to_string()))?;
        while hbytes.len() % 8 != 0 {
            hbytes.push(b' ');
        }
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let werr = |e| io_err(&dest, e);
        out.write_all(&(hbytes.len() as u64).to_le_bytes())
            .map_err(werr)?;
        out.write_all(&hbytes).map_err(werr)?;
        let mut w = CaptureWriter {
            dest,
            tmp,
            out,
            sizes,
            current: 0,
            written: 0,
        };
        w.skip_empty();
        Ok(w)
    }

    fn skip_empty(&mut self) {
        while self.current < self.sizes.len() && self.sizes[self.current].1 == self.written {
            self.current += 1;
            self.written = 0;
        }
    }

    /// Append raw little-endian bytes to the tensor being written (a tensor may be written in pieces).
    pub fn write_bytes(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let Some(&(_, size)) = self.sizes.get(self.current) else {
                return Err(Error::Internal(
                    "capture writer: more bytes than declared tensors".into(),
                ));
            };
            let take = (size - self.written).min(bytes.len());
            self.out
                .write_all(&bytes[..take])
                .map_err(|e| io_err(&self.dest, e))?;
            self.written += take;
            bytes = &bytes[take..];
            if self.written == size {
                self.current += 1;
                self.written = 0;
                self.skip_empty();
            }
        }
        Ok(())
    }

    pub fn write_f32(&mut self, v: &[f32]) -> Result<()> {
        let mut b = Vec::with_capacity(v.len() * 4);
        v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        self.write_bytes(&b)
    }
    pub fn write_f16(&mut self, v: &[f32]) -> Result<()> {
        let mut b = Vec::with_capacity(v.len() * 2);
        v.iter()
            .for_each(|x| b.extend_from_slice(&f16::from_f32(*x).to_le_bytes()));
        self.write_bytes(&b)
    }
    pub fn write_bf16(&mut self, v: &[f32]) -> Result<()> {
        let mut b = Vec::with_capacity(v.len() * 2);
        v.iter()
            .for_each(|x| b.extend_from_slice(&bf16::from_f32(*x).to_le_bytes()));
        self.write_bytes(&b)
    }
    /// Write floats in the given on-disk kind.
    pub fn write_floats(&mut self, kind: FloatKind, v: &[f32]) -> Result<()> {
        match kind {
            FloatKind::F32 => self.write_f32(v),
            FloatKind::F16 => self.write_f16(v),
            FloatKind::BF16 => self.write_bf16(v),
        }
    }
    pub fn write_i64(&mut self, v: &[i64]) -> Result<()> {
        let mut b = Vec::with_capacity(v.len() * 8);
        v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        self.write_bytes(&b)
    }

    /// Check every declared byte was written, flush, and atomically move the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.current != self.sizes.len() {
            let (name, size) = &self.sizes[self.current];
            return Err(Error::Internal(format!(
                "capture writer: tensor `{name}` got {} of {size} bytes",
                self.written
            )));
        }
        self.out.flush().map_err(|e| io_err(&self.dest, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| io_err(&self.dest, e))?;
        let dest = self.dest.clone();
        // Temporary files are created 0600; a finished capture is an ordinary, shareable file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(self.tmp.path(), std::fs::Permissions::from_mode(0o644))
                .map_err(|e| io_err(&dest, e))?;
        }
        self.tmp
            .persist(&dest)
            .map_err(|e| io_err(&dest, e.error))?;
        Ok(dest)
    }
}

/// One sequence held in memory, for captures small enough to build whole (tests, imports, plans).
#[derive(Debug, Clone, Default)]
pub struct SeqData {
    pub tokens: Vec<i64>,
    /// `(rows, vocab, row-major values)` stored as `logits_kind`.
    pub logits: Option<(usize, usize, Vec<f32>)>,
    pub logits_kind: Option<FloatKind>,
    /// `(rows, k, ids, logits)`.
    pub top: Option<(usize, usize, Vec<i64>, Vec<f32>)>,
    pub argmax: Option<Vec<i64>>,
    pub rollout: Option<Vec<i64>>,
}

/// Write a whole capture from memory (temp file + rename, like every writer here).
pub fn write_capture(
    dest: impl AsRef<Path>,
    meta: &CaptureMeta,
    seqs: &[SeqData],
) -> Result<PathBuf> {
    let mut specs = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        specs.push(TensorSpec::new(
            format!("seq.{i}.tokens"),
            Dtype::I64,
            &[s.tokens.len()],
        ));
        if let Some((r, v, _)) = &s.logits {
            let kind = s.logits_kind.unwrap_or(FloatKind::F32);
            specs.push(TensorSpec::new(
                format!("seq.{i}.logits"),
                kind.dtype(),
                &[*r, *v],
            ));
        }
        if let Some((r, k, _, _)) = &s.top {
            specs.push(TensorSpec::new(
                format!("seq.{i}.top_ids"),
                Dtype::I64,
                &[*r, *k],
            ));
            specs.push(TensorSpec::new(
                format!("seq.{i}.top_logits"),
                Dtype::F32,
                &[*r, *k],
            ));
        }
        if let Some(a) = &s.argmax {
            specs.push(TensorSpec::new(
                format!("seq.{i}.argmax"),
                Dtype::I64,
                &[a.len()],
            ));
        }
        if let Some(g) = &s.rollout {
            specs.push(TensorSpec::new(
                format!("seq.{i}.rollout"),
                Dtype::I64,
                &[g.len()],
            ));
        }
    }
    let mut w = CaptureWriter::create(dest, meta, &specs)?;
    for s in seqs {
        w.write_i64(&s.tokens)?;
        if let Some((_, _, v)) = &s.logits {
            w.write_floats(s.logits_kind.unwrap_or(FloatKind::F32), v)?;
        }
        if let Some((_, _, ids, lg)) = &s.top {
            w.write_i64(ids)?;
            w.write_f32(lg)?;
        }
        if let Some(a) = &s.argmax {
            w.write_i64(a)?;
        }
        if let Some(g) = &s.rollout {
            w.write_i64(g)?;
        }
    }
    w.finish()
}
