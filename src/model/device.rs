//! Where the oracle runs (`--device cpu|cuda[:N]`) and which kernels that implies.
//!
//! On the CPU the decoder uses its host kernels (hand-vectorised delta rule, packed bf16 GEMM, row-wise
//! softmax). Any other device runs the *portable* kernels: the same arithmetic written as tensor ops, so
//! that the delta-rule chunk scan, the causal conv, attention and MoE all stay on the device; only the
//! MoE router's `[T, experts]` probabilities cross to the host once per layer, for torch's top-k
//! tie-breaking. The portable kernels also run on the CPU (`portable_kernels`), which is how CI checks
//! them against HF's own outputs without a GPU.
use super::round_op::cast;
use crate::error::{Error, Result};
use candle_core::Device;

/// Parse `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::usage(format!("--device {spec}: expected cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(Error::usage(format!(
                "--device {spec}: expected cpu, cuda or cuda:N"
            )))
        }
    };
    cuda_device(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    let dev = Device::new_cuda(ordinal)
        .map_err(|e| Error::usage(format!("--device cuda:{ordinal}: cannot open the GPU: {e}")))?;
    if let Device::Cuda(d) = &dev {
        // SAFETY: qgate uses the device's one stream only, so CUDA's stream order already orders every
        // allocation, use and free; per-tensor events would only add host overhead to each op.
        unsafe { d.disable_event_tracking() };
        keep_freed_memory(ordinal);
    }
    Ok(dev)
}

/// Keep the memory a forward frees in the device's pool for the next allocation, as torch's caching
/// allocator does, instead of returning it to the driver at every synchronisation (CUDA's default release
/// threshold is 0). Mapping device memory again is host work that is not hidden behind the GPU once the
/// host waits (measured on an H200: 94k → 103k tok/s at bf16 T = 4,096); the peak is set inside a forward
/// either way. Best effort: without it the oracle is slower, not wrong.
#[cfg(feature = "cuda")]
fn keep_freed_memory(ordinal: usize) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Some(pool) = default_mem_pool(ordinal) else {
        return;
    };
    let mut threshold = u64::MAX;
    // SAFETY: a valid pool handle; the u64 attribute lives for the call.
    unsafe {
        let _ = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut _,
        );
    }
}

/// GPU `ordinal`'s default memory pool (the one candle's stream-ordered allocations use), or `None` when
/// the driver cannot say.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub fn default_mem_pool(
    ordinal: usize,
) -> Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ordinal = std::ffi::c_int::try_from(ordinal).ok()?;
    let (mut device, mut pool): (sys::CUdevice, sys::CUmemoryPool) = (0, std::ptr::null_mut());
    // SAFETY: plain driver queries; the out-pointers live for the calls.
    let ok = unsafe {
        sys::cuDeviceGet(&mut device, ordinal) == sys::CUresult::CUDA_SUCCESS
            && sys::cuDeviceGetDefaultMemPool(&mut pool, device) == sys::CUresult::CUDA_SUCCESS
    };
    ok.then_some(pool)
}

/// Wait for `dev`, then return the memory its pool keeps free ([`keep_freed_memory`]) to the driver;
/// nothing on the CPU. The pool serves a forward's many activation sizes from more memory than they
/// use at once (on an H200 at T = 512, ~590 MiB reserved for a 152 MiB peak in f32), and the head's
/// logits, the largest tensors, then fit in little of it: released first, the head's peak is the
/// logits plus what the body leaves alive. Best effort: where the driver cannot trim, the peak is higher,
/// the values the same.
pub fn release_pool_memory(dev: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        dev.synchronize()?;
        let ordinal = d.cuda_stream().context().ordinal();
        if let Some(pool) = default_mem_pool(ordinal) {
            // SAFETY: a valid pool handle; the device has finished every queued free.
            unsafe {
                let _ = candle_core::cuda_backend::cudarc::driver::sys::cuMemPoolTrimTo(pool, 0);
            }
        }
    }
    let _ = dev;
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Err(Error::usage(format!(
        "--device cuda:{ordinal}: this qgate was built without CUDA; build it with scripts/build-cuda.sh \
         (cargo feature `cuda`)"
    )))
}

/// `x` with row-major strides. candle's `contiguous()` keeps odd strides on size-1 axes (it treats
/// such a tensor as contiguous already), which its CUDA matmul then rejects; a reshape of a contiguous
/// tensor lays it out afresh without copying.
/// On a GPU the copy is [`super::strided_copy::contiguous`] (one vectorised kernel for the transposes and
/// narrows the kernels meet).
pub fn standard_layout(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    super::strided_copy::contiguous(x)?.reshape(x.shape())
}

/// `a · b` with both operands in a layout cuBLAS takes (row- or column-major last two axes, uniform batch
/// stride), copying an operand only when it is in neither. candle's CPU matmul accepts more layouts than
/// its CUDA one, so the portable kernels route every product through here to behave the same on both.
pub fn matmul(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    gemm_ready(a)?.matmul(&gemm_ready(b)?)
}

fn gemm_ready(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    let (dims, st) = (x.dims(), x.stride());
    let r = dims.len();
    if r < 2 {
        return Ok(x.clone());
    }
    let (rows, cols, s2, s1) = (dims[r - 2], dims[r - 1], st[r - 2], st[r - 1]);
    let row_major = (s1 == 1 || cols == 1) && (s2 == cols || rows == 1);
    let col_major = (s2 == 1 || rows == 1) && (s1 == rows || cols == 1);
    let batch_ok = match r {
        2 | 3 => true,
        4 => st[0] == st[1] * dims[1] || dims[0] == 1,
        _ => false,
    };
    if (row_major || col_major) && batch_ok {
        Ok(x.clone())
    } else {
        standard_layout(x)
    }
}

/// `a · b` rounded to the model dtype and *kept* in it where the product runs on a GPU in bf16/f16 (cuBLAS
/// writes the rounded values in that dtype; no f32 copy), else `R(a · b)` in f32. The values are the
/// same either way; the next op (the attention softmax) reads either dtype.
pub fn matmul_model_dtype(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    prec: super::precision::Precision,
) -> candle_core::Result<candle_core::Tensor> {
    match prec.half_dtype() {
        Some(dt) if !a.device().is_cpu() => matmul(&cast(a, dt)?, &cast(b, dt)?),
        // An f32 product (operands stored in bf16/f16 are widened exactly), through `matmul` for the
        // layouts cuBLAS takes.
        _ => {
            let f = candle_core::DType::F32;
            prec.round(&matmul(&a.to_dtype(f)?, &b.to_dtype(f)?)?)
        }
    }
}

/// The PTX of `source`, compiled once per process (`cell`) with NVRTC for compute capability 8.0 or newer
/// (the kernels' bf16/f16 conversions are sm_80 PTX instructions), or the compile error naming `what`.
#[cfg(feature = "cuda")]
pub(crate) fn nvrtc_ptx(
    cell: &'static std::sync::OnceLock<std::result::Result<String, String>>,
    source: &str,
    what: &str,
) -> candle_core::Result<&'static str> {
    use candle_core::cuda_backend::cudarc::nvrtc;
    cell.get_or_init(|| {
        let opts = nvrtc::CompileOptions {
            arch: Some("sm_80"),
            ..Default::default()
        };
        nvrtc::compile_ptx_with_opts(source, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile {what}: {e}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// [`nvrtc_ptx`] of `source` after the device functions the rounding kernels share: `rnd(x, mode)` (`R`:
/// mode 0 f32, 1 bf16, 2 f16, as [`super::precision::round_code`]), `silu(x) = x / (1 + exp(−x))`
/// rounded as on the host, and `ld(p, i, dt)` / `st(p, i, v, dt)` (and the four-wide `ld4` / `st4`) for
/// activations stored in any of the three dtypes ([`super::act_io`]).
#[cfg(feature = "cuda")]
pub(crate) fn nvrtc_ptx_with_rounding(
    cell: &'static std::sync::OnceLock<std::result::Result<String, String>>,
    source: &str,
    what: &str,
) -> candle_core::Result<&'static str> {
    const HELPERS: &str = r#"
__device__ __forceinline__ float rnd(float x, int mode) {
    if (mode == 1) {
        unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
        return __uint_as_float(((unsigned int)h) << 16);
    }
    if (mode == 2) {
        float f; asm("{ .reg .f16 t; cvt.rn.f16.f32 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "f"(x));
        return f;
    }
    return x;
}
__device__ __forceinline__ float silu(float x) { return __fdiv_rn(x, __fadd_rn(1.0f, expf(-x))); }
// Activations of any storage dtype (`act_io`: 0 f32, 1 bf16, 2 f16), read as f32 (exact) and stored
// rounded to nearest (exact for values the kernel already rounded to that dtype).
__device__ __forceinline__ float ld(const void* p, long i, int dt) {
    if (dt == 1) return __uint_as_float(((unsigned int)((const unsigned short*)p)[i]) << 16);
    if (dt == 2) {
        float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(((const unsigned short*)p)[i]));
        return f;
    }
    return ((const float*)p)[i];
}
__device__ __forceinline__ void st(void* p, long i, float v, int dt) {
    if (dt == 1) {
        unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
        ((unsigned short*)p)[i] = h;
    } else if (dt == 2) {
        unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        ((unsigned short*)p)[i] = h;
    } else {
        ((float*)p)[i] = v;
    }
}
// Four consecutive activations from element i (any storage dtype); v4: i is a multiple of 4 and the data
// 8/16-byte aligned, so one vector load; else four scalar loads (the last ones only where i + e < lim).
__device__ __forceinline__ void ld4(const void* p, long i, int dt, int v4, int lim, float* o) {
    if (v4) {
        if (dt == 0) {
            const float4 f = *(const float4*)((const float*)p + i);
            o[0] = f.x; o[1] = f.y; o[2] = f.z; o[3] = f.w;
            return;
        }
        const uint2 u = *(const uint2*)((const unsigned short*)p + i);
        const unsigned short hs[4] = {(unsigned short)(u.x & 0xffff), (unsigned short)(u.x >> 16),
                                      (unsigned short)(u.y & 0xffff), (unsigned short)(u.y >> 16)};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (dt == 1) o[e] = __uint_as_float(((unsigned int)hs[e]) << 16);
            else asm("cvt.f32.f16 %0, %1;" : "=f"(o[e]) : "h"(hs[e]));
        }
        return;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = (e < lim) ? ld(p, i + e, dt) : 0.0f;
}

// Four consecutive values stored from element i, rounded to nearest in dtype dt; v4: one vector store
// (i a multiple of 4, aligned), else the ones with i + e < lim.
__device__ __forceinline__ void st4(void* p, long i, const float* v, int dt, int v4, int lim) {
    if (v4) {
        if (dt == 0) { *(float4*)((float*)p + i) = make_float4(v[0], v[1], v[2], v[3]); return; }
        unsigned short hs[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (dt == 1) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(hs[e]) : "f"(v[e]));
            else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hs[e]) : "f"(v[e]));
        }
        *(uint2*)((unsigned short*)p + i) = make_uint2((unsigned)hs[0] | ((unsigned)hs[1] << 16),
                                                       (unsigned)hs[2] | ((unsigned)hs[3] << 16));
        return;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) if (e < lim) st(p, i + e, v[e], dt);
}

"#;
    if let Some(done) = cell.get() {
        return done
            .as_deref()
            .map_err(|e| candle_core::Error::Msg(e.clone()));
    }
    nvrtc_ptx(cell, &format!("{HELPERS}{source}"), what)
}

/// The f32 data a custom op's CUDA kernel reads: `s` from the layout's start offset.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_f32<'a>(
    s: &'a candle_core::CudaStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    Ok(s.as_cuda_slice::<f32>()?.slice(l.start_offset()..))
}

/// Bytes of shared memory a block on `dev` may opt in to (0 where the driver does not say): the H100/H200
/// allow 227 KB, consumer GPUs ~99 KB.
#[cfg(feature = "cuda")]
pub(crate) fn max_shared_mem_optin(dev: &candle_core::CudaDevice) -> usize {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    dev.cuda_stream()
        .context()
        .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_or(0, |m| usize::try_from(m).unwrap_or(0))
}

/// Launch shape of the grid-stride element-wise kernels over `n` elements: 256 threads a block, one
/// element per thread up to 262,140 blocks.
#[cfg(feature = "cuda")]
pub(crate) fn grid_stride(n: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65535 * 4) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A short name for reports and capture metadata: `cpu` or `cuda:N`.
pub fn device_name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Bytes of device memory free now (`None` on the CPU, or when the driver cannot say).
pub fn free_device_memory(dev: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free as u64);
    }
    let _ = dev;
    None
}
