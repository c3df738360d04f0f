//! The CPU kernel layer: one set of kernels per instruction set, behind one interface, chosen once.
//!
//! - `avx512`: AVX-512F (and AVX-512-BF16 for the bf16 GEMM when the CPU has it): Zen 4, Sapphire Rapids.
//! - `avx2`: AVX2 + FMA (Haswell and later, Zen 1–3, Alder Lake and later client cores).
//! - `portable`: plain Rust written as fixed-width lane loops (no `std::arch`), which LLVM vectorises for
//!   the target it compiles for (NEON on aarch64 / Apple Silicon); no x86 assumptions.
//!
//! The choice is a value, [`Kernels`]: detected once (`auto`) or forced (`--kernels`), printed with `-v`,
//! written into every oracle capture's metadata and part of the `oracles/` cache key. A packed GEMM is
//! built for one `Kernels` value and only when that value can run on this CPU ([`Kernels::check`]), so
//! calling it can never execute an instruction the CPU lacks.
//!
//! Every path computes each f32 GEMM output as one in-order FMA chain from zero (`acc = fma(x[p], w[p],
//! acc)`, `p = 0, 1, …`), the bf16 GEMM as `vdpbf16ps` does (per k pair: odd product, then even, each
//! added with one rounding), and the elementwise kernels bit for bit as their scalar definitions: the
//! paths agree with each other exactly, and none depends on the thread count.
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod portable;

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU8, Ordering};

/// Which kernel set runs the oracle's CPU arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernels {
    /// AVX-512F f32 GEMM and helpers; the bf16 GEMM uses `vdpbf16ps` when AVX-512-BF16 is present too.
    Avx512,
    /// AVX2 + FMA (256-bit).
    Avx2,
    /// Plain Rust lane loops (any CPU; NEON through autovectorisation on aarch64).
    Portable,
}

/// What `--kernels` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    Auto,
    Force(Kernels),
}

impl KernelChoice {
    /// `auto`, `avx512`, `avx2` or `portable`.
    pub fn parse(s: &str) -> Result<KernelChoice> {
        Ok(match s.trim() {
            "auto" => KernelChoice::Auto,
            "avx512" => KernelChoice::Force(Kernels::Avx512),
            "avx2" => KernelChoice::Force(Kernels::Avx2),
            "portable" => KernelChoice::Force(Kernels::Portable),
            other => {
                return Err(Error::usage(format!(
                    "--kernels `{other}`: expected auto, avx512, avx2 or portable"
                )))
            }
        })
    }

    /// The kernels this choice means on this CPU; a forced set the CPU cannot run is a usage error.
    pub fn resolve(self) -> Result<Kernels> {
        match self {
            KernelChoice::Auto => Ok(Kernels::detect()),
            KernelChoice::Force(k) => k.check(),
        }
    }
}

impl Kernels {
    pub const ALL: [Kernels; 3] = [Kernels::Avx512, Kernels::Avx2, Kernels::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Avx512 => "avx512",
            Kernels::Avx2 => "avx2",
            Kernels::Portable => "portable",
        }
    }

    /// The fastest set this CPU runs.
    pub fn detect() -> Kernels {
        Kernels::ALL
            .into_iter()
            .find(|k| k.supported())
            .unwrap_or(Kernels::Portable)
    }

    /// Whether this CPU runs this set.
    pub fn supported(self) -> bool {
        match self {
            Kernels::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernels::Avx512 | Kernels::Avx2 => false,
        }
    }

    /// `self` when this CPU runs it; else the one-line usage error `--kernels` reports.
    pub fn check(self) -> Result<Kernels> {
        if self.supported() {
            Ok(self)
        } else {
            Err(Error::usage(format!(
                "--kernels {}: this CPU cannot run them ({}); use --kernels auto (here: {})",
                self.name(),
                self.requirement(),
                Kernels::detect().name()
            )))
        }
    }

    fn requirement(self) -> &'static str {
        match self {
            Kernels::Avx512 => "they need AVX-512F",
            Kernels::Avx2 => "they need AVX2 and FMA",
            Kernels::Portable => "none",
        }
    }

    /// Whether the bf16 GEMM uses `vdpbf16ps` (AVX-512-BF16) under this set; else bf16 weights are
    /// widened to f32 per tile (same sums: the products are exact and added in the same order).
    pub fn native_bf16(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernels::Avx512 {
            return std::is_x86_feature_detected!("avx512bf16");
        }
        false
    }

    /// For `-v` and capture metadata: the set and, for bf16, how it multiplies.
    pub fn describe(self) -> String {
        let bf16 = if self.native_bf16() {
            "bf16 GEMM with vdpbf16ps"
        } else {
            "bf16 GEMM widening bf16 weights per tile"
        };
        format!("{} ({bf16})", self.name())
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// 0: not chosen yet (the first use detects); else `1 + index in Kernels::ALL`.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The kernels in force for this process (detected on first use unless `select` chose them).
pub fn active() -> Kernels {
    match ACTIVE.load(Ordering::Relaxed) {
        0 => {
            let k = Kernels::detect();
            ACTIVE.store(index(k), Ordering::Relaxed);
            k
        }
        i => Kernels::ALL[(i - 1) as usize],
    }
}

fn index(k: Kernels) -> u8 {
    1 + Kernels::ALL.iter().position(|&x| x == k).unwrap_or(2) as u8
}

/// Use `k` from now on (commands call this once, before loading a model; tests between models).
/// `k` must be runnable here: it comes from `KernelChoice::resolve` or `Kernels::check`.
pub fn select(k: Kernels) -> Result<Kernels> {
    let k = k.check()?;
    ACTIVE.store(index(k), Ordering::Relaxed);
    Ok(k)
}

/// Run `f` compiled for the kernel set in force: under `avx2`/`avx512` the closure is inlined into a
/// function built for AVX2+FMA, so its elementwise loops vectorise 8 lanes wide (the baseline x86-64
/// build has 4-lane SSE2 only); under `portable`, as built for the target. Rust never contracts a
/// multiply and an add into an FMA, so the results are the same bits either way.
#[inline(always)]
pub fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if active() != Kernels::Portable {
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the kernels in force (AVX2+FMA, or AVX-512F which implies both) were checked to run
        // on this CPU.
        return unsafe { run(f) };
    }
    f()
}

static VERBOSE: AtomicU8 = AtomicU8::new(0);

/// `-v`: commands print the kernels they chose.
pub fn set_verbose(on: bool) {
    VERBOSE.store(u8::from(on), Ordering::Relaxed);
}

/// Resolve and select a command's `--kernels` value (printed with `-v`).
pub fn select_arg(arg: &str) -> Result<Kernels> {
    let k = select(KernelChoice::parse(arg)?.resolve()?)?;
    if VERBOSE.load(Ordering::Relaxed) != 0 {
        eprintln!("qgate: CPU kernels: {}", k.describe());
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_unsupported_sets_are_one_line_usage_errors() {
        assert_eq!(KernelChoice::parse("auto").unwrap(), KernelChoice::Auto);
        assert_eq!(
            KernelChoice::parse("avx2").unwrap(),
            KernelChoice::Force(Kernels::Avx2)
        );
        assert!(KernelChoice::parse("sse").is_err());
        assert_eq!(
            KernelChoice::Force(Kernels::Portable).resolve().unwrap(),
            Kernels::Portable
        );
        assert!(Kernels::detect().supported());
        for k in Kernels::ALL {
            match k.check() {
                Ok(got) => assert_eq!(got, k),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(!msg.contains('\n') && msg.contains(k.name()), "{msg}");
                    assert_eq!(e.exit_code(), 2);
                }
            }
        }
    }
}
