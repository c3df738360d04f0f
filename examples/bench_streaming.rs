//! The layer-streamed oracle on a few-layer checkpoint with real 27B / 35B-A3B shapes
//! (`bench/make_synthetic_checkpoint.py`): per-layer seconds (weights read+convert vs total), the head,
//! the machine's f32 GEMM rate on representative shapes, the two lower bounds (reading the weights once
//! at `READ_GBPS`, the matmul FLOPs at the GEMM rate), the ratio to the larger, peak RSS, and the
//! extrapolation to the full depth. Driven by `bench/streaming.sh` (which measures `READ_GBPS` with dd).
//!
//! usage: bench_streaming MODEL_DIR PLAN READ_GBPS FULL_DEPTH [DTYPE]
//! (`PREFETCH=0` in the environment: load every block on the computing thread, as before issue 6's
//! prefetch thread.)
use candle_core::{Device, Tensor};
use qgate::capture::Capture;
use qgate::model::config::{LayerKind, TextConfig};
use qgate::model::precision::Precision;
use qgate::model::streaming::{Streamer, DEFAULT_HEAD_CHUNK};
use qgate::model::weights::WeightStore;
use qgate::model::Cache;
use std::time::Instant;

fn peak_rss_gib() -> f64 {
    qgate::alloc_tuning::peak_rss_bytes()
        .map(|b| b as f64 / (1024.0 * 1024.0 * 1024.0))
        .unwrap_or(f64::NAN)
}

/// Best-of-3 GFLOP/s of `x [m,k] · w [n,k]ᵀ` (the oracle's `linear`).
fn gemm_rate(m: usize, k: usize, n: usize) -> candle_core::Result<f64> {
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let y = x.matmul(&w.t()?)?;
        std::hint::black_box(y);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// Matmul FLOPs of layer `l` over sequences of the given lengths (linears, routed experts, attention).
fn layer_flops(cfg: &TextConfig, ws: &WeightStore, l: usize, lens: &[usize]) -> f64 {
    let t: f64 = lens.iter().sum::<usize>() as f64;
    let pre = ws.decoder_name(&format!("layers.{l}."));
    let mut f = 0.0;
    for name in ws.names().filter(|n| n.starts_with(&pre)) {
        let Some(shape) = ws.shape(name) else {
            continue;
        };
        let numel: usize = shape.iter().product();
        if name.contains("experts.") && !name.contains("shared_expert") {
            // Each token runs top_k experts of E.
            let m = cfg
                .moe
                .as_ref()
                .map(|m| (m.num_experts_per_tok, m.num_experts));
            if let Some((k, e)) = m {
                f += 2.0 * t * (numel / e * k) as f64;
            }
        } else if shape.len() == 2 {
            f += 2.0 * t * numel as f64;
        }
    }
    if cfg.layer_types[l] == LayerKind::FullAttention {
        for &n in lens {
            f += 4.0 * (cfg.num_attention_heads * cfg.head_dim) as f64 * (n * n) as f64;
        }
    }
    f
}

fn layer_bytes(ws: &WeightStore, l: usize) -> f64 {
    let pre = ws.decoder_name(&format!("layers.{l}."));
    ws.names()
        .filter(|n| n.starts_with(&pre))
        .filter_map(|n| ws.tensor_bytes(n))
        .sum::<usize>() as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qgate::alloc_tuning::keep_freed_memory_for_reuse(); // as the CLI
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        eprintln!("usage: bench_streaming MODEL_DIR PLAN READ_GBPS FULL_DEPTH [DTYPE]");
        std::process::exit(2);
    }
    let dir = std::path::Path::new(&a[1]);
    let plan = Capture::open(&a[2])?.plan();
    let read_gbps: f64 = a[3].parse()?;
    let full_depth: usize = a[4].parse()?;
    let prec = Precision::parse(a.get(5).map(String::as_str).unwrap_or("f32")).ok_or("dtype")?;
    let cfg = TextConfig::from_dir(dir)?;
    let mut ws = WeightStore::open(dir)?;
    ws.set_streaming(true);
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let lens: Vec<usize> = plan.iter().map(Vec::len).collect();
    let positions: usize = lens.iter().sum();
    let per_k = 1000.0 / positions as f64;

    // The machine's f32 GEMM rate, on this model's dominant shapes.
    let wide = cfg.intermediate_size.unwrap_or(
        2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
            + cfg.linear_num_value_heads * cfg.linear_value_head_dim,
    );
    let shapes = [
        (positions, h, wide),
        (positions, wide, h),
        (positions, h, 32768),
    ];
    let mut rates = Vec::new();
    for &(m, k, n) in &shapes {
        let r = gemm_rate(m, k, n)?;
        println!("gemm f32 [{m}x{k}]·[{k}x{n}]: {r:.1} GFLOP/s");
        rates.push(r);
    }
    let gemm = rates.iter().sum::<f64>() / rates.len() as f64;
    println!("gemm rate used for the bound: {gemm:.1} GFLOP/s (mean of the three)");

    let mut st = Streamer::new(&cfg, &ws, prec, DEFAULT_HEAD_CHUNK)?;
    let prefetch = std::env::var("PREFETCH").map_or(true, |v| v != "0");
    st.set_prefetch(prefetch);
    println!(
        "weight prefetch thread: {}",
        if prefetch { "on" } else { "off" }
    );
    let ids: Vec<Vec<u32>> = plan
        .iter()
        .map(|s| s.iter().map(|&t| t as u32).collect())
        .collect();
    let t_all = Instant::now();
    let t = Instant::now();
    let mut xs = ids
        .iter()
        .map(|s| st.embed(s))
        .collect::<Result<Vec<_>, _>>()?;
    let embed_s = t.elapsed().as_secs_f64();
    let mut caches: Vec<Cache> = ids.iter().map(|_| Cache::default()).collect();
    let mut timings = Vec::new();
    st.layers(&mut xs, &mut caches, true, &mut |l, timing| {
        eprintln!(
            "layer {l}: {:.2} s ({:.2} s loading, of which {:.2} s waited for; {:.2} s mixer)",
            timing.total_s, timing.load_s, timing.wait_s, timing.mixer_s
        );
        timings.push(timing)
    })?;
    let hidden = st.final_norm(&xs)?;
    let t = Instant::now();
    let mut sink_bytes = 0usize;
    st.head(
        &hidden,
        &mut |_, _, logits| {
            let vals: Vec<f32> = logits.flatten_all()?.to_vec1()?;
            sink_bytes += vals.len() * 4;
            Ok(())
        },
        &mut |_| {},
    )?;
    let head_s = t.elapsed().as_secs_f64();
    let total_s = t_all.elapsed().as_secs_f64();
    assert_eq!(sink_bytes, positions * v * 4);

    println!(
        "\n{} layers, {} sequence(s), {positions} positions, dtype {}",
        cfg.layer_types.len(),
        lens.len(),
        prec.name()
    );
    println!("| layer | kind | weights on disk | s | s loading (waited for) | s / layer / 1k pos | read bound s | GEMM bound s | ratio |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut per_kind: Vec<(LayerKind, f64, f64, f64, usize)> = Vec::new();
    for (l, tm) in timings.iter().enumerate() {
        let kind = cfg.layer_types[l];
        let bytes = layer_bytes(&ws, l);
        let read_s = bytes / (read_gbps * 1e9);
        let gemm_s = layer_flops(&cfg, &ws, l, &lens) / (gemm * 1e9);
        let bound = read_s.max(gemm_s);
        println!(
            "| {l} | {kind:?} | {:.2} GB | {:.2} | {:.2} ({:.2}) | {:.2} | {read_s:.2} | {gemm_s:.2} | {:.2} |",
            bytes / 1e9,
            tm.total_s,
            tm.load_s,
            tm.wait_s,
            tm.total_s * per_k,
            tm.total_s / bound
        );
        match per_kind.iter_mut().find(|e| e.0 == kind) {
            Some(e) => {
                e.1 += tm.total_s;
                e.2 += read_s;
                e.3 += gemm_s;
                e.4 += 1;
            }
            None => per_kind.push((kind, tm.total_s, read_s, gemm_s, 1)),
        }
    }
    let head_bytes = (v * h * 2) as f64; // bf16 on disk
    let head_read = head_bytes / (read_gbps * 1e9);
    let head_gemm = 2.0 * (positions * v * h) as f64 / (gemm * 1e9);
    println!(
        "| head | {v}×{h} in {} chunks | {:.2} GB | {head_s:.2} | | {:.2} | {head_read:.2} | {head_gemm:.2} | {:.2} |",
        st.head_chunks(),
        head_bytes / 1e9,
        head_s * per_k,
        head_s / head_read.max(head_gemm)
    );
    println!("embedding rows: {embed_s:.3} s");

    // Extrapolation: the full model interleaves 3 linear + 1 full attention layer.
    let full_layers = full_depth / 4;
    let lin_layers = full_depth - full_layers;
    let mut total = embed_s
        + head_s
        + (total_s - embed_s - head_s - timings.iter().map(|t| t.total_s).sum::<f64>());
    let mut bound = head_read.max(head_gemm);
    for (kind, s, r, g, n) in &per_kind {
        let count = if *kind == LayerKind::FullAttention {
            full_layers
        } else {
            lin_layers
        };
        let n = *n as f64;
        println!(
            "{kind:?}: {:.2} s per layer per 1k positions (mean of {n}), bound {:.2} s",
            s / n * per_k,
            (r / n).max(g / n) * per_k
        );
        total += s / n * count as f64;
        bound += (r / n).max(g / n) * count as f64;
    }
    println!(
        "\nmeasured ({} layers): {total_s:.1} s; peak RSS {:.2} GiB",
        cfg.layer_types.len(),
        peak_rss_gib()
    );
    println!(
        "extrapolated to {full_depth} layers ({lin_layers} linear + {full_layers} full): {total:.0} s \
         (lower bound {bound:.0} s, ratio {:.2})",
        total / bound
    );
    Ok(())
}
