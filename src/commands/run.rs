//! `qgate run`: compare candidate captures with the oracle, apply the gate policy, write the verdict and
//! the reports. Exit codes: 0 pass, 1 gate failed, 2 bad input or usage, 3 prompt rejected.
use crate::capture::Capture;
use crate::error::{Error, Result};
use crate::gate::bundle::{self, CandidateInput};
use crate::gate::compare;
use crate::gate::margin_rule;
use crate::gate::metrics::{MarginSpace, OracleView, PositionMetrics};
use crate::gate::policy::Policy;
use crate::gate::rollout;
use crate::gate::stats;
use crate::gate::summary::{self, Identity, Paired, Role, RolloutSummary, RunSummary};
use crate::gate::verdict;
use crate::report;
use std::collections::HashMap;
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

pub fn execute(args: Args) -> Result<i32> {
    let mut policy = Policy::load(args.gate.as_deref())?;
    let space = args.margin_space.map(|s| match s {
        SpaceArg::Prob => MarginSpace::Prob,
        SpaceArg::Logit => MarginSpace::Logit,
    });
    policy.override_with(space, args.margin_floor, args.require_confident_prompt)?;

    let mut inputs = Vec::new();
    for b in &args.bundle {
        inputs.extend(bundle::resolve(b)?);
    }
    let caps: Vec<Capture> = inputs
        .iter()
        .map(|i| Capture::open(&i.capture))
        .collect::<Result<_>>()?;
    let oracle_path = crate::oracle_cache::resolve_oracle(
        &args.oracle,
        args.model.as_deref(),
        inputs[0].bundle_dir.as_deref(),
        &caps[0],
        &crate::model::device::parse_device(&args.device)?,
    )?;
    let oracle = Capture::open(&oracle_path)?;
    let control = args.control.as_ref().map(Capture::open).transpose()?;
    for c in caps.iter().chain(control.iter()) {
        compare::check_same_plan(&oracle, c)?;
    }

    let mut all: Vec<&Capture> = caps.iter().collect();
    if let Some(c) = &control {
        all.push(c);
    }
    // identities (labels unique)
    let mut ids: Vec<Identity> = Vec::new();
    for (i, c) in all.iter().enumerate() {
        let input = inputs.get(i);
        let mut label = match input.and_then(|x| x.bundle_name.clone()) {
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
        if label.is_empty() || ids.iter().any(|x| x.label == label) {
            label = format!(
                "{} [{}]",
                if label.is_empty() {
                    "candidate"
                } else {
                    &label
                },
                bundle::capture_stem(&c.path)
            );
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
        });
    }

    let mut ev = evaluate(&oracle, &all, ids, caps.len(), &policy)?;
    ev.run.sim_vs_bundle =
        crate::gate::sim_vs_bundle::pair_up(&all, &ev.compared, &ev.run.candidates);
    let tt = tokenizer_for(&args, &inputs)?;
    let out = args.out.clone().unwrap_or_else(|| default_out(&inputs[0]));
    write_reports(&out, &ev, &oracle.plan(), &tt)?;
    report::ci::write(&ev.run, args.junit.as_deref())?;
    let run = ev.run;
    let json = report::json::render(&run)?;
    let code = run.exit_code;
    if args.json {
        print!("{json}");
    } else {
        print!("{}", report::terminal::render(&run));
        println!("reports: {}", out.display());
    }
    eprintln!("qgate: {}", run.verdict);
    Ok(code)
}

/// A gated run: the summary every report renders, and the per-position data behind it.
pub struct Evaluation {
    pub run: RunSummary,
    pub compared: Vec<compare::Compared>,
    pub masks: Vec<Vec<bool>>,
    pub views: Vec<(usize, usize, OracleView)>,
}

/// Compare `all` (the first `n_candidates` gated, then the control if any) with the oracle, judge each
/// against the policy and decide what ships. `ids` names each capture.
pub fn evaluate(
    oracle: &Capture,
    all: &[&Capture],
    ids: Vec<Identity>,
    n_candidates: usize,
    policy: &Policy,
) -> Result<Evaluation> {
    let (views, compared) = compare::compare(oracle, all, policy.margin_space)?;
    let view_at: HashMap<(usize, usize), OracleView> =
        views.iter().map(|v| ((v.0, v.1), v.2)).collect();
    let control_top1 = (all.len() > n_candidates)
        .then(|| margin_rule::control_top1(&compared[n_candidates].positions));
    let mut sums = Vec::new();
    for (i, c) in all.iter().enumerate() {
        let role = if i < n_candidates {
            Role::Candidate
        } else {
            Role::Control
        };
        let mut per_seq = Vec::new();
        let mut reps = Vec::new();
        for s in 0..oracle.len() {
            let (ov, cv) = (oracle.seq(s), c.seq(s));
            if let Some(cr) = &cv.rollout {
                if let Some(sym) = verdict::repetition_symptom(s, cr, ov.rollout.as_deref()) {
                    reps.push(sym);
                }
            }
            if let (Some(or), Some(cr)) = (&ov.rollout, &cv.rollout) {
                let last = ov.tokens.len() - 1;
                let m0 = view_at.get(&(s, last)).map(|v| v.margin);
                // Later steps: the oracle's own per-step margins, in the run's margin space.
                let mut margins: Vec<Option<f64>> = match &ov.rollout_margin {
                    Some(m) => m
                        .iter()
                        .map(|&(p, l)| {
                            Some(if policy.margin_space == MarginSpace::Prob {
                                p as f64
                            } else {
                                l as f64
                            })
                        })
                        .collect(),
                    None => vec![None; or.len()],
                };
                if let (Some(first), Some(m0)) = (margins.first_mut(), m0) {
                    *first = Some(m0);
                }
                per_seq.push(rollout::compare(s, or, cr, &margins));
            }
        }
        let rs = (!per_seq.is_empty()).then(|| RolloutSummary {
            sequences_compared: per_seq.len(),
            sequences_exact: per_seq.iter().filter(|r| r.is_exact()).count(),
            min_exact_prefix: per_seq.iter().map(|r| r.exact_prefix).min().unwrap_or(0),
            per_sequence: per_seq,
        });
        let ctl = if role == Role::Candidate {
            control_top1.as_ref()
        } else {
            None
        };
        let mut s = summary::summarise(
            ids[i].clone(),
            role,
            &compared[i].positions,
            compared[i].not_compared,
            policy,
            ctl,
            rs,
        );
        s.symptoms.extend(reps);
        s.verdict = verdict::judge(&s, policy);
        sums.push(s);
    }

    // paired comparisons on positions both have and the policy counts
    let mut paired = Vec::new();
    let masks: Vec<Vec<bool>> = compared
        .iter()
        .map(|c| summary::counted_mask(&c.positions, policy))
        .collect();
    let matched: Vec<HashMap<(usize, usize), bool>> = compared
        .iter()
        .zip(&masks)
        .map(|(c, m)| {
            c.positions
                .iter()
                .zip(m)
                .filter(|(_, &k)| k)
                .map(|(p, _)| ((p.seq, p.pos), p.matched))
                .collect()
        })
        .collect();
    for a in 0..all.len() {
        for b in a + 1..all.len() {
            let (mut ao, mut bo, mut n) = (0, 0, 0);
            for (k, &ma) in &matched[a] {
                if let Some(&mb) = matched[b].get(k) {
                    n += 1;
                    ao += (ma && !mb) as usize;
                    bo += (mb && !ma) as usize;
                }
            }
            if n > 0 {
                paired.push(Paired {
                    a: ids[a].label.clone(),
                    b: ids[b].label.clone(),
                    positions: n,
                    test: stats::mcnemar(ao, bo),
                });
            }
        }
    }

    let prompt = verdict::check_prompt(&views, policy);
    let (code, line) = verdict::overall(&sums, &prompt, policy);
    let plan = oracle.plan();
    let run = RunSummary {
        schema: summary::REPORT_SCHEMA,
        qgate_version: env!("CARGO_PKG_VERSION"),
        oracle: summary::OracleInfo {
            capture: oracle.path.display().to_string(),
            label: oracle.meta.label.clone(),
            runtime: oracle.meta.runtime.clone(),
            dtype: oracle.meta.dtype.clone(),
        },
        plan: summary::PlanInfo {
            sequences: oracle.len(),
            tokens: plan.iter().map(|t| t.len()).sum(),
            oracle_rows: views.len(),
            vocab_size: oracle.meta.vocab_size,
        },
        margin_space: policy.margin_space,
        margin_floor: policy.margin_floor,
        policy: policy.clone(),
        prompt,
        ship: verdict::ship_decision(&sums).map(|s| s.0),
        ship_basis: verdict::ship_decision(&sums)
            .map(|s| s.1.to_string())
            .unwrap_or_default(),
        ladder: None,
        sim_vs_bundle: Vec::new(),
        candidates: sums,
        paired,
        exit_code: code,
        verdict: line,
    };

    Ok(Evaluation {
        run,
        compared,
        masks,
        views,
    })
}

/// Write report.md, positions.csv, summary.json and positions.svg into `out`.
pub fn write_reports(
    out: &Path,
    ev: &Evaluation,
    plan: &[Vec<i64>],
    tt: &report::tokens::TokenText,
) -> Result<()> {
    let (run, compared, masks, views) = (&ev.run, &ev.compared, &ev.masks, &ev.views);
    let policy = &run.policy;
    let md = report::markdown::render(run, plan, tt);
    let labels: Vec<String> = run.candidates.iter().map(|c| c.id.label.clone()).collect();
    let csv_in: Vec<(&str, &[PositionMetrics], Vec<bool>)> = compared
        .iter()
        .zip(masks)
        .enumerate()
        .map(|(i, (c, m))| (labels[i].as_str(), c.positions.as_slice(), m.clone()))
        .collect();
    let csv = report::csv::render(&csv_in, policy.margin_floor);
    let plot_in: Vec<(&str, &[PositionMetrics])> = csv_in.iter().map(|c| (c.0, c.1)).collect();
    let svg = report::plot::render(views, &plot_in, policy.margin_floor)?;
    let json = report::json::render(run)?;
    report::write::write_dir(
        out,
        &[
            ("report.md", md.into_bytes()),
            ("positions.csv", csv.into_bytes()),
            ("summary.json", json.into_bytes()),
            ("positions.svg", svg.into_bytes()),
        ],
    )
}
