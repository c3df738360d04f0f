//! positions.svg: centred cosine per candidate (top, with the policy's min-cosine line) and the oracle
//! margin (bottom, with the floor) over the plan's positions, with each candidate's flips marked
//! (confident: filled, tie: hollow), sequence boundaries dashed, integer position ticks, axis titles on
//! both panels, and the legend in its own strip above the panels so it never covers data.
use crate::error::{Error, Result};
use crate::gate::margin_rule::FlipKind;
use crate::gate::metrics::OracleView;
use crate::report::csv::Rows;
use plotters::prelude::*;
use std::collections::HashMap;

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

/// What the plot shows besides the data: the policy's lines and the margin's unit.
pub struct Lines {
    pub floor: f64,
    pub min_cosine: Option<f64>,
    pub margin_unit: &'static str,
}

/// `views`: every oracle row in plan order; `cands`: each capture's positions and the gate's flips.
pub fn render(
    views: &[(usize, usize, OracleView)],
    cands: &[Rows<'_>],
    lines: &Lines,
) -> Result<String> {
    let err = |e: String| Error::Internal(format!("positions.svg: {e}"));
    let floor = lines.floor;
    let index: HashMap<(usize, usize), usize> = views
        .iter()
        .enumerate()
        .map(|(i, v)| ((v.0, v.1), i))
        .collect();
    let n = views.len().max(2) as f64;
    // first plan index of every sequence after the first
    let bounds: Vec<f64> = views
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[0].0 != w[1].0)
        .map(|(i, _)| i as f64 + 0.5)
        .collect();
    let mut lo = lines.min_cosine.map(|c| c - 0.005).unwrap_or(1.0).min(1.0);
    for r in cands {
        for m in r.positions.iter() {
            if let Some(c) = m.cosine_centred {
                lo = lo.min(c);
            }
        }
    }
    let lo = (lo - 0.005).max(-1.0);
    let mmax = views.iter().map(|v| v.2.margin).fold(floor, f64::max) * 1.05;
    let int_tick = |x: &f64| format!("{}", x.round() as i64);
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (1000, 680)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let (legend, rest) = root.split_vertically(40);
        let (top, bottom) = rest.split_vertically(320);

        // legend strip: one entry per capture, then the markers and lines
        let font = ("sans-serif", 14).into_font();
        let mut x = 70i32;
        for (ci, r) in cands.iter().enumerate() {
            let col = COLOURS[ci % COLOURS.len()];
            legend
                .draw(&PathElement::new(
                    vec![(x, 20), (x + 20, 20)],
                    col.stroke_width(2),
                ))
                .map_err(|e| err(e.to_string()))?;
            legend
                .draw(&Text::new(r.label.to_string(), (x + 25, 13), font.clone()))
                .map_err(|e| err(e.to_string()))?;
            x += 40 + 8 * r.label.chars().count() as i32;
        }
        let key = format!(
            "● confident flip  ○ tie-flip  — red: margin floor {floor}{}  ┆ sequence boundary",
            lines
                .min_cosine
                .map(|c| format!(", min cosine {c}"))
                .unwrap_or_default()
        );
        legend
            .draw(&Text::new(key, (x.max(70) + 10, 13), font.clone()))
            .map_err(|e| err(e.to_string()))?;

        let mut ch = ChartBuilder::on(&top)
            .caption("mean-centred cosine of logit rows", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(65)
            .build_cartesian_2d(0f64..n, lo..1.0f64)
            .map_err(|e| err(e.to_string()))?;
        ch.configure_mesh()
            .x_desc("position (plan order)")
            .y_desc("cosine")
            .x_label_formatter(&int_tick)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for &b in &bounds {
            ch.draw_series(DashedLineSeries::new(
                vec![(b, lo), (b, 1.0)],
                4,
                4,
                BLACK.mix(0.4).stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?;
        }
        if let Some(c) = lines.min_cosine {
            ch.draw_series(LineSeries::new(
                vec![(0.0, c), (n, c)],
                RED.mix(0.6).stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?;
        }
        for (ci, r) in cands.iter().enumerate() {
            let col = COLOURS[ci % COLOURS.len()];
            let pts: Vec<(f64, f64)> = r
                .positions
                .iter()
                .filter_map(|m| Some((*index.get(&(m.seq, m.pos))? as f64, m.cosine_centred?)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            ch.draw_series(LineSeries::new(pts, col.stroke_width(1)))
                .map_err(|e| err(e.to_string()))?;
        }

        let mut mc = ChartBuilder::on(&bottom)
            .caption(
                "oracle margin (top-1 − top-2); flips marked",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(65)
            .build_cartesian_2d(0f64..n, 0f64..mmax.max(1e-6))
            .map_err(|e| err(e.to_string()))?;
        mc.configure_mesh()
            .x_desc("position (plan order)")
            .y_desc(format!("margin ({})", lines.margin_unit))
            .x_label_formatter(&int_tick)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for &b in &bounds {
            mc.draw_series(DashedLineSeries::new(
                vec![(b, 0.0), (b, mmax.max(1e-6))],
                4,
                4,
                BLACK.mix(0.4).stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?;
        }
        let pts: Vec<(f64, f64)> = views
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64, v.2.margin))
            .collect();
        mc.draw_series(LineSeries::new(pts, BLACK.stroke_width(1)))
            .map_err(|e| err(e.to_string()))?;
        mc.draw_series(LineSeries::new(
            vec![(0.0, floor), (n, floor)],
            RED.mix(0.5).stroke_width(1),
        ))
        .map_err(|e| err(e.to_string()))?;
        for (ci, r) in cands.iter().enumerate() {
            let col = COLOURS[ci % COLOURS.len()];
            for (m, kind) in r.positions.iter().zip(r.flips) {
                let (Some(kind), Some(&i)) = (*kind, index.get(&(m.seq, m.pos))) else {
                    continue;
                };
                let style = if kind == FlipKind::Confident {
                    col.filled()
                } else {
                    col.stroke_width(1)
                };
                mc.draw_series(std::iter::once(Circle::new(
                    (i as f64, m.oracle.margin),
                    4,
                    style,
                )))
                .map_err(|e| err(e.to_string()))?;
            }
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(buf)
}
