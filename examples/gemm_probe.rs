//! The AVX2 f32 GEMM alone on one shape, for tuning (GFLOP/s; the k block is `drive_blocked`'s).
//! usage: gemm_probe M K N [ROUNDS]
use qgate::model::cpu::Kernels;
use qgate::model::f32_gemm::PackedF32;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qgate::alloc_tuning::keep_freed_memory_for_reuse();
    let a: Vec<String> = std::env::args().collect();
    if !(4..=5).contains(&a.len()) {
        eprintln!("usage: gemm_probe M K N [ROUNDS]");
        std::process::exit(2);
    }
    let (m, k, n): (usize, usize, usize) = (a[1].parse()?, a[2].parse()?, a[3].parse()?);
    let rounds: usize = a.get(4).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
        .collect();
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 104729) % 1000) as f32 * 1e-3)
        .collect();
    let p = PackedF32::pack(&w, n, k, Kernels::detect())?;
    drop(w);
    for r in 0..rounds {
        let t0 = Instant::now();
        let o = p.matmul_t(&x, m);
        let s = t0.elapsed().as_secs_f64();
        let gf = 2.0 * (m * n * k) as f64 / s / 1e9;
        println!(
            "round {r} ({}): {s:.3} s, {gf:.1} GFLOP/s (check {})",
            p.kernels(),
            o[7]
        );
    }
    Ok(())
}
