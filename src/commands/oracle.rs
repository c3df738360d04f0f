//! `qgate oracle`: run the HF-exact oracle over a plan and write a capture.
use crate::capture::Capture;
use crate::error::{io_err, Error, ExitCode, Result};
use crate::model::device::{device_name, parse_device};
use crate::model::precision::Precision;
use crate::model::weights::resolve_model_dir;
use crate::oracle::{run_oracle, run_oracle_as, ExecOptions, OracleRequest};
use crate::shard::Shard;
use candle_core::Device;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (config.json + safetensors), or `Org/Name` in the local Hugging Face cache.
    #[arg(long)]
    pub model: String,
    /// Compute precision: f32, bf16 (HF's bf16 rounding points) or f16 (the fp16 control).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Any qgate capture; its token sequences are the plan.
    #[arg(long)]
    pub plan: PathBuf,
    /// Output capture file.
    #[arg(long)]
    pub out: PathBuf,
    /// Greedy continuation length per sequence (stops early after an EOS token).
    #[arg(long, default_value_t = 16)]
    pub rollout: usize,
    /// Memory budget (`8GiB`, `24G`, `6000MB`): above it the oracle streams layers from disk instead of
    /// loading the whole model. Default: three quarters of physical memory.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// Always stream layers (one layer's weights in memory at a time; same numbers).
    #[arg(long, conflicts_with = "no_stream")]
    pub stream: bool,
    /// Never stream: load the whole model even above the memory budget.
    #[arg(long)]
    pub no_stream: bool,
    /// Where to run: cpu, cuda or cuda:N (a build with the `cuda` feature; scripts/build-cuda.sh). Several
    /// GPUs of one host (`cuda:0,cuda:1`) each compute one shard of the plan at the same time, and the
    /// shards are merged into one capture.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute only shard i of N (0-based): plan sequences i, i+N, i+2N, … into a partial capture. Join
    /// the N partials with `qgate merge`; the result equals the unsharded run byte for byte (same model
    /// directory, device kind and execution mode). Runs the shards of any job system: a CI matrix, a Slurm
    /// array, Kubernetes Jobs.
    #[arg(long, value_name = "i/N")]
    pub shard: Option<String>,
    /// CPU kernels: auto (the fastest this CPU runs), avx512, avx2 or portable (plain Rust, any CPU).
    /// Forcing a set this CPU cannot run is an error. Same numbers on every set (see README).
    #[arg(long, default_value = "auto", value_name = "KERNELS")]
    pub kernels: String,
    /// When streaming, load each layer's weights on the computing thread instead of prefetching the
    /// next layer on a background thread (same numbers, less memory, slower; for benchmarks).
    #[arg(long)]
    pub no_prefetch: bool,
}

pub fn execute(args: Args) -> Result<ExitCode> {
    crate::model::cpu::select_arg(&args.kernels)?;
    crate::outputs::check_capture_out(&args.out, &[args.plan.as_path()])?;
    let precision = Precision::parse(&args.dtype).ok_or_else(|| {
        Error::usage(format!(
            "--dtype `{}`: expected f32, bf16 or f16",
            args.dtype
        ))
    })?;
    let shard = args.shard.as_deref().map(Shard::parse).transpose()?;
    let devices = parse_devices(&args.device)?;
    if devices.len() > 1 && shard.is_some() {
        return Err(Error::usage(
            "--shard with several --device GPUs: a run on several GPUs shards the plan itself; give one device per shard job",
        ));
    }
    let model_dir = resolve_model_dir(&args.model)?;
    let plan = Capture::open(&args.plan)?.plan();
    let options = |device: Device| -> Result<ExecOptions> {
        let mut exec = ExecOptions::from_args(
            device,
            args.max_memory.as_deref(),
            args.stream,
            args.no_stream,
        )?;
        exec.prefetch = !args.no_prefetch;
        Ok(exec)
    };
    let out = if devices.len() > 1 {
        run_on_devices(&args, &model_dir, precision, &plan, devices, &options)?
    } else {
        let exec = options(devices.into_iter().next().unwrap_or(Device::Cpu))?;
        match shard {
            None => run_oracle(&OracleRequest {
                model_dir: &model_dir,
                precision,
                plan: &plan,
                rollout: args.rollout,
                out: &args.out,
                progress: crate::progress::enabled(),
                exec,
            })?,
            Some(sh) => run_shard(
                &model_dir,
                precision,
                &plan,
                sh,
                args.rollout,
                &args.out,
                crate::progress::enabled(),
                exec,
            )?,
        }
    };
    let (n_seq, positions) = match shard {
        Some(sh) => {
            let idx = sh.sequences(plan.len());
            (idx.len(), idx.iter().map(|&i| plan[i].len()).sum::<usize>())
        }
        None => (plan.len(), plan.iter().map(Vec::len).sum()),
    };
    let what = match shard {
        Some(sh) => format!(" (shard {}/{} of {})", sh.index, sh.count, plan.len()),
        None => String::new(),
    };
    eprintln!(
        "qgate: oracle {} on {} over {n_seq} sequences{what} / {positions} positions → {}",
        precision.name(),
        args.device,
        out.display()
    );
    Ok(ExitCode::Pass)
}

/// `--device` as a list: one device, or several distinct GPUs.
fn parse_devices(spec: &str) -> Result<Vec<Device>> {
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    if parts.len() == 1 {
        return Ok(vec![parse_device(parts[0])?]);
    }
    let mut names: Vec<String> = Vec::new();
    let mut devices = Vec::new();
    for p in &parts {
        let d = parse_device(p)?;
        if d.is_cpu() {
            return Err(Error::usage(format!(
                "--device {spec}: several devices are for GPUs (the CPU oracle already uses every core)"
            )));
        }
        let name = device_name(&d);
        if names.contains(&name) {
            return Err(Error::usage(format!(
                "--device {spec}: {name} is listed twice"
            )));
        }
        names.push(name);
        devices.push(d);
    }
    Ok(devices)
}

/// One shard of the plan into a partial capture (see `crate::shard`).
#[allow(clippy::too_many_arguments)]
fn run_shard(
    model_dir: &std::path::Path,
    precision: Precision,
    plan: &[Vec<i64>],
    shard: Shard,
    rollout: usize,
    out: &std::path::Path,
    progress: bool,
    exec: ExecOptions,
) -> Result<PathBuf> {
    let sub = shard.select(plan)?;
    let mut more = serde_json::Map::new();
    more.insert("shard".into(), shard.metadata(plan));
    run_oracle_as(
        &OracleRequest {
            model_dir,
            precision,
            plan: &sub,
            rollout,
            out,
            progress,
            exec,
        },
        crate::shard::SHARD_RUNTIME,
        more,
    )
}

/// Shard k of N on device k, all at once (one thread per GPU), then merge into `args.out`. The partials
/// live in a temporary folder beside the output, removed with it.
fn run_on_devices(
    args: &Args,
    model_dir: &std::path::Path,
    precision: Precision,
    plan: &[Vec<i64>],
    devices: Vec<Device>,
    options: &(dyn Fn(Device) -> Result<ExecOptions> + Sync),
) -> Result<PathBuf> {
    let n = devices.len().min(plan.len());
    let dir = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".qgate-shards-")
        .tempdir_in(&dir)
        .map_err(|e| io_err(&dir, e))?;
    let results: Vec<Result<PathBuf>> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .into_iter()
            .take(n)
            .enumerate()
            .map(|(k, device)| {
                let part = tmp.path().join(format!("shard-{k}.capture.safetensors"));
                s.spawn(move || -> Result<PathBuf> {
                    let exec = options(device)?;
                    run_shard(
                        model_dir,
                        precision,
                        plan,
                        Shard { index: k, count: n },
                        args.rollout,
                        &part,
                        false,
                        exec,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Internal("a shard thread panicked".into())))
            })
            .collect()
    });
    let parts = results
        .into_iter()
        .map(|r| r.and_then(Capture::open))
        .collect::<Result<Vec<_>>>()?;
    crate::shard::merge(&parts, &args.out)
}
