//! Process memory: allocator tuning and the peak resident set benchmarks report.
//!
//! The forward pass allocates and frees many large activation buffers. glibc serves each from a fresh
//! `mmap` and returns it on free, so every op pays page faults and page clearing (measured: ~10% of an
//! oracle run). Keeping freed memory in the heap for reuse removes that cost.
//!
//! All threads share the main heap (`M_ARENA_MAX` 1): a thread's own arena is made of 64 MiB heaps, so
//! glibc serves every larger block there (a weight tensor converted on the streaming oracle's prefetch
//! thread) from a fresh `mmap` again, whatever the threshold. Measured on the 27B-shaped streaming
//! benchmark: weight loading on the prefetch thread 3.3–6.1 s per layer with per-thread arenas, 0.6–1.6 s
//! with the shared heap.

/// Call once at start-up, before any large allocation and before other threads start.
pub fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hand freed heap memory back to the system (after a large transient, e.g. a table repacked at load:
/// `keep_freed_memory_for_reuse` would otherwise keep the hole resident). Cheap; no-op off glibc.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heap to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Peak resident set of this process in bytes (`VmHWM`), for benchmarks; `None` off Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}
