//! Atomic report directories: files go to a temporary directory beside `--out`, which is then renamed into
//! place. An existing directory is replaced only when it holds nothing but a previous qgate report's own
//! files (`crate::outputs`); anything else is refused before any work and again here.
use crate::error::{io_err, Error, Result};
use crate::outputs;
use std::path::Path;

pub fn write_dir(out: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| io_err(&parent, e))?;
    // checked before the work started; checked again in case something changed meanwhile
    outputs::check_report_dir(out)?;
    let tmp = tempfile::Builder::new()
        .prefix(".qgate-report-")
        .tempdir_in(&parent)
        .map_err(|e| io_err(&parent, e))?;
    for (name, bytes) in files {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).map_err(|e| io_err(&p, e))?;
    }
    if out.exists() {
        // move the previous report aside (one rename), put the new one in place, then delete only the
        // files the previous report's manifest lists
        let old = tempfile::Builder::new()
            .prefix(".qgate-old-report-")
            .tempdir_in(&parent)
            .map_err(|e| io_err(&parent, e))?;
        let old_path = old.keep();
        std::fs::remove_dir(&old_path).map_err(|e| io_err(&old_path, e))?;
        std::fs::rename(out, &old_path).map_err(|e| io_err(out, e))?;
        let staged = tmp.keep();
        if let Err(e) = std::fs::rename(&staged, out) {
            let _ = std::fs::rename(&old_path, out);
            return Err(Error::input(
                out,
                format!(
                    "cannot put the new report in place ({e}); it is in {}",
                    staged.display()
                ),
            ));
        }
        outputs::remove_previous_report(&old_path)?;
    } else {
        let staged = tmp.keep();
        if let Err(e) = std::fs::rename(&staged, out) {
            return Err(Error::input(
                out,
                format!(
                    "cannot put the report in place ({e}); it is in {}",
                    staged.display()
                ),
            ));
        }
    }
    Ok(())
}
