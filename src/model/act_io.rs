//! Activations stored in the model dtype. In bf16/f16 the portable kernels' activations between the
//! products are values of the model dtype (every one was rounded by `R`), so storing them as bf16/f16
//! instead of f32 loses nothing and saves the f32 ↔ bf16 casts around every cuBLAS product and half the
//! memory traffic. The ops that take activations read f32, bf16 or f16 (converted to f32 exactly on load)
//! and write the dtype they are asked for (each output already rounded by the op, so the store is exact).
//!
//! Here: the host side (`f32_of`, `storage_of`) and, for the CUDA kernels, a view of any of the three
//! dtypes with the code the device helpers `ld`/`st` take (`device::nvrtc_ptx_with_rounding`).
use candle_core::{CpuStorage, DType, Layout, Result};
use std::borrow::Cow;

/// The dtype the activations between products are stored in: the model dtype in bf16/f16 on the
/// portable kernels, else f32 (the host kernels keep f32 slices).
pub fn storage_dtype(prec: super::precision::Precision, portable: bool) -> DType {
    match prec.half_dtype() {
        Some(dt) if portable => dt,
        _ => DType::F32,
    }
}

/// `n` values of `s` from the layout's start offset, as f32 (exact for bf16/f16).
pub fn f32_of<'a>(s: &'a CpuStorage, l: &Layout, n: usize, what: &str) -> Result<Cow<'a, [f32]>> {
    let a = l.start_offset();
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[a..a + n]),
        CpuStorage::BF16(v) => Cow::Owned(v[a..a + n].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => Cow::Owned(v[a..a + n].iter().map(|x| x.to_f32()).collect()),
        _ => candle_core::bail!("{what}: f32, bf16 or f16 activations expected"),
    })
}

/// `v` stored as `dt` (round-to-nearest-even; exact for values already rounded to `dt`).
pub fn storage_of(v: Vec<f32>, dt: DType) -> Result<CpuStorage> {
    Ok(match dt {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect()),
        DType::F16 => CpuStorage::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
        _ => candle_core::bail!("activations are stored as f32, bf16 or f16, not {dt:?}"),
    })
}

/// The code of `dt` for the device helpers `ld`/`st` (0 f32, 1 bf16, 2 f16).
pub fn code(dt: DType) -> i32 {
    match dt {
        DType::BF16 => 1,
        DType::F16 => 2,
        _ => 0,
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{view, Out, View};

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchArgs, PushKernelArg,
    };
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{CudaStorage, DType, Layout, Result};
    use half::{bf16, f16};

    /// A kernel's input of any activation dtype, from the layout's start offset.
    pub enum View<'a> {
        F32(CudaView<'a, f32>),
        Bf16(CudaView<'a, bf16>),
        F16(CudaView<'a, f16>),
    }

    pub fn view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<View<'a>> {
        let a = l.start_offset();
        Ok(match s.dtype() {
            DType::F32 => View::F32(s.as_cuda_slice::<f32>()?.slice(a..)),
            DType::BF16 => View::Bf16(s.as_cuda_slice::<bf16>()?.slice(a..)),
            DType::F16 => View::F16(s.as_cuda_slice::<f16>()?.slice(a..)),
            dt => candle_core::bail!("f32, bf16 or f16 activations expected, got {dt:?}"),
        })
    }

    impl<'a> View<'a> {
        pub fn code(&self) -> i32 {
            match self {
                View::F32(_) => 0,
                View::Bf16(_) => 1,
                View::F16(_) => 2,
            }
        }
        pub fn push<'b>(&'b self, b: &mut LaunchArgs<'b>) {
            match self {
                View::F32(v) => b.arg(v),
                View::Bf16(v) => b.arg(v),
                View::F16(v) => b.arg(v),
            };
        }
    }

    /// A kernel's output of any activation dtype.
    pub enum Out {
        F32(CudaSlice<f32>),
        Bf16(CudaSlice<bf16>),
        F16(CudaSlice<f16>),
    }

    impl Out {
        /// # Safety
        /// Uninitialised: the kernel must write all `n` elements.
        pub unsafe fn alloc(dev: &CudaDevice, dt: DType, n: usize) -> Result<Out> {
            Ok(match dt {
                DType::F32 => Out::F32(dev.alloc::<f32>(n)?),
                DType::BF16 => Out::Bf16(dev.alloc::<bf16>(n)?),
                DType::F16 => Out::F16(dev.alloc::<f16>(n)?),
                dt => candle_core::bail!("activations are stored as f32, bf16 or f16, not {dt:?}"),
            })
        }
        pub fn code(&self) -> i32 {
            match self {
                Out::F32(_) => 0,
                Out::Bf16(_) => 1,
                Out::F16(_) => 2,
            }
        }
        pub fn push<'b>(&'b self, b: &mut LaunchArgs<'b>) {
            match self {
                Out::F32(v) => b.arg(v),
                Out::Bf16(v) => b.arg(v),
                Out::F16(v) => b.arg(v),
            };
        }
        pub fn storage(self, dev: CudaDevice) -> CudaStorage {
            match self {
                Out::F32(v) => CudaStorage::wrap_cuda_slice(v, dev),
                Out::Bf16(v) => CudaStorage::wrap_cuda_slice(v, dev),
                Out::F16(v) => CudaStorage::wrap_cuda_slice(v, dev),
            }
        }
    }
}
