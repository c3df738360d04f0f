//! Running and caching the oracle for `qgate run --oracle <dtype>` (implemented in the oracle branch).
use crate::capture::Capture;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub fn oracle_capture_for(
    _model: Option<&Path>,
    _bundle_dir: Option<&Path>,
    dtype: &str,
    _plan: &Capture,
) -> Result<PathBuf> {
    Err(Error::usage(format!(
        "--oracle {dtype}: running the oracle from `qgate run` is not available in this build; run `qgate oracle` and pass the oracle capture file to --oracle"
    )))
}
