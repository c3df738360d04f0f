//! One teacher-forced oracle forward over T random tokens (after a short warm-up), printing one JSON
//! line with tokens/s and peak RSS. Driven by `bench/oracle_vs_transformers.sh` (CPU) and
//! `bench/gpu/oracle_vs_transformers_gpu.sh` (`DEVICE` = cuda), which run the transformers peer in the
//! same invocation and print the ratio. On a GPU the time is the median of `REPS` forwards, each ended by
//! a device synchronisation (the logits `[T, V]` stay on the device, as transformers' do; in the oracle's
//! row blocks, `Model::forward_native_blocks`).
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
    // The device's memory in use before any weights: the CUDA context and what opening the device loads
    // (cuBLAS, cuRAND), the part of the peak that lies outside the pool.
    let device_at_open = pool::device_used_mib();
    let t_load = Instant::now();
    let model = Model::load_on(std::path::Path::new(&a[1]), prec, &dev, false)?;
    dev.synchronize()?;
    let load_s = t_load.elapsed().as_secs_f64();
    if !dev.is_cpu() {
        eprintln!(
            "GPU after load MiB: device in use {:.0}; default pool used {:.0} reserved {:.0}",
            pool::device_used_mib(),
            pool::mib(pool::Mark::Used),
            pool::mib(pool::Mark::Reserved)
        );
    }
    let ids = qgate::plan::random_token_ids(t, model.cfg.vocab_size);
    // Warm-up: on a GPU at the full length (kernel compilation, cuBLAS heuristics, the allocator's pool),
    // as the transformers peer does; on the CPU a short one.
    let warm = if dev.is_cpu() { 16.min(t) } else { t };
    drop(model.forward_native_blocks(&ids[..warm], &mut model.new_cache())?);
    dev.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    // Host time until the forward is enqueued (on a GPU; the rest of `seconds` is the device finishing).
    let mut enqueued = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        let logits = model.forward_native_blocks(&ids, &mut model.new_cache())?;
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
    use pool::Mark;
    let mem_at_start = pool::mib(Mark::Used);
    pool::reset_high();
    let t0 = Instant::now();
    let mut cache = model.new_cache();
    let hidden = model.hidden_states(&ids, &mut cache)?;
    dev.synchronize()?;
    let body_s = t0.elapsed().as_secs_f64();
    let (body_high, body_reserved) = (pool::mib(Mark::UsedHigh), pool::mib(Mark::ReservedHigh));
    let after_body = pool::mib(Mark::Used);
    pool::reset_high();
    let t0 = Instant::now();
    let logits = model.logits_native_blocks(&hidden)?; // the oracle's head (as `forward_native_blocks`), not an f32 copy
    dev.synchronize()?;
    let head_s = t0.elapsed().as_secs_f64();
    let (head_high, head_reserved) = (pool::mib(Mark::UsedHigh), pool::mib(Mark::ReservedHigh));
    // The whole device's use with the logits alive: the pool's reservation plus what lies outside it
    // (the CUDA context, cuBLAS's workspaces, modules).
    let device_used = pool::device_used_mib();
    drop((logits, cache));
    if !dev.is_cpu() {
        eprintln!(
            "GPU pool MiB: device in use at open {device_at_open:.0}; before {mem_at_start:.0}, body peak {body_high:.0} (reserved {body_reserved:.0}), after body (hidden + cache) {after_body:.0}, head peak {head_high:.0} (reserved {head_reserved:.0}); device in use after the head {device_used:.0}"
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

/// The CUDA default memory pool (candle allocates from it, stream-ordered), in MiB: bytes in use now, their
/// high-water mark, and the high-water mark of the bytes the pool reserved from the device (in use or
/// kept for reuse), the marks since the last `reset_high`. NaN without a GPU.
mod pool {
    #[derive(Clone, Copy)]
    pub enum Mark {
        Used,
        Reserved,
        UsedHigh,
        ReservedHigh,
    }

    pub fn mib(mark: Mark) -> f64 {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::cudarc::driver::sys;
            use sys::CUmemPool_attribute as A;
            let attr = match mark {
                Mark::Used => A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                Mark::Reserved => A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                Mark::UsedHigh => A::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                Mark::ReservedHigh => A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            };
            let Some(pool) = qgate::model::device::default_mem_pool(0) else {
                return f64::NAN;
            };
            let mut v: u64 = 0;
            // SAFETY: a plain query of device 0's default pool; the out-pointer lives for the call.
            let ok = unsafe {
                sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut _)
                    == sys::CUresult::CUDA_SUCCESS
            };
            if ok {
                v as f64 / (1024.0 * 1024.0)
            } else {
                f64::NAN
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = mark;
            f64::NAN
        }
    }

    /// The device's memory in use (total − free, every allocation of every process), in MiB.
    pub fn device_used_mib() -> f64 {
        #[cfg(feature = "cuda")]
        if let Ok((free, total)) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
        {
            return (total - free) as f64 / (1024.0 * 1024.0);
        }
        f64::NAN
    }

    pub fn reset_high() {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::cudarc::driver::sys;
            use sys::CUmemPool_attribute as A;
            let Some(pool) = qgate::model::device::default_mem_pool(0) else {
                return;
            };
            // SAFETY: resets device 0's default pool's high-water marks (the driver's documented use:
            // set to 0).
            unsafe {
                for attr in [
                    A::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                ] {
                    let mut zero: u64 = 0;
                    let _ = sys::cuMemPoolSetAttribute(pool, attr, &mut zero as *mut u64 as *mut _);
                }
            }
        }
    }
}
