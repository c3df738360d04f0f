//! Gated DeltaNet (`linear_attn`): projections, causal depthwise conv + SiLU over q|k|v, GVA head
//! mapping, L2 norm, β and g, the delta rule (chunked for sequences, recurrent for cached single steps),
//! gated RMSNorm and out_proj.
use super::config::TextConfig;
use super::delta_chunk_prep;
use super::delta_rule::{self, DeltaInputs};
use super::delta_rule_portable;
use super::gdn_prep;
use super::mlp::{linear, linear_to, LinearWeight};
use super::norms::GatedRmsNorm;
use super::precision::{with_f32_slice, Precision};
use super::weights::WeightStore;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// What a GDN layer carries between calls: the last `K-1` pre-conv `qkv` rows (`[K-1, C]`) and the
/// f32 state (`[Hv, Dk, Dv]`, never rounded, as HF).
pub struct GdnCache {
    pub carried: Carried,
    pub seen: usize,
}

/// The carried rows and state, where the layer's kernels keep them.
pub enum Carried {
    /// Host kernels: zeros before the first token.
    Host {
        conv_history: Vec<f32>,
        state: Vec<f32>,
    },
    /// Portable kernels: tensors on the device, made at the first call.
    Device {
        conv_history: Option<Tensor>,
        state: Option<Tensor>,
    },
}

pub struct GatedDeltaNet {
    in_proj_qkv: LinearWeight,
    in_proj_z: LinearWeight,
    in_proj_b: LinearWeight,
    in_proj_a: LinearWeight,
    conv_weight_t: Vec<f32>, // [K, C]: tap-major, so the conv loop runs along channels
    a_log: Vec<f32>,
    dt_bias: Vec<f32>,
    norm: GatedRmsNorm,
    out_proj: LinearWeight,
    hk: usize,
    hv: usize,
    dk: usize,
    dv: usize,
    kernel: usize,
    prec: Precision,
    /// Tensor-op kernels on the weights' device (see `device`); `None`: the host kernels.
    portable: Option<PortableGdn>,
}

/// The small per-layer tensors the portable kernels need on the device.
struct PortableGdn {
    conv_weight_t: Tensor, // [K, C]
    params: Tensor,        // [2, Hv]: dt_bias, −exp(A_log)
}

impl GatedDeltaNet {
    /// `prefix`: full name prefix ending in `linear_attn.`.
    pub fn new(cfg: &TextConfig, ws: &WeightStore, prefix: &str, prec: Precision) -> Result<Self> {
        let h = cfg.hidden_size;
        let (hk, hv, dk, dv) = (
            cfg.linear_num_key_heads,
            cfg.linear_num_value_heads,
            cfg.linear_key_head_dim,
            cfg.linear_value_head_dim,
        );
        let c = 2 * hk * dk + hv * dv;
        let kernel = cfg.linear_conv_kernel_dim;
        let vec = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            Ok(ws
                .load(&format!("{prefix}{name}"), shape, prec)?
                .flatten_all()?
                .to_vec1()?)
        };
        let conv_weight_t: Vec<f32> = {
            let w = vec("conv1d.weight", &[c, 1, kernel])?;
            (0..kernel * c)
                .map(|i| w[(i % c) * kernel + i / c])
                .collect()
        };
        let a_log = vec("A_log", &[hv])?;
        let dt_bias = vec("dt_bias", &[hv])?;
        let portable = if ws.portable_kernels() {
            let dev = ws.device();
            let neg_a: Vec<f32> = a_log.iter().map(|a| -a.exp()).collect();
            let params: Vec<f32> = dt_bias.iter().copied().chain(neg_a).collect();
            Some(PortableGdn {
                conv_weight_t: Tensor::from_slice(&conv_weight_t, (kernel, c), dev)?,
                params: Tensor::from_vec(params, (2, hv), dev)?,
            })
        } else {
            None
        };
        Ok(GatedDeltaNet {
            in_proj_qkv: ws.load_linear(&format!("{prefix}in_proj_qkv.weight"), &[c, h], prec)?,
            in_proj_z: ws.load_linear(&format!("{prefix}in_proj_z.weight"), &[hv * dv, h], prec)?,
            in_proj_b: ws.load_linear(&format!("{prefix}in_proj_b.weight"), &[hv, h], prec)?,
            in_proj_a: ws.load_linear(&format!("{prefix}in_proj_a.weight"), &[hv, h], prec)?,
            conv_weight_t,
            a_log,
            dt_bias,
            norm: GatedRmsNorm::new(
                ws,
                &format!("{prefix}norm.weight"),
                dv,
                cfg.rms_norm_eps,
                prec,
            )?,
            out_proj: ws.load_linear(&format!("{prefix}out_proj.weight"), &[h, hv * dv], prec)?,
            hk,
            hv,
            dk,
            dv,
            kernel,
            prec,
            portable,
        })
    }

    pub fn empty_cache(&self) -> GdnCache {
        let c = 2 * self.hk * self.dk + self.hv * self.dv;
        let carried = if self.portable.is_some() {
            Carried::Device {
                conv_history: None,
                state: None,
            }
        } else {
            Carried::Host {
                conv_history: vec![0.0; (self.kernel - 1) * c],
                state: vec![0.0; self.hv * self.dk * self.dv],
            }
        };
        GdnCache { carried, seen: 0 }
    }

    pub fn forward(&self, h: &Tensor, cache: &mut GdnCache) -> Result<Tensor> {
        let (conv_history, state) = match (&self.portable, &mut cache.carried) {
            (
                Some(pg),
                Carried::Device {
                    conv_history,
                    state,
                },
            ) => return self.forward_portable(pg, h, conv_history, state, &mut cache.seen),
            (
                None,
                Carried::Host {
                    conv_history,
                    state,
                },
            ) => (conv_history, state),
            _ => return Err(Error::Internal("GDN cache made for other kernels".into())),
        };
        let p = self.prec;
        let (t, _) = h.dims2()?;
        let (hk, hv, dk, dv, kk) = (self.hk, self.hv, self.dk, self.dv, self.kernel);
        let c = 2 * hk * dk + hv * dv;
        let qkv_t = linear(h, &self.in_proj_qkv, p)?;
        let z = linear(h, &self.in_proj_z, p)?;
        let b: Vec<f32> = linear(h, &self.in_proj_b, p)?.flatten_all()?.to_vec1()?;
        let a: Vec<f32> = linear(h, &self.in_proj_a, p)?.flatten_all()?.to_vec1()?;

        // Causal depthwise conv over all C channels (f32 accumulation over the K taps in order), then
        // R, SiLU, R. Row `i` of the conv input is the K-1 cached pre-conv rows followed by this
        // call's rows (read in place, not concatenated).
        let hist = kk - 1;
        let history = std::mem::take(conv_history);
        let (conv, new_history) = with_f32_slice(&qkv_t, |qkv| {
            let row_at = |i: usize| -> &[f32] {
                if i < hist {
                    &history[i * c..(i + 1) * c]
                } else {
                    &qkv[(i - hist) * c..(i - hist + 1) * c]
                }
            };
            // One row per task (rows are independent): the taps in order, then R, SiLU, R.
            let mut conv = vec![0f32; t * c];
            let conv_row = |(ti, out): (usize, &mut [f32])| {
                let mut e = vec![0f32; out.len()];
                super::cpu::vectorised(|| {
                    for j in 0..kk {
                        let src = row_at(ti + j);
                        for ((o, x), w) in out
                            .iter_mut()
                            .zip(src)
                            .zip(self.conv_weight_t[j * c..(j + 1) * c].iter())
                        {
                            *o += w * x;
                        }
                    }
                    for (e, &x) in e.iter_mut().zip(out.iter()) {
                        *e = -p.round_scalar(x);
                    }
                });
                // R, then SiLU (`r / (1 + exp(-r))`), then R
                super::expf::exp_in_place(&mut e);
                super::cpu::vectorised(|| {
                    for (x, e) in out.iter_mut().zip(&e) {
                        let r = p.round_scalar(*x);
                        *x = p.round_scalar(r / (1.0 + e));
                    }
                })
            };
            if t > 1 {
                conv.par_chunks_mut(c).enumerate().for_each(conv_row);
            } else {
                conv.chunks_mut(c).enumerate().for_each(conv_row);
            }
            // Keep the last K-1 pre-conv rows for the next call.
            let mut new_history = Vec::with_capacity(hist * c);
            for i in t..t + hist {
                new_history.extend_from_slice(row_at(i));
            }
            (conv, new_history)
        })?;
        *conv_history = new_history;

        // Split q | k | v (head-major), expand key heads to value heads (head j uses key head j / r),
        // L2-normalise q and k (eps 1e-6 inside the root), all f32.
        let r = hv / hk;
        let mut q = vec![0f32; hv * t * dk];
        let mut k = vec![0f32; hv * t * dk];
        let mut v = vec![0f32; hv * t * dv];
        // One value head per task.
        q.par_chunks_mut(t * dk)
            .zip(k.par_chunks_mut(t * dk))
            .zip(v.par_chunks_mut(t * dv))
            .enumerate()
            .for_each(|(j, ((qh, kh_out), vh))| {
                let kh = j / r;
                for ti in 0..t {
                    let row = &conv[ti * c..(ti + 1) * c];
                    let qs = &row[kh * dk..(kh + 1) * dk];
                    let ks = &row[hk * dk + kh * dk..hk * dk + (kh + 1) * dk];
                    let vs = &row[2 * hk * dk + j * dv..2 * hk * dk + (j + 1) * dv];
                    l2_normalise_into(qs, &mut qh[ti * dk..(ti + 1) * dk]);
                    l2_normalise_into(ks, &mut kh_out[ti * dk..(ti + 1) * dk]);
                    vh[ti * dv..(ti + 1) * dv].copy_from_slice(vs);
                }
            });
        // β = R(sigmoid(b)); g = -exp(A_log) · softplus(a + dt_bias) in f32 (not rounded).
        let mut beta = vec![0f32; hv * t];
        let mut g = vec![0f32; hv * t];
        for ti in 0..t {
            for j in 0..hv {
                beta[j * t + ti] = p.round_scalar(1.0 / (1.0 + (-b[ti * hv + j]).exp()));
                g[j * t + ti] = -self.a_log[j].exp() * softplus(a[ti * hv + j] + self.dt_bias[j]);
            }
        }
        let inputs = DeltaInputs {
            heads: hv,
            t,
            dk,
            dv,
            q: &q,
            k: &k,
            v: &v,
            beta: &beta,
            g: &g,
        };
        // HF: recurrent form only for a single token with an existing state; chunked otherwise.
        let mut o = if t == 1 && cache.seen > 0 {
            delta_rule::recurrent(&inputs, state)
        } else {
            delta_rule::chunked(&inputs, state)
        };
        cache.seen += t;
        p.round_slice(&mut o);
        // o is [Hv, T, Dv]; the norm reads it in [T, Hv, Dv] order (row ti·Hv + j is o's row j·T + ti).
        let o = Tensor::from_vec(o, (hv * t, dv), &Device::Cpu)?;
        let z = z.reshape((t * hv, dv))?;
        let y = self
            .norm
            .forward_gathered(&o, &z, |r| (r % hv) * t + r / hv)?
            .reshape((t, hv * dv))?;
        linear(&y, &self.out_proj, p)
    }
}

impl GatedDeltaNet {
    /// `forward` as tensor ops on `h`'s device: the same arithmetic as the host path step by step
    /// (conv taps accumulated in order, the same rounding points), the delta rule from
    /// `delta_rule_portable`.
    fn forward_portable(
        &self,
        pg: &PortableGdn,
        h: &Tensor,
        conv_history: &mut Option<Tensor>,
        state: &mut Option<Tensor>,
        seen: &mut usize,
    ) -> Result<Tensor> {
        let p = self.prec;
        let dev = h.device();
        let (t, _) = h.dims2()?;
        let (hk, hv, dk, dv, kk) = (self.hk, self.hv, self.dk, self.dv, self.kernel);
        let c = 2 * hk * dk + hv * dv;
        // Products' outputs stored in the model dtype where our kernels read them (`act_io`).
        let io = super::act_io::storage_dtype(p, true);
        let qkv = linear_to(h, &self.in_proj_qkv, p, io)?;
        let z = linear_to(h, &self.in_proj_z, p, io)?;
        let b = linear(h, &self.in_proj_b, p)?;
        let a = linear(h, &self.in_proj_a, p)?;

        // Causal depthwise conv (taps in order), R, SiLU, R; q, k L2-normalised and expanded to value
        // heads; heads first — one op (`gdn_prep`: one kernel on a GPU).
        let hist = kk - 1;
        let history = match conv_history.take() {
            Some(x) => x,
            None => Tensor::zeros((hist, c), qkv.dtype(), dev)?,
        };
        let dims = gdn_prep::Dims { hk, hv, dk, dv };
        let conv = gdn_prep::conv_qkv(&history, &qkv, &pg.conv_weight_t, dims, p)?;
        *conv_history = Some(if t >= hist {
            super::strided_copy::copy(&qkv.narrow(0, t - hist, hist)?)?
        } else {
            Tensor::cat(&[&history, &qkv], 0)?
                .narrow(0, t, hist)
                .and_then(|x| super::strided_copy::copy(&x))?
        });

        // β = R(sigmoid(b)); g = −exp(A_log) · softplus(a + dt_bias), f32: [Hv, T] — one op.
        let bg = gdn_prep::beta_g(&b, &a, &pg.params, p)?;

        let initial = match state.take() {
            Some(s) => s,
            None => Tensor::zeros((hv, dk, dv), candle_core::DType::F32, dev)?,
        };
        let (o, new_state) = if t == 1 && *seen > 0 {
            let (q, k, v) = gdn_prep::split_qkv(&conv, dims, t)?;
            delta_rule_portable::recurrent(&q, &k, &v, &bg.get(0)?, &bg.get(1)?, &initial)?
        } else {
            let d = delta_chunk_prep::Dims { h: hv, t, dk, dv };
            delta_rule_portable::chunked(&conv, &bg, d, &initial)?
        };
        *state = Some(new_state);
        *seen += t;
        // R(o), heads first → [T, Hv, Dv], the gated norm: one op.
        let z = z.reshape((t, hv, dv))?;
        let y = self.norm.forward_heads_first(&o, &z, io)?;
        let y = y.reshape((t, hv * dv))?;
        linear_to(&y, &self.out_proj, p, io)
    }
}

/// `x · rsqrt(Σx² + 1e-6)` (sum, not mean; HF's l2norm).
pub(crate) fn l2_normalise_into(x: &[f32], out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss + 1e-6).sqrt();
    for (o, v) in out.iter_mut().zip(x) {
        *o = v * inv;
    }
}

/// torch softplus (β = 1, threshold 20): `x` above the threshold, else `log1p(exp(x))`.
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}
