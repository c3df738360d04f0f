//! `qgate`: a thin command line over the library. Every command returns its exit code;
//! errors print one line and exit 2 (bad input) without a panic. Under `--json` an error is also a JSON
//! object on stdout, so a CI step that parses stdout always gets JSON.
use clap::{Parser, Subcommand};
use qgate::commands;
use std::ffi::OsString;

/// The exit-code contract and the environment, shown by `qgate --help` and every command's help.
const FOOTER: &str = concat!(
    "Exit codes:\n",
    "  0  pass (run), a scheme ships (sweep), or the command succeeded\n",
    "  1  gate failed (run: a candidate fails the policy; sweep: no scheme ships)\n",
    "  2  bad input or usage (one line on stderr naming the file and the problem;\n",
    "     with --json also {\"error\": …, \"exit_code\": 2} on stdout)\n",
    "  3  prompt rejected (run --require-confident-prompt: the plan has low-margin positions)\n",
    "  101  internal error (a bug in qgate)\n",
    "\n",
    "Environment:\n",
    "  QGATE_ORACLE_CACHE       where `--oracle bf16|f32|f16` caches oracle runs (default: qgate/oracles\n",
    "                           in the user cache directory: $XDG_CACHE_HOME or ~/.cache on Linux,\n",
    "                           ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows)\n",
    "  QGATE_PROGRESS_INTERVAL  seconds between progress lines when stderr is not a terminal (default 5)\n",
    "  GITHUB_STEP_SUMMARY      run/sweep append the verdict table to this file (GitHub Actions)\n",
    "  GITHUB_ACTIONS=true      run/sweep print ::error annotations for failed candidates\n",
    "  HF_HUB_CACHE, HF_HOME    where `--model Org/Name` is looked up (offline; qgate never downloads)"
);

#[derive(Parser)]
#[command(
    name = "qgate",
    version,
    about = "Gate quantized / converted Qwen3.5-family models against an exact HF oracle",
    after_help = FOOTER
)]
struct Cli {
    /// No progress output (neither terminal bars nor the timestamped progress lines written when stderr
    /// is not a terminal).
    #[arg(long, global = true, display_order = 900)]
    quiet: bool,
    /// Say more about how the command runs (the CPU kernels chosen).
    #[arg(short = 'v', long, global = true, display_order = 901)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HF-exact oracle over a plan and write a capture with full logits and greedy rollouts.
    #[command(after_help = FOOTER)]
    Oracle(commands::oracle::Args),
    /// Tokenize text prompts (optionally through the model's chat template) into a plan.
    #[command(after_help = FOOTER)]
    Plan(commands::plan::Args),
    /// Compare candidate captures with the oracle, apply the gate policy and write the verdict and reports.
    #[command(after_help = FOOTER)]
    Run(commands::run::Args),
    /// The oracle with fake-quantized weights: predict a quantized bundle before exporting it.
    #[command(after_help = FOOTER)]
    Simulate(commands::simulate::Args),
    /// Simulate a ladder of schemes, gate each against the oracle (f16 control) and name the one that ships.
    #[command(after_help = FOOTER)]
    Sweep(commands::sweep::Args),
    /// Where a simulated scheme's error enters: per-layer error of the residual stream at its flips.
    #[command(after_help = FOOTER)]
    Locate(commands::locate::Args),
    /// Join the partial captures of `qgate oracle --shard i/N` into the whole-plan oracle capture.
    #[command(after_help = FOOTER)]
    Merge(commands::merge::Args),
    /// Convert other tools' outputs (npz, llm-runner JSON, transcripts) into a qgate capture.
    #[command(after_help = FOOTER)]
    Import(commands::import::Args),
}

/// `{"error": …, "exit_code": …}` (plus `"path"` when the error names a file), one line.
fn json_error(message: &str, code: i32, path: Option<&std::path::Path>) -> String {
    let mut o = serde_json::Map::new();
    o.insert("error".into(), message.into());
    o.insert("exit_code".into(), code.into());
    if let Some(p) = path {
        o.insert("path".into(), p.display().to_string().into());
    }
    serde_json::Value::Object(o).to_string()
}

/// Whether the raw command line asks for `--json` (used when clap itself rejects the command line).
fn raw_wants_json(argv: &[OsString]) -> bool {
    argv.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

fn main() {
    qgate::alloc_tuning::keep_freed_memory_for_reuse();
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => {
            // --help and --version are not errors; a usage error under --json also goes to stdout as JSON.
            if e.use_stderr() && raw_wants_json(&argv) {
                // The message without clap's usage and hint: the lines before the first blank one.
                let text = e.to_string();
                let message = text
                    .lines()
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ");
                let message = message.trim_start_matches("error: ");
                println!("{}", json_error(message, e.exit_code(), None));
            }
            e.exit();
        }
    };
    qgate::progress::set_quiet(cli.quiet);
    qgate::model::cpu::set_verbose(cli.verbose);
    let json = match &cli.command {
        Command::Run(a) => a.json,
        Command::Sweep(a) => a.json,
        Command::Locate(a) => a.json,
        _ => false,
    };
    let result = match cli.command {
        Command::Oracle(a) => commands::oracle::execute(a),
        Command::Plan(a) => commands::plan::execute(a),
        Command::Run(a) => commands::run::execute(a),
        Command::Import(a) => commands::import::execute(a),
        Command::Merge(a) => commands::merge::execute(a),
        Command::Simulate(a) => commands::simulate::execute(a),
        Command::Sweep(a) => commands::sweep::execute(a),
        Command::Locate(a) => commands::locate::execute(a),
    };
    match result {
        Ok(code) => std::process::exit(code.code()),
        Err(e) => {
            eprintln!("qgate: error: {e}");
            let code = e.exit_code();
            if json {
                let path = match &e {
                    qgate::error::Error::Input { path, .. } => Some(path.as_path()),
                    _ => None,
                };
                println!("{}", json_error(&e.to_string(), code, path));
            }
            std::process::exit(code);
        }
    }
}
