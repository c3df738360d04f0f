//! `qgate sweep`: simulate every scheme, gate each against the oracle with the f16 simulation as the
//! control, and write one ladder report (the `qgate run` report writer) naming the smallest scheme that
//! passes and why each smaller one was rejected. `--ablate int4` quantizes one component group at a time
//! (rest at the base scheme) and names the sensitive components.
use super::run::write_reports;
use super::simulate::{parse_compute, parse_scale_dtype, print_skipped, simulate, SimRequest};
use crate::capture::Capture;
use crate::error::{Error, ExitCode, Result};
use crate::gate::compare;
use crate::gate::evaluate::{evaluate, Inputs};
use crate::gate::ladder;
use crate::gate::outcome::{Ablation, Ladder, Rung};
use crate::gate::policy::Policy;
use crate::gate::summary::Identity;
use crate::model::weights::resolve_model_dir;
use crate::quant::apply::QuantReport;
use crate::quant::scheme::{Component, FloatDtype, Method, Scheme};
use crate::report;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (config.json + safetensors), or `Org/Name` in the local Hugging Face cache.
    #[arg(long)]
    pub model: String,
    /// Any qgate capture; its token sequences are the plan.
    #[arg(long)]
    pub plan: PathBuf,
    /// The oracle: `bf16`, `f32` or `f16` (run or reuse the cached HF oracle), or an oracle capture file.
    #[arg(long, default_value = "bf16")]
    pub oracle: String,
    /// Comma-separated schemes (canonical names, aliases, bundle names; mixes need one --schemes each).
    /// `f16` is the control (added when not listed).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f16,int8lin,int8hu-headsym,int4lin"
    )]
    pub schemes: Vec<String>,
    /// Separate scheme given whole (for component mixes, which contain commas). Repeatable.
    #[arg(long)]
    pub mix: Vec<String>,
    /// Ablation method (`int4` = int4-b32-symclip, or a canonical method): one component group at a time.
    #[arg(long)]
    pub ablate: Option<String>,
    /// Base scheme of the ablation (default: the scheme that ships, else int8lin).
    #[arg(long)]
    pub ablate_base: Option<String>,
    /// Compute precision of the simulations: f16 (default), bf16 or f32.
    #[arg(long, default_value = "f16")]
    pub compute: String,
    /// Scale (and LUT) dtype: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub scale_dtype: String,
    /// Gate policy TOML (default: the built-in gates/release.toml).
    #[arg(long)]
    pub gate: Option<PathBuf>,
    /// Report directory (default: reports/sweep-<model>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the simulated captures go (default: `<out>-captures`, beside the report directory).
    #[arg(long)]
    pub captures: Option<PathBuf>,
    /// Print summary.json to stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the verdict as JUnit XML (one testcase per candidate × gate rule) to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Where the oracle runs: cpu, cuda or cuda:N (a build with the `cuda` feature; scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU kernels: auto (the fastest this CPU runs), avx512, avx2 or portable (plain Rust, any CPU).
    /// Forcing a set this CPU cannot run is an error. Same numbers on every set (see README).
    #[arg(long, default_value = "auto", value_name = "KERNELS")]
    pub kernels: String,
}

fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn ablation_method(s: &str) -> Result<Method> {
    match s {
        "int4" => Method::parse("int4-b32-symclip"),
        "int8" => Method::parse("int8-b32-symclip"),
        m => Method::parse(m),
    }
    .ok_or_else(|| {
        Error::usage(format!(
            "--ablate `{s}`: expected int4, int8 or a canonical method"
        ))
    })
}

struct Sim {
    scheme: Scheme,
    label: String,
    capture: Capture,
    report: QuantReport,
}

fn identity(s: &Sim) -> Identity {
    Identity {
        label: s.label.clone(),
        capture: s.capture.path.display().to_string(),
        bundle: None,
        mode: s.scheme.alias.clone(),
        size_bytes: Some(s.report.size_bytes()),
    }
}

pub fn execute(args: Args) -> Result<ExitCode> {
    crate::model::cpu::select_arg(&args.kernels)?;
    let policy = Policy::load(args.gate.as_deref())?;
    let compute = parse_compute(&args.compute)?;
    let sd = parse_scale_dtype(&args.scale_dtype)?;
    let model_dir = resolve_model_dir(&args.model)?;
    let plan_cap = Capture::open(&args.plan)?;
    let plan = plan_cap.plan();
    let mut schemes: Vec<Scheme> = args
        .schemes
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| Scheme::parse(s))
        .chain(args.mix.iter().map(|s| Scheme::parse(s)))
        .collect::<Result<_>>()?;
    let is_f16 = |s: &Scheme| s.rest == Some(FloatDtype::F16) && !s.quantizes();
    let control_at = schemes.iter().position(is_f16);
    let control_scheme = match control_at {
        Some(i) => schemes.remove(i),
        None => Scheme::parse("f16")?,
    };
    if schemes.is_empty() {
        return Err(Error::usage(
            "--schemes names only the f16 control: give at least one scheme to gate",
        ));
    }
    let model_name = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("reports").join(format!("sweep-{}", safe(&model_name))));
    crate::outputs::check_report_dir(&out)?;
    let cap_dir = args.captures.clone().unwrap_or_else(|| {
        let mut n = out
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        n.push("-captures");
        out.with_file_name(n)
    });
    crate::outputs::check_capture_dir(&cap_dir)?;
    policy
        .check_against_plan(plan.len())
        .map_err(|m| Error::usage(format!("gate policy does not fit the plan: {m}")))?;
    std::fs::create_dir_all(&cap_dir).map_err(|e| crate::error::io_err(&cap_dir, e))?;
    let progress = crate::progress::enabled();
    let device = crate::model::device::parse_device(&args.device)?;

    let resolved = crate::oracle_cache::resolve_oracle(
        &args.oracle,
        Some(&model_dir),
        None,
        &plan_cap,
        &device,
        false,
    )?;
    let oracle = &resolved.capture;
    compare::check_same_plan(oracle, &plan_cap)?;
    let rollout = (0..oracle.len())
        .filter_map(|i| oracle.seq(i).rollout.map(|r| r.len()))
        .max()
        .unwrap_or(16);

    let mut used: Vec<String> = Vec::new();
    let mut run_sim = |scheme: Scheme| -> Result<Sim> {
        let mut label = scheme.label();
        if used.contains(&label) {
            label = format!("{label} #{}", used.len() + 1);
        }
        used.push(label.clone());
        let path = cap_dir.join(format!("{}.capture.safetensors", safe(&label)));
        crate::outputs::check_capture_out(&path, &[args.plan.as_path(), oracle.path.as_path()])?;
        eprintln!("qgate: simulating {label} ({})…", scheme.spec());
        let o = simulate(SimRequest {
            model_dir: &model_dir,
            plan: &plan,
            scheme,
            compute,
            scale_dtype: sd,
            rollout,
            out: &path,
            progress,
            device: device.clone(),
        })?;
        print_skipped(&label, &o.report);
        Ok(Sim {
            label,
            capture: Capture::open(&o.capture)?,
            report: o.report,
            scheme: o.scheme,
        })
    };
    let mut sims: Vec<Sim> = schemes
        .into_iter()
        .map(&mut run_sim)
        .collect::<Result<_>>()?;
    let control = run_sim(control_scheme)?;

    let all: Vec<&Capture> = sims
        .iter()
        .map(|s| &s.capture)
        .chain(std::iter::once(&control.capture))
        .collect();
    let ids: Vec<Identity> = sims
        .iter()
        .chain(std::iter::once(&control))
        .map(identity)
        .collect();
    let mut ev = evaluate(Inputs {
        oracle,
        provenance: resolved.provenance.clone(),
        all: &all,
        ids,
        n_candidates: sims.len(),
        policy: &policy,
    })?;

    // why each scheme smaller than the one that ships was rejected
    let rejected = ladder::rejected_smaller(&ev.run.candidates, ev.run.ship.as_deref());

    // ablation: one component group at a time
    let ablation = match &args.ablate {
        None => None,
        Some(a) => {
            let method = ablation_method(a)?;
            let base = match (&args.ablate_base, &ev.run.ship) {
                (Some(b), _) => Scheme::parse(b)?,
                (None, Some(ship)) => sims
                    .iter()
                    .find(|s| &s.label == ship)
                    .map(|s| s.scheme.clone())
                    .unwrap_or(Scheme::parse("int8lin")?),
                (None, None) => Scheme::parse("int8lin")?,
            };
            let mut variants = Vec::new();
            for c in Component::ALL {
                let mut v = base.clone();
                v.set(c, Some(method));
                v.alias = None;
                v.name = format!("{}+{}={}", base.label(), c.name(), method.canonical());
                variants.push((c, run_sim(v)?));
            }
            let all: Vec<&Capture> = variants
                .iter()
                .map(|v| &v.1.capture)
                .chain(std::iter::once(&control.capture))
                .collect();
            let ids: Vec<Identity> = variants
                .iter()
                .map(|v| identity(&v.1))
                .chain(std::iter::once(identity(&control)))
                .collect();
            let aev = evaluate(Inputs {
                oracle,
                provenance: resolved.provenance.clone(),
                all: &all,
                ids,
                n_candidates: variants.len(),
                policy: &policy,
            })?;
            let rows: Vec<(String, crate::gate::summary::CandidateSummary)> = variants
                .iter()
                .zip(aev.run.candidates)
                .map(|(v, c)| (v.0.name().to_string(), c))
                .collect();
            let sensitive = ladder::sensitive(&rows);
            Some(Ablation {
                base: format!("{} ({})", base.label(), base.spec()),
                method: method.canonical(),
                variants: rows,
                sensitive,
            })
        }
    };

    sims.push(control);
    ev.run.ladder = Some(Ladder {
        compute: compute.name().to_string(),
        scale_dtype: serde_json::to_value(sd)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        rungs: sims
            .iter()
            .map(|s| Rung {
                label: s.label.clone(),
                alias: s.scheme.alias.clone(),
                spec: s.scheme.spec(),
                size_bytes: s.report.size_bytes(),
                skipped: s
                    .report
                    .skipped
                    .iter()
                    .map(|k| format!("{} {:?} ({})", k.name, k.shape, k.reason))
                    .collect(),
            })
            .collect(),
        rejected_smaller: rejected,
        ablation,
    });
    let (code, line) =
        ladder::sweep_verdict(ev.run.ship.as_deref(), ev.run.exit_code, &ev.run.verdict);
    ev.run.exit_code = code;
    ev.run.verdict = line;
    let tt = report::tokens::TokenText::load(&model_dir.join("tokenizer.json"))
        .unwrap_or_else(|_| report::tokens::TokenText::none());
    write_reports(&out, &mut ev, &plan, &tt)?;
    report::ci::write(&ev.run, args.junit.as_deref())?;
    if args.json {
        print!("{}", report::json::render(&ev.run)?);
    } else {
        print!("{}", report::terminal::render(&ev.run));
        println!("reports: {}", out.display());
    }
    eprintln!("qgate: {}", ev.run.verdict);
    Ok(code)
}
