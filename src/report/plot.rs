//! positions.svg: centred cosine per candidate (top) and the oracle margin (bottom) over the plan's
//! positions, with each candidate's flips marked (confident: filled, tie: hollow).
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

/// `views`: every oracle row in plan order; `cands`: each capture's positions and the gate's flips.
pub fn render(
    views: &[(usize, usize, OracleView)],
    cands: &[Rows<'_>],
    floor: f64,
) -> Result<String> {
    let err = |e: String| Error::Internal(format!("positions.svg: {e}"));
    let index: HashMap<(usize, usize), usize> = views
        .iter()
        .enumerate()
        .map(|(i, v)| ((v.0, v.1), i))
        .collect();
    let n = views.len().max(2) as f64;
    let mut lo = 1.0f64;
    for r in cands {
        for m in r.positions.iter() {
            if let Some(c) = m.cosine_centred {
                lo = lo.min(c);
            }
        }
    }
    let lo = (lo - 0.01).max(-1.0);
    let mmax = views.iter().map(|v| v.2.margin).fold(floor, f64::max) * 1.05;
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (1000, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let (top, bottom) = root.split_vertically(320);
        let mut ch = ChartBuilder::on(&top)
            .caption("mean-centred cosine of logit rows", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(25)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..n, lo..1.0f64)
            .map_err(|e| err(e.to_string()))?;
        ch.configure_mesh()
            .x_desc("position (plan order)")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (ci, r) in cands.iter().enumerate() {
            let (label, col) = (r.label, COLOURS[ci % COLOURS.len()]);
            let pts: Vec<(f64, f64)> = r
                .positions
                .iter()
                .filter_map(|m| Some((*index.get(&(m.seq, m.pos))? as f64, m.cosine_centred?)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            ch.draw_series(LineSeries::new(pts, col.stroke_width(1)))
                .map_err(|e| err(e.to_string()))?
                .label(label.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], col));
        }
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;

        let mut mc = ChartBuilder::on(&bottom)
            .caption(
                "oracle margin; flips marked (filled: confident, hollow: tie)",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(25)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..n, 0f64..mmax.max(1e-6))
            .map_err(|e| err(e.to_string()))?;
        mc.configure_mesh().draw().map_err(|e| err(e.to_string()))?;
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
