//! numpy inputs: `.npz` archives with arrays named like the capture's tensors (`_` for `.`):
//! `seq{i}_tokens` `[T]`, `seq{i}_logits` `[R, V]` (f16/f32; f64 is narrowed to f32 and noted),
//! optional `seq{i}_top_ids`/`seq{i}_top_logits` `[R, K]`, `seq{i}_argmax` `[R]`, `seq{i}_rollout` `[G]`;
//! or bare `.npy` logits files (`[T, V]` or `[1, T, V]`), one per plan sequence, with `--plan`.
//!
//! The float dtype on disk is kept: f16 rows stay F16 in the capture, bit for bit.
use super::{
    check_ids, check_plan_tokens, file_name, Plan, RowBytes, SeqBytes, SeqSource, TopRows,
};
use crate::capture::FloatKind;
use crate::error::{io_err, Error, Result};
use ndarray::ArrayD;
use ndarray_npy::{ReadDataError, ReadNpyError, ReadNpyExt, ReadableElement};
use py_literal::Value as PyValue;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

// ------------------------------------------------------------------------------------------------
// Element types that read what numpy writes without trusting the header's length for allocation.

/// Read exactly `len` elements of `width` bytes, growing the buffer only as data arrives (a header that
/// lies about its shape cannot make us allocate more than the file holds).
fn read_exact_bytes<R: Read>(
    mut reader: R,
    len: usize,
    width: usize,
) -> std::result::Result<Vec<u8>, ReadDataError> {
    let n = len
        .checked_mul(width)
        .ok_or_else(|| ReadDataError::ParseData("array too large".into()))?;
    let mut buf = Vec::new();
    (&mut reader).take(n as u64).read_to_end(&mut buf)?;
    if buf.len() < n {
        return Err(ReadDataError::MissingData);
    }
    let extra = io::copy(&mut reader, &mut io::sink())?;
    if extra > 0 {
        return Err(ReadDataError::ExtraBytes(extra as usize));
    }
    Ok(buf)
}

fn desc_str(d: &PyValue) -> Option<&str> {
    match d {
        PyValue::String(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Parse a simple numpy descriptor (`<f2`, `>i4`, `|u1`, …) into (kind char, width, big-endian).
fn parse_desc(d: &PyValue) -> Option<(char, usize, bool)> {
    let s = desc_str(d)?;
    let (order, rest) = match s.chars().next()? {
        o @ ('<' | '>' | '|' | '=') => (o, &s[1..]),
        // no byte-order prefix ("i1", "f4" forms): native, i.e. little-endian here
        _ => ('<', s),
    };
    let mut c = rest.chars();
    let kind = c.next()?;
    let w: usize = c.as_str().parse().ok()?;
    Some((kind, w, order == '>'))
}

/// fp16 bits as stored (descriptor `<f2`/`>f2`).
#[derive(Clone, Copy, Debug)]
pub struct F16Bits(pub u16);
/// A float read from f4 or f8 (f8 narrowed to f32).
#[derive(Clone, Copy, Debug)]
pub struct F32Val(pub f32);
/// f8 values, narrowed to f32 on use.
#[derive(Clone, Copy, Debug)]
pub struct F64Val(pub f64);
/// Any integer descriptor, widened to i64.
#[derive(Clone, Copy, Debug)]
pub struct IntVal(pub i64);

fn chunk<const N: usize>(c: &[u8], be: bool) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(c);
    if be {
        a.reverse();
    }
    a
}

/// `.npy` float elements of one width, read little- or big-endian as the descriptor says.
macro_rules! float_element {
    ($ty:ident, $width:literal, $from:expr) => {
        impl ReadableElement for $ty {
            fn read_to_end_exact_vec<R: Read>(
                reader: R,
                type_desc: &PyValue,
                len: usize,
            ) -> std::result::Result<Vec<Self>, ReadDataError> {
                match parse_desc(type_desc) {
                    Some(('f', $width, be)) => Ok(read_exact_bytes(reader, len, $width)?
                        .chunks_exact($width)
                        .map(|c| $ty($from(chunk::<$width>(c, be))))
                        .collect()),
                    _ => Err(ReadDataError::WrongDescriptor(type_desc.clone())),
                }
            }
        }
    };
}

float_element!(F16Bits, 2, u16::from_le_bytes);
float_element!(F32Val, 4, f32::from_le_bytes);
float_element!(F64Val, 8, f64::from_le_bytes);

impl ReadableElement for IntVal {
    fn read_to_end_exact_vec<R: Read>(
        reader: R,
        type_desc: &PyValue,
        len: usize,
    ) -> std::result::Result<Vec<Self>, ReadDataError> {
        let Some((k @ ('i' | 'u'), w @ (1 | 2 | 4 | 8), be)) = parse_desc(type_desc) else {
            return Err(ReadDataError::WrongDescriptor(type_desc.clone()));
        };
        let bytes = read_exact_bytes(reader, len, w)?;
        let mut out = Vec::with_capacity(len);
        for c in bytes.chunks_exact(w) {
            let v = match (k, w) {
                ('i', 1) => c[0] as i8 as i64,
                ('u', 1) => c[0] as i64,
                ('i', 2) => i16::from_le_bytes(chunk::<2>(c, be)) as i64,
                ('u', 2) => u16::from_le_bytes(chunk::<2>(c, be)) as i64,
                ('i', 4) => i32::from_le_bytes(chunk::<4>(c, be)) as i64,
                ('u', 4) => u32::from_le_bytes(chunk::<4>(c, be)) as i64,
                ('i', _) => i64::from_le_bytes(chunk::<8>(c, be)),
                _ => {
                    let u = u64::from_le_bytes(chunk::<8>(c, be));
                    i64::try_from(u).map_err(|_| {
                        ReadDataError::ParseData(
                            format!("uint64 value {u} is not a token id").into(),
                        )
                    })?
                }
            };
            out.push(IntVal(v));
        }
        Ok(out)
    }
}

// ------------------------------------------------------------------------------------------------

/// A float array as read: its kind on disk (f64 reported as F32), shape and little-endian bytes.
struct FloatArray {
    kind: FloatKind,
    narrowed_f64: bool,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl FloatArray {
    fn to_f32(&self) -> Vec<f32> {
        match self.kind {
            FloatKind::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            FloatKind::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            FloatKind::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }
}

fn npy_problem(name: &str, e: ReadNpyError) -> String {
    format!("array `{name}`: {e}")
}

/// Largest `.npy` header accepted. `ndarray-npy` allocates the header's declared length before reading
/// it (up to 4 GiB from a 12-byte file, in the v2/v3 formats); numpy itself refuses headers over 10000
/// bytes by default. Our arrays' headers are under 200 bytes.
const MAX_NPY_HEADER: usize = 1 << 16;

/// Read one `.npy` stream, refusing a header length beyond [`MAX_NPY_HEADER`] before `ndarray-npy`
/// allocates it.
fn read_npy_checked<T: ReadableElement, R: Read>(
    mut r: R,
    name: &str,
) -> std::result::Result<ArrayD<T>, String> {
    // magic (6) + version (2) + header length (2 in v1, 4 in v2/v3)
    let mut pre = [0u8; 12];
    let mut n = 0;
    while n < pre.len() {
        match r.read(&mut pre[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("array `{name}`: {e}")),
        }
    }
    let header_len = match pre[6] {
        1 if n >= 10 => u16::from_le_bytes([pre[8], pre[9]]) as usize,
        2 | 3 if n >= 12 => u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as usize,
        _ => 0, // too short or an unknown version: ndarray-npy says which
    };
    if header_len > MAX_NPY_HEADER {
        return Err(format!(
            "array `{name}`: .npy header of {header_len} bytes (at most {MAX_NPY_HEADER} accepted)"
        ));
    }
    ArrayD::<T>::read_npy(io::Cursor::new(&pre[..n]).chain(r)).map_err(|e| npy_problem(name, e))
}

/// Where the arrays come from: an open archive or one `.npy` stream.
trait ArraySource {
    fn read<T: ReadableElement>(&mut self, name: &str) -> std::result::Result<ArrayD<T>, String>;
}

/// An `.npz` archive, read entry by entry (numpy's lookup: `name`, else `name.npy`).
struct NpzArrays(zip::ZipArchive<BufReader<File>>);
impl ArraySource for NpzArrays {
    fn read<T: ReadableElement>(&mut self, name: &str) -> std::result::Result<ArrayD<T>, String> {
        let idx = self
            .0
            .index_for_name(name)
            .or_else(|| self.0.index_for_name(&format!("{name}.npy")))
            .ok_or_else(|| format!("array `{name}`: not in the archive"))?;
        let entry = self
            .0
            .by_index(idx)
            .map_err(|e| format!("array `{name}`: {e}"))?;
        read_npy_checked(entry, name)
    }
}

struct NpyFile(PathBuf);
impl ArraySource for NpyFile {
    fn read<T: ReadableElement>(&mut self, name: &str) -> std::result::Result<ArrayD<T>, String> {
        let f = File::open(&self.0).map_err(|e| e.to_string())?;
        read_npy_checked(BufReader::new(f), name)
    }
}

fn is_wrong_desc(e: &str) -> bool {
    e.contains("descriptor")
}

fn read_floats(src: &mut impl ArraySource, name: &str) -> std::result::Result<FloatArray, String> {
    fn bytes_of<T, F: Fn(&T, &mut Vec<u8>)>(a: &ArrayD<T>, f: F, w: usize) -> Vec<u8> {
        let mut b = Vec::with_capacity(a.len() * w);
        a.iter().for_each(|x| f(x, &mut b));
        b
    }
    match src.read::<F16Bits>(name) {
        Ok(a) => {
            return Ok(FloatArray {
                kind: FloatKind::F16,
                narrowed_f64: false,
                shape: a.shape().to_vec(),
                bytes: bytes_of(&a, |x, b| b.extend_from_slice(&x.0.to_le_bytes()), 2),
            })
        }
        Err(e) if !is_wrong_desc(&e) => return Err(e),
        Err(_) => {}
    }
    match src.read::<F32Val>(name) {
        Ok(a) => {
            return Ok(FloatArray {
                kind: FloatKind::F32,
                narrowed_f64: false,
                shape: a.shape().to_vec(),
                bytes: bytes_of(&a, |x, b| b.extend_from_slice(&x.0.to_le_bytes()), 4),
            })
        }
        Err(e) if !is_wrong_desc(&e) => return Err(e),
        Err(_) => {}
    }
    match src.read::<F64Val>(name) {
        Ok(a) => Ok(FloatArray {
            kind: FloatKind::F32,
            narrowed_f64: true,
            shape: a.shape().to_vec(),
            bytes: bytes_of(
                &a,
                |x, b| b.extend_from_slice(&(x.0 as f32).to_le_bytes()),
                4,
            ),
        }),
        Err(e) if is_wrong_desc(&e) => Err(format!(
            "array `{name}` is not float16/float32/float64 ({e})"
        )),
        Err(e) => Err(e),
    }
}

fn read_ints(
    src: &mut impl ArraySource,
    name: &str,
) -> std::result::Result<(Vec<usize>, Vec<i64>), String> {
    match src.read::<IntVal>(name) {
        Ok(a) => Ok((a.shape().to_vec(), a.iter().map(|x| x.0).collect())),
        Err(e) if is_wrong_desc(&e) => Err(format!("array `{name}` is not an integer array ({e})")),
        Err(e) => Err(e),
    }
}

/// Drop leading length-1 axes until `ndim` axes remain (HF-style `[1, T, V]` exports).
fn squeeze_to(shape: &[usize], ndim: usize) -> Option<Vec<usize>> {
    let mut s = shape.to_vec();
    while s.len() > ndim && s[0] == 1 {
        s.remove(0);
    }
    (s.len() == ndim).then_some(s)
}

#[derive(Default, Clone)]
struct Fields {
    tokens: bool,
    logits: bool,
    top_ids: bool,
    top_logits: bool,
    argmax: bool,
    rollout: bool,
}

/// Where sequence `i` of the import lives.
#[derive(Clone)]
struct SeqLoc {
    file: usize,
    local: usize,
    fields: Fields,
}

pub struct NpzSource {
    files: Vec<PathBuf>,
    npy: bool,
    locs: Vec<SeqLoc>,
    plan: Option<Plan>,
    vocab: Option<usize>,
    narrowed_f64: bool,
}

fn parse_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("seq")?;
    let (idx, field) = rest.split_once('_')?;
    if idx.is_empty()
        || !idx.bytes().all(|b| b.is_ascii_digit())
        || (idx.len() > 1 && idx.starts_with('0'))
    {
        return None;
    }
    Some((idx.parse().ok()?, field))
}

impl NpzSource {
    pub fn open(files: &[PathBuf], plan: Option<&Plan>, vocab: Option<usize>) -> Result<Self> {
        let is_npy = |p: &PathBuf| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
        let npy = files.iter().any(is_npy);
        if npy && !files.iter().all(is_npy) {
            return Err(Error::usage(
                "mix of .npy and .npz inputs: pass either .npz archives or one .npy of logits per plan sequence",
            ));
        }
        let plan = plan.map(|p| Plan {
            path: p.path.clone(),
            seqs: p.seqs.clone(),
            vocab_size: p.vocab_size,
        });
        let mut locs = Vec::new();
        if npy {
            let Some(p) = &plan else {
                return Err(Error::usage(
                    "a .npy file holds only logits: pass --plan PLAN for its tokens",
                ));
            };
            if p.seqs.len() != files.len() {
                return Err(Error::usage(format!(
                    "the plan {} has {} sequences but {} .npy files were given (one per sequence, in plan order)",
                    p.path.display(),
                    p.seqs.len(),
                    files.len()
                )));
            }
            for f in 0..files.len() {
                locs.push(SeqLoc {
                    file: f,
                    local: 0,
                    fields: Fields {
                        logits: true,
                        ..Default::default()
                    },
                });
            }
        } else {
            for (fi, path) in files.iter().enumerate() {
                let npz = open_npz(path)?;
                // numpy's names: a single `.npy` suffix stripped
                let names: Vec<String> = npz
                    .file_names()
                    .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_owned())
                    .collect();
                let mut seqs: BTreeMap<usize, Fields> = BTreeMap::new();
                for n in &names {
                    let bad = || {
                        Error::input(
                            path,
                            format!("unexpected array `{n}` (expected seq{{i}}_tokens, seq{{i}}_logits, seq{{i}}_top_ids, seq{{i}}_top_logits, seq{{i}}_argmax, seq{{i}}_rollout)"),
                        )
                    };
                    let (i, field) = parse_name(n).ok_or_else(bad)?;
                    let e = seqs.entry(i).or_default();
                    let flag = match field {
                        "tokens" => &mut e.tokens,
                        "logits" => &mut e.logits,
                        "top_ids" => &mut e.top_ids,
                        "top_logits" => &mut e.top_logits,
                        "argmax" => &mut e.argmax,
                        "rollout" => &mut e.rollout,
                        _ => return Err(bad()),
                    };
                    if *flag {
                        return Err(Error::input(path, format!("array `{n}` appears twice")));
                    }
                    *flag = true;
                }
                if seqs.is_empty() {
                    return Err(Error::input(path, "the archive holds no seq{i}_* arrays"));
                }
                for (expect, (&i, fields)) in seqs.iter().enumerate() {
                    if i != expect {
                        return Err(Error::input(
                            path,
                            format!(
                                "sequence indices are not 0..{}: seq{expect}_* is missing",
                                seqs.len() - 1
                            ),
                        ));
                    }
                    if !fields.tokens {
                        return Err(Error::input(path, format!("seq{i}_tokens is missing")));
                    }
                    if fields.top_ids != fields.top_logits {
                        let missing = if fields.top_ids {
                            "top_logits"
                        } else {
                            "top_ids"
                        };
                        return Err(Error::input(
                            path,
                            format!(
                                "seq{i}_{missing} is missing (top_ids and top_logits go together)"
                            ),
                        ));
                    }
                    locs.push(SeqLoc {
                        file: fi,
                        local: i,
                        fields: fields.clone(),
                    });
                }
            }
            if let Some(p) = &plan {
                if p.seqs.len() != locs.len() {
                    return Err(Error::usage(format!(
                        "the plan {} has {} sequences but the archives hold {}",
                        p.path.display(),
                        p.seqs.len(),
                        locs.len()
                    )));
                }
            }
        }
        Ok(NpzSource {
            files: files.to_vec(),
            npy,
            locs,
            plan,
            vocab,
            narrowed_f64: false,
        })
    }

    fn load_from(
        &mut self,
        i: usize,
        src: &mut impl ArraySource,
    ) -> std::result::Result<SeqBytes, String> {
        let loc = self.locs[i].clone();
        let l = loc.local;
        let f = &loc.fields;
        let mut s = SeqBytes::default();
        if self.npy {
            s.tokens = self
                .plan
                .as_ref()
                .map(|p| p.seqs[i].clone())
                .unwrap_or_default();
        } else {
            let name = format!("seq{l}_tokens");
            let (shape, v) = read_ints(src, &name)?;
            if squeeze_to(&shape, 1).is_none() {
                return Err(format!("array `{name}` has shape {shape:?}, expected [T]"));
            }
            if v.is_empty() {
                return Err(format!("array `{name}` is empty"));
            }
            s.tokens = v;
        }
        let logits_name = if self.npy {
            "logits".to_string()
        } else {
            format!("seq{l}_logits")
        };
        let mut vocab = self.vocab;
        if f.logits {
            let a = read_floats(src, &logits_name)?;
            let Some(sh) = squeeze_to(&a.shape, 2) else {
                return Err(format!(
                    "array `{logits_name}` has shape {:?}, expected [T, V] (or [1, T, V])",
                    a.shape
                ));
            };
            let (r, v) = (sh[0], sh[1]);
            if v == 0 {
                return Err(format!("array `{logits_name}` has 0 values per row"));
            }
            if let Some(k) = vocab {
                if k != v {
                    return Err(format!(
                        "row length does not match the vocabulary: `{logits_name}` rows have {v} values, vocab_size is {k}"
                    ));
                }
            }
            vocab = Some(v);
            self.narrowed_f64 |= a.narrowed_f64;
            s.logits = Some(RowBytes {
                rows: r,
                vocab: v,
                kind: a.kind,
                bytes: a.bytes,
            });
        }
        if f.top_ids {
            let n_ids = format!("seq{l}_top_ids");
            let n_lg = format!("seq{l}_top_logits");
            let (shape, ids) = read_ints(src, &n_ids)?;
            let lg = read_floats(src, &n_lg)?;
            if shape.len() != 2 || lg.shape != shape {
                return Err(format!(
                    "`{n_ids}` {shape:?} and `{n_lg}` {:?} must both be [R, K]",
                    lg.shape
                ));
            }
            if shape[1] == 0 {
                return Err(format!("`{n_ids}` has K = 0"));
            }
            check_ids_s(&n_ids, &ids, vocab)?;
            s.top = Some(TopRows {
                rows: shape[0],
                k: shape[1],
                ids,
                logits: lg.to_f32(),
            });
        }
        if f.argmax {
            let name = format!("seq{l}_argmax");
            let (shape, v) = read_ints(src, &name)?;
            if shape.len() != 1 {
                return Err(format!("array `{name}` has shape {shape:?}, expected [R]"));
            }
            check_ids_s(&name, &v, vocab)?;
            s.argmax = Some(v);
        }
        if f.rollout {
            let name = format!("seq{l}_rollout");
            let (shape, v) = read_ints(src, &name)?;
            if shape.len() != 1 {
                return Err(format!("array `{name}` has shape {shape:?}, expected [G]"));
            }
            check_ids_s(&name, &v, vocab)?;
            s.rollout = Some(v);
        }
        check_ids_s(&format!("seq{l}_tokens"), &s.tokens, vocab)?;
        // rows: every per-position array agrees, and never more rows than tokens
        let t = s.tokens.len();
        let mut counts: Vec<(&str, usize)> = Vec::new();
        if let Some(x) = &s.logits {
            counts.push(("logits", x.rows));
        }
        if let Some(x) = &s.top {
            counts.push(("top_ids", x.rows));
        }
        if let Some(x) = &s.argmax {
            counts.push(("argmax", x.len()));
        }
        for (name, r) in &counts {
            if *r > t {
                return Err(format!(
                    "seq{l}_{name} has {r} rows but seq{l} has only {t} tokens"
                ));
            }
            if *r != counts[0].1 {
                return Err(format!(
                    "inconsistent rows: seq{l}_{name} has {r} rows but seq{l}_{} has {}",
                    counts[0].0, counts[0].1
                ));
            }
        }
        Ok(s)
    }
}

fn check_ids_s(what: &str, ids: &[i64], vocab: Option<usize>) -> std::result::Result<(), String> {
    check_ids(Path::new(""), what, ids, vocab).map_err(|e| match e {
        Error::Input { problem, .. } => problem,
        other => other.to_string(),
    })
}

fn open_npz(path: &Path) -> Result<zip::ZipArchive<BufReader<File>>> {
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| Error::input(path, format!("not a readable .npz archive ({e})")))
}

impl SeqSource for NpzSource {
    fn len(&self) -> usize {
        self.locs.len()
    }
    fn file_of(&self, i: usize) -> &Path {
        &self.files[self.locs[i].file]
    }
    fn runtime(&self) -> String {
        "npz".into()
    }
    fn load(&mut self, i: usize) -> Result<SeqBytes> {
        let path = self.files[self.locs[i].file].clone();
        let r = if self.npy {
            let mut src = NpyFile(path.clone());
            self.load_from(i, &mut src)
        } else {
            let mut src = NpzArrays(open_npz(&path)?);
            self.load_from(i, &mut src)
        };
        let s = r.map_err(|p| Error::input(&path, p))?;
        if let Some(p) = &self.plan {
            check_plan_tokens(&path, p, i, &s.tokens)?;
        }
        Ok(s)
    }
    fn notes(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "input".into(),
            if self.npy {
                "npy logits + plan tokens"
            } else {
                "npz archive"
            }
            .into(),
        );
        if self.narrowed_f64 {
            m.insert("f64_narrowed_to_f32".into(), serde_json::Value::Bool(true));
        }
        m.insert(
            "files".into(),
            serde_json::Value::Array(self.files.iter().map(|f| file_name(f).into()).collect()),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_parse_or_are_refused_without_panic() {
        let d = |s: &str| parse_desc(&PyValue::String(s.into()));
        assert_eq!(d("<f2"), Some(('f', 2, false)));
        assert_eq!(d(">i8"), Some(('i', 8, true)));
        assert_eq!(d("|u1"), Some(('u', 1, false)));
        assert_eq!(d("f4"), Some(('f', 4, false)));
        // never a panic; nothing here reads as a float or integer type
        for bad in ["", "<", "é2", "<é", "<f", "<fx", "b", "|b1", "<c8", "<f2x"] {
            let r = d(bad);
            assert!(!matches!(r, Some(('f' | 'i' | 'u', _, _))), "{bad}: {r:?}");
        }
        assert_eq!(parse_desc(&PyValue::Integer(3.into())), None);
    }

    #[test]
    fn parse_name_accepts_only_canonical_indices() {
        assert_eq!(parse_name("seq0_tokens"), Some((0, "tokens")));
        assert_eq!(parse_name("seq12_top_ids"), Some((12, "top_ids")));
        for bad in [
            "seq_tokens",
            "seq01_tokens",
            "seq+1_tokens",
            "sequence0_tokens",
            "seq0tokens",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}
