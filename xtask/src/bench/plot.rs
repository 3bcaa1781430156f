//! SVG plots of the report (plotters' SVG backend: no system library, no font files).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::modes::Mode;
use super::record::{Metric, Record};

const SIZE: (u32, u32) = (900, 540);

/// One line of a plot: (N, value) points, sorted by N.
struct Line {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Which number of a record a line plots.
#[derive(Clone, Copy)]
enum Pick {
    Value,
    P50,
}

/// The line of `mode`'s `metric` (its value or p50, times `scale`); `None` without points.
fn line(
    records: &[Record],
    mode: Mode,
    metric: Metric,
    pick: Pick,
    scale: f64,
    label: String,
) -> Option<Line> {
    let mut points: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.is(mode, metric))
        .filter_map(|r| {
            #[allow(clippy::cast_precision_loss)] // service counts are small
            let n = r.services as f64;
            let value = match pick {
                Pick::Value => r.value,
                Pick::P50 => r.p50,
            };
            value.map(|v| (n, v * scale))
        })
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    (!points.is_empty()).then(|| Line {
        label,
        color: color(mode),
        points,
    })
}

/// One line per mode with the value of `metric`.
fn per_mode(records: &[Record], metric: Metric) -> Vec<Line> {
    Mode::ALL
        .into_iter()
        .filter_map(|mode| {
            line(
                records,
                mode,
                metric,
                Pick::Value,
                1.0,
                mode.name().to_owned(),
            )
        })
        .collect()
}

/// Per-change latency: the agent fed by the API server (its own sync and API event → maps),
/// the agent on a manifests file, and kube-proxy's partial syncs; in ms.
fn change_lines(records: &[Record]) -> Vec<Line> {
    let api = Mode::SwitchyardApi;
    let mut lines: Vec<Line> = [
        line(
            records,
            api,
            Metric::EventToMaps,
            Pick::P50,
            1.0,
            format!("{api}: API event → maps (p50)"),
        ),
        line(
            records,
            api,
            Metric::ChangeSync,
            Pick::P50,
            1.0,
            format!("{api}: agent-side sync (p50)"),
        ),
        line(
            records,
            Mode::SwitchyardSocket,
            Metric::UpdateOne,
            Pick::Value,
            1e3,
            "switchyard (manifests file): rewrite → synced".to_owned(),
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let Some(sync) = lines.iter_mut().find(|l| l.label.contains("agent-side")) {
        // Same mode, same colour family: lighter for the agent's own share.
        sync.color = RGBColor(120, 200, 230);
    }
    lines.extend(
        [Mode::IptablesNft, Mode::IptablesLegacy, Mode::Nftables]
            .into_iter()
            .filter_map(|mode| {
                line(
                    records,
                    mode,
                    Metric::UpdateOne,
                    Pick::Value,
                    1e3,
                    format!("{mode}: partial sync"),
                )
            }),
    );
    lines
}

fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Direct => RGBColor(90, 90, 90),
        Mode::IptablesNft => RGBColor(214, 39, 40),
        Mode::IptablesLegacy => RGBColor(255, 127, 14),
        Mode::Nftables => RGBColor(148, 103, 189),
        Mode::SwitchyardSocket => RGBColor(31, 119, 180),
        Mode::SwitchyardTc => RGBColor(44, 160, 44),
        Mode::SwitchyardXdp => RGBColor(188, 189, 34),
        Mode::SwitchyardTc2Node => RGBColor(140, 86, 75),
        Mode::SwitchyardDsr => RGBColor(227, 119, 194),
        Mode::SwitchyardApi => RGBColor(23, 190, 207),
    }
}

/// Writes the plots that have data; returns their file names.
pub fn write_all(dir: &Path, records: &[Record]) -> Result<Vec<String>> {
    let mut written = Vec::new();
    for (file, lines, caption, y_label, log_y) in [
        (
            "latency_vs_services.svg",
            per_mode(records, Metric::ConnectLatency),
            "New-connection latency (mean) vs number of services",
            "latency (µs)",
            false,
        ),
        (
            "program_time_vs_services.svg",
            per_mode(records, Metric::ProgramAll),
            "Time to program N services from empty",
            "seconds (log)",
            true,
        ),
        (
            "change_latency_vs_services.svg",
            change_lines(records),
            "One endpoint change vs number of services",
            "milliseconds (log)",
            true,
        ),
    ] {
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
    lines: &[Line],
    log_y: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let points = lines.iter().flat_map(|line| line.points.iter());
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
        for line in lines {
            add_line(&mut chart, line)?;
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
        for line in lines {
            add_line(&mut chart, line)?;
        }
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}

fn add_line<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    line: &Line,
) -> Result<(), Box<dyn std::error::Error>>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let style = line.color.stroke_width(2);
    chart
        .draw_series(LineSeries::new(line.points.iter().copied(), style))?
        .label(line.label.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    chart.draw_series(
        line.points
            .iter()
            .map(|&p| Circle::new(p, 3, line.color.filled())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_plot_has_a_line_per_path_with_values_in_ms() {
        let mut records = Vec::new();
        for (n, api_p50, restore) in [(100, 1.5, 0.05), (10_000, 3.0, 0.9)] {
            let mut api = Record::new(Mode::SwitchyardApi, n, 10, Metric::EventToMaps);
            api.value = Some(api_p50 * 1.2);
            api.p50 = Some(api_p50);
            records.push(api);
            let mut nft = Record::new(Mode::Nftables, n, 10, Metric::UpdateOne);
            nft.value = Some(restore);
            records.push(nft);
        }
        // A point without a value draws nothing.
        records.push(Record::new(Mode::IptablesNft, 100, 10, Metric::UpdateOne));
        let lines = change_lines(&records);
        let labels: Vec<&str> = lines.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "switchyard-api: API event → maps (p50)",
                "nftables: partial sync"
            ]
        );
        assert_eq!(lines[0].points, [(100.0, 1.5), (10_000.0, 3.0)]);
        assert_eq!(lines[1].points, [(100.0, 50.0), (10_000.0, 900.0)]);
        let dir = switchyard_tests::env::tempdir::TempDir::new().unwrap();
        let written = write_all(dir.path(), &records).unwrap();
        assert_eq!(written, ["change_latency_vs_services.svg"]);
        let svg = std::fs::read_to_string(dir.path().join(&written[0])).unwrap();
        assert!(svg.contains("nftables: partial sync"));
    }
}
