//! GEMM shapes of the 0.8B forward at T=512 (profiling aid): GFLOP/s of the packed bf16 kernel (or,
//! with `F32=1`, the f32 one), on the kernel set `KERNELS=auto|avx512|avx2|portable` (default auto).
//! `CANDLE=1` (with `F32=1`): candle's own matmul (the `gemm` crate) on the same shapes, for comparison.
use qgate::model::bf16_gemm::PackedBf16;
use qgate::model::cpu::KernelChoice;
use qgate::model::f32_gemm::PackedF32;
use std::time::Instant;

fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() {
    let m: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(512);
    let reps: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(3);
    let only: Option<String> = std::env::args().nth(3);
    let shapes = [
        ("qkv", 6144, 1024),
        ("z", 2048, 1024),
        ("out", 1024, 2048),
        ("gate", 3584, 1024),
        ("down", 1024, 3584),
        ("q", 4096, 1024),
        ("kv", 512, 1024),
        ("b", 16, 1024),
        ("head", 248320 / 4, 1024),
    ];
    let kernels = KernelChoice::parse(&std::env::var("KERNELS").unwrap_or_else(|_| "auto".into()))
        .and_then(|c| c.resolve())
        .unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        });
    let candle = std::env::var("CANDLE").is_ok();
    println!(
        "kernels: {}{}",
        kernels.describe(),
        if candle { " (f32: candle matmul)" } else { "" }
    );
    let mut s = 7u64;
    let mut rnd = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
        half::bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_f32()
    };
    let mut tot = (0f64, 0f64);
    for (name, n, k) in shapes {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let f32_mode = std::env::var("F32").is_ok();
        let p = PackedBf16::pack(&w, n, k, kernels).expect("kernels checked");
        let pf = PackedF32::pack(&w, n, k, kernels).expect("kernels checked");
        let (wt, xt) = (
            candle_core::Tensor::from_vec(w.clone(), (n, k), &candle_core::Device::Cpu).unwrap(),
            candle_core::Tensor::from_vec(x.clone(), (m, k), &candle_core::Device::Cpu).unwrap(),
        );
        let mut best = f64::MAX;
        let mut bestc = f64::MAX;
        for _ in 0..reps {
            let (t0, c0) = (Instant::now(), cpu_seconds());
            let y = if f32_mode && candle {
                xt.matmul(&wt.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            } else if f32_mode {
                pf.matmul_t(&x, m)
            } else {
                p.matmul_t_rounded(&x, m, true)
            };
            best = best.min(t0.elapsed().as_secs_f64());
            bestc = bestc.min(cpu_seconds() - c0);
            std::hint::black_box(y);
        }
        let gf = 2.0 * (m * n * k) as f64 / 1e9;
        tot.0 += gf;
        tot.1 += best;
        println!(
            "{name:5} n={n:6} k={k}: {:.2} ms, {:.0} GFLOP/s wall, {:.0} GFLOP/cpu-s",
            best * 1e3,
            gf / best,
            gf / bestc
        );
    }
    println!("total: {:.0} GFLOP/s", tot.0 / tot.1);
}
