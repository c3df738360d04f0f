//! `qgate run` (being built in its own branch; see the issue).
use crate::error::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn execute(_args: Args) -> Result<i32> {
    Err(Error::usage("`qgate run` is not built yet"))
}
