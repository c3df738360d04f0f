//! HF's eager attention softmax as one op: `s = R(x · scale)`, the causal mask, an f32 softmax over the
//! visible keys, and `R` of the probabilities (R: round to the model dtype; none in f32).
//!
//! HF (`eager_attention_forward`): `w = matmul(q, kᵀ) * scaling` in the model dtype (one rounding each),
//! `w + causal_mask` (visible keys: `+ 0`, exact; hidden ones: the dtype's minimum, whose `exp` is 0),
//! `softmax(w, dtype=float32)` (max, `exp(s − max)`, sum, divide), `.to(model dtype)`. The op computes
//! exactly these values; only the order of the f32 sum differs between devices (sequential on the CPU, a
//! block reduction on the GPU), as it does between torch's CPU and CUDA softmax.
//!
//! On a GPU it is one kernel, one block per score row, reading the scores in the dtype cuBLAS wrote them
//! and writing the probabilities in the dtype the next product reads. Where the row fits in shared memory
//! (rows up to ~58,000 keys on an H100/H200) the row is read from memory once, 16 bytes a load, its scaled
//! scores and then their `exp` kept in shared memory as f32, and the probabilities written 16 bytes a
//! store; longer rows take the strided kernel (three passes over the row, one element a load). Both sum
//! each thread's keys `j ≡ tid (mod 256)` in ascending order and then reduce the same way, so they give
//! the same bits. The kernels are compiled at first use with NVRTC.
use super::precision::Precision;
#[cfg(any(feature = "cuda", test))]
use candle_core::DType;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `x`: `[.., R, total]` scores (any float dtype), row `r` belongs to query position
/// `start + (r / group) % t` (rows ordered `[.., t, group]`: `group` consecutive rows share a position,
/// the GQA query heads of one kv head). Returns probabilities in `x`'s dtype, rounded to `prec`.
pub fn scaled_masked_softmax(
    x: &Tensor,
    t: usize,
    group: usize,
    start: usize,
    scale: f32,
    prec: Precision,
) -> Result<Tensor> {
    ScaledMaskedSoftmax {
        t,
        group,
        start,
        scale,
        prec,
        kernel: GpuKernel::Fastest,
    }
    .apply(x)
}

/// Which GPU kernel [`ScaledMaskedSoftmax::apply`] runs (the host ignores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuKernel {
    /// The row in shared memory where it fits, else the strided kernel.
    Fastest,
    /// The strided kernel (three passes over the row in memory), for checks against the other
    /// (`gpu_ops_check` compares the two bit for bit).
    Strided,
}

/// The op, with the GPU kernel chosen: the arguments of [`scaled_masked_softmax`], and `kernel`.
pub struct ScaledMaskedSoftmax {
    pub t: usize,
    pub group: usize,
    pub start: usize,
    pub scale: f32,
    pub prec: Precision,
    pub kernel: GpuKernel,
}

impl ScaledMaskedSoftmax {
    /// The probabilities of `x`'s scores (see [`scaled_masked_softmax`]).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    fn dims(&self, l: &Layout) -> Result<(usize, usize)> {
        let dims = l.shape().dims();
        let total = *dims.last().unwrap_or(&0);
        let rows = l.shape().elem_count() / total.max(1);
        let per = self.t * self.group;
        if !l.is_contiguous() || total == 0 || per == 0 || !rows.is_multiple_of(per) {
            candle_core::bail!(
                "scaled_masked_softmax: expected contiguous [.., R, total] with R a multiple of t·group = {per}, got {:?}",
                l.shape()
            );
        }
        if self.start + self.t > total {
            candle_core::bail!(
                "scaled_masked_softmax: positions {}..{} need {} keys, the scores have {total}",
                self.start,
                self.start + self.t,
                self.start + self.t
            );
        }
        Ok((rows, total))
    }

    /// One row on the host: the reference semantics.
    fn row(&self, r: usize, x: &[f32], out: &mut [f32]) {
        let p = self.prec;
        let visible = self.start + (r / self.group) % self.t + 1;
        let (seen, hidden) = out.split_at_mut(visible);
        for (o, &v) in seen.iter_mut().zip(&x[..visible]) {
            *o = p.round_scalar(p.round_scalar(v) * self.scale);
        }
        let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in seen.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in seen.iter_mut() {
            *v = p.round_scalar(*v / sum);
        }
        hidden.iter_mut().for_each(|v| *v = 0.0);
    }
}

impl CustomOp1 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "qgate-scaled-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (rows, total) = self.dims(l)?;
        let n = rows * total;
        let widen = super::act_io::f32_of(s, l, n, "scaled_masked_softmax")?;
        let mut out = vec![0f32; n];
        out.par_chunks_mut(total)
            .zip(widen.par_chunks(total))
            .enumerate()
            .for_each(|(r, (o, x))| self.row(r, x, o));
        use candle_core::backend::BackendStorage;
        let storage = super::act_io::storage_of(out, s.dtype())?;
        Ok((storage, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (rows, total) = self.dims(l)?;
        let dev = s.device().clone();
        let name = kernel_name(s.dtype(), self.prec)?;
        // The row's scores as f32 in shared memory, where the block may have that much.
        let smem = total * 4;
        let in_smem = self.kernel == GpuKernel::Fastest && smem <= max_smem(&dev);
        let func = if in_smem {
            let f =
                dev.get_or_load_custom_func(&format!("{name}_smem"), "qgate_attn_softmax", ptx()?)?;
            f.set_attribute(
                Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()?;
            f
        } else {
            dev.get_or_load_custom_func(name, "qgate_attn_softmax", ptx()?)?
        };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: if in_smem { smem as u32 } else { 0 },
        };
        let (total32, t32, start32) = (total as i32, self.t as i32, self.start as i32);
        let group32 = self.group as i32;
        let scale = self.scale;
        macro_rules! launch {
            ($ty:ty) => {{
                let x = s.as_cuda_slice::<$ty>()?.slice(l.start_offset()..);
                // SAFETY: the kernel writes every element of every row (zeros after the visible keys).
                let y = unsafe { dev.alloc::<$ty>(rows * total)? };
                // 16-byte loads and stores: every row starts on a 16-byte boundary (the output's
                // allocation does; the input's start offset and the row length keep it there).
                let per16 = 16 / std::mem::size_of::<$ty>();
                let vec = i32::from(
                    total.is_multiple_of(per16) && l.start_offset().is_multiple_of(per16),
                );
                let mut b = func.builder();
                b.arg(&x);
                b.arg(&y);
                b.arg(&total32);
                b.arg(&t32);
                b.arg(&group32);
                b.arg(&start32);
                b.arg(&scale);
                if in_smem {
                    b.arg(&vec);
                }
                // SAFETY: reads and writes rows·total elements, as allocated; the shared-memory kernel
                // indexes `total` floats of dynamic shared memory, as configured.
                unsafe { b.launch(cfg) }.w()?;
                candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::F32 => launch!(f32),
            DType::BF16 => launch!(half::bf16),
            DType::F16 => launch!(half::f16),
            d => candle_core::bail!("scaled_masked_softmax: no kernel for {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// Threads a row (both kernels: the same threads sum the same keys, so they give the same bits).
#[cfg(feature = "cuda")]
const THREADS: u32 = 256;

/// Bytes of dynamic shared memory the shared-memory kernel may take on `dev`.
#[cfg(feature = "cuda")]
fn max_smem(dev: &candle_core::CudaDevice) -> usize {
    // Room for the kernel's static reduction buffer.
    super::device::max_shared_mem_optin(dev).saturating_sub(1024)
}
/// The kernel for scores stored as `dtype`, rounded to `prec`.
#[cfg(feature = "cuda")]
fn kernel_name(dtype: DType, prec: Precision) -> Result<&'static str> {
    Ok(match (dtype, prec) {
        (DType::F32, Precision::F32) => "qgate_softmax_f32",
        (DType::F32, Precision::BF16) => "qgate_softmax_f32_rbf16",
        (DType::F32, Precision::F16) => "qgate_softmax_f32_rf16",
        (DType::BF16, Precision::BF16) => "qgate_softmax_bf16",
        (DType::F16, Precision::F16) => "qgate_softmax_f16",
        (d, p) => candle_core::bail!(
            "scaled_masked_softmax: scores in {d:?} for a {} model",
            p.name()
        ),
    })
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
__device__ __forceinline__ float bf2f(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float h2f(unsigned short h) {
    float f; asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h; asm("{ .reg .f16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float id(float x) { return x; }
__device__ __forceinline__ float rbf16(float x) { return bf2f(f2bf(x)); }
__device__ __forceinline__ float rf16(float x) { return h2f(f2h(x)); }
__device__ __forceinline__ float ldf(float x) { return x; }
__device__ __forceinline__ float stf(float x) { return x; }

// max (NaN-propagating, as torch) and sum over the block; every thread gets the result.
__device__ __forceinline__ float nanmax(float a, float b) { return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b); }
__device__ float block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = nanmax(v, __shfl_xor_sync(0xffffffff, v, o));
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = (lane < (blockDim.x >> 5)) ? red[lane] : __int_as_float(0xff800000);
    for (int o = 16; o > 0; o >>= 1) v = nanmax(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
__device__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = (lane < (blockDim.x >> 5)) ? red[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Both kernels' start: the block's row of scores `xr` and of probabilities `yr`, its visible keys
// (causal, after a cached prefix of `start`), and the running max `m` from −inf.
#define SOFTMAX_ROW(TY)                                                                            \
    const long row = blockIdx.x;                                                                   \
    const TY* xr = x + row * (long)total;                                                          \
    TY* yr = y + row * (long)total;                                                                \
    const int visible = start + (int)((row / group) % t) + 1;                                      \
    float m = __int_as_float(0xff800000);

#define SOFTMAX(NAME, TY, LOAD, STORE, RND)                                                        \
extern "C" __global__ void NAME(const TY* x, TY* y, int total, int t, int group, int start, float scale) { \
    __shared__ float red[32];                                                                      \
    SOFTMAX_ROW(TY)                                                                                \
    for (int j = threadIdx.x; j < visible; j += blockDim.x) m = nanmax(m, RND(RND(LOAD(xr[j])) * scale)); \
    m = block_max(m, red);                                                                         \
    float s = 0.0f;                                                                                \
    for (int j = threadIdx.x; j < visible; j += blockDim.x) s += expf(RND(RND(LOAD(xr[j])) * scale) - m); \
    s = block_sum(s, red);                                                                         \
    for (int j = threadIdx.x; j < total; j += blockDim.x) {                                        \
        float o = 0.0f;                                                                            \
        if (j < visible) o = RND(expf(RND(RND(LOAD(xr[j])) * scale) - m) / s);                     \
        yr[j] = STORE(o);                                                                          \
    }                                                                                              \
}

SOFTMAX(qgate_softmax_f32, float, ldf, stf, id)
SOFTMAX(qgate_softmax_f32_rbf16, float, ldf, stf, rbf16)
SOFTMAX(qgate_softmax_f32_rf16, float, ldf, stf, rf16)
SOFTMAX(qgate_softmax_bf16, unsigned short, bf2f, f2bf, rbf16)
SOFTMAX(qgate_softmax_f16, unsigned short, h2f, f2h, rf16)

// The row in shared memory: read once (16-byte loads when `vec`: the row starts on a 16-byte boundary and
// its length is a multiple of N elements), the scaled scores kept as f32, then replaced by their exp; the
// probabilities written 16 bytes a store. The max is order-free; the sum runs over the same keys per
// thread in the same order as SOFTMAX, so both kernels give the same bits.
#define UNR 4
#define SOFTMAX_SMEM(NAME, TY, N, LOAD, STORE, RND)                                                \
extern "C" __global__ void NAME(const TY* x, TY* y, int total, int t, int group, int start, float scale, \
                                int vec) {                                                         \
    extern __shared__ __align__(16) float srow[];                                                  \
    __shared__ float red[32];                                                                      \
    SOFTMAX_ROW(TY)                                                                                \
    if (vec) {                                                                                     \
        const int nv = (visible + N - 1) / N;                                                      \
        /* UNR loads in flight a thread before any is used (one at a time, the pass waited on    \
           memory latency once per load) */                                                        \
        for (int q0 = threadIdx.x; q0 < nv; q0 += UNR * blockDim.x) {                              \
            uint4 raw[UNR];                                                                        \
            _Pragma("unroll") for (int u = 0; u < UNR; ++u) {                                      \
                const int q = q0 + u * blockDim.x;                                                 \
                if (q < nv) raw[u] = ((const uint4*)xr)[q];                                        \
            }                                                                                      \
            _Pragma("unroll") for (int u = 0; u < UNR; ++u) {                                      \
                const int q = q0 + u * blockDim.x;                                                 \
                if (q >= nv) break;                                                                \
                const TY* e = (const TY*)&raw[u];                                                  \
                float v[N];                                                                        \
                _Pragma("unroll") for (int i = 0; i < N; ++i) {                                    \
                    v[i] = RND(RND(LOAD(e[i])) * scale);                                           \
                    if (q * N + i < visible) m = nanmax(m, v[i]);                                  \
                }                                                                                  \
                /* 16-byte stores (few bank conflicts); past `visible` they are never read */      \
                _Pragma("unroll") for (int i = 0; i < N; i += 4)                                   \
                    *(float4*)(srow + q * N + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]); \
            }                                                                                      \
        }                                                                                          \
    } else {                                                                                       \
        for (int j = threadIdx.x; j < visible; j += blockDim.x) {                                  \
            const float v = RND(RND(LOAD(xr[j])) * scale); srow[j] = v; m = nanmax(m, v);          \
        }                                                                                          \
    }                                                                                              \
    m = block_max(m, red);                                                                         \
    float s = 0.0f;                                                                                \
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {                                      \
        const float e = expf(srow[j] - m); srow[j] = e; s += e;                                    \
    }                                                                                              \
    s = block_sum(s, red);                                                                         \
    if (vec) {                                                                                     \
        const int nv = total / N;                                                                  \
        for (int q = threadIdx.x; q < nv; q += blockDim.x) {                                       \
            uint4 raw;                                                                             \
            TY* e = (TY*)&raw;                                                                     \
            float v[N];                                                                            \
            if (q * N < visible) {                                                                 \
                _Pragma("unroll") for (int i = 0; i < N; i += 4) {                                 \
                    const float4 f = *(const float4*)(srow + q * N + i);                           \
                    v[i] = f.x; v[i + 1] = f.y; v[i + 2] = f.z; v[i + 3] = f.w;                    \
                }                                                                                  \
            }                                                                                      \
            _Pragma("unroll") for (int i = 0; i < N; ++i) {                                        \
                const int j = q * N + i;                                                           \
                e[i] = STORE(j < visible ? RND(v[i] / s) : 0.0f);                                  \
            }                                                                                      \
            ((uint4*)yr)[q] = raw;                                                                 \
        }                                                                                          \
    } else {                                                                                       \
        for (int j = threadIdx.x; j < total; j += blockDim.x)                                      \
            yr[j] = STORE(j < visible ? RND(srow[j] / s) : 0.0f);                                  \
    }                                                                                              \
}

SOFTMAX_SMEM(qgate_softmax_f32_smem, float, 4, ldf, stf, id)
SOFTMAX_SMEM(qgate_softmax_f32_rbf16_smem, float, 4, ldf, stf, rbf16)
SOFTMAX_SMEM(qgate_softmax_f32_rf16_smem, float, 4, ldf, stf, rf16)
SOFTMAX_SMEM(qgate_softmax_bf16_smem, unsigned short, 8, bf2f, f2bf, rbf16)
SOFTMAX_SMEM(qgate_softmax_f16_smem, unsigned short, 8, h2f, f2h, rf16)
"#;

/// The kernels' PTX, compiled once per process.
#[cfg(feature = "cuda")]
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx(&PTX, KERNEL, "the attention softmax kernel")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The op against the formula written out for one small case, in each storage dtype.
    #[test]
    fn op_is_hfs_scaled_masked_softmax() {
        let (t, start, total) = (3usize, 2usize, 5usize);
        for (prec, group) in [
            (Precision::F32, 1),
            (Precision::BF16, 1),
            (Precision::F16, 1),
            (Precision::BF16, 2),
        ] {
            let vals: Vec<f32> = (0..2 * t * group * total)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.37)
                .collect();
            let x = Tensor::from_vec(vals, (2, t * group, total), &Device::Cpu).unwrap();
            let x = match prec.half_dtype() {
                Some(d) => x.to_dtype(d).unwrap(),
                None => x,
            };
            let y = scaled_masked_softmax(&x, t, group, start, 0.5, prec).unwrap();
            assert_eq!(y.dtype(), x.dtype());
            let y: Vec<f32> = y
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let xs: Vec<f32> = x
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for r in 0..2 * t * group {
                let vis = start + (r / group) % t + 1;
                let row = &xs[r * total..(r + 1) * total];
                let s: Vec<f32> = row[..vis]
                    .iter()
                    .map(|&v| prec.round_scalar(v * 0.5))
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for c in 0..total {
                    let want = if c < vis {
                        prec.round_scalar(e[c] / z)
                    } else {
                        0.0
                    };
                    assert_eq!(y[r * total + c], want, "{prec:?} row {r} col {c}");
                }
            }
        }
    }
}
