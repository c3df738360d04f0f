//! A strided view copied to row-major storage as one op on a GPU: the views the portable kernels make
//! contiguous are transposes and narrows whose innermost axis has unit stride (a head's channels), which
//! merge to at most three axes `[A, B, C]` with strides `(sa, sb, 1)`. candle's generic strided copy
//! decodes every element's index through all its axes and moves 2 bytes a thread in bf16; this moves four
//! elements a thread with one 8- or 16-byte load where the strides allow. The values are moved, never
//! converted. Anything else (and every host tensor) goes through candle's `contiguous`.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `x` in row-major layout (a copy unless it is already contiguous).
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() || x.device().is_cpu() {
        return x.contiguous();
    }
    match merged(x.dims(), x.stride()) {
        Some(m) => x.apply_op1_no_bwd(&StridedCopy(m)),
        None => x.contiguous(),
    }
}

/// `[A, B, C]` and strides `(sa, sb)` of a view whose innermost axis has unit stride, after dropping
/// size-1 axes and merging axes that are contiguous with each other; `None` beyond three axes.
fn merged(dims: &[usize], strides: &[usize]) -> Option<[usize; 5]> {
    let mut axes: Vec<(usize, usize)> = Vec::with_capacity(dims.len());
    for (&d, &s) in dims.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        match axes.last_mut() {
            Some((pd, ps)) if *ps == s * d => {
                *pd *= d;
                *ps = s;
            }
            _ => axes.push((d, s)),
        }
    }
    if axes.last().is_some_and(|&(_, s)| s != 1) {
        axes.push((1, 1));
    }
    while axes.len() < 3 {
        axes.insert(0, (1, 0));
    }
    match axes[..] {
        [(a, sa), (b, sb), (c, 1)] => Some([a, b, c, sa, sb]),
        _ => None,
    }
}

struct StridedCopy([usize; 5]);

impl CustomOp1 for StridedCopy {
    fn name(&self) -> &'static str {
        "qgate-strided-copy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let [a, b, c, sa, sb] = self.0;
        let o = l.start_offset();
        fn gather<T: Copy>(v: &[T], o: usize, [a, b, c, sa, sb]: [usize; 5]) -> Vec<T> {
            let mut out = Vec::with_capacity(a * b * c);
            for i in 0..a {
                for j in 0..b {
                    let r = o + i * sa + j * sb;
                    out.extend_from_slice(&v[r..r + c]);
                }
            }
            out
        }
        let m = [a, b, c, sa, sb];
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(gather(v, o, m)),
            CpuStorage::BF16(v) => CpuStorage::BF16(gather(v, o, m)),
            CpuStorage::F16(v) => CpuStorage::F16(gather(v, o, m)),
            CpuStorage::U32(v) => CpuStorage::U32(gather(v, o, m)),
            _ => candle_core::bail!("strided copy: f32, bf16, f16 or u32 expected"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::DType;
        let [a, b, c, sa, sb] = self.0;
        let o = l.start_offset();
        let n = a * b * c;
        let dev = s.device().clone();
        let v4 = [c, sa, sb, o].iter().all(|v| v % 4 == 0) as i32;
        let per = if v4 == 1 { 4 } else { 1 };
        let cfg = super::device::grid_stride(n.div_ceil(per));
        let longs = [a as i64, b as i64, c as i64, sa as i64, sb as i64];
        macro_rules! launch {
            ($ty:ty, $kernel:expr) => {{
                let x = s.as_cuda_slice::<$ty>()?.slice(o..);
                // SAFETY: the kernel writes all n elements.
                let y = unsafe { dev.alloc::<$ty>(n)? };
                let func = dev.get_or_load_custom_func($kernel, "qgate_strided_copy", ptx()?)?;
                let mut bld = func.builder();
                bld.arg(&x);
                bld.arg(&y);
                for v in &longs {
                    bld.arg(v);
                }
                bld.arg(&v4);
                // SAFETY: reads the view's a·b·c elements (offsets inside its storage), writes n.
                unsafe { bld.launch(cfg) }.w()?;
                candle_core::CudaStorage::wrap_cuda_slice(y, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => launch!(f32, "qgate_strided_copy_b4"),
            DType::U32 => launch!(u32, "qgate_strided_copy_b4"),
            DType::BF16 => launch!(half::bf16, "qgate_strided_copy_b2"),
            DType::F16 => launch!(half::f16, "qgate_strided_copy_b2"),
            d => candle_core::bail!("strided copy: no kernel for {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// A fresh, compact row-major copy of `x`, even when `x` is contiguous already: a buffer an in-place op
/// may write, or a small part of a large tensor kept past it. (candle's `copy` clones the whole buffer
/// under a view: a 3-row narrow of a `[4096, C]` tensor kept all 4,096 rows.)
pub fn copy(x: &Tensor) -> Result<Tensor> {
    match merged(x.dims(), x.stride()) {
        Some(m) => x.apply_op1_no_bwd(&StridedCopy(m)),
        None => x
            .contiguous()?
            .apply_op1_no_bwd(&StridedCopy([1, 1, x.elem_count(), 0, 0])),
    }
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
// out[i, j, k] = x[i·sa + j·sb + k], row-major out; a thread moves VEC consecutive k (one vector load
// and store when v4: c, sa, sb and the view's offset are multiples of 4), grid-stride.
#define COPY(NAME, TY, VTY)                                                                        \
extern "C" __global__ void NAME(const TY* x, TY* y, long a, long b, long c, long sa, long sb, int v4) { \
    const long per = v4 ? 4 : 1;                                                                   \
    const long n = a * b * c / per;                                                                \
    for (long t = (long)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) { \
        const long e = t * per;                                                                    \
        const long k = e % c, ij = e / c;                                                          \
        const long src = (ij / b) * sa + (ij % b) * sb + k;                                         \
        if (v4) *(VTY*)(y + e) = *(const VTY*)(x + src);                                           \
        else y[e] = x[src];                                                                        \
    }                                                                                              \
}
COPY(qgate_strided_copy_b4, unsigned int, uint4)
COPY(qgate_strided_copy_b2, unsigned short, uint2)
"#;

#[cfg(feature = "cuda")]
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx(&PTX, KERNEL, "the strided copy kernel")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn merges_views_to_three_axes() {
        // [T, nkv, hd] transposed to [nkv, T, hd]
        assert_eq!(merged(&[2, 5, 8], &[8, 16, 1]), Some([2, 5, 8, 8, 16]));
        // a narrow of the last axis: [T, nh, hd] of [T, nh, 2hd] (T and nh merge: rows 16 apart)
        assert_eq!(merged(&[5, 4, 8], &[64, 16, 1]), Some([1, 20, 8, 0, 16]));
        // contiguous axes merge; size-1 axes drop
        assert_eq!(
            merged(&[3, 1, 4, 8], &[32, 99, 8, 1]),
            Some([1, 1, 96, 0, 0])
        );
        // an innermost stride other than 1 becomes a unit axis
        assert_eq!(merged(&[4, 6], &[1, 4]), Some([4, 6, 1, 1, 4]));
        assert_eq!(merged(&[2, 3, 4, 5], &[1000, 100, 10, 1]), None);
    }

    /// `copy` keeps only the view: a narrow's copy owns its rows, not the buffer under it.
    #[test]
    fn copy_is_compact() {
        let x = Tensor::arange(0f32, 4096.0 * 6.0, &Device::Cpu)
            .unwrap()
            .reshape((4096, 6))
            .unwrap();
        let tail = copy(&x.narrow(0, 4093, 3).unwrap()).unwrap();
        let (storage, layout) = tail.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
            panic!("f32 on the host expected")
        };
        assert_eq!((v.len(), layout.start_offset()), (18, 0));
        assert_eq!(v[0], 4093.0 * 6.0);
    }

    /// The op's host implementation is candle's `contiguous` on the views the kernels meet.
    #[test]
    fn copies_what_contiguous_copies() {
        let x = Tensor::arange(0f32, 2.0 * 5.0 * 16.0, &Device::Cpu)
            .unwrap()
            .reshape((5, 2, 16))
            .unwrap();
        for v in [
            x.transpose(0, 1).unwrap(),
            x.narrow(2, 0, 8).unwrap(),
            x.narrow(2, 8, 8).unwrap().transpose(0, 1).unwrap(),
        ] {
            let m = merged(v.dims(), v.stride()).unwrap();
            let got = v.apply_op1_no_bwd(&StridedCopy(m)).unwrap();
            let want = v.contiguous().unwrap();
            assert_eq!(got.dims(), want.dims());
            let (g, w): (Vec<f32>, Vec<f32>) = (
                got.flatten_all().unwrap().to_vec1().unwrap(),
                want.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(g, w);
        }
    }
}
