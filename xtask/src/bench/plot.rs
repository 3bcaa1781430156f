//! SVG plots of the report (plotters' SVG backend: no system library, no font files).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::modes::Mode;
use super::report::{Metric, Record};

const SIZE: (u32, u32) = (900, 540);

/// One line per mode: (N, value) points of `metric` that have a value.
fn series(records: &[Record], metric: Metric) -> Vec<(Mode, Vec<(f64, f64)>)> {
    Mode::ALL
        .iter()
        .map(|&mode| {
            let mut points: Vec<(f64, f64)> = records
                .iter()
                .filter(|r| r.mode == mode.name() && r.metric == metric.name())
                .filter_map(|r| {
                    #[allow(clippy::cast_precision_loss)] // service counts are small
                    let n = r.services as f64;
                    r.value.map(|v| (n, v))
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (mode, points)
        })
        .filter(|(_, points)| !points.is_empty())
        .collect()
}

fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Direct => RGBColor(90, 90, 90),
        Mode::IptablesNft => RGBColor(214, 39, 40),
        Mode::IptablesLegacy => RGBColor(255, 127, 14),
        Mode::Nftables => RGBColor(148, 103, 189),
        Mode::SwitchyardSocket => RGBColor(31, 119, 180),
        Mode::SwitchyardTc => RGBColor(44, 160, 44),
    }
}

/// Writes the plots that have data; returns their file names.
pub fn write_all(dir: &Path, records: &[Record]) -> Result<Vec<String>> {
    let mut written = Vec::new();
    for (file, metric, caption, y_label, log_y) in [
        (
            "latency_vs_services.svg",
            Metric::ConnectLatency,
            "New-connection latency (mean) vs number of services",
            "latency (µs)",
            false,
        ),
        (
            "program_time_vs_services.svg",
            Metric::ProgramAll,
            "Time to program N services from empty",
            "seconds (log)",
            true,
        ),
    ] {
        let lines = series(records, metric);
        if lines.is_empty() {
            continue;
        }
        draw(&dir.join(file), caption, y_label, &lines, log_y)
            .map_err(|e| anyhow!("drawing {file}: {e}"))?;
        written.push(file.to_owned());
    }
    Ok(written)
}

fn draw(
    path: &Path,
    caption: &str,
    y_label: &str,
    lines: &[(Mode, Vec<(f64, f64)>)],
    log_y: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let points = lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0_f64, f64::INFINITY, 0.0_f64);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let x_range = (0.8..x_max * 1.25).log_scale();
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    if log_y {
        let y_range = ((y_min * 0.5).max(1e-4)..y_max * 2.0).log_scale();
        let mut chart = builder.build_cartesian_2d(x_range, y_range)?;
        chart
            .configure_mesh()
            .x_desc("services (log)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(y_label)
            .draw()?;
        for (mode, points) in lines {
            add_line(&mut chart, *mode, points)?;
        }
        legend(&mut chart)?;
    } else {
        let mut chart = builder.build_cartesian_2d(x_range, 0.0..y_max * 1.15)?;
        chart
            .configure_mesh()
            .x_desc("services (log)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(y_label)
            .draw()?;
        for (mode, points) in lines {
            add_line(&mut chart, *mode, points)?;
        }
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}

fn add_line<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    mode: Mode,
    points: &[(f64, f64)],
) -> Result<(), Box<dyn std::error::Error>>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let style = color(mode).stroke_width(2);
    chart
        .draw_series(LineSeries::new(points.iter().copied(), style))?
        .label(mode.name())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    chart.draw_series(
        points
            .iter()
            .map(|&p| Circle::new(p, 3, color(mode).filled())),
    )?;
    Ok(())
}

fn legend<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
) -> Result<(), Box<dyn std::error::Error>>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
