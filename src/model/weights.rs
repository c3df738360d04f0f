//! Checkpoint access: `model.safetensors` or a sharded index, memory-mapped; tensors are looked up by
//! decoder-relative name (the `model.language_model.` / `model.` prefix is resolved once), checked for
//! shape, widened to f32 and rounded to the oracle precision.
use super::precision::Precision;
use crate::error::{io_err, Error, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::Dtype;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A change applied to every weight after it is widened to f32 and before it is rounded to the compute
/// precision (the quantization simulator's fake-quantization). The oracle itself never sets one.
pub trait WeightTransform: Send + Sync {
    /// `name`: decoder-relative (`layers.0.mlp.gate_proj.weight`, `embed_tokens.weight`) or
    /// `lm_head.weight`; `w`: the whole f32 tensor as stored in the checkpoint.
    fn apply(&self, name: &str, w: Tensor) -> Result<Tensor>;
    /// Give a tied model its own head (a copy of the embedding, transformed as `lm_head.weight`).
    fn untie_head(&self) -> bool {
        false
    }
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct WeightStore {
    pub dir: PathBuf,
    /// `model.safetensors`, or the index of a sharded checkpoint: where a missing tensor is reported.
    pub primary: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    /// The same files opened for positioned reads (`pread`), used in streaming mode.
    handles: Vec<File>,
    entries: HashMap<String, Entry>,
    /// Streaming mode: read tensor bytes with positioned reads into private buffers instead of touching
    /// the memory maps, so that a checkpoint read once from end to end never shows up in the resident set.
    streaming: bool,
    /// `model.language_model.` (VL checkpoints) or `model.` (ForCausalLM checkpoints).
    pub decoder_prefix: String,
    transform: Option<Arc<dyn WeightTransform>>,
    /// Where loaded tensors go (converted on the host first, then copied once).
    device: Device,
    /// The portable (tensor-op) kernels even on the CPU (a GPU always uses them).
    force_portable: bool,
    /// Names of the tensors the model read or claimed (`claim`): the rest were not used (`unused`).
    used: Mutex<HashSet<String>>,
}

/// Checkpoint tensors the model did not read, sorted by what HF does with them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnusedTensors {
    /// `model.visual.*`: the vision tower of a VL checkpoint (the text decoder never reads it).
    pub vision_tower: usize,
    /// `mtp.*`: the multi-token-prediction head (HF never builds it: `_keys_to_ignore_on_load_unexpected`).
    pub mtp_head: usize,
    /// Everything else, sorted: tensors a text decoder of this config should have used (HF warns "Some
    /// weights of the model checkpoint were not used" and proceeds).
    pub unexpected: Vec<String>,
}

impl WeightStore {
    pub fn open(dir: &Path) -> Result<WeightStore> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shard_names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::input(&index, format!("not valid JSON ({e})")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::input(&index, "no `weight_map` object"))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(Error::input(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        };
        let mut files = Vec::new();
        let mut handles = Vec::new();
        let mut entries = HashMap::new();
        for (fi, name) in shard_names.iter().enumerate() {
            if name.contains('/') || name.contains("..") {
                return Err(Error::input(
                    &index,
                    format!("shard name `{name}` leaves the model directory"),
                ));
            }
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| io_err(&path, e))?;
            // SAFETY: read-only map of a checkpoint file; nothing in qgate writes to it.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_err(&path, e))?;
            let (n, md) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                Error::input(
                    &path,
                    format!("not a valid safetensors file ({e}); truncated or corrupt?"),
                )
            })?;
            for (tname, info) in md.tensors() {
                let (s, e) = info.data_offsets;
                entries.insert(
                    tname,
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: 8 + n + s,
                        end: 8 + n + e,
                    },
                );
            }
            let handle = file.try_clone().map_err(|e| io_err(&path, e))?;
            files.push((path, mmap));
            handles.push(handle);
        }
        let decoder_prefix = if entries.contains_key("model.language_model.embed_tokens.weight") {
            "model.language_model."
        } else {
            "model."
        }
        .to_string();
        let primary = if index.exists() { index } else { single };
        Ok(WeightStore {
            dir: dir.to_path_buf(),
            primary,
            files,
            handles,
            entries,
            decoder_prefix,
            streaming: false,
            transform: None,
            device: Device::Cpu,
            force_portable: false,
            used: Mutex::new(HashSet::new()),
        })
    }

    /// Count `full` as used by the model without reading it (a lazily loaded expert bank: streaming
    /// reads only the experts some token routes to).
    pub fn claim(&self, full: &str) {
        if let Ok(mut u) = self.used.lock() {
            u.insert(full.to_string());
        }
    }

    /// The stored tensors that nothing read or claimed so far (call it once the model is loaded, or once
    /// a streamed pass has gone through every layer).
    pub fn unused(&self) -> UnusedTensors {
        let used = match self.used.lock() {
            Ok(u) => u.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut out = UnusedTensors::default();
        for name in self.entries.keys().filter(|n| !used.contains(*n)) {
            if name.starts_with("model.visual.") {
                out.vision_tower += 1;
            } else if name.starts_with("mtp.") {
                out.mtp_head += 1;
            } else {
                out.unexpected.push(name.clone());
            }
        }
        out.unexpected.sort();
        out
    }

    /// Whether a transform (the simulator's fake quantization) changes the weights as they load.
    pub fn has_transform(&self) -> bool {
        self.transform.is_some()
    }

    /// The stored tensors accepted by `pick` (sorted by name) that hold a NaN or an infinity, with which
    /// (`"NaN"` when there is any, else `"Inf"`). Reads the checkpoint as stored, before any transform;
    /// tensors that cannot be read, or are not F32/BF16/F16, are passed over.
    pub fn nonfinite_tensors(&self, pick: impl Fn(&str) -> bool) -> Vec<(String, &'static str)> {
        let mut names: Vec<&String> = self.entries.keys().filter(|n| pick(n)).collect();
        names.sort();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for name in names {
            let e = &self.entries[name];
            let size = match e.dtype {
                Dtype::F32 => 4,
                Dtype::BF16 | Dtype::F16 => 2,
                _ => continue,
            };
            let (mut nan, mut inf) = (false, false);
            let mut at = e.start;
            while at < e.end && !nan {
                // whole elements per piece (READ_PIECE is a multiple of 4)
                let take = READ_PIECE.min(e.end - at) / size * size;
                if take == 0 {
                    break;
                }
                let Ok(piece) = self.raw_into(name, e.file, at, take, &mut buf) else {
                    break;
                };
                let (n, i) = scan_nonfinite(piece, e.dtype);
                nan |= n;
                inf |= i;
                at += take;
            }
            if nan || inf {
                out.push((name.clone(), if nan { "NaN" } else { "Inf" }));
            }
        }
        out
    }

    fn mark_used(&self, full: &str) {
        if let Ok(mut u) = self.used.lock() {
            if !u.contains(full) {
                u.insert(full.to_string());
            }
        }
    }

    /// Put every tensor loaded from now on on `dev`; a non-CPU device implies the portable kernels.
    pub fn set_device(&mut self, dev: &Device) {
        self.device = dev.clone();
    }

    /// Use the portable (tensor-op) kernels on the CPU too (how the GPU path is tested without a GPU).
    pub fn set_portable_kernels(&mut self, on: bool) {
        self.force_portable = on;
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn portable_kernels(&self) -> bool {
        self.force_portable || !self.device.is_cpu()
    }

    /// Apply `t` to every tensor loaded from now on.
    pub fn set_transform(&mut self, t: Arc<dyn WeightTransform>) {
        self.transform = Some(t);
    }

    /// Whether a tied head is to be loaded as a separate tensor (see `WeightTransform::untie_head`).
    pub fn untie_head(&self) -> bool {
        self.transform.as_ref().is_some_and(|t| t.untie_head())
    }

    /// Read tensors with positioned reads (see `streaming`); the values are the same either way.
    pub fn set_streaming(&mut self, on: bool) {
        self.streaming = on;
    }

    /// Names of all tensors, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Bytes `start..end` of shard `file`: borrowed from the map, or read into a buffer in streaming mode.
    fn raw(&self, full: &str, file: usize, start: usize, end: usize) -> Result<Cow<'_, [u8]>> {
        #[cfg(unix)]
        if self.streaming {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; end - start];
            self.handles[file]
                .read_exact_at(&mut buf, start as u64)
                .map_err(|e| {
                    Error::input(
                        &self.files[file].0,
                        format!("cannot read tensor `{full}` ({e})"),
                    )
                })?;
            return Ok(Cow::Owned(buf));
        }
        let _ = full;
        Ok(Cow::Borrowed(&self.files[file].1[start..end]))
    }

    /// Full tensor name for a decoder-relative name (`layers.0.mlp.gate_proj.weight`).
    pub fn decoder_name(&self, rel: &str) -> String {
        format!("{}{rel}", self.decoder_prefix)
    }

    pub fn contains(&self, full: &str) -> bool {
        self.entries.contains_key(full)
    }

    /// Bytes of a tensor on disk.
    pub fn tensor_bytes(&self, full: &str) -> Option<usize> {
        self.entries.get(full).map(|e| e.end - e.start)
    }

    pub fn shape(&self, full: &str) -> Option<&[usize]> {
        self.entries.get(full).map(|e| e.shape.as_slice())
    }

    /// Where a problem with this tensor should be reported: its shard file, else the model directory.
    fn file_of(&self, full: &str) -> PathBuf {
        match self.entries.get(full) {
            Some(e) => self.files[e.file].0.clone(),
            None => self.primary.clone(),
        }
    }

    /// Load a tensor by full name, check its shape, widen to f32 and round to `prec`
    /// (HF casts every parameter to the model dtype, F32-stored ones included).
    pub fn load(&self, full: &str, shape: &[usize], prec: Precision) -> Result<Tensor> {
        self.load_in(full, shape, prec, None)
    }

    /// The dtype a GPU keeps `prec`'s 16-bit weights in (`None` on the CPU, or in f32): what
    /// [`WeightStore::load_in`] should convert to before the upload.
    pub fn upload_dtype(&self, prec: Precision) -> Option<DType> {
        if self.device.is_cpu() {
            None
        } else {
            prec.half_dtype()
        }
    }

    /// As `load`, converted to `dtype` (when given) on the host before the upload. Exact: the values are
    /// already rounded to `prec`. A GPU then never holds the transient f32 copy, whose freed space the
    /// pool keeps and later allocations only partly fill (164 MiB of the 0.8B bf16 weights' reservation
    /// on an H200 when each weight was cast on the device).
    pub fn load_in(
        &self,
        full: &str,
        shape: &[usize],
        prec: Precision,
        dtype: Option<DType>,
    ) -> Result<Tensor> {
        let logical = full.strip_prefix(&self.decoder_prefix).unwrap_or(full);
        self.load_as_in(full, logical, shape, prec, dtype)
    }

    /// As `load_in`, with the transform seeing the tensor under `logical` (a tied head is the embedding
    /// loaded as `lm_head.weight`).
    pub fn load_as_in(
        &self,
        full: &str,
        logical: &str,
        shape: &[usize],
        prec: Precision,
        dtype: Option<DType>,
    ) -> Result<Tensor> {
        let n0 = shape.first().copied().unwrap_or(1);
        self.load_rows_as(full, logical, shape, 0..n0, prec, dtype)
    }

    /// Rows `first .. first+n` along the first axis of a tensor whose full shape must be `shape`, as
    /// `load` would give them (widening is exact and rounding elementwise, so slicing first changes
    /// nothing): one vocabulary chunk of the head, one embedding row, one expert of a fused bank.
    pub fn load_rows(
        &self,
        full: &str,
        shape: &[usize],
        first: usize,
        n: usize,
        prec: Precision,
    ) -> Result<Tensor> {
        let logical = full.strip_prefix(&self.decoder_prefix).unwrap_or(full);
        self.load_rows_as(full, logical, shape, first..first + n, prec, None)
    }

    /// Rows `rows` of `full`, rounded to `prec`, converted to `dtype` (when given) before the upload.
    fn load_rows_as(
        &self,
        full: &str,
        logical: &str,
        shape: &[usize],
        rows: std::ops::Range<usize>,
        prec: Precision,
        dtype: Option<DType>,
    ) -> Result<Tensor> {
        let (first, n) = (rows.start, rows.len());
        // Rounded to `prec` (exact in `dtype` then), converted, then uploaded.
        let finish = |t: &Tensor| -> Result<Tensor> {
            let t = prec.round(t)?;
            let t = match dtype {
                Some(dt) => t.to_dtype(dt)?,
                None => t,
            };
            Ok(t.to_device(&self.device)?)
        };
        let rows_total = shape.first().copied().unwrap_or(1);
        if self.transform.is_some() && (first != 0 || n != rows_total) {
            // A transform (fake quantization) sees whole tensors, as exporters do (k-means groups span
            // rows): transform the whole tensor, then take the rows.
            let whole =
                self.load_rows_as(full, logical, shape, 0..rows_total, Precision::F32, None)?;
            return finish(&whole.narrow(0, first, n)?);
        }
        let e = self
            .entries
            .get(full)
            .ok_or_else(|| Error::input(&self.primary, format!("missing tensor `{full}`")))?;
        self.mark_used(full);
        if e.shape != shape {
            return Err(Error::input(
                self.file_of(full),
                format!(
                    "tensor `{full}` has shape {:?}, expected {:?}",
                    e.shape, shape
                ),
            ));
        }
        let (disk_dtype, size) = match e.dtype {
            Dtype::F32 => (DType::F32, 4),
            Dtype::BF16 => (DType::BF16, 2),
            Dtype::F16 => (DType::F16, 2),
            other => {
                return Err(Error::input(
                    self.file_of(full),
                    format!("tensor `{full}` has dtype {other:?}; only F32, BF16 and F16 checkpoints are supported"),
                ))
            }
        };
        let rows = shape.first().copied().unwrap_or(1);
        if first + n > rows {
            return Err(Error::Internal(format!(
                "rows {first}..{} of `{full}` requested; it has {rows}",
                first + n
            )));
        }
        let row_elems: usize = shape.iter().skip(1).product();
        let row_bytes = row_elems * size;
        if e.end - e.start != rows * row_bytes {
            return Err(Error::input(
                self.file_of(full),
                format!("tensor `{full}` has a byte range that does not match its shape and dtype"),
            ));
        }
        let start = e.start + first * row_bytes;
        let mut out_shape = shape.to_vec();
        if let Some(s0) = out_shape.first_mut() {
            *s0 = n;
        }
        let t = if self.streaming {
            // Read and widen piece by piece into the one f32 allocation: the read buffer stays in cache
            // and nothing is zero-filled first. bf16/f16 → f32 is exact, so the values are those of
            // `to_dtype`.
            let v = self.read_widened(full, e.file, start, n * row_bytes, e.dtype)?;
            Tensor::from_vec(v, out_shape, &Device::Cpu)?
        } else {
            let bytes = self.raw(full, e.file, start, start + n * row_bytes)?;
            Tensor::from_raw_buffer(&bytes, disk_dtype, &out_shape, &Device::Cpu)?
                .to_dtype(DType::F32)?
        };
        let t = match &self.transform {
            Some(tr) => tr.apply(logical, t)?,
            None => t,
        };
        finish(&t)
    }

    /// Load a decoder-relative tensor (prefix resolved).
    /// Load a Linear weight `[out, in]` in the form its matmul uses (see `linear::LinearWeight`).
    pub fn load_linear(
        &self,
        full: &str,
        shape: &[usize],
        prec: Precision,
    ) -> Result<super::linear::LinearWeight> {
        let w = self.load_in(full, shape, prec, self.upload_dtype(prec))?;
        super::linear::LinearWeight::new(w, prec)
    }

    /// A decoder tensor in the model dtype itself (BF16 / F16 for those precisions, F32 for f32): read
    /// straight from disk when it is stored in that dtype (exact, and without a transient f32 copy of a
    /// [vocab, hidden] table), else loaded as usual and converted (exact after rounding).
    pub fn load_decoder_native(
        &self,
        rel: &str,
        shape: &[usize],
        prec: Precision,
    ) -> Result<Tensor> {
        let full = self.decoder_name(rel);
        let want = match prec {
            Precision::F32 => None,
            Precision::BF16 => Some((Dtype::BF16, DType::BF16)),
            Precision::F16 => Some((Dtype::F16, DType::F16)),
        };
        if let (Some((disk, dt)), Some(e), None) = (want, self.entries.get(&full), &self.transform)
        {
            if e.dtype == disk && e.shape == shape {
                self.mark_used(&full);
                let bytes = self.raw(&full, e.file, e.start, e.end)?;
                return Ok(Tensor::from_raw_buffer(&bytes, dt, shape, &Device::Cpu)?
                    .to_device(&self.device)?);
            }
        }
        self.load_in(&full, shape, prec, want.map(|(_, dt)| dt))
    }

    pub fn load_decoder(&self, rel: &str, shape: &[usize], prec: Precision) -> Result<Tensor> {
        self.load(&self.decoder_name(rel), shape, prec)
    }

    /// sha256 of every weights file (and the index), in name order: the oracle cache key.
    pub fn weights_sha256(&self) -> Result<Vec<(String, String)>> {
        use sha2::{Digest, Sha256};
        // One hash per file per process: `qgate run --oracle` keys its cache with it and the oracle run
        // records it again; a file whose size or modification time changed is hashed anew.
        static MEMO: std::sync::Mutex<Vec<(PathBuf, u64, std::time::SystemTime, String)>> =
            std::sync::Mutex::new(Vec::new());
        let mut out = Vec::new();
        for (path, _) in &self.files {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let md = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
            let stamp = (md.len(), md.modified().map_err(|e| io_err(path, e))?);
            let known = MEMO.lock().ok().and_then(|m| {
                m.iter()
                    .find(|(p, l, t, _)| p == path && (*l, *t) == stamp)
                    .map(|(_, _, _, h)| h.clone())
            });
            if let Some(h) = known {
                out.push((name, h));
                continue;
            }
            // Plain reads, not the map: hashing a 50 GB checkpoint must not grow the resident set.
            let mut h = Sha256::new();
            let mut f = File::open(path).map_err(|e| io_err(path, e))?;
            let mut buf = vec![0u8; 1 << 22];
            loop {
                match std::io::Read::read(&mut f, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => h.update(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err(path, e)),
                }
            }
            let digest = hex::encode(h.finalize());
            if let Ok(mut m) = MEMO.lock() {
                m.push((path.clone(), stamp.0, stamp.1, digest.clone()));
            }
            out.push((name, digest));
        }
        Ok(out)
    }
}

/// Bytes read from disk per positioned read when widening (small enough to stay in cache).
const READ_PIECE: usize = 4 << 20;

impl WeightStore {
    /// `len` bytes of shard `file` from `start` (an F32/BF16/F16 tensor or row range), widened to f32:
    /// read in `READ_PIECE` pieces into one reused buffer, each widened straight into the output.
    fn read_widened(
        &self,
        full: &str,
        file: usize,
        start: usize,
        len: usize,
        dtype: Dtype,
    ) -> Result<Vec<f32>> {
        let size = if dtype == Dtype::F32 { 4 } else { 2 };
        let elems = len / size;
        let mut out: Vec<f32> = Vec::with_capacity(elems);
        let mut buf = Vec::new();
        let mut done = 0;
        while done < len {
            let take = READ_PIECE.min(len - done);
            let piece = self.raw_into(full, file, start + done, take, &mut buf)?;
            let dst = &mut out.spare_capacity_mut()[done / size..(done + take) / size];
            widen_into(piece, dtype, dst);
            done += take;
        }
        // SAFETY: every element of `0..elems` was written by `widen_into` above.
        unsafe { out.set_len(elems) };
        Ok(out)
    }

    /// Bytes `start..start+len` of shard `file`, read into `buf` (grown as needed; streaming mode) or
    /// borrowed from the map.
    fn raw_into<'b>(
        &'b self,
        full: &str,
        file: usize,
        start: usize,
        len: usize,
        buf: &'b mut Vec<u8>,
    ) -> Result<&'b [u8]> {
        #[cfg(unix)]
        if self.streaming {
            use std::os::unix::fs::FileExt;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            self.handles[file]
                .read_exact_at(&mut buf[..len], start as u64)
                .map_err(|e| {
                    Error::input(
                        &self.files[file].0,
                        format!("cannot read tensor `{full}` ({e})"),
                    )
                })?;
            return Ok(&buf[..len]);
        }
        let _ = (full, buf);
        Ok(&self.files[file].1[start..start + len])
    }
}

/// Whether little-endian F32/BF16/F16 `bytes` hold a NaN, an infinity.
fn scan_nonfinite(bytes: &[u8], dtype: Dtype) -> (bool, bool) {
    let (mut nan, mut inf) = (false, false);
    match dtype {
        Dtype::F32 => {
            for c in bytes.chunks_exact(4) {
                let b = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7FFF_FFFF;
                nan |= b > 0x7F80_0000;
                inf |= b == 0x7F80_0000;
            }
        }
        Dtype::BF16 | Dtype::F16 => {
            let exp: u16 = if dtype == Dtype::BF16 { 0x7F80 } else { 0x7C00 };
            for c in bytes.chunks_exact(2) {
                let b = u16::from_le_bytes([c[0], c[1]]) & 0x7FFF;
                nan |= b > exp;
                inf |= b == exp;
            }
        }
        _ => {}
    }
    (nan, inf)
}

/// Little-endian F32/BF16/F16 bytes to f32 (exact) into `out` (`bytes.len() / size` elements), in
/// parallel chunks (on whichever rayon pool the caller runs in).
fn widen_into(bytes: &[u8], dtype: Dtype, out: &mut [std::mem::MaybeUninit<f32>]) {
    use rayon::prelude::*;
    let size = if dtype == Dtype::F32 { 4 } else { 2 };
    debug_assert_eq!(out.len() * size, bytes.len());
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * size))
        .for_each(|(o, b)| match dtype {
            Dtype::BF16 => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    x.write(f32::from_bits(
                        (u16::from_le_bytes([c[0], c[1]]) as u32) << 16,
                    ));
                }
            }
            Dtype::F16 => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    x.write(half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32());
                }
            }
            _ => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                    x.write(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
            }
        });
}

/// Resolve `--model`: a directory as is; otherwise `Org/Name` looked up in the local Hugging Face hub
/// cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), offline, never downloading.
pub fn resolve_model_dir(model: &str) -> Result<PathBuf> {
    let p = PathBuf::from(model);
    if p.is_dir() {
        return Ok(p);
    }
    let looks_like_repo_id =
        model.split('/').count() == 2 && !model.starts_with('/') && !model.starts_with('.');
    if !looks_like_repo_id {
        return Err(Error::input(&p, "model directory does not exist"));
    }
    let cache = hub_cache_dir();
    let repo_dir = cache.join(format!("models--{}", model.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(Error::input(
            &repo_dir,
            format!(
                "`{model}` is neither a directory nor in the local Hugging Face cache (qgate never downloads; \
                 run `huggingface-cli download {model}` or pass the model directory)"
            ),
        ));
    }
    let refs_main = repo_dir.join("refs").join("main");
    let snapshots = repo_dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(&refs_main) {
        let snap = snapshots.join(rev.trim());
        if snap.is_dir() {
            return Ok(snap);
        }
        return Err(Error::input(
            &snap,
            format!(
                "refs/main points at snapshot `{}` which is missing",
                rev.trim()
            ),
        ));
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|e| io_err(&snapshots, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    snaps.sort();
    match snaps.len() {
        1 => Ok(snaps.remove(0)),
        0 => Err(Error::input(&snapshots, "no snapshots in the cache entry")),
        n => Err(Error::input(
            &snapshots,
            format!(
                "{n} snapshots and no refs/main: pass the snapshot directory you mean with --model"
            ),
        )),
    }
}

fn hub_cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(c);
    }
    if let Some(h) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_cache_layout_resolves_through_refs_main() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--Org--Tiny");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::env::set_var("HF_HUB_CACHE", tmp.path());
        let got = resolve_model_dir("Org/Tiny").unwrap();
        assert_eq!(got, repo.join("snapshots/abc123"));
        let err = resolve_model_dir("Org/Missing").unwrap_err().to_string();
        assert!(err.contains("never downloads"), "{err}");
        std::env::remove_var("HF_HUB_CACHE");
    }
}
