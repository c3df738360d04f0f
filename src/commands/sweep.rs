//! `qgate sweep`: simulate every scheme, gate each against the oracle with the f16 simulation as the
//! control, and write one ladder report (the `qgate run` report writer) naming the smallest scheme that
//! passes and why each smaller one was rejected. `--ablate int4` quantizes one component group at a time
//! (rest at the base scheme) and names the sensitive components. `--sensitivity int4` maps every layer ×
//! component alone at int4 (`quant::sensitivity`, prefix reuse); `--search int4:int8` finds the smallest
//! passing mix of the two (`quant::search`) and gates it as one more rung of the ladder.
use super::run::write_reports_with;
use super::simulate::{parse_compute, parse_scale_dtype, print_skipped, simulate, SimRequest};
use crate::capture::Capture;
use crate::error::{Error, ExitCode, Result};
use crate::gate::evaluate::{evaluate, Inputs};
use crate::gate::ladder;
use crate::gate::outcome::{Ablation, Ladder, Rung};
use crate::gate::policy::Policy;
use crate::gate::summary::Identity;
use crate::model::weights::resolve_model_dir;
use crate::quant::apply::QuantReport;
use crate::quant::scheme::{Component, FloatDtype, Method, Scheme};
use crate::quant::sensitivity;
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
    /// Sensitivity map: every layer × component (attention, Gated DeltaNet, MLP/experts, head, embedding)
    /// alone at this method (`int4` = int4-b32-symclip, `int8`, or a canonical method), the rest
    /// unquantized; writes sensitivity.{md,csv,svg} into --out.
    #[arg(long, value_name = "LOW")]
    pub sensitivity: Option<String>,
    /// Compute the sensitivity map with one full simulation per part instead of prefix reuse (same
    /// numbers; the benchmark's baseline).
    #[arg(long)]
    pub sensitivity_naive: bool,
    /// Map only these parts (`mlp@2,gdn@0,attn@3,head,embed`); default every part.
    #[arg(long, value_delimiter = ',', value_name = "PARTS")]
    pub sensitivity_parts: Vec<String>,
    /// Smallest passing mix of two methods (`int4:int8`): start from LOW everywhere, promote the most
    /// harmful parts per byte to HIGH until the gate passes, then demote what is no longer needed. The mix
    /// is gated as one more rung (`mix-LOW-HIGH`); search.md lists every step.
    #[arg(long, value_name = "LOW:HIGH")]
    pub search: Option<String>,
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
        simulation: true,
    }
}

pub fn execute(args: Args) -> Result<ExitCode> {
    crate::model::cpu::select_arg(&args.kernels)?;
    let policy = Policy::load(args.gate.as_deref())?;
    let sens_method = args
        .sensitivity
        .as_deref()
        .map(|m| {
            ablation_method(m).map_err(|_| {
                Error::usage(format!(
                    "--sensitivity `{m}`: expected int4, int8 or a canonical method"
                ))
            })
        })
        .transpose()?;
    let search_methods = match args.search.as_deref() {
        None => None,
        Some(s) => {
            let (lo, hi) = s.split_once(':').ok_or_else(|| {
                Error::usage(format!("--search `{s}`: expected LOW:HIGH, e.g. int4:int8"))
            })?;
            let bad = |m: &str| {
                Error::usage(format!(
                    "--search `{s}`: `{m}` is not int4, int8 or a canonical method"
                ))
            };
            let low = ablation_method(lo.trim()).map_err(|_| bad(lo))?;
            let high = ablation_method(hi.trim()).map_err(|_| bad(hi))?;
            if low == high {
                return Err(Error::usage(format!(
                    "--search `{s}`: LOW and HIGH are the same method"
                )));
            }
            Some((lo.trim().to_string(), low, hi.trim().to_string(), high))
        }
    };
    let only: Vec<sensitivity::Part> = args
        .sensitivity_parts
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            sensitivity::Part::parse(p).ok_or_else(|| {
                Error::usage(format!(
                    "--sensitivity-parts `{p}`: expected head, embed or COMPONENT@LAYER (attn@3, gdn@0, mlp@2)"
                ))
            })
        })
        .collect::<Result<_>>()?;
    if !only.is_empty() && sens_method.is_none() {
        return Err(Error::usage("--sensitivity-parts needs --sensitivity LOW"));
    }
    if args.sensitivity_naive && sens_method.is_none() {
        return Err(Error::usage("--sensitivity-naive needs --sensitivity LOW"));
    }
    let compute = parse_compute(&args.compute)?;
    let sd = parse_scale_dtype(&args.scale_dtype)?;
    let model_dir = resolve_model_dir(&args.model)?;
    if !only.is_empty() {
        // The parts must exist in this model: checked now, not after the oracle and the ladder.
        sensitivity::check_parts(
            &crate::model::config::TextConfig::from_dir(&model_dir)?,
            &only,
        )?;
    }
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
    if let Some(j) = &args.junit {
        crate::outputs::check_junit_out(j)?;
        crate::outputs::check_outside_report(j, "--junit", &out)?;
    }
    // The ablation's arguments, parsed before any work (they are used after the ladder has run).
    let ablate_method = args.ablate.as_deref().map(ablation_method).transpose()?;
    let ablate_base = args.ablate_base.as_deref().map(Scheme::parse).transpose()?;
    let cap_dir = args.captures.clone().unwrap_or_else(|| {
        let mut n = out
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        n.push("-captures");
        out.with_file_name(n)
    });
    crate::outputs::check_capture_dir(&cap_dir)?;
    crate::outputs::check_outside_report(&cap_dir, "--captures", &out)?;
    // The ladder's captures (one per scheme and the f16 control), checked before the oracle runs.
    for s in schemes.iter().chain(std::iter::once(&control_scheme)) {
        let path = cap_dir.join(format!("{}.capture.safetensors", safe(&s.label())));
        crate::outputs::check_capture_out(&path, &[args.plan.as_path()])?;
    }
    policy
        .check_against_plan(plan.len())
        .map_err(|m| Error::usage(format!("gate policy does not fit the plan: {m}")))?;
    std::fs::create_dir_all(&cap_dir).map_err(|e| crate::error::io_err(&cap_dir, e))?;
    let progress = crate::progress::enabled();
    let device = crate::model::device::parse_device(&args.device)?;

    let resolved = super::oracle_for_plan(&args.oracle, &model_dir, &plan_cap, &device)?;
    let oracle = &resolved.capture;
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
    let control = run_sim(control_scheme)?;
    let sens_req = |method, mode| crate::quant::sensitivity::Request {
        model_dir: &model_dir,
        plan: &plan,
        oracle,
        control: &control.capture,
        policy: &policy,
        method,
        compute,
        scale_dtype: sd,
        mode,
        progress,
        device: device.clone(),
        scratch: &cap_dir,
        only: None,
    };
    let sensitivity = match sens_method {
        None => None,
        Some(m) => {
            let mode = if args.sensitivity_naive {
                sensitivity::Mode::Naive
            } else {
                sensitivity::Mode::PrefixReuse
            };
            eprintln!("qgate: sensitivity map at {} ({:?})…", m.canonical(), mode);
            let mut r = sens_req(m, mode);
            if !only.is_empty() {
                r.only = Some(&only);
            }
            Some(sensitivity::run(&r)?)
        }
    };
    let search = match &search_methods {
        None => None,
        Some((_, low, _, high)) => {
            let own;
            let map = match &sensitivity {
                Some(s) if s.method == low.canonical() && only.is_empty() => s,
                _ => {
                    eprintln!(
                        "qgate: sensitivity map at {} for the search…",
                        low.canonical()
                    );
                    own = sensitivity::run(&sens_req(*low, sensitivity::Mode::PrefixReuse))?;
                    &own
                }
            };
            eprintln!(
                "qgate: searching the smallest passing mix of {} and {}…",
                low.canonical(),
                high.canonical()
            );
            Some(crate::quant::search::run(&crate::quant::search::Request {
                model_dir: &model_dir,
                plan: &plan,
                oracle,
                provenance: resolved.provenance.clone(),
                control: &control.capture,
                control_id: identity(&control),
                policy: &policy,
                low: *low,
                high: *high,
                compute,
                scale_dtype: sd,
                rollout,
                map,
                scratch: &cap_dir,
                progress,
                device: device.clone(),
            })?)
        }
    };
    if let (Some(o), Some((lo, _, hi, _))) = (&search, &search_methods) {
        if let Some(mix) = &o.mix {
            let mut sc = Scheme::parse(mix)?;
            sc.name = format!("mix-{}-{}", safe(lo), safe(hi));
            schemes.push(sc);
        }
    }
    let mut sims: Vec<Sim> = schemes
        .into_iter()
        .map(&mut run_sim)
        .collect::<Result<_>>()?;

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
    let ablation = match ablate_method {
        None => None,
        Some(method) => {
            let base = match (ablate_base, &ev.run.ship) {
                (Some(b), _) => b,
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
        sensitivity,
        search,
    });
    let (code, line) = ladder::sweep_verdict(
        &ev.run.candidates,
        ev.run.ship.as_deref(),
        &ev.run.ship_note,
        ev.run.exit_code,
        &ev.run.verdict,
    );
    ev.run.exit_code = code;
    ev.run.verdict = line;
    let tt = report::tokens::TokenText::load(&model_dir.join("tokenizer.json"))
        .unwrap_or_else(|_| report::tokens::TokenText::none());
    let mut extra: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut text = String::new();
    if let Some(l) = &ev.run.ladder {
        if let Some(m) = &l.sensitivity {
            let t = report::sensitivity::table(m, &policy);
            text.push_str(&t);
            extra.push(("sensitivity.md", t.into_bytes()));
            extra.push((
                "sensitivity.csv",
                report::sensitivity::csv(m, &policy).into_bytes(),
            ));
            extra.push((
                "sensitivity.svg",
                report::sensitivity::svg(m, &policy)?.into_bytes(),
            ));
        }
        if let Some(s) = &l.search {
            let t = report::sensitivity::search_md(s);
            text.push('\n');
            text.push_str(&t);
            extra.push(("search.md", t.into_bytes()));
        }
    }
    write_reports_with(&out, &mut ev, &plan, &tt, extra)?;
    report::ci::write(&ev.run, args.junit.as_deref())?;
    if args.json {
        print!("{}", report::json::render(&ev.run)?);
    } else {
        print!("{}", report::terminal::render(&ev.run));
        if !text.is_empty() {
            println!("\n{text}");
        }
        println!("reports: {}", out.display());
    }
    eprintln!("qgate: {}", ev.run.verdict);
    Ok(code)
}
