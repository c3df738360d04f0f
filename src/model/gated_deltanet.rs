//! Gated DeltaNet (`linear_attn`): projections, causal depthwise conv + SiLU over q|k|v, GVA head
//! mapping, L2 norm, β and g, the delta rule (chunked for sequences, recurrent for cached single steps),
//! gated RMSNorm and out_proj.
use super::config::TextConfig;
use super::delta_rule::{self, DeltaInputs};
use super::mlp::{linear, LinearWeight};
use super::norms::GatedRmsNorm;
use super::precision::{with_f32_slice, Precision};
use super::weights::WeightStore;
use crate::error::Result;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// What a GDN layer carries between calls: the last `K-1` pre-conv `qkv` rows and the f32 state.
pub struct GdnCache {
    /// `[K-1, C]`, zeros before the first token.
    pub conv_history: Vec<f32>,
    /// `[Hv, Dk, Dv]`, f32 (never rounded, as HF).
    pub state: Vec<f32>,
    pub seen: usize,
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
        Ok(GatedDeltaNet {
            in_proj_qkv: ws.load_linear(&format!("{prefix}in_proj_qkv.weight"), &[c, h], prec)?,
            in_proj_z: ws.load_linear(&format!("{prefix}in_proj_z.weight"), &[hv * dv, h], prec)?,
            in_proj_b: ws.load_linear(&format!("{prefix}in_proj_b.weight"), &[hv, h], prec)?,
            in_proj_a: ws.load_linear(&format!("{prefix}in_proj_a.weight"), &[hv, h], prec)?,
            conv_weight_t: {
                let w = vec("conv1d.weight", &[c, 1, kernel])?;
                (0..kernel * c)
                    .map(|i| w[(i % c) * kernel + i / c])
                    .collect()
            },
            a_log: vec("A_log", &[hv])?,
            dt_bias: vec("dt_bias", &[hv])?,
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
        })
    }

    pub fn empty_cache(&self) -> GdnCache {
        let c = 2 * self.hk * self.dk + self.hv * self.dv;
        GdnCache {
            conv_history: vec![0.0; (self.kernel - 1) * c],
            state: vec![0.0; self.hv * self.dk * self.dv],
            seen: 0,
        }
    }

    pub fn forward(&self, h: &Tensor, cache: &mut GdnCache) -> Result<Tensor> {
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
        let history = std::mem::take(&mut cache.conv_history);
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
                // R, then SiLU (`r / (1 + exp(-r))`), then R
                let mut e: Vec<f32> = out.iter().map(|&x| -p.round_scalar(x)).collect();
                super::expf::exp_in_place(&mut e);
                for (x, e) in out.iter_mut().zip(&e) {
                    let r = p.round_scalar(*x);
                    *x = p.round_scalar(r / (1.0 + e));
                }
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
        cache.conv_history = new_history;

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
            delta_rule::recurrent(&inputs, &mut cache.state)
        } else {
            delta_rule::chunked(&inputs, &mut cache.state)
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
