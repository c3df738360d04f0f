//! `--bundle` arguments: a capture file, or a Core AI LanguageBundle directory (`metadata.json`, `*.aimodel`,
//! `tokenizer/`) holding the captures the capture tool wrote next to it (`*.capture.safetensors`).
use crate::error::{io_err, Error, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct CandidateInput {
    pub capture: PathBuf,
    pub bundle_dir: Option<PathBuf>,
    /// `metadata.json` `name`, else the directory name.
    pub bundle_name: Option<String>,
    /// Sum of the bundle's `.aimodel` / `.aimodelc` files.
    pub size_bytes: Option<u64>,
    /// Quantization tag from the bundle (or capture file) name.
    pub mode: Option<String>,
    pub tokenizer: Option<PathBuf>,
}

/// The zoo's precision tags (`conversion/zoo_verify.py`), longest alternatives first.
const PRECISION_TAGS: &[&str] = &[
    "int2",
    "int4km",
    "int4linsym",
    "int4lin",
    "int4hu",
    "int4",
    "int8hu",
    "int8lin",
    "int8sym",
    "int8",
    "mixed48",
    "mixedbit",
    "sym8",
    "fp4",
    "fp8",
    "fp16",
    "float16",
    "bf16",
    "bfloat16",
    "float32",
    "fp32",
];

/// First precision tag in a name (lower-cased; a tag must not touch another letter or digit).
pub fn precision_tag(name: &str) -> Option<String> {
    let s = name.to_ascii_lowercase();
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    for i in 0..b.len() {
        if i > 0 && alnum(b[i - 1]) {
            continue;
        }
        for tag in PRECISION_TAGS {
            let end = i + tag.len();
            // Compared as bytes: `i` may fall inside a multi-byte character of a non-ASCII name.
            if b[i..].starts_with(tag.as_bytes()) && (end == b.len() || !alnum(b[end])) {
                return Some(tag.to_string());
            }
        }
    }
    None
}

/// Bytes under `p`, following symbolic links (an HF-cache layout links files to blobs), each file or
/// directory counted once (no loops); `None` when anything cannot be read: an unknown size, never 0.
fn path_size(p: &Path, seen: &mut std::collections::HashSet<PathBuf>) -> Option<u64> {
    let real = p.canonicalize().ok()?;
    if !seen.insert(real.clone()) {
        return Some(0);
    }
    let m = std::fs::metadata(&real).ok()?;
    if !m.is_dir() {
        return Some(m.len());
    }
    let mut total = 0u64;
    for e in std::fs::read_dir(&real).ok()? {
        total = total.checked_add(path_size(&e.ok()?.path(), seen)?)?;
    }
    Some(total)
}

/// Strip `.capture.safetensors` / `.safetensors` from a capture file name.
pub fn capture_stem(p: &Path) -> String {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    n.trim_end_matches(".safetensors")
        .trim_end_matches(".capture")
        .to_string()
}

pub fn resolve(arg: &Path) -> Result<Vec<CandidateInput>> {
    if arg.is_file() {
        return Ok(vec![CandidateInput {
            capture: arg.to_path_buf(),
            bundle_dir: None,
            bundle_name: None,
            size_bytes: None,
            mode: precision_tag(&capture_stem(arg)),
            tokenizer: None,
        }]);
    }
    if !arg.is_dir() {
        return Err(Error::input(
            arg,
            "no such file or directory (--bundle takes a capture file or a bundle directory)",
        ));
    }
    let meta_path = arg.join("metadata.json");
    if !meta_path.is_file() {
        return Err(Error::input(arg, "not a Core AI bundle: no metadata.json (--bundle takes a capture file or a bundle directory)"));
    }
    let text = std::fs::read_to_string(&meta_path).map_err(|e| io_err(&meta_path, e))?;
    let meta: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(&meta_path, format!("not JSON ({e})")))?;
    let dir_name = arg
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| arg.display().to_string());
    let name = meta
        .get("name")
        .and_then(|n| n.as_str())
        .map(str::to_string)
        .unwrap_or(dir_name.clone());
    let mut captures: Vec<PathBuf> = std::fs::read_dir(arg)
        .map_err(|e| io_err(arg, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(".capture.safetensors"))
        .collect();
    captures.sort();
    if captures.is_empty() {
        return Err(Error::input(
            arg,
            "bundle holds no *.capture.safetensors: capture the bundle on the plan first (or pass the capture file to --bundle)",
        ));
    }
    // The model assets' bytes: `X.aimodel`, or `X.aimodelc` where no `X.aimodel` is beside it (the
    // runtime's fallback), links followed; unknown when any cannot be read.
    let mut size = Some(0u64);
    let mut any = false;
    let mut seen = std::collections::HashSet::new();
    for e in std::fs::read_dir(arg)
        .map_err(|e| io_err(arg, e))?
        .flatten()
    {
        let p = e.path();
        let n = p.to_string_lossy().to_string();
        let counted = n.ends_with(".aimodel")
            || (n.ends_with(".aimodelc") && !p.with_extension("aimodel").exists());
        if counted {
            any = true;
            size = size.and_then(|s| s.checked_add(path_size(&p, &mut seen)?));
        }
    }
    let tok = arg.join("tokenizer").join("tokenizer.json");
    let mode = precision_tag(&dir_name).or_else(|| precision_tag(&name));
    Ok(captures
        .into_iter()
        .map(|c| CandidateInput {
            capture: c,
            bundle_dir: Some(arg.to_path_buf()),
            bundle_name: Some(name.clone()),
            size_bytes: if any { size } else { None },
            mode: mode.clone(),
            tokenizer: tok.is_file().then(|| tok.clone()),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_tags_follow_the_zoo_regex() {
        assert_eq!(
            precision_tag("qwen3_5_0_8b_decode_int8hu_block32_sym").as_deref(),
            Some("int8hu")
        );
        assert_eq!(precision_tag("Qwen-INT4-model").as_deref(), Some("int4"));
        assert_eq!(precision_tag("model_int4x"), None);
        assert_eq!(precision_tag("xint8"), None);
        assert_eq!(precision_tag("a.fp16.capture").as_deref(), Some("fp16"));
        // Non-ASCII names (a scheme, a label, a bundle's metadata name): no panic inside a character.
        assert_eq!(precision_tag("é"), None);
        assert_eq!(precision_tag("modèle"), None);
        assert_eq!(precision_tag("Qwen3.5 – int8").as_deref(), Some("int8"));
    }
}
