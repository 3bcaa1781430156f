//! The benchmark's output: `report.json` (machine facts and one record per mode, scale point
//! and metric) and `report.md` (the same as tables, with the plots).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::modes::Mode;
use super::record::{Metric, Record};

/// The metrics that get a table of their own, one column per mode (the control-plane metrics
/// are gathered in one table instead).
const TABLE_METRICS: [Metric; 9] = [
    Metric::ConnectLatency,
    Metric::ConnPerS,
    Metric::SustainedConnPerS,
    Metric::ConnFailed,
    Metric::Throughput,
    Metric::ProgramAll,
    Metric::UpdateOne,
    Metric::AgentRss,
    Metric::MapMemory,
];

fn title(metric: Metric) -> &'static str {
    match metric {
        Metric::ConnectLatency => {
            "New-connection latency (connect, request, full response, close), µs: mean (p50 / p99), ×direct"
        }
        Metric::ConnPerS => {
            "Connections per second at fixed concurrency (median of repetitions), ×direct"
        }
        Metric::SustainedConnPerS => {
            "Connections per second over one run of the sustained connection count, ×direct"
        }
        Metric::ConnFailed => {
            "Failed connections over every connections-per-second run (the sustained one included)"
        }
        Metric::Throughput => {
            "Bulk throughput of one flow, Gbit/s (median of repetitions), ×direct"
        }
        Metric::ProgramAll => "Time to program N services from empty, s",
        Metric::UpdateOne => "Time to apply one endpoint change at N services, s",
        Metric::AgentRss => "Agent peak RSS, MiB",
        Metric::MapMemory => "BPF map memory (sum of the maps' memlock), MiB",
        Metric::ProgramSync => "Agent-side sync of programming from empty, s",
        Metric::ChangeSync => "Agent-side sync of one endpoint change, ms",
        Metric::ChangeCpu => "Agent CPU time per endpoint change, ms",
        Metric::EventToMaps => "API event → maps written, ms",
        Metric::HealthzChurn => "GET /healthz while endpoints change 10 times a second, ms",
        Metric::MaglevRebuild => "Agent-side Maglev table build, ms",
    }
}

/// The control-plane table: its modes, in row order, and its columns.
const CONTROL_MODES: [Mode; 6] = [
    Mode::SwitchyardApi,
    Mode::SwitchyardSocket,
    Mode::SwitchyardTc,
    Mode::IptablesNft,
    Mode::IptablesLegacy,
    Mode::Nftables,
];
const CONTROL_COLUMNS: [&str; 8] = [
    "one change: sync p50 / p99, ms",
    "CPU per change: mean (p99), ms",
    "change → maps p50 / p99, ms",
    "program from empty, s",
    "start → synced, s",
    "peak RSS, MiB",
    "BPF maps, MiB",
    "/healthz at 10 changes/s p50 / p99, ms",
];
const CONTROL_LEGEND: &str = "switchyard-api: the agent following the test API server, over \
    the changes of the control-plane phase (sync = the agent's own `elapsed`; change → maps = \
    API watch event → new backends readable in the pinned map; program from empty = agent-side \
    sync; /healthz = GET /healthz every 20 ms while 10 endpoint changes a second go through the \
    API server). switchyard-socket / switchyard-tc: the agent on a manifests file, one change (change \
    → maps = rewriting the file → its `dataplane synced` line, including the file poll every \
    100 ms and the one extra poll that proves the file complete). iptables-*, nftables: kube-proxy's rules, one change (sync = the partial-sync \
    restore's wall time) and program from empty = the full restore's wall time. — = not \
    applicable.";

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: serde_json::Value,
    pub records: Vec<Record>,
}

impl Report {
    pub fn write(&self, dir: &Path, method: &[String]) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("report.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", json.display()))?;
        let plots = super::plot::write_all(dir, &self.records)?;
        let markdown = dir.join("report.md");
        std::fs::write(&markdown, self.markdown(method, &plots))
            .with_context(|| format!("writing {}", markdown.display()))
    }

    fn find(&self, mode: Mode, services: usize, metric: Metric) -> Option<&Record> {
        self.records
            .iter()
            .find(|r| r.is(mode, metric) && r.services == services)
    }

    /// The N of the records of `metric`, ascending (all records with `None`).
    fn scale(&self, metric: Option<Metric>) -> Vec<usize> {
        let mut scale: Vec<usize> = self
            .records
            .iter()
            .filter(|r| metric.is_none_or(|m| r.metric == m.name()))
            .map(|r| r.services)
            .collect();
        scale.sort_unstable();
        scale.dedup();
        scale
    }

    fn endpoints_at(&self, n: usize) -> usize {
        self.records
            .iter()
            .find(|r| r.services == n)
            .map_or(0, |r| r.endpoints_per_service)
    }

    /// The control-plane table's rows: (N, M, mode, cells).
    fn control_rows(&self) -> Vec<(usize, usize, Mode, Vec<String>)> {
        let mut rows = Vec::new();
        for n in self.scale(None) {
            for mode in CONTROL_MODES {
                let get = |metric| self.find(mode, n, metric);
                let cells: Vec<String> = if mode == Mode::SwitchyardApi {
                    vec![
                        get(Metric::ChangeSync).map_or_else(absent, percentiles),
                        get(Metric::ChangeCpu).map_or_else(absent, mean_and_p99),
                        get(Metric::EventToMaps).map_or_else(absent, percentiles),
                        get(Metric::ProgramSync).map_or_else(absent, |r| value(r, 1.0)),
                        get(Metric::ProgramAll).map_or_else(absent, |r| value(r, 1.0)),
                        get(Metric::AgentRss).map_or_else(absent, |r| value(r, 1.0)),
                        get(Metric::MapMemory).map_or_else(absent, |r| value(r, 1.0)),
                        get(Metric::HealthzChurn).map_or_else(absent, percentiles),
                    ]
                } else if mode.is_switchyard() {
                    vec![
                        get(Metric::ChangeSync).map_or_else(absent, |r| value(r, 1.0)),
                        get(Metric::ChangeCpu).map_or_else(absent, |r| value(r, 1.0)),
                        get(Metric::UpdateOne).map_or_else(absent, |r| value(r, 1e3)),
                        get(Metric::ProgramSync).map_or_else(absent, |r| value(r, 1.0)),
                        get(Metric::ProgramAll).map_or_else(absent, |r| value(r, 1.0)),
                        get(Metric::AgentRss).map_or_else(absent, |r| value(r, 1.0)),
                        get(Metric::MapMemory).map_or_else(absent, |r| value(r, 1.0)),
                        "—".to_owned(),
                    ]
                } else {
                    let na = || "—".to_owned();
                    vec![
                        get(Metric::UpdateOne).map_or_else(absent, |r| value(r, 1e3)),
                        na(),
                        na(),
                        get(Metric::ProgramAll).map_or_else(absent, |r| value(r, 1.0)),
                        na(),
                        na(),
                        na(),
                        na(),
                    ]
                };
                if cells.iter().any(|c| !c.is_empty() && c != "—") {
                    rows.push((n, self.endpoints_at(n), mode, cells));
                }
            }
        }
        rows
    }

    /// What Direct Server Return saves over masquerading on the same two nodes: one row per
    /// connection metric, with the ratio paired repetition by repetition (empty without
    /// `switchyard-dsr` records).
    fn dsr_table(&self) -> String {
        let dsr = Mode::SwitchyardDsr;
        let Some(twin) = dsr.masqueraded_twin() else {
            return String::new();
        };
        let mut rows = String::new();
        for (metric, what) in [
            (Metric::ConnectLatency, "new-connection latency, mean µs"),
            (Metric::ConnPerS, "connections/s"),
            (Metric::SustainedConnPerS, "sustained connections/s"),
            (Metric::ConnFailed, "failed connections"),
            (Metric::Throughput, "throughput, Gbit/s"),
        ] {
            for record in self.records.iter().filter(|r| r.is(dsr, metric)) {
                let n = record.services;
                let ratio = match (
                    record.ratio_to_masquerade,
                    record.ratio_to_masquerade_min,
                    record.ratio_to_masquerade_max,
                ) {
                    (Some(ratio), Some(low), Some(high)) => {
                        format!("{ratio:.2} [{low:.2}–{high:.2}]")
                    }
                    _ => "—".to_owned(),
                };
                let _ = writeln!(
                    rows,
                    "| {what} | {n} ({}) | {} | {} | {ratio} |",
                    self.endpoints_at(n),
                    self.find(twin, n, metric).map_or_else(absent, plain),
                    plain(record),
                );
            }
        }
        if rows.is_empty() {
            return String::new();
        }
        format!(
            "\n## Direct Server Return vs masquerading over the same two nodes\n\n\
             External client → node 0's NodePort → endpoints on node 1; {twin} masquerades \
             (replies return through node 0), {dsr} does not (node 1 replies straight to the \
             client). Ratio: median over repetitions of {dsr} / {twin} in the same repetition \
             [min–max]; below 1 is faster for latency, above 1 is more for rates.\n\n\
             | metric | services (endpoints) | {twin} | {dsr} | {dsr} ÷ {twin} |\n\
             |---|---|---|---|---|\n{rows}"
        )
    }

    /// The Maglev rebuild figure as one sentence, if it was measured.
    pub fn maglev_rebuild_text(&self) -> Option<String> {
        let record = self
            .records
            .iter()
            .find(|r| r.metric == Metric::MaglevRebuild.name())?;
        let ms = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
        Some(format!(
            "{} backends, M = {}: p50 {} ms, p99 {} ms, mean {} ms over {} builds.",
            record.endpoints_per_service,
            super::maglev::TABLE_SIZE,
            ms(record.p50),
            ms(record.p99),
            ms(record.value),
            record.reps
        ))
    }

    /// The control-plane table as aligned plain text (for the terminal).
    pub fn control_plane_text(&self) -> String {
        let rows = self.control_rows();
        let widths: Vec<usize> = CONTROL_COLUMNS
            .iter()
            .enumerate()
            .map(|(i, header)| {
                rows.iter()
                    .map(|(_, _, _, cells)| cells[i].chars().count())
                    .chain([header.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |mode: &str, shape: &str, cells: &[&str]| {
            let cells: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(cell, &width)| format!("{cell:>width$}"))
                .collect();
            format!("  {mode:<18} {shape:>13} | {}\n", cells.join(" | "))
        };
        let mut out = line("mode", "N × M", &CONTROL_COLUMNS);
        for (n, m, mode, cells) in &rows {
            let cells: Vec<&str> = cells.iter().map(String::as_str).collect();
            out.push_str(&line(mode.name(), &format!("{n} × {m}"), &cells));
        }
        out
    }

    pub fn markdown(&self, method: &[String], plots: &[String]) -> String {
        let mut out = String::from("# Switchyard benchmark\n\n## Machine\n\n");
        if let Some(machine) = self.machine.as_object() {
            for (key, value) in machine {
                let value = value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_owned);
                let _ = writeln!(out, "- {key}: {value}");
            }
        }
        out.push_str("\n## Method\n\n");
        for line in method {
            let _ = writeln!(out, "- {line}");
        }
        for metric in TABLE_METRICS {
            let modes: Vec<Mode> = Mode::ALL
                .into_iter()
                .filter(|&mode| self.records.iter().any(|r| r.is(mode, metric)))
                .collect();
            if modes.is_empty() {
                continue;
            }
            let names: Vec<&str> = modes.iter().map(|m| m.name()).collect();
            let _ = write!(
                out,
                "\n## {}\n\n| services (endpoints) | {} |\n|---|{}\n",
                title(metric),
                names.join(" | "),
                "---|".repeat(names.len())
            );
            for n in self.scale(Some(metric)) {
                let cells: Vec<String> = modes
                    .iter()
                    .map(|&mode| self.find(mode, n, metric).map_or_else(String::new, cell))
                    .collect();
                let _ = writeln!(
                    out,
                    "| {n} ({}) | {} |",
                    self.endpoints_at(n),
                    cells.join(" | ")
                );
            }
        }
        out.push_str(&self.dsr_table());
        let rows = self.control_rows();
        if !rows.is_empty() {
            let _ = write!(
                out,
                "\n## Control plane: one endpoint change, programming from empty, memory\n\n\
                 {CONTROL_LEGEND}\n\n| services (endpoints) | mode | {} |\n|---|---|{}\n",
                CONTROL_COLUMNS.join(" | "),
                "---|".repeat(CONTROL_COLUMNS.len())
            );
            for (n, m, mode, cells) in rows {
                let _ = writeln!(out, "| {n} ({m}) | {mode} | {} |", cells.join(" | "));
            }
        }
        if let Some(line) = self.maglev_rebuild_text() {
            let _ = write!(out, "\n## {}\n\n{line}\n", title(Metric::MaglevRebuild));
        }
        // One line per (mode, note), listing where it applies: notes repeat across metrics.
        let mut notes: Vec<(&str, &str, Vec<String>)> = Vec::new();
        for record in &self.records {
            let Some(note) = record.note.as_deref() else {
                continue;
            };
            let place = format!("N = {}", record.services);
            match notes
                .iter_mut()
                .find(|(mode, text, _)| *mode == record.mode && *text == note)
            {
                Some((_, _, places)) if places.contains(&place) => {}
                Some((_, _, places)) => places.push(place),
                None => notes.push((record.mode, note, vec![place])),
            }
        }
        if !notes.is_empty() {
            out.push_str("\n## Notes (cells marked *)\n\n");
            for (mode, note, places) in notes {
                let _ = writeln!(out, "- {mode} ({}): {note}", places.join(", "));
            }
        }
        if !plots.is_empty() {
            out.push_str("\n## Plots\n\n");
            for plot in plots {
                let _ = writeln!(out, "![{plot}]({plot})\n");
            }
        }
        out
    }
}

/// A cell for a record that does not exist at this point.
fn absent() -> String {
    String::new()
}

/// "n/a" for a missing value ("n/a*" when a note says why), else `text` (with "*" for a note).
fn noted(record: &Record, text: Option<String>) -> String {
    let mark = if record.note.is_some() { "*" } else { "" };
    text.map_or_else(|| format!("n/a{mark}"), |text| format!("{text}{mark}"))
}

/// The value alone (counts as whole numbers), marked when a note applies.
fn plain(record: &Record) -> String {
    let text = record.value.map(|v| {
        if record.unit == Metric::ConnFailed.unit() {
            format!("{v:.0}")
        } else {
            format_number(v)
        }
    });
    noted(record, text)
}

/// The value, times `scale` (unit conversion).
fn value(record: &Record, scale: f64) -> String {
    noted(record, record.value.map(|v| format_number(v * scale)))
}

/// "p50 / p99".
fn percentiles(record: &Record) -> String {
    let text = record
        .p50
        .zip(record.p99)
        .map(|(p50, p99)| format!("{} / {}", format_number(p50), format_number(p99)));
    noted(record, text)
}

/// "mean (p99)".
fn mean_and_p99(record: &Record) -> String {
    let text = record.value.map(|mean| {
        record.p99.map_or_else(
            || format_number(mean),
            |p99| format!("{} ({})", format_number(mean), format_number(p99)),
        )
    });
    noted(record, text)
}

/// A table cell: the value, percentiles if any, the ratio to direct and its range if any.
fn cell(record: &Record) -> String {
    let Some(value) = record.value else {
        return if record.note.is_some() {
            "n/a*".into()
        } else {
            "n/a".into()
        };
    };
    // Counts are whole numbers.
    let mut text = if record.unit == Metric::ConnFailed.unit() {
        format!("{value:.0}")
    } else {
        format_number(value)
    };
    if let (Some(p50), Some(p99)) = (record.p50, record.p99) {
        let _ = write!(text, " ({} / {})", format_number(p50), format_number(p99));
    }
    if let (Some(ratio), Some(low), Some(high)) =
        (record.ratio_to_direct, record.ratio_min, record.ratio_max)
    {
        let _ = write!(text, " ×{ratio:.2} [{low:.2}–{high:.2}]");
    }
    if record.note.is_some() {
        text.push('*');
    }
    text
}

pub fn format_number(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else if value >= 0.1 {
        format!("{value:.2}")
    } else {
        format!("{value:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_serialize_with_nulls_and_render_as_table_cells() {
        let mut record = Record::new(Mode::IptablesNft, 100, 10, Metric::ConnectLatency);
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["metric"], "connect_latency_us");
        assert!(json["value"].is_null());
        assert_eq!(cell(&record), "n/a");
        record.value = Some(187.4);
        record.p50 = Some(180.0);
        record.p99 = Some(320.4);
        record.ratio_to_direct = Some(1.234);
        record.ratio_min = Some(1.1);
        record.ratio_max = Some(1.3);
        assert_eq!(cell(&record), "187 (180 / 320) ×1.23 [1.10–1.30]");
        let report = Report {
            machine: serde_json::json!({"kernel": "6.18"}),
            records: vec![record],
        };
        let markdown = report.markdown(&["paired".into()], &[]);
        // Only modes with records get a column.
        assert!(markdown.contains("| services (endpoints) | iptables-nft |"));
        assert!(markdown.contains("| 100 (10) | 187 (180 / 320) ×1.23 [1.10–1.30] |"));
        assert!(markdown.contains("- kernel: 6.18"));
        assert!(!markdown.contains("Control plane"));
    }

    #[test]
    fn dsr_is_set_against_its_masqueraded_twin() {
        let mut twin = Record::new(Mode::SwitchyardTc2Node, 1, 10, Metric::ConnectLatency);
        twin.value = Some(120.0);
        let mut dsr = Record::new(Mode::SwitchyardDsr, 1, 10, Metric::ConnectLatency);
        dsr.value = Some(96.0);
        (
            dsr.ratio_to_masquerade,
            dsr.ratio_to_masquerade_min,
            dsr.ratio_to_masquerade_max,
        ) = (Some(0.8), Some(0.75), Some(0.9));
        let mut rates = Record::new(Mode::SwitchyardDsr, 1, 10, Metric::ConnPerS);
        rates.note = Some("the two-node cluster failed".into());
        let mut failed = Record::new(Mode::SwitchyardDsr, 1, 10, Metric::ConnFailed);
        failed.value = Some(0.0);
        let report = Report {
            machine: serde_json::json!({}),
            records: vec![twin, dsr, rates, failed],
        };
        let markdown = report.markdown(&[], &[]);
        assert!(markdown.contains("## Direct Server Return vs masquerading"));
        assert!(
            markdown.contains(
                "| new-connection latency, mean µs | 1 (10) | 120 | 96.0 | 0.80 [0.75–0.90] |"
            ),
            "{markdown}"
        );
        // A missing twin and value stay visible, not silently dropped.
        assert!(markdown.contains("| connections/s | 1 (10) |  | n/a* | — |"));
        assert!(markdown.contains("| failed connections | 1 (10) |  | 0 | — |"));
        let without = Report {
            machine: serde_json::json!({}),
            records: Vec::new(),
        };
        assert!(without.dsr_table().is_empty());
    }

    #[test]
    fn the_control_plane_table_puts_each_path_in_its_columns() {
        let mut records = Vec::new();
        let mut add = |mode, metric, value: Option<f64>, p50, p99, note: Option<&str>| {
            let mut record = Record::new(mode, 10_000, 10, metric);
            (record.value, record.p50, record.p99) = (value, p50, p99);
            record.note = note.map(str::to_owned);
            records.push(record);
        };
        let api = Mode::SwitchyardApi;
        add(
            api,
            Metric::ChangeSync,
            Some(3.5),
            Some(3.0),
            Some(9.0),
            None,
        );
        add(
            api,
            Metric::ChangeCpu,
            Some(4.2),
            Some(4.0),
            Some(7.5),
            None,
        );
        add(
            api,
            Metric::EventToMaps,
            Some(30.0),
            Some(25.0),
            Some(48.0),
            None,
        );
        add(
            api,
            Metric::HealthzChurn,
            Some(2.0),
            Some(1.5),
            Some(6.0),
            None,
        );
        add(api, Metric::ProgramSync, Some(0.41), None, None, None);
        add(api, Metric::ProgramAll, Some(2.5), None, None, None);
        add(api, Metric::AgentRss, Some(140.0), None, None, None);
        add(
            api,
            Metric::MapMemory,
            None,
            None,
            None,
            Some("no maps found"),
        );
        add(
            Mode::Nftables,
            Metric::UpdateOne,
            Some(0.74),
            None,
            None,
            None,
        );
        add(
            Mode::Nftables,
            Metric::ProgramAll,
            Some(131.0),
            None,
            None,
            None,
        );
        // Not a control-plane metric: no row of its own.
        add(
            Mode::Direct,
            Metric::ConnectLatency,
            Some(95.0),
            None,
            None,
            None,
        );
        let report = Report {
            machine: serde_json::json!({}),
            records,
        };
        let markdown = report.markdown(&[], &[]);
        assert!(markdown.contains(
            "| 10000 (10) | switchyard-api | 3.00 / 9.00 | 4.20 (7.50) | 25.0 / 48.0 | 0.41 | 2.50 \
             | 140 | n/a* | 1.50 / 6.00 |"
        ), "{markdown}");
        assert!(markdown.contains("| 10000 (10) | nftables | 740 | — | — | 131 | — | — | — | — |"));
        assert!(!markdown.contains("| 10000 (10) | direct |"));
        let text = report.control_plane_text();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.contains("switchyard-api"));
    }

    #[test]
    fn the_maglev_rebuild_gets_a_section_and_no_control_plane_row() {
        let mut change = Record::new(Mode::SwitchyardApi, 10, 2, Metric::ChangeSync);
        (change.value, change.p50, change.p99) = (Some(3.5), Some(3.0), Some(9.0));
        let mut rebuild = Record::new(Mode::SwitchyardApi, 1, 1_000, Metric::MaglevRebuild);
        (rebuild.value, rebuild.p50, rebuild.p99, rebuild.reps) =
            (Some(1.3), Some(1.25), Some(2.5), 200);
        let report = Report {
            machine: serde_json::json!({}),
            records: vec![change, rebuild],
        };
        let markdown = report.markdown(&[], &[]);
        assert!(
            markdown.contains(
                "## Agent-side Maglev table build, ms\n\n1000 backends, M = 16381: p50 1.25 ms, \
                 p99 2.50 ms, mean 1.30 ms over 200 builds."
            ),
            "{markdown}"
        );
        assert!(!markdown.contains("| 1 (1000) |"), "{markdown}");
        assert_eq!(report.control_plane_text().lines().count(), 2);
    }
}
