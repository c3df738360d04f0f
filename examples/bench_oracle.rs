//! One teacher-forced oracle forward over T random tokens (after a short warm-up), printing one JSON
//! line with tokens/s and peak RSS. Driven by `bench/oracle_vs_transformers.sh` (CPU) and
//! `bench/gpu/oracle_vs_transformers_gpu.sh` (`DEVICE` = cuda), which run the transformers peer in the
//! same invocation and print the ratio. On a GPU the time is the median of `REPS` forwards, each ended by
//! a device synchronisation (the logits `[T, V]` stay on the device, as transformers' do).
//!
//! usage: bench_oracle MODEL_DIR DTYPE T [DEVICE [REPS]]
use qgate::model::{device::parse_device, precision::Precision, Model};
use std::time::Instant;

fn peak_rss_gb() -> f64 {
    qgate::alloc_tuning::peak_rss_bytes()
        .map(|b| b as f64 / 1e9)
        .unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qgate::alloc_tuning::keep_freed_memory_for_reuse();
    let a: Vec<String> = std::env::args().collect();
    if !(4..=6).contains(&a.len()) {
        eprintln!("usage: bench_oracle MODEL_DIR DTYPE T [DEVICE [REPS]]");
        std::process::exit(2);
    }
    let prec = Precision::parse(&a[2]).ok_or("dtype")?;
    let t: usize = a[3].parse()?;
    let device_name = a.get(4).map(String::as_str).unwrap_or("cpu");
    let dev = parse_device(device_name)?;
    let reps: usize = a.get(5).map(|r| r.parse()).transpose()?.unwrap_or(1).max(1);
    let t_load = Instant::now();
    let model = Model::load_on(std::path::Path::new(&a[1]), prec, &dev, false)?;
    dev.synchronize()?;
    let load_s = t_load.elapsed().as_secs_f64();
    let ids = qgate::plan::random_token_ids(t, model.cfg.vocab_size);
    // Warm-up: on a GPU at the full length (kernel compilation, cuBLAS heuristics, the allocator's pool),
    // as the transformers peer does; on the CPU a short one.
    let warm = if dev.is_cpu() { 16.min(t) } else { t };
    drop(model.forward_native(&ids[..warm], &mut model.new_cache())?);
    dev.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    // Host time until the forward is enqueued (on a GPU; the rest of `seconds` is the device finishing).
    let mut enqueued = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        let logits = model.forward_native(&ids, &mut model.new_cache())?;
        enqueued.push(t0.elapsed().as_secs_f64());
        dev.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        drop(logits);
    }
    times.sort_by(f64::total_cmp);
    enqueued.sort_by(f64::total_cmp);
    let enqueue_s = enqueued[enqueued.len() / 2];
    // Where the time goes: the decoder body vs the head (each ended by a synchronisation); on a GPU also
    // the memory pool's high-water marks (MiB in use: weights, the body's peak, what the body leaves
    // alive with its cache, the head's peak).
    let mem_at_start = pool::used_mib(false);
    pool::reset_high();
    let t0 = Instant::now();
    let mut cache = model.new_cache();
    let hidden = model.hidden_states(&ids, &mut cache)?;
    dev.synchronize()?;
    let body_s = t0.elapsed().as_secs_f64();
    let body_high = pool::used_mib(true);
    let after_body = pool::used_mib(false);
    pool::reset_high();
    let t0 = Instant::now();
    drop(model.logits_native(&hidden)?); // the oracle's head (as `forward_native`), not an f32 copy
    dev.synchronize()?;
    let head_s = t0.elapsed().as_secs_f64();
    let head_high = pool::used_mib(true);
    drop(cache);
    if !dev.is_cpu() {
        eprintln!(
            "GPU pool MiB: before {mem_at_start:.0}, body peak {body_high:.0}, after body (hidden + cache) {after_body:.0}, head peak {head_high:.0}"
        );
    }
    let secs = times[times.len() / 2];
    println!(
        "{{\"runtime\": \"qgate\", \"dtype\": \"{}\", \"T\": {t}, \"device\": \"{device_name}\", \"seconds\": {secs:.4}, \"tokens_per_s\": {:.2}, \"peak_rss_gb\": {:.2}, \"load_seconds\": {load_s:.1}, \"threads\": {}, \"reps\": {reps}, \"body_seconds\": {body_s:.4}, \"head_seconds\": {head_s:.4}, \"enqueue_seconds\": {enqueue_s:.4}, \"cpu_kernels\": \"{}\"}}",
        prec.name(),
        t as f64 / secs,
        peak_rss_gb(),
        rayon::current_num_threads(),
        qgate::model::cpu::active().name()
    );
    Ok(())
}

/// The CUDA default memory pool's bytes in use (candle allocates from it, stream-ordered), in MiB:
/// current or the high-water mark since the last `reset_high`. NaN without a GPU.
mod pool {
    #[cfg(feature = "cuda")]
    fn attr(high: bool) -> f64 {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut v: u64 = 0;
        // SAFETY: plain queries of device 0's default pool; the out-pointers live for the call.
        unsafe {
            if sys::cuDeviceGetDefaultMemPool(&mut pool, 0) != sys::CUresult::CUDA_SUCCESS {
                return f64::NAN;
            }
            let attr = if high {
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH
            } else {
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT
            };
            if sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut _)
                != sys::CUresult::CUDA_SUCCESS
            {
                return f64::NAN;
            }
        }
        v as f64 / (1024.0 * 1024.0)
    }
    pub fn used_mib(high: bool) -> f64 {
        #[cfg(feature = "cuda")]
        return attr(high);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = high;
            f64::NAN
        }
    }
    pub fn reset_high() {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::cudarc::driver::sys;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            let mut zero: u64 = 0;
            // SAFETY: resets device 0's default pool's high-water mark (the driver's documented use).
            unsafe {
                if sys::cuDeviceGetDefaultMemPool(&mut pool, 0) == sys::CUresult::CUDA_SUCCESS {
                    let _ = sys::cuMemPoolSetAttribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        &mut zero as *mut u64 as *mut _,
                    );
                }
            }
        }
    }
}
