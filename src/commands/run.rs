//! `qgate run`: parse the arguments, check every output path, resolve the oracle, call the gate
//! (`gate::evaluate`) and write what it decided. Exit codes: 0 pass, 1 gate failed, 2 bad input or usage,
//! 3 prompt rejected.
use crate::capture::Capture;
use crate::error::{Error, ExitCode, Result};
use crate::gate::bundle::{self, CandidateInput};
use crate::gate::compare;
use crate::gate::evaluate::{evaluate, Evaluation, Inputs};
use crate::gate::metrics::MarginSpace;
use crate::gate::policy::Policy;
use crate::gate::summary::{self, Identity, SIMULATE_RUNTIME};
use crate::report;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Candidate: a capture file, or a Core AI bundle directory holding `*.capture.safetensors`. Repeat for a ladder.
    #[arg(long, required = true)]
    pub bundle: Vec<PathBuf>,
    /// The oracle: `bf16`, `f32` or `f16` (run or reuse the cached HF oracle), or an oracle capture file.
    #[arg(long)]
    pub oracle: String,
    /// HF model directory (for `--oracle <dtype>` and the tokenizer).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the oracle runs: cpu, cuda or cuda:N (a build with the `cuda` feature; scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU kernels: auto (the fastest this CPU runs), avx512, avx2 or portable (plain Rust, any CPU).
    /// Forcing a set this CPU cannot run is an error. Same numbers on every set (see README).
    #[arg(long, default_value = "auto", value_name = "KERNELS")]
    pub kernels: String,
    /// Control capture of the same plan (typically fp16): confident flips it shares are attributed to the oracle's resolution.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Gate policy TOML (default: the built-in gates/release.toml).
    #[arg(long)]
    pub gate: Option<PathBuf>,
    /// Report directory (default: reports/<bundle-name>/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Margin unit: `prob` (softmax probabilities) or `logit` (nats). Overrides the policy.
    #[arg(long, value_enum)]
    pub margin_space: Option<SpaceArg>,
    /// Margin floor in the margin space. Overrides the policy.
    #[arg(long)]
    pub margin_floor: Option<f64>,
    /// Reject the plan (exit 3) when a counted position's oracle margin is below the floor.
    #[arg(long)]
    pub require_confident_prompt: bool,
    /// tokenizer.json for decoded context in the report (default: the model's or the bundle's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Print summary.json to stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// The size of a candidate, `LABEL=SIZE` (e.g. `int8=402MB`), when its bundle directory or capture
    /// metadata does not give it; the ship decision is by size and never by argument order.
    #[arg(long = "size", value_name = "LABEL=SIZE")]
    pub sizes: Vec<String>,
    /// Accept an `--oracle FILE` that is not a qgate or HF oracle capture; the report says "oracle
    /// provenance unverified".
    #[arg(long)]
    pub trust_oracle: bool,
    /// Also write the verdict as JUnit XML (one testcase per candidate × gate rule) to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum SpaceArg {
    Prob,
    Logit,
}

fn size_from_meta(c: &Capture) -> Option<u64> {
    c.meta.extra.get("size_bytes").and_then(|v| v.as_u64())
}

fn default_out(first: &CandidateInput) -> PathBuf {
    let name = first
        .bundle_name
        .clone()
        .unwrap_or_else(|| bundle::capture_stem(&first.capture));
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    Path::new("reports").join(if safe.is_empty() { "run".into() } else { safe })
}

fn tokenizer_for(args: &Args, inputs: &[CandidateInput]) -> Result<report::tokens::TokenText> {
    if let Some(p) = &args.tokenizer {
        return report::tokens::TokenText::load(p)
            .map_err(|e| Error::input(p, format!("cannot load tokenizer ({e})")));
    }
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(m) = &args.model {
        cands.push(m.join("tokenizer.json"));
    }
    cands.extend(inputs.iter().filter_map(|i| i.tokenizer.clone()));
    for c in cands {
        if c.is_file() {
            if let Ok(t) = report::tokens::TokenText::load(&c) {
                return Ok(t);
            }
        }
    }
    Ok(report::tokens::TokenText::none())
}

pub fn execute(args: Args) -> Result<ExitCode> {
    crate::model::cpu::select_arg(&args.kernels)?;
    let mut policy = Policy::load(args.gate.as_deref())?;
    let space = args.margin_space.map(|s| match s {
        SpaceArg::Prob => MarginSpace::Prob,
        SpaceArg::Logit => MarginSpace::Logit,
    });
    policy.override_with(space, args.margin_floor, args.require_confident_prompt)?;
    let device = crate::model::device::parse_device(&args.device)?;

    let mut inputs = Vec::new();
    for b in &args.bundle {
        inputs.extend(bundle::resolve(b)?);
    }
    // every output path is checked before any work (the oracle may take hours)
    let out = args.out.clone().unwrap_or_else(|| default_out(&inputs[0]));
    crate::outputs::check_report_dir(&out)?;
    if let Some(j) = &args.junit {
        crate::outputs::check_junit_out(j)?;
        crate::outputs::check_outside_report(j, "--junit", &out)?;
    }

    let caps: Vec<Capture> = inputs
        .iter()
        .map(|i| Capture::open(&i.capture))
        .collect::<Result<_>>()?;
    let control = args.control.as_ref().map(Capture::open).transpose()?;
    for c in &caps {
        crate::shard::refuse_partial(c, "candidate")?;
    }
    if let Some(c) = &control {
        crate::shard::refuse_partial(c, "control")?;
    }
    // every capture on one plan, checked before the oracle may run for hours
    for c in caps.iter().skip(1).chain(control.iter()) {
        compare::check_same_plan_as(&caps[0], "the first candidate", c)?;
    }
    policy
        .check_against_plan(caps[0].len())
        .map_err(|m| Error::usage(format!("gate policy does not fit the plan: {m}")))?;
    let mut all: Vec<&Capture> = caps.iter().collect();
    if let Some(c) = &control {
        all.push(c);
    }
    let mut ids = identities(&all, &inputs);
    for spec in &args.sizes {
        let (label, size) = spec
            .split_once('=')
            .and_then(|(l, s)| Some((l, crate::oracle::parse_bytes(s)?)))
            .ok_or_else(|| {
                Error::usage(format!(
                    "--size `{spec}`: expected LABEL=SIZE, such as int8=402MB or int4=1.2GiB"
                ))
            })?;
        if args
            .sizes
            .iter()
            .filter(|s| s.split_once('=').map(|(l, _)| l) == Some(label))
            .count()
            > 1
        {
            return Err(Error::usage(format!(
                "--size: `{label}` is given more than once"
            )));
        }
        let Some(id) = ids.iter_mut().find(|i| i.label == label) else {
            let known: Vec<&str> = ids.iter().map(|i| i.label.as_str()).collect();
            return Err(Error::usage(format!(
                "--size `{spec}`: no candidate is labelled `{label}` (labels: {})",
                known.join(", ")
            )));
        };
        // a size measured from the bundle or recorded in the capture stands: a different --size for it is
        // a mistake to report, not to apply silently
        if let Some(known) = id.size_bytes.filter(|&k| k != size) {
            return Err(Error::usage(format!(
                "--size `{spec}`: `{label}` already has a size of {known} bytes (its bundle directory or capture metadata); --size is for candidates without one"
            )));
        }
        id.size_bytes = Some(size);
    }
    // The tokenizer before the oracle: a bad --tokenizer must not cost an oracle run.
    let tt = tokenizer_for(&args, &inputs)?;
    let resolved = crate::oracle_cache::resolve_oracle(
        &args.oracle,
        args.model.as_deref(),
        inputs[0].bundle_dir.as_deref(),
        &caps[0],
        &device,
        args.trust_oracle,
    )?;
    let oracle = resolved.capture;
    for c in caps.iter().chain(control.iter()) {
        compare::check_same_plan(&oracle, c)?;
    }

    let mut ev = evaluate(Inputs {
        oracle: &oracle,
        provenance: resolved.provenance,
        all: &all,
        ids,
        n_candidates: caps.len(),
        policy: &policy,
    })?;
    ev.run.sim_vs_bundle =
        crate::gate::sim_vs_bundle::pair_up(&all, &ev.compared, &ev.run.candidates);
    write_reports(&out, &mut ev, &oracle.plan(), &tt)?;
    report::ci::write(&ev.run, args.junit.as_deref())?;
    let run = ev.run;
    let code = run.exit_code;
    if args.json {
        print!("{}", report::json::render(&run)?);
    } else {
        print!("{}", report::terminal::render(&run));
        println!("reports: {}", out.display());
    }
    eprintln!("qgate: {}", run.verdict);
    Ok(code)
}

/// Unique labels and what is known of each capture (bundle, mode, size).
fn identities(all: &[&Capture], inputs: &[CandidateInput]) -> Vec<Identity> {
    let mut ids: Vec<Identity> = Vec::new();
    for (i, c) in all.iter().enumerate() {
        let input = inputs.get(i);
        let label = match input.and_then(|x| x.bundle_name.clone()) {
            Some(b)
                if inputs
                    .iter()
                    .filter(|y| y.bundle_name.as_deref() == Some(&b))
                    .count()
                    == 1 =>
            {
                b
            }
            _ => c.meta.label.clone(),
        };
        // one line, safe in a markdown table (a label must not forge a report cell), and unique
        let mut label = summary::clean_label(&label);
        if ids.iter().any(|x| x.label == label) {
            label = summary::clean_label(&format!("{label} [{}]", bundle::capture_stem(&c.path)));
        }
        let base = label.clone();
        let mut n = 2;
        while ids.iter().any(|x| x.label == label) {
            label = format!("{base} #{n}");
            n += 1;
        }
        ids.push(Identity {
            label,
            capture: c.path.display().to_string(),
            bundle: input.and_then(|x| x.bundle_dir.as_ref().map(|d| d.display().to_string())),
            mode: input
                .and_then(|x| x.mode.clone())
                .or_else(|| bundle::precision_tag(&c.meta.label)),
            size_bytes: input
                .and_then(|x| x.size_bytes)
                .or_else(|| size_from_meta(c)),
            simulation: c.meta.runtime == SIMULATE_RUNTIME,
        });
    }
    ids
}

/// The files of a report directory.
pub const REPORT_FILES: [&str; 4] = [
    "report.md",
    "positions.csv",
    "summary.json",
    "positions.svg",
];

/// Write report.md, positions.csv, summary.json (with the manifest of these files) and positions.svg
/// into `out`.
pub fn write_reports(
    out: &Path,
    ev: &mut Evaluation,
    plan: &[Vec<i64>],
    tt: &report::tokens::TokenText,
) -> Result<()> {
    write_reports_with(out, ev, plan, tt, Vec::new())
}

/// As `write_reports`, with more files (`sweep --sensitivity`'s map, …) in the directory and its manifest.
pub fn write_reports_with(
    out: &Path,
    ev: &mut Evaluation,
    plan: &[Vec<i64>],
    tt: &report::tokens::TokenText,
    extra: Vec<(&'static str, Vec<u8>)>,
) -> Result<()> {
    ev.run.report_files = REPORT_FILES
        .iter()
        .copied()
        .chain(extra.iter().map(|e| e.0))
        .map(str::to_string)
        .collect();
    let (run, compared, masks, views) = (&ev.run, &ev.compared, &ev.masks, &ev.views);
    let policy = &run.policy;
    let md = report::markdown::render(run, plan, tt);
    let labels: Vec<String> = run.candidates.iter().map(|c| c.id.label.clone()).collect();
    let csv_in: Vec<report::csv::Rows<'_>> = compared
        .iter()
        .zip(masks)
        .zip(&ev.judgements)
        .enumerate()
        .map(|(i, ((c, m), j))| report::csv::Rows {
            label: labels[i].as_str(),
            positions: c.positions.as_slice(),
            counted: m.as_slice(),
            flips: j.as_slice(),
        })
        .collect();
    let csv = report::csv::render(&csv_in);
    let svg = report::plot::render(
        views,
        &csv_in,
        &report::plot::Lines {
            floor: policy.margin_floor,
            min_cosine: policy.min_cosine,
            margin_unit: match policy.margin_space {
                MarginSpace::Prob => "probability",
                MarginSpace::Logit => "nats",
            },
        },
    )?;
    let json = report::json::render(run)?;
    let mut files = vec![
        ("report.md", md.into_bytes()),
        ("positions.csv", csv.into_bytes()),
        ("summary.json", json.into_bytes()),
        ("positions.svg", svg.into_bytes()),
    ];
    files.extend(extra);
    report::write::write_dir(out, &files)
}
