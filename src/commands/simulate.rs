//! `qgate simulate`: the oracle with fake-quantized weights (quantize → dequantize once at load,
//! weight-only), default compute f16 as the GPU runtimes do. Writes a normal capture labelled with the
//! scheme; its metadata records the exact spec, every skipped weight and the simulated bundle size.
use crate::capture::Capture;
use crate::error::{Error, ExitCode, Result};
use crate::model::config::TextConfig;
use crate::model::precision::Precision;
use crate::model::weights::{resolve_model_dir, WeightStore};
use crate::model::Model;
use crate::oracle::{run_model, OracleRequest};
use crate::quant::apply::{QuantReport, QuantTransform};
use crate::quant::linear::ScaleDtype;
use crate::quant::scheme::Scheme;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (config.json + safetensors), or `Org/Name` in the local Hugging Face cache.
    #[arg(long)]
    pub model: String,
    /// Any qgate capture; its token sequences are the plan.
    #[arg(long)]
    pub plan: PathBuf,
    /// Scheme: canonical (`int8-b32-symclip`, `int8-perchannel-sym`, `kmeans8-g32`, `f16`), a component mix
    /// (`mlp=int4-b32-symclip,attn=int8-b32-symclip,gdn=int8-b32-symclip`), an alias (`int8lin`, `int8hu`,
    /// `int8hu-headsym`, `int4lin`, `int8`) or a bundle directory name carrying one.
    #[arg(long)]
    pub scheme: String,
    /// Quantize the head with this method (a tied head is untied first). Default: the scheme's head.
    #[arg(long)]
    pub head: Option<String>,
    /// Compute precision: f16 (default, as GPU runtimes run), bf16 or f32.
    #[arg(long, default_value = "f16")]
    pub compute: String,
    /// Scale (and LUT) dtype: f16 (as the fp16 exports store them) or f32.
    #[arg(long, default_value = "f16")]
    pub scale_dtype: String,
    /// Output capture file.
    #[arg(long)]
    pub out: PathBuf,
    /// Greedy continuation length per sequence.
    #[arg(long, default_value_t = 16)]
    pub rollout: usize,
    /// Where the oracle runs: cpu, cuda or cuda:N (a build with the `cuda` feature; scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU kernels: auto (the fastest this CPU runs), avx512, avx2 or portable (plain Rust, any CPU).
    /// Forcing a set this CPU cannot run is an error. Same numbers on every set (see README).
    #[arg(long, default_value = "auto", value_name = "KERNELS")]
    pub kernels: String,
}

pub struct SimRequest<'a> {
    pub model_dir: &'a Path,
    pub plan: &'a [Vec<i64>],
    pub scheme: Scheme,
    pub compute: Precision,
    pub scale_dtype: ScaleDtype,
    pub rollout: usize,
    pub out: &'a Path,
    pub progress: bool,
    /// Where the fake-quantized model runs (weights are quantized on the host, then copied).
    pub device: candle_core::Device,
}

pub struct SimOutcome {
    pub capture: PathBuf,
    /// Seconds spent fake-quantizing at load.
    pub quantize_seconds: f64,
    pub report: QuantReport,
    pub scheme: Scheme,
}

pub fn parse_compute(s: &str) -> Result<Precision> {
    Precision::parse(s)
        .ok_or_else(|| Error::usage(format!("--compute `{s}`: expected f16, bf16 or f32")))
}

pub fn parse_scale_dtype(s: &str) -> Result<ScaleDtype> {
    ScaleDtype::parse(s)
        .ok_or_else(|| Error::usage(format!("--scale-dtype `{s}`: expected f16 or f32")))
}

/// Load the model with the scheme's transform and run it over the plan.
pub fn simulate(req: SimRequest) -> Result<SimOutcome> {
    let cfg = TextConfig::from_dir(req.model_dir)?;
    crate::oracle::check_plan(req.plan, &cfg)?;
    let mut ws = WeightStore::open(req.model_dir)?;
    let t = Arc::new(QuantTransform::new(req.scheme.clone(), req.scale_dtype));
    ws.set_transform(t.clone());
    ws.set_device(&req.device);
    let model = Model::from_store(cfg, &ws, req.compute)?;
    let report = t.report();
    let s = &req.scheme;
    let mut extra = serde_json::Map::new();
    extra.insert("quant_scheme".into(), s.name.clone().into());
    extra.insert(
        "quant_alias".into(),
        s.alias
            .clone()
            .map(Into::into)
            .unwrap_or(serde_json::Value::Null),
    );
    extra.insert("quant_spec".into(), s.spec().into());
    extra.insert(
        "quant_scale_dtype".into(),
        serde_json::to_value(req.scale_dtype).unwrap_or_default(),
    );
    extra.insert("quant_head_untied".into(), t_untied(&t).into());
    extra.insert("quant_weights_quantized".into(), report.quantized().into());
    extra.insert(
        "quant_skipped".into(),
        serde_json::to_value(&report.skipped).unwrap_or_default(),
    );
    extra.insert("size_bytes".into(), report.size_bytes().into());
    extra.insert(
        "size_basis".into(),
        "simulated: packed codes + scales/LUTs for quantized weights, 2 bytes per element otherwise"
            .into(),
    );
    let capture = run_model(
        &OracleRequest {
            model_dir: req.model_dir,
            precision: req.compute,
            plan: req.plan,
            rollout: req.rollout,
            out: req.out,
            progress: req.progress,
            exec: crate::oracle::ExecOptions {
                device: req.device.clone(),
                ..Default::default()
            },
        },
        &model,
        &ws,
        &s.label(),
        crate::gate::summary::SIMULATE_RUNTIME,
        extra,
    )?;
    Ok(SimOutcome {
        capture,
        quantize_seconds: t.seconds(),
        report,
        scheme: req.scheme,
    })
}

fn t_untied(t: &QuantTransform) -> bool {
    use crate::model::weights::WeightTransform;
    t.untie_head()
}

/// One line per skipped weight (exporters skip them silently; qgate names them).
pub fn print_skipped(label: &str, r: &QuantReport) {
    for s in &r.skipped {
        eprintln!(
            "qgate: {label}: left unquantized: {} {:?} ({}: {})",
            s.name, s.shape, s.method, s.reason
        );
    }
}

pub fn execute(args: Args) -> Result<ExitCode> {
    crate::model::cpu::select_arg(&args.kernels)?;
    crate::outputs::check_capture_out(&args.out, &[args.plan.as_path()])?;
    let compute = parse_compute(&args.compute)?;
    let sd = parse_scale_dtype(&args.scale_dtype)?;
    let mut scheme = Scheme::parse(&args.scheme)?;
    if let Some(h) = &args.head {
        scheme = scheme.with_head(h)?;
    }
    let model_dir = resolve_model_dir(&args.model)?;
    let plan = Capture::open(&args.plan)?.plan();
    let o = simulate(SimRequest {
        model_dir: &model_dir,
        plan: &plan,
        scheme,
        compute,
        scale_dtype: sd,
        rollout: args.rollout,
        out: &args.out,
        progress: crate::progress::enabled(),
        device: crate::model::device::parse_device(&args.device)?,
    })?;
    print_skipped(&o.scheme.label(), &o.report);
    eprintln!(
        "qgate: simulated {} ({}) in {} compute: {} weights quantized in {:.1} s, {} skipped, bundle ≈ {} → {}",
        o.scheme.label(),
        o.scheme.spec(),
        compute.name(),
        o.report.quantized(),
        o.quantize_seconds,
        o.report.skipped.len(),
        crate::report::markdown::human_size(o.report.size_bytes()),
        o.capture.display()
    );
    Ok(ExitCode::Pass)
}
