//! Partial rotary embedding (text-only mRoPE ≡ 1-D RoPE): fp32 inverse frequencies and angles,
//! tables rounded to the model dtype, NeoX rotate-half on the first `rd` dims of each head.
use super::precision::Precision;
use crate::error::Result;
use candle_core::{Device, Tensor, D};

/// The last sin/cos tables made and what they were made for: (start, T, device, sin, cos).
type LastTables = (usize, usize, candle_core::DeviceLocation, Tensor, Tensor);

pub struct Rope {
    inv_freq: Vec<f32>,
    rotary_dim: usize,
    prec: Precision,
    /// The last tables made, keyed by (start, T, device): every attention layer of a forward asks for the
    /// same ones, and at T = 4096 each set is ~0.5M sin/cos on the host.
    last: std::sync::Mutex<Option<LastTables>>,
}

impl Rope {
    pub fn new(theta: f64, rotary_dim: usize, prec: Precision) -> Rope {
        // HF: 1.0 / (base ** (arange(0, dim, 2, float32) / dim)), all in fp32.
        let base = theta as f32;
        let inv_freq = (0..rotary_dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / rotary_dim as f32))
            .collect();
        Rope {
            inv_freq,
            rotary_dim,
            prec,
            last: std::sync::Mutex::new(None),
        }
    }

    /// `(cos, sin)` tables `[T, rd]` for positions `start..start+t`, rounded to the model dtype, on `dev`
    /// (computed on the host: a few KB per call).
    pub fn tables(&self, start: usize, t: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let loc = dev.location();
        if let Ok(last) = self.last.lock() {
            if let Some((s0, t0, l0, c, s)) = last.as_ref() {
                if (*s0, *t0, *l0) == (start, t, loc) {
                    return Ok((c.clone(), s.clone()));
                }
            }
        }
        let half = self.rotary_dim / 2;
        let mut cos = Vec::with_capacity(t * self.rotary_dim);
        let mut sin = Vec::with_capacity(t * self.rotary_dim);
        for p in start..start + t {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            cos.extend(angles.iter().map(|a| a.cos()));
            sin.extend(angles.iter().map(|a| a.sin()));
            // emb = cat(freqs, freqs): the second half repeats the first
            let at = cos.len() - half;
            cos.extend_from_within(at..);
            sin.extend_from_within(at..);
        }
        let mut cos_t = Tensor::from_vec(cos, (t, self.rotary_dim), &Device::Cpu)?;
        let mut sin_t = Tensor::from_vec(sin, (t, self.rotary_dim), &Device::Cpu)?;
        cos_t = self.prec.round(&cos_t)?;
        sin_t = self.prec.round(&sin_t)?;
        let (cos_t, sin_t) = (cos_t.to_device(dev)?, sin_t.to_device(dev)?);
        if let Ok(mut last) = self.last.lock() {
            *last = Some((start, t, loc, cos_t.clone(), sin_t.clone()));
        }
        Ok((cos_t, sin_t))
    }

    /// Apply to `x: [heads, T, hd]` with tables `[T, rd]`: `R(R(x·cos) + R(rot(x)·sin))` on the rotary slice.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let p = self.prec;
        let rd = self.rotary_dim;
        let hd = x.dim(D::Minus1)?;
        let x_rot = x.narrow(D::Minus1, 0, rd)?;
        let x1 = x_rot.narrow(D::Minus1, 0, rd / 2)?;
        let x2 = x_rot.narrow(D::Minus1, rd / 2, rd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let a = p.round(&x_rot.broadcast_mul(cos)?)?;
        let b = p.round(&rotated.broadcast_mul(sin)?)?;
        let out = p.round(&(a + b)?)?;
        if rd == hd {
            Ok(out)
        } else {
            Ok(Tensor::cat(
                &[&out, &x.narrow(D::Minus1, rd, hd - rd)?],
                D::Minus1,
            )?)
        }
    }
}

/// Rotary embedding as one op for the portable path: `x: [T, H, hd]` (heads innermost, as the q/k norms
/// write them; any activation dtype), tables `[T, rd]` f32. Returns `[H/groups, T, groups, hd]` stored as
/// `out` — heads first for `groups = 1` (keys), and for queries the GQA layout in which kv head `j`'s
/// score rows are (position, group) pairs, so that a block of positions is a contiguous range of rows
/// (`attention::blocked`). Each element is `R(R(x·cos) + R(rot(x)·sin))` on the rotary slice and `x`
/// after it, exactly as [`Rope::apply`] (products and the sum rounded separately, no FMA).
pub fn rotate_grouped(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    groups: usize,
    prec: Precision,
    out: candle_core::DType,
) -> Result<Tensor> {
    let op = RotateGrouped { groups, prec, out };
    Ok(x.contiguous()?
        .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)?)
}

struct RotateGrouped {
    groups: usize,
    prec: Precision,
    out: candle_core::DType,
}

impl RotateGrouped {
    /// `(T, H, hd, rd)` after checking the operands.
    fn dims(
        &self,
        x: &candle_core::Layout,
        cos: &candle_core::Layout,
        sin: &candle_core::Layout,
    ) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (t, h, hd) = x.shape().dims3()?;
        let (tc, rd) = cos.shape().dims2()?;
        let ok = tc == t
            && sin.shape() == cos.shape()
            && rd <= hd
            && rd % 2 == 0
            && self.groups > 0
            && h % self.groups == 0;
        if !ok {
            candle_core::bail!(
                "rope: expected x [T, H, hd], tables [T, rd ≤ hd] and H a multiple of {} groups; got {:?}, {:?}",
                self.groups,
                x.shape(),
                cos.shape()
            );
        }
        Ok((t, h, hd, rd))
    }
}

impl candle_core::CustomOp3 for RotateGrouped {
    fn name(&self) -> &'static str {
        "qgate-rope-grouped"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use super::act_io::{f32_of, storage_of};
        let (t, h, hd, rd) = self.dims(l1, l2, l3)?;
        let x = f32_of(s1, l1, t * h * hd, "rope")?;
        let cos = f32_of(s2, l2, t * rd, "rope")?;
        let sin = f32_of(s3, l3, t * rd, "rope")?;
        let (p, g, half) = (self.prec, self.groups, rd / 2);
        let mut out = vec![0f32; t * h * hd];
        for ti in 0..t {
            for hi in 0..h {
                let xr = &x[(ti * h + hi) * hd..][..hd];
                let o0 = ((hi / g * t + ti) * g + hi % g) * hd;
                let o = &mut out[o0..o0 + hd];
                for d in 0..rd {
                    let rot = if d < half {
                        -xr[d + half]
                    } else {
                        xr[d - half]
                    };
                    let a = p.round_scalar(xr[d] * cos[ti * rd + d]);
                    let b = p.round_scalar(rot * sin[ti * rd + d]);
                    o[d] = p.round_scalar(a + b);
                }
                o[rd..].copy_from_slice(&xr[rd..]);
            }
        }
        let shape = (h / g, t, g, hd);
        Ok((storage_of(out, self.out)?, candle_core::Shape::from(shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use super::act_io;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let (t, h, hd, rd) = self.dims(l1, l2, l3)?;
        let dev = s1.device().clone();
        let xs = act_io::view(s1, l1)?;
        let (cs, ss) = (
            super::device::cuda_f32(s2, l2)?,
            super::device::cuda_f32(s3, l3)?,
        );
        let n = t * h * hd;
        // SAFETY: the kernel writes all n elements.
        let out = unsafe { act_io::Out::alloc(&dev, self.out, n)? };
        let func = dev.get_or_load_custom_func("qgate_rope_grouped", "qgate_rope", rope_ptx()?)?;
        let ints = [
            t as i32,
            h as i32,
            hd as i32,
            rd as i32,
            self.groups as i32,
            super::precision::round_code(self.prec),
            xs.code(),
            out.code(),
        ];
        let mut b = func.builder();
        xs.push(&mut b);
        b.arg(&cs);
        b.arg(&ss);
        out.push(&mut b);
        let n64 = n as i64;
        b.arg(&n64);
        for i in &ints {
            b.arg(i);
        }
        // SAFETY: reads n elements of x and t·rd of each table, writes n, as allocated, in the dtypes coded.
        unsafe { b.launch(super::device::grid_stride(n)) }.w()?;
        let shape = candle_core::Shape::from((h / self.groups, t, self.groups, hd));
        Ok((out.storage(dev), shape))
    }
}

// Products and the sum with explicit _rn intrinsics (no FMA contraction), as the host rounds them.
#[cfg(feature = "cuda")]
const ROPE_KERNEL: &str = r#"
// Thread per output element (grid-stride): out [H/g, T, g, hd] from x [T, H, hd].
extern "C" __global__ void qgate_rope_grouped(const void* x, const float* cs, const float* sn, void* out, long n,
                                              int t, int h, int hd, int rd, int g, int mode, int xt, int ot) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const int d = (int)(i % hd);
        const long r = i / hd;               // ((j·T + ti)·g + gi)
        const int gi = (int)(r % g);
        const long jt = r / g;
        const int ti = (int)(jt % t);
        const int hi = (int)(jt / t) * g + gi;
        const long x0 = ((long)ti * h + hi) * hd;
        float v;
        if (d < rd) {
            const int half = rd >> 1;
            const float rot = d < half ? -ld(x, x0 + d + half, xt) : ld(x, x0 + d - half, xt);
            const float a = rnd(__fmul_rn(ld(x, x0 + d, xt), cs[(long)ti * rd + d]), mode);
            const float b = rnd(__fmul_rn(rot, sn[(long)ti * rd + d]), mode);
            v = rnd(__fadd_rn(a, b), mode);
        } else {
            v = ld(x, x0 + d, xt);
        }
        st(out, i, v, ot);
    }
}
"#;

#[cfg(feature = "cuda")]
fn rope_ptx() -> candle_core::Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::device::nvrtc_ptx_with_rounding(&PTX, ROPE_KERNEL, "the RoPE kernel")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::noise;
    use candle_core::DType;

    /// The one-op rotation is `apply` on heads-first `x`, reordered to `[H/g, T, g, hd]`, bit for bit,
    /// and it stores the dtype asked for.
    #[test]
    fn rotate_grouped_is_apply_reordered() {
        let dev = Device::Cpu;
        let (t, h, hd, rd, g) = (5, 4, 16, 8, 2);
        for p in [Precision::F32, Precision::BF16, Precision::F16] {
            let rope = Rope::new(1e4, rd, p);
            let (cos, sin) = rope.tables(3, t, &dev).unwrap();
            let x = p
                .round(&Tensor::from_vec(noise(t * h * hd, 4), (t, h, hd), &dev).unwrap())
                .unwrap();
            let heads_first = x.transpose(0, 1).unwrap().contiguous().unwrap();
            let want = rope
                .apply(&heads_first, &cos, &sin)
                .unwrap()
                .reshape((h / g, g, t, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            let out = p.half_dtype().unwrap_or(DType::F32);
            let got = rotate_grouped(&x, &cos, &sin, g, p, out).unwrap();
            assert_eq!(got.dtype(), out);
            assert_eq!(got.dims(), [h / g, t, g, hd]);
            let bits = |x: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = x
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                v.iter().map(|v| v.to_bits()).collect()
            };
            assert_eq!(bits(&got), bits(&want), "{}", p.name());
            let unrotated = x
                .reshape((t, h / g, g, hd))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap();
            assert_ne!(bits(&got), bits(&unrotated), "degenerate test");
        }
    }
}
