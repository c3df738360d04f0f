//! One scratch file per fuzzing process (libFuzzer runs inputs one after another in a process).
use std::path::PathBuf;

/// `<tmp>/qgate-fuzz-<pid>/<name>`; the directory is created on first use.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qgate-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}
