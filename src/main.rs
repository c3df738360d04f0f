//! `qgate`: a thin command line over the library. Every command returns its exit code;
//! errors print one line and exit 2 (bad input) without a panic.
use clap::{Parser, Subcommand};
use qgate::commands;

#[derive(Parser)]
#[command(
    name = "qgate",
    version,
    about = "Gate quantized / converted Qwen3.5-family models against an exact HF oracle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HF-exact oracle over a plan and write a capture with full logits and greedy rollouts.
    Oracle(commands::oracle::Args),
    /// Tokenize text prompts (optionally through the model's chat template) into a plan.
    Plan(commands::plan::Args),
    /// Compare candidate captures with the oracle, apply the gate policy and write the verdict and reports.
    Run(commands::run::Args),
    /// The oracle with fake-quantized weights: predict a quantized bundle before exporting it.
    Simulate(commands::simulate::Args),
    /// Simulate a ladder of schemes, gate each against the oracle (f16 control) and name the one that ships.
    Sweep(commands::sweep::Args),
    /// Convert other tools' outputs (npz, llm-runner JSON, transcripts) into a qgate capture.
    Import(commands::import::Args),
}

fn main() {
    qgate::alloc_tuning::keep_freed_memory_for_reuse();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Oracle(a) => commands::oracle::execute(a),
        Command::Plan(a) => commands::plan::execute(a),
        Command::Run(a) => commands::run::execute(a),
        Command::Import(a) => commands::import::execute(a),
        Command::Simulate(a) => commands::simulate::execute(a),
        Command::Sweep(a) => commands::sweep::execute(a),
    };
    match result {
        Ok(code) => std::process::exit(code.code()),
        Err(e) => {
            eprintln!("qgate: error: {e}");
            std::process::exit(e.exit_code());
        }
    }
}
