//! Profiling aid: load once, then run the T-token forward REPS times, printing wall and CPU seconds of
//! each (CPU time is less disturbed than wall time on a shared machine).
use qgate::model::{precision::Precision, Model};
use std::time::Instant;

fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn sys_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_stime.tv_sec as f64 + ru.ru_stime.tv_usec as f64 * 1e-6
}

fn minflt() -> i64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_minflt
}

fn mem() -> String {
    let st = std::fs::read_to_string("/proc/self/status").unwrap();
    st.lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qgate::alloc_tuning::keep_freed_memory_for_reuse();
    let a: Vec<String> = std::env::args().collect();
    let prec = Precision::parse(&a[2]).ok_or("dtype")?;
    let t: usize = a[3].parse()?;
    let reps: usize = a.get(4).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let model = Model::load(std::path::Path::new(&a[1]), prec)?;
    eprintln!("after load: {}", mem());
    let ids = qgate::plan::random_token_ids(t, model.cfg.vocab_size);
    model.forward(&ids[..16.min(t)], &mut model.new_cache())?;
    for _ in 0..reps {
        let (t0, c0, f0, s0) = (Instant::now(), cpu_seconds(), minflt(), sys_seconds());
        let logits = model.forward(&ids, &mut model.new_cache())?;
        let (w, c) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        let faults = minflt() - f0;
        let sys = sys_seconds() - s0;
        eprintln!("after forward: {}", mem());
        drop(logits);
        println!(
            "{} T={t}: wall {w:.3}s ({:.1} tok/s) cpu {c:.3}s, {faults} page faults, sys {sys:.3}s",
            prec.name(),
            t as f64 / w
        );
    }
    Ok(())
}
