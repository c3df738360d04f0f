//! Which weights a scheme quantizes, and the `WeightTransform` that fake-quantizes them at load.
//!
//! Quantized: every linear weight of the decoder layers — attention q/k/v/o, delta-net in_proj_qkv / z / b /
//! a and out_proj, MLP, routed experts (fused `[E, out, in]` or per expert) and the shared expert — plus
//! the head when the scheme gives it a method, and the embedding when the scheme names it (`embed=…`).
//! A mix can give one layer's component its own method (`mlp@2=…`). Never: norms, conv1d, A_log, dt_bias, the MoE
//! router (`mlp.gate`) and the shared-expert gate. A weight whose input dimension is not divisible by the
//! block size (or, for palettization, whose output rows do not split into groups) is left unquantized, as
//! the exporters do, and listed in `skipped`.
use super::kmeans;
use super::linear::{self, ScaleDtype};
use super::scheme::{Component, FloatDtype, Method, Scheme};
use crate::error::Result;
use crate::model::weights::WeightTransform;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The component a weight belongs to, or `None` for weights that are never quantized.
pub fn classify(name: &str) -> Option<Component> {
    classify_at(name).map(|(c, _)| c)
}

/// The component a weight belongs to and its decoder layer (`None` for the head and the embedding).
pub fn classify_at(name: &str) -> Option<(Component, Option<usize>)> {
    if name == "lm_head.weight" {
        return Some((Component::Head, None));
    }
    if name == "embed_tokens.weight" {
        return Some((Component::Embed, None));
    }
    let rest = name.strip_prefix("layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let layer: usize = l.parse().ok()?;
    layer_component(rest).map(|c| (c, Some(layer)))
}

/// The component of a layer-relative weight name (`self_attn.q_proj.weight`, `mlp.down_proj.weight`).
fn layer_component(rest: &str) -> Option<Component> {
    if let Some(p) = rest.strip_prefix("self_attn.") {
        return matches!(
            p,
            "q_proj.weight" | "k_proj.weight" | "v_proj.weight" | "o_proj.weight"
        )
        .then_some(Component::Attn);
    }
    if let Some(p) = rest.strip_prefix("linear_attn.") {
        return matches!(
            p,
            "in_proj_qkv.weight"
                | "in_proj_z.weight"
                | "in_proj_b.weight"
                | "in_proj_a.weight"
                | "out_proj.weight"
        )
        .then_some(Component::Gdn);
    }
    if let Some(p) = rest.strip_prefix("mlp.") {
        let proj = |s: &str| {
            matches!(
                s,
                "gate_proj.weight" | "up_proj.weight" | "down_proj.weight"
            )
        };
        let hit = proj(p)
            || matches!(p, "experts.gate_up_proj" | "experts.down_proj")
            || p.strip_prefix("shared_expert.").is_some_and(proj)
            || p.strip_prefix("experts.")
                .and_then(|e| e.split_once('.'))
                .is_some_and(|(i, s)| i.parse::<usize>().is_ok() && proj(s));
        return hit.then_some(Component::Mlp);
    }
    None
}

/// One weight as the simulated bundle stores it.
#[derive(Debug, Clone, Serialize)]
pub struct WeightRecord {
    pub name: String,
    pub shape: Vec<usize>,
    /// The method applied (`int8-b32-symclip`, `f16`, …) or `keep`.
    pub method: String,
    /// Bytes in the simulated bundle (packed codes + scales or LUTs; 2 bytes per element otherwise).
    pub bytes: u64,
}

/// A weight the scheme would quantize but cannot (exporters skip these silently).
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub name: String,
    pub shape: Vec<usize>,
    pub method: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct QuantReport {
    pub weights: Vec<WeightRecord>,
    pub skipped: Vec<Skipped>,
}

impl QuantReport {
    pub fn size_bytes(&self) -> u64 {
        self.weights.iter().map(|w| w.bytes).sum()
    }
    pub fn quantized(&self) -> usize {
        self.weights
            .iter()
            .filter(|w| {
                w.method != "keep" && !w.method.starts_with('f') && !w.method.starts_with('b')
            })
            .count()
    }
}

pub struct QuantTransform {
    pub scheme: Scheme,
    pub scale_dtype: ScaleDtype,
    report: Mutex<QuantReport>,
    nanos: AtomicU64,
}

fn round_float(v: &mut [f32], d: FloatDtype) {
    match d {
        FloatDtype::F16 => v
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        FloatDtype::BF16 => v
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
    }
}

impl QuantTransform {
    pub fn new(scheme: Scheme, scale_dtype: ScaleDtype) -> Self {
        QuantTransform {
            scheme,
            scale_dtype,
            report: Mutex::new(QuantReport::default()),
            nanos: AtomicU64::new(0),
        }
    }

    /// Seconds spent quantizing so far (the load's overhead over the oracle's).
    pub fn seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// What was loaded so far, in load order.
    pub fn report(&self) -> QuantReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Fake-quantize `data` (shape `shape`, row-major) in place; returns the method name and the bytes.
    pub fn quantize(
        &self,
        name: &str,
        shape: &[usize],
        data: &mut [f32],
    ) -> (String, u64, Option<Skipped>) {
        let numel = data.len() as u64;
        let plain = numel * 2;
        let method = classify_at(name).and_then(|(c, l)| self.scheme.method_at(c, l));
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let rows = if shape.len() >= 2 {
            shape[shape.len() - 2]
        } else {
            1
        };
        let skip = |m: &Method, reason: String| Skipped {
            name: name.to_string(),
            shape: shape.to_vec(),
            method: m.canonical(),
            reason,
        };
        let rest = |data: &mut [f32]| {
            if let Some(d) = self.scheme.rest {
                round_float(data, d);
                (Method::Float { dtype: d }.canonical(), plain)
            } else {
                ("keep".to_string(), plain)
            }
        };
        match method {
            None => {
                let (m, b) = rest(data);
                (m, b, None)
            }
            Some(m @ Method::Float { dtype }) => {
                round_float(data, dtype);
                (m.canonical(), plain, None)
            }
            Some(m @ Method::Linear(spec)) => {
                if shape.len() < 2 || !linear::divisible(&spec, cols) {
                    let s = skip(
                        &m,
                        format!(
                            "input dimension {cols} is not divisible by the block size {}",
                            spec.block.unwrap_or(cols)
                        ),
                    );
                    let (mm, b) = rest(data);
                    return (mm, b, Some(s));
                }
                linear::fake_quant(data, cols, &spec, self.scale_dtype);
                let bytes = linear::storage_bytes(numel, cols as u64, &spec, self.scale_dtype);
                (m.canonical(), bytes, None)
            }
            Some(m @ Method::Kmeans { bits, group }) => {
                if shape.len() < 2 || rows % group != 0 {
                    let s = skip(
                        &m,
                        format!(
                            "output dimension {rows} does not split into groups of {group} rows"
                        ),
                    );
                    let (mm, b) = rest(data);
                    return (mm, b, Some(s));
                }
                kmeans::palettize(data, cols, bits, group, self.scale_dtype);
                let bytes =
                    kmeans::storage_bytes(numel, cols as u64, bits, group as u64, self.scale_dtype);
                (m.canonical(), bytes, None)
            }
        }
    }
}

impl WeightTransform for QuantTransform {
    fn apply(&self, name: &str, w: Tensor) -> Result<Tensor> {
        let t0 = std::time::Instant::now();
        let shape = w.dims().to_vec();
        let mut data: Vec<f32> = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let (method, bytes, skipped) = self.quantize(name, &shape, &mut data);
        if let Ok(mut r) = self.report.lock() {
            r.weights.push(WeightRecord {
                name: name.to_string(),
                shape: shape.clone(),
                method,
                bytes,
            });
            if let Some(s) = skipped {
                r.skipped.push(s);
            }
        }
        let out = Tensor::from_vec(data, shape, &Device::Cpu)?;
        self.nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(out)
    }

    fn untie_head(&self) -> bool {
        // a quantized embedding serves a tied head only when the head asks for the same method
        if self.scheme.embed.is_some_and(|m| !m.is_float()) {
            return self.scheme.head != self.scheme.embed;
        }
        match self.scheme.head {
            None => false,
            Some(Method::Float { dtype }) => self.scheme.rest != Some(dtype),
            Some(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_gets_quantized() {
        let yes = [
            ("layers.3.self_attn.q_proj.weight", Component::Attn),
            ("layers.3.self_attn.o_proj.weight", Component::Attn),
            ("layers.0.linear_attn.in_proj_qkv.weight", Component::Gdn),
            ("layers.0.linear_attn.in_proj_a.weight", Component::Gdn),
            ("layers.0.linear_attn.out_proj.weight", Component::Gdn),
            ("layers.1.mlp.down_proj.weight", Component::Mlp),
            ("layers.1.mlp.experts.gate_up_proj", Component::Mlp),
            ("layers.1.mlp.experts.down_proj", Component::Mlp),
            ("layers.1.mlp.experts.7.up_proj.weight", Component::Mlp),
            (
                "layers.1.mlp.shared_expert.gate_proj.weight",
                Component::Mlp,
            ),
            ("lm_head.weight", Component::Head),
        ];
        for (n, c) in yes {
            assert_eq!(classify(n), Some(c), "{n}");
        }
        assert_eq!(
            classify_at("layers.12.mlp.experts.3.up_proj.weight"),
            Some((Component::Mlp, Some(12)))
        );
        assert_eq!(
            classify_at("embed_tokens.weight"),
            Some((Component::Embed, None))
        );
        assert_eq!(classify_at("lm_head.weight"), Some((Component::Head, None)));
        for n in [
            "norm.weight",
            "layers.0.input_layernorm.weight",
            "layers.0.linear_attn.conv1d.weight",
            "layers.0.linear_attn.A_log",
            "layers.0.linear_attn.dt_bias",
            "layers.0.linear_attn.norm.weight",
            "layers.3.self_attn.q_norm.weight",
            "layers.1.mlp.gate.weight",
            "layers.1.mlp.shared_expert_gate.weight",
        ] {
            assert_eq!(classify(n), None, "{n}");
        }
    }

    #[test]
    fn skips_are_listed_and_sizes_counted() {
        let t = QuantTransform::new(Scheme::parse("int8lin").unwrap(), ScaleDtype::F16);
        let w = Tensor::ones((4, 48), DType::F32, &Device::Cpu).unwrap();
        let out = t.apply("layers.0.linear_attn.out_proj.weight", w).unwrap();
        assert_eq!(out.dims(), &[4, 48]);
        let w = Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap();
        t.apply("layers.0.mlp.up_proj.weight", w.clone()).unwrap();
        t.apply("layers.0.mlp.gate.weight", w).unwrap();
        let r = t.report();
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(r.skipped[0].name, "layers.0.linear_attn.out_proj.weight");
        assert!(
            r.skipped[0].reason.contains("48"),
            "{}",
            r.skipped[0].reason
        );
        assert_eq!(r.weights[0].method, "keep");
        assert_eq!(r.weights[1].method, "int8-b32-symclip");
        assert_eq!(r.weights[1].bytes, 256 + 8 * 2);
        assert_eq!(r.size_bytes(), 4 * 48 * 2 + 256 + 16 + 4 * 64 * 2);
        assert!(!t.untie_head());
        let h = QuantTransform::new(Scheme::parse("int8hu-headsym").unwrap(), ScaleDtype::F16);
        assert!(h.untie_head());
    }
}
