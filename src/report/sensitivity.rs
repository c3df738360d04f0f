//! The sensitivity map, the mix search and `qgate locate` as text: a table (markdown, also printed on the
//! terminal), CSV, and the heat map (layers × components, SVG). Formats what the map measured; decides
//! nothing.
use crate::error::{Error, Result};
use crate::gate::policy::Policy;
use crate::quant::locate::{Located, Trend};
use crate::quant::scheme::Component;
use crate::quant::search::{Action, Found, SearchOutcome};
use crate::quant::sensitivity::SensitivityMap;
use crate::report::markdown::human_size;
use plotters::prelude::*;
use std::fmt::Write;

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "not computed".into())
}

/// The map as a markdown table, most harmful part first.
pub fn table(m: &SensitivityMap, policy: &Policy) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Sensitivity map: each part alone at {}, the rest unquantized ({} compute); {} counted positions, teacher-forced. Harm = introduced confident flips + mean KL / max_mean_kl + (1 − min cos) / (1 − min_cosine).\n",
        m.method, m.compute, m.positions_counted
    );
    let _ = writeln!(
        o,
        "| rank | part | introduced flips | confident flips | mean KL | min cos | harm | size at {} | unquantized | layers run |",
        m.method
    );
    let _ = writeln!(o, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, r) in m.ranked(policy).iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {:.3} | {} | {} | {}/{} |",
            i + 1,
            r.label,
            r.introduced_confident_flips,
            r.confident_flips,
            opt(r.mean_kl, 5),
            opt(r.min_cosine, 4),
            r.harm(policy),
            human_size(r.bytes_low),
            human_size(r.bytes_plain),
            r.layers_run,
            m.layers
        );
    }
    let skipped: Vec<&String> = m.parts.iter().flat_map(|r| &r.skipped).collect();
    if !skipped.is_empty() {
        let _ = writeln!(o, "\nLeft unquantized by {} (as exporters do):", m.method);
        for s in skipped {
            let _ = writeln!(o, "- {s}");
        }
    }
    let _ = writeln!(
        o,
        "\nPrefix reuse: {} decoder-layer passes over the plan instead of {} ({} parts × {} layers), {:.1} s.",
        m.layer_passes,
        m.layer_passes_naive,
        m.parts.len(),
        m.layers,
        m.seconds
    );
    o
}

/// One row per part.
pub fn csv(m: &SensitivityMap, policy: &Policy) -> String {
    let mut o = String::from(
        "part,component,layer,introduced_confident_flips,confident_flips,tie_flips,mean_kl,min_cosine,harm,bytes_low,bytes_plain,layers_run\n",
    );
    for r in &m.parts {
        let _ = writeln!(
            o,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            r.label,
            r.part.component.name(),
            r.part.layer.map(|l| l.to_string()).unwrap_or_default(),
            r.introduced_confident_flips,
            r.confident_flips,
            r.tie_flips,
            r.mean_kl.map(|x| x.to_string()).unwrap_or_default(),
            r.min_cosine.map(|x| x.to_string()).unwrap_or_default(),
            r.harm(policy),
            r.bytes_low,
            r.bytes_plain,
            r.layers_run
        );
    }
    o
}

/// White (no harm) to dark red (the most harmful part), on a log scale of harm.
fn colour(h: f64, max: f64) -> RGBColor {
    if h <= 0.0 || max <= 0.0 {
        return RGBColor(255, 255, 255);
    }
    let t = ((1.0 + h).ln() / (1.0 + max).ln()).clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(lerp(255.0, 165.0), lerp(245.0, 15.0), lerp(235.0, 21.0))
}

/// The heat map: one row per decoder layer (plus one for the head and the embedding), columns attention,
/// Gated DeltaNet, MLP / experts, head, embedding; each cell shows the introduced confident flips and the
/// mean KL, coloured by harm; parts a layer does not have are grey.
pub fn svg(m: &SensitivityMap, policy: &Policy) -> Result<String> {
    let err = |e: String| Error::Internal(format!("sensitivity.svg: {e}"));
    let cols = [
        Component::Attn,
        Component::Gdn,
        Component::Mlp,
        Component::Head,
        Component::Embed,
    ];
    let col_title = [
        "attention",
        "Gated DeltaNet",
        "MLP / experts",
        "head",
        "embedding",
    ];
    let rows = m.layers + 1;
    let (cw, ch, left, top) = (150i32, 30i32, 90i32, 70i32);
    let w = (left + cw * cols.len() as i32 + 20) as u32;
    let h = (top + ch * rows as i32 + 50) as u32;
    let max = m.parts.iter().map(|r| r.harm(policy)).fold(0.0, f64::max);
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let title = ("sans-serif", 16).into_font();
        let font = ("sans-serif", 12).into_font();
        let small = ("sans-serif", 11).into_font();
        root.draw(&Text::new(
            format!(
                "Sensitivity to {} (one part at a time; cell: introduced confident flips · mean KL)",
                m.method
            ),
            (10, 10),
            title,
        ))
        .map_err(|e| err(e.to_string()))?;
        for (ci, t) in col_title.iter().enumerate() {
            root.draw(&Text::new(
                t.to_string(),
                (left + ci as i32 * cw + 8, top - 20),
                font.clone(),
            ))
            .map_err(|e| err(e.to_string()))?;
        }
        for row in 0..rows {
            let y = top + row as i32 * ch;
            let name = if row < m.layers {
                format!("layer {row}")
            } else {
                "model".to_string()
            };
            root.draw(&Text::new(name, (10, y + 9), font.clone()))
                .map_err(|e| err(e.to_string()))?;
            for (ci, &c) in cols.iter().enumerate() {
                let x = left + ci as i32 * cw;
                let layer = (row < m.layers).then_some(row);
                let r = m
                    .parts
                    .iter()
                    .find(|r| r.part.component == c && r.part.layer == layer);
                let fill = match r {
                    Some(r) => colour(r.harm(policy), max),
                    None => RGBColor(225, 225, 225),
                };
                root.draw(&Rectangle::new(
                    [(x, y), (x + cw - 2, y + ch - 2)],
                    fill.filled(),
                ))
                .map_err(|e| err(e.to_string()))?;
                if let Some(r) = r {
                    let dark = r.harm(policy) > 0.5 * max && max > 0.0;
                    let tc = if dark { WHITE } else { BLACK };
                    root.draw(&Text::new(
                        format!(
                            "{} · {}",
                            r.introduced_confident_flips,
                            r.mean_kl
                                .map(|k| format!("{k:.4}"))
                                .unwrap_or_else(|| "n/c".into())
                        ),
                        (x + 8, y + 8),
                        small.clone().color(&tc),
                    ))
                    .map_err(|e| err(e.to_string()))?;
                }
            }
        }
        root.draw(&Text::new(
            format!(
                "colour: harm = flips + KL/max_mean_kl + (1-min cos)/(1-min_cosine), log scale, max {max:.2}; grey: the layer has no such part"
            ),
            (10, top + ch * rows as i32 + 15),
            small,
        ))
        .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(buf)
}

/// The search, step by step, and its answer.
pub fn search_md(s: &SearchOutcome) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Mix search {} → {}: {}\n", s.low, s.high, s.note);
    if let (Found::Mix | Found::AllLow, Some(mix)) = (s.found, &s.mix) {
        let _ = writeln!(o, "mix: `{mix}`");
        let _ = writeln!(
            o,
            "size: {} (all-{}: {}, saved {}; all-{}: {})\n",
            human_size(s.size_bytes.unwrap_or(0)),
            s.high,
            human_size(s.all_high_bytes),
            human_size(s.saved_bytes.unwrap_or(0)),
            s.low,
            human_size(s.all_low_bytes)
        );
        let _ = writeln!(
            o,
            "reproduce: `qgate simulate --scheme '{mix}' …` then `qgate run` on that capture\n"
        );
    }
    let _ = writeln!(
        o,
        "| step | action | part | size | introduced flips | gate |"
    );
    let _ = writeln!(o, "|---:|---|---|---:|---:|---|");
    for (i, st) in s.steps.iter().enumerate() {
        let action = match (st.action, st.kept) {
            (Action::AllHigh, _) => "all high".to_string(),
            (Action::AllLow, _) => "all low".to_string(),
            (Action::Promote, _) => "promote".to_string(),
            (Action::Demote, Some(true)) => "demote (kept)".to_string(),
            (Action::Demote, _) => "demote (reverted)".to_string(),
        };
        let gate = match st.failed_rule {
            Some(r) => format!("{} ({r})", st.status),
            None => st.status.to_string(),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            i,
            action,
            st.part.as_deref().unwrap_or(""),
            human_size(st.size_bytes),
            st.introduced_confident_flips,
            gate
        );
    }
    o
}

/// `qgate locate` as a table.
pub fn locate_md(l: &Located) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}\n", l.note);
    let _ = writeln!(
        o,
        "Residual stream after each layer, quantized vs unquantized (same compute), at {} position(s):\n",
        l.positions.len()
    );
    let _ = writeln!(
        o,
        "| layer | after | mean rel. error | added | max rel. error | min cosine |"
    );
    let _ = writeln!(o, "|---:|---|---:|---:|---:|---:|");
    let _ = writeln!(
        o,
        "| emb | embedding | {:.5} | {:.5} | | |",
        l.embedding_rel_err, l.embedding_rel_err
    );
    for e in &l.layers {
        let mark = if Some(e.layer) == l.entry_layer && Some(e.kind) == l.entry_block {
            " ← enters"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "| {}{} | {} | {:.5} | {:+.5} | {:.5} | {:.5} |",
            e.layer, mark, e.kind, e.mean_rel_err, e.added, e.max_rel_err, e.min_cosine
        );
    }
    if l.trend != Trend::NotApplicable {
        let _ = writeln!(
            o,
            "\ndownstream: {:?} ({:.2}× from the entry layer to the last)",
            l.trend,
            l.growth.unwrap_or(f64::NAN)
        );
    }
    o
}
