//! The benchmark's output: `report.json` (machine facts and one record per mode, scale point
//! and metric) and `report.md` (the same as tables, with the plots).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::modes::Mode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    ConnectLatency,
    ConnPerS,
    Throughput,
    ProgramAll,
    UpdateOne,
    AgentRss,
    MapMemory,
}

impl Metric {
    pub const ALL: [Self; 7] = [
        Self::ConnectLatency,
        Self::ConnPerS,
        Self::Throughput,
        Self::ProgramAll,
        Self::UpdateOne,
        Self::AgentRss,
        Self::MapMemory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ConnectLatency => "connect_latency_us",
            Self::ConnPerS => "conn_per_s",
            Self::Throughput => "throughput_gbps",
            Self::ProgramAll => "program_all_s",
            Self::UpdateOne => "update_one_s",
            Self::AgentRss => "agent_rss_mb",
            Self::MapMemory => "map_memory_mb",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Self::ConnectLatency => "us",
            Self::ConnPerS => "1/s",
            Self::Throughput => "Gbit/s",
            Self::ProgramAll | Self::UpdateOne => "s",
            Self::AgentRss | Self::MapMemory => "MiB",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::ConnectLatency => {
                "New-connection latency (connect, request, full response, close), µs: mean (p50 / p99), ×direct"
            }
            Self::ConnPerS => {
                "Connections per second at fixed concurrency (median of repetitions), ×direct"
            }
            Self::Throughput => {
                "Bulk throughput of one flow, Gbit/s (median of repetitions), ×direct"
            }
            Self::ProgramAll => "Time to program N services from empty, s",
            Self::UpdateOne => "Time to apply one endpoint change at N services, s",
            Self::AgentRss => "Agent peak RSS, MiB",
            Self::MapMemory => "BPF map memory (sum of the maps' memlock), MiB",
        }
    }
}

/// One measured quantity; `None` values are written as JSON null.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub mode: &'static str,
    pub services: usize,
    pub endpoints_per_service: usize,
    pub metric: &'static str,
    pub unit: &'static str,
    pub value: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub reps: usize,
    pub ratio_to_direct: Option<f64>,
    pub ratio_min: Option<f64>,
    pub ratio_max: Option<f64>,
    pub note: Option<String>,
}

impl Record {
    pub fn new(mode: Mode, services: usize, endpoints: usize, metric: Metric) -> Self {
        Self {
            mode: mode.name(),
            services,
            endpoints_per_service: endpoints,
            metric: metric.name(),
            unit: metric.unit(),
            value: None,
            p50: None,
            p99: None,
            reps: 0,
            ratio_to_direct: None,
            ratio_min: None,
            ratio_max: None,
            note: None,
        }
    }
}

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

    fn find(&self, mode: &str, services: usize, metric: Metric) -> Option<&Record> {
        self.records
            .iter()
            .find(|r| r.mode == mode && r.services == services && r.metric == metric.name())
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
        let mut scale: Vec<usize> = self.records.iter().map(|r| r.services).collect();
        scale.sort_unstable();
        scale.dedup();
        let modes: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
        for metric in Metric::ALL {
            let _ = write!(
                out,
                "\n## {}\n\n| services (endpoints) | {} |\n|---|{}\n",
                metric.title(),
                modes.join(" | "),
                "---|".repeat(modes.len())
            );
            for &n in &scale {
                let endpoints = self
                    .records
                    .iter()
                    .find(|r| r.services == n)
                    .map_or(0, |r| r.endpoints_per_service);
                let cells: Vec<String> = modes
                    .iter()
                    .map(|mode| self.find(mode, n, metric).map_or_else(String::new, cell))
                    .collect();
                let _ = writeln!(out, "| {n} ({endpoints}) | {} |", cells.join(" | "));
            }
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

/// A table cell: the value, percentiles if any, the ratio to direct and its range if any.
fn cell(record: &Record) -> String {
    let Some(value) = record.value else {
        return if record.note.is_some() {
            "n/a*".into()
        } else {
            "n/a".into()
        };
    };
    let mut text = format_number(value);
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
        assert!(markdown.contains("| 100 (10) |  | 187 (180 / 320) ×1.23 [1.10–1.30] |"));
        assert!(markdown.contains("- kernel: 6.18"));
    }
}
