//! One teacher-forced oracle forward over T random tokens (after a short warm-up), printing one JSON
//! line with tokens/s and peak RSS. Driven by `bench/oracle_vs_transformers.sh`, which runs the
//! transformers peer in the same invocation and prints the ratio.
use qgate::model::{precision::Precision, Model};
use std::time::Instant;

fn peak_rss_gb() -> f64 {
    qgate::alloc_tuning::peak_rss_bytes()
        .map(|b| b as f64 / 1e9)
        .unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qgate::alloc_tuning::keep_freed_memory_for_reuse();
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 4 {
        eprintln!("usage: bench_oracle MODEL_DIR DTYPE T");
        std::process::exit(2);
    }
    let prec = Precision::parse(&a[2]).ok_or("dtype")?;
    let t: usize = a[3].parse()?;
    let t_load = Instant::now();
    let model = Model::load(std::path::Path::new(&a[1]), prec)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let v = model.cfg.vocab_size as u64;
    let mut x = 0x9E3779B97F4A7C15u64;
    let ids: Vec<u32> = (0..t)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % v) as u32
        })
        .collect();
    model.forward(&ids[..16.min(t)], &mut model.new_cache())?; // warm-up
    let t0 = Instant::now();
    let logits = model.forward(&ids, &mut model.new_cache())?;
    let secs = t0.elapsed().as_secs_f64();
    drop(logits);
    println!(
        "{{\"runtime\": \"qgate\", \"dtype\": \"{}\", \"T\": {t}, \"seconds\": {secs:.3}, \"tokens_per_s\": {:.2}, \"peak_rss_gb\": {:.2}, \"load_seconds\": {load_s:.1}, \"threads\": {}}}",
        prec.name(),
        t as f64 / secs,
        peak_rss_gb(),
        rayon::current_num_threads()
    );
    Ok(())
}
