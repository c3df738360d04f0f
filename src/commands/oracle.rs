//! `qgate oracle`.
use crate::error::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn execute(_args: Args) -> Result<i32> {
    Err(Error::usage("`qgate oracle` is not built yet"))
}
