//! Process memory: allocator tuning and the peak resident set benchmarks report.
//!
//! The forward pass allocates and frees many large activation buffers. glibc serves each from a fresh
//! `mmap` and returns it on free, so every op pays page faults and page clearing (measured: ~10% of an
//! oracle run). Keeping freed memory in the heap for reuse removes that cost.

/// Call once at start-up, before any large allocation.
pub fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
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
