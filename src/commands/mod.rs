//! One module per subcommand: its clap `Args` and an `execute` returning the process exit code.
pub mod import;
pub mod locate;
pub mod merge;
pub mod oracle;
pub mod plan;
pub mod run;
pub mod simulate;
pub mod sweep;
