//! Atomic report directories: files go to a temporary directory beside `--out`, which is then renamed into
//! place. An existing report directory (one holding a qgate summary.json) is replaced; anything else that is
//! not empty is left alone and reported.
use crate::error::{io_err, Error, Result};
use std::path::Path;

/// Whether `write_dir` may replace `dir` (empty, or a qgate report directory).
pub fn is_replaceable(dir: &Path) -> bool {
    let Ok(mut rd) = std::fs::read_dir(dir) else {
        return false;
    };
    if rd.next().is_none() {
        return true;
    }
    std::fs::read_to_string(dir.join("summary.json"))
        .map(|t| t.contains(crate::gate::summary::REPORT_SCHEMA))
        .unwrap_or(false)
}

pub fn write_dir(out: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| io_err(&parent, e))?;
    if out.exists() && !(out.is_dir() && is_replaceable(out)) {
        return Err(Error::input(
            out,
            "exists and is not a qgate report directory; refusing to replace it (choose another --out)",
        ));
    }
    let tmp = tempfile::Builder::new()
        .prefix(".qgate-report-")
        .tempdir_in(&parent)
        .map_err(|e| io_err(&parent, e))?;
    for (name, bytes) in files {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).map_err(|e| io_err(&p, e))?;
    }
    let staged = tmp.keep();
    if out.exists() {
        let old = tempfile::Builder::new()
            .prefix(".qgate-old-report-")
            .tempdir_in(&parent)
            .map_err(|e| io_err(&parent, e))?;
        let old_path = old.keep();
        std::fs::remove_dir(&old_path).map_err(|e| io_err(&old_path, e))?;
        std::fs::rename(out, &old_path).map_err(|e| io_err(out, e))?;
        if let Err(e) = std::fs::rename(&staged, out) {
            let _ = std::fs::rename(&old_path, out);
            let _ = std::fs::remove_dir_all(&staged);
            return Err(io_err(out, e));
        }
        std::fs::remove_dir_all(&old_path).map_err(|e| io_err(&old_path, e))?;
    } else if let Err(e) = std::fs::rename(&staged, out) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(io_err(out, e));
    }
    Ok(())
}
