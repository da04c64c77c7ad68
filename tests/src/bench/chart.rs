//! The PNG chart: saturation requests/s and added single-stream latency per contender, two bar
//! panels. Text is drawn with ab_glyph from a TrueType font of a Debian package
//! (fonts-dejavu-core, installed by `cargo xtask setup`), so no system font library is linked.

use std::path::Path;

use plotters::prelude::*;

pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Debug)]
pub struct ChartError(pub String);

impl std::fmt::Display for ChartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(e: impl std::fmt::Display) -> ChartError {
    ChartError(e.to_string())
}

/// One panel per series: (title, unit, bars of (label, value)).
pub fn bars(path: &Path, panels: &[(&str, Vec<(String, f64)>)]) -> Result<(), ChartError> {
    let font = std::fs::read(FONT_PATH).map_err(|e| {
        ChartError(format!(
            "reading the chart font {FONT_PATH}: {e} (Debian package fonts-dejavu-core; \
             `cargo xtask setup` installs it)"
        ))
    })?;
    // ab_glyph keeps a &'static reference to the font data for the process lifetime.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| ChartError(format!("{FONT_PATH} is not a usable TrueType font")))?;

    let width = 1100;
    let height = 420 * panels.len() as u32;
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((panels.len(), 1));
    for (area, (title, bars)) in areas.iter().zip(panels) {
        let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9) * 1.15;
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            // A segmented 0..n has n + 1 segments: 0..n-1 gives one per bar.
            .build_cartesian_2d((0..bars.len().saturating_sub(1)).into_segmented(), 0.0..max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len())
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_label_formatter(&|y| format_value(*y))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                let color = Palette99::pick(i).filled();
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    color,
                );
                bar.set_margin(0, 0, 12, 12);
                bar
            }))
            .map_err(err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                Text::new(
                    format_value(*v),
                    (SegmentValue::CenterOf(i), *v + max * 0.02),
                    ("sans-serif", 14).into_font(),
                )
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn format_value(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
