//! Results: one row per (scenario, server), its figures as ratios to the
//! scenario's baseline (native; in the `http` scenario `wasmtime serve`), the
//! printed table, the target check, and the JSON file.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::load::Measure;
use crate::server::Memory;

/// The server every ratio is relative to.
pub const BASELINE: &str = "native";
/// The `wasmtime serve` server of the `http` scenario, and its baseline.
pub const WASMTIME: &str = "wasmtime-serve";

/// The server a scenario's ratios are relative to.
pub fn baseline_name(scenario: &str) -> &'static str {
    if scenario == "http" {
        WASMTIME
    } else {
        BASELINE
    }
}

pub struct Row {
    pub scenario: &'static str,
    pub server: &'static str,
    pub measure: Measure,
    pub memory: Memory,
    pub server_cpu_secs: f64,
    /// Set when the server could not be started or the run failed.
    pub failure: Option<String>,
}

impl Row {
    pub fn conn_per_s(&self) -> Option<f64> {
        let secs = self.measure.elapsed.as_secs_f64();
        (self.measure.ok > 0 && secs > 0.0).then(|| self.measure.ok as f64 / secs)
    }

    pub fn mib_per_s(&self) -> Option<f64> {
        let secs = self.measure.elapsed.as_secs_f64();
        (self.measure.bytes > 0 && secs > 0.0)
            .then(|| self.measure.bytes as f64 / (1024.0 * 1024.0) / secs)
    }

    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        percentile(&self.measure.latencies_us, p).map(|us| us as f64 / 1000.0)
    }

    /// Server CPU time per connection it served, in microseconds.
    pub fn cpu_us_per_conn(&self) -> Option<f64> {
        let served = self.measure.served;
        (served > 0 && self.server_cpu_secs > 0.0)
            .then(|| self.server_cpu_secs * 1e6 / served as f64)
    }

    pub fn rss_mib(&self) -> Option<f64> {
        let kib = self.memory.peak_rss_kib;
        (kib > 0).then(|| kib as f64 / 1024.0)
    }

    pub fn pss_mib(&self) -> Option<f64> {
        let kib = self.memory.peak_pss_kib;
        (kib > 0).then(|| kib as f64 / 1024.0)
    }

    /// The figures that get ratios, by name; only those that mean something
    /// for the row's scenario (MiB/s for streaming, connections/s otherwise).
    fn figures(&self) -> [(&'static str, Option<f64>); 7] {
        let streaming = self.scenario == "stream";
        [
            ("conn_per_s", self.conn_per_s().filter(|_| !streaming)),
            ("p50_ms", self.percentile_ms(50.0)),
            ("p99_ms", self.percentile_ms(99.0)),
            ("mib_per_s", self.mib_per_s().filter(|_| streaming)),
            ("peak_rss_mib", self.rss_mib()),
            ("peak_pss_mib", self.pss_mib()),
            (
                "cpu_us_per_conn",
                self.cpu_us_per_conn().filter(|_| !streaming),
            ),
        ]
    }
}

/// Nearest-rank percentile.
fn percentile(samples: &[u64], p: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ratio(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => Some(v / b),
        _ => None,
    }
}

fn baseline<'a>(rows: &'a [Row], scenario: &str) -> Option<&'a Row> {
    let name = baseline_name(scenario);
    rows.iter()
        .find(|r| r.scenario == scenario && r.server == name && r.failure.is_none())
}

fn cell(value: Option<f64>, ratio: Option<f64>, digits: usize) -> String {
    match (value, ratio) {
        (Some(v), Some(r)) => format!("{v:.digits$} ({r:.2}x)"),
        (Some(v), None) => format!("{v:.digits$}"),
        _ => "-".into(),
    }
}

/// The table for one scenario, as printed and as pasted into the docs.
pub fn table(rows: &[Row], scenario: &'static str, title: &str) -> String {
    let base = baseline(rows, scenario);
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    let _ = writeln!(
        out,
        "| server | ok | conn/s | p50 ms | p99 ms | MiB/s | peak RSS MiB | peak PSS MiB | server CPU s | CPU µs/conn | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows.iter().filter(|r| r.scenario == scenario) {
        if let Some(failure) = &row.failure {
            let _ = writeln!(
                out,
                "| {} | failed: {failure} | | | | | | | | | |",
                row.server
            );
            continue;
        }
        let figures = row.figures();
        let base_figures = base.map(Row::figures);
        let cells: Vec<String> = figures
            .iter()
            .enumerate()
            .map(|(i, (name, value))| {
                let r = ratio(*value, base_figures.and_then(|b| b[i].1));
                let digits = match *name {
                    "p50_ms" | "p99_ms" => 2,
                    "peak_rss_mib" | "peak_pss_mib" => 1,
                    _ => 0,
                };
                cell(*value, r, digits)
            })
            .collect();
        let rss = if row.memory.peak_children > 0 {
            format!("{} [+{} processes]", cells[4], row.memory.peak_children)
        } else {
            cells[4].clone()
        };
        let _ = writeln!(
            out,
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            row.server,
            row.measure.ok,
            row.measure.attempted,
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            rss,
            cells[5],
            row.server_cpu_secs,
            cells[6],
            row.measure.error_count(),
        );
    }
    let errors: Vec<String> = rows
        .iter()
        .filter(|r| r.scenario == scenario)
        .flat_map(|r| {
            r.measure
                .errors
                .iter()
                .map(move |(k, n)| format!("  {}: {n} x {k}", r.server))
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "errors:");
        for e in errors {
            let _ = writeln!(out, "{e}");
        }
    }
    out
}

/// A figure of one row relative to another row's, if both ran.
fn relative(
    rows: &[Row],
    scenario: &str,
    server: &str,
    reference: &str,
    figure: fn(&Row) -> Option<f64>,
) -> Option<f64> {
    let find = |name: &str| {
        rows.iter()
            .find(|r| r.scenario == scenario && r.server == name && r.failure.is_none())
    };
    ratio(figure(find(server)?), figure(find(reference)?))
}

/// The targets, reported (not asserted): (text, ratio, goal).
pub fn targets(rows: &[Row]) -> Vec<(String, Option<f64>, f64)> {
    vec![
        (
            "short conn/s: host-threading vs native".into(),
            relative(rows, "short", "host-threading", BASELINE, Row::conn_per_s),
            0.8,
        ),
        (
            "short conn/s: host-forking vs py-forking".into(),
            relative(rows, "short", "host-forking", "py-forking", Row::conn_per_s),
            2.0,
        ),
        (
            "short conn/s: host-prefork vs native".into(),
            relative(rows, "short", "host-prefork", BASELINE, Row::conn_per_s),
            0.7,
        ),
        (
            "streaming MiB/s: host-threading vs native".into(),
            relative(rows, "stream", "host-threading", BASELINE, Row::mib_per_s),
            0.6,
        ),
        (
            "streaming MiB/s: host-forking vs native".into(),
            relative(rows, "stream", "host-forking", BASELINE, Row::mib_per_s),
            0.6,
        ),
        (
            "http-hello conn/s: host-threading vs wasmtime serve".into(),
            relative(rows, "http", "host-threading", WASMTIME, Row::conn_per_s),
            1.5,
        ),
    ]
}

pub fn targets_text(rows: &[Row]) -> String {
    let mut out = String::from("targets (reported, not asserted):\n");
    for (text, value, goal) in targets(rows) {
        let verdict = match value {
            Some(v) if v >= goal => format!("{v:.2}x  met (>= {goal}x)"),
            Some(v) => format!("{v:.2}x  MISSED (>= {goal}x)"),
            None => "not measured".into(),
        };
        let _ = writeln!(out, "  {text}: {verdict}");
    }
    out
}

fn opt(value: Option<f64>) -> Value {
    value.map_or(Value::Null, |v| json!(v))
}

/// Writes the JSON file: machine, configuration, rows with ratios, targets.
pub fn write_json(path: &Path, machine: Value, config: Value, rows: &[Row]) -> std::io::Result<()> {
    let results: Vec<Value> = rows
        .iter()
        .map(|row| {
            let base = baseline(rows, row.scenario).map(Row::figures);
            let native = rows
                .iter()
                .find(|r| r.scenario == row.scenario && r.server == BASELINE && r.failure.is_none())
                .map(Row::figures);
            let mut ratios = Map::new();
            let mut native_ratios = Map::new();
            let mut figures = Map::new();
            for (i, (name, value)) in row.figures().iter().enumerate() {
                figures.insert((*name).into(), opt(*value));
                ratios.insert(
                    (*name).into(),
                    opt(ratio(*value, base.and_then(|b| b[i].1))),
                );
                native_ratios.insert(
                    (*name).into(),
                    opt(ratio(*value, native.and_then(|b| b[i].1))),
                );
            }
            let extra: Map<String, Value> = row
                .measure
                .extra
                .iter()
                .map(|(k, v)| ((*k).to_string(), json!(v)))
                .collect();
            json!({
                "scenario": row.scenario,
                "server": row.server,
                "failure": row.failure,
                "ok": row.measure.ok,
                "attempted": row.measure.attempted,
                "served_incl_warmup": row.measure.served,
                "errors": row.measure.error_count(),
                "error_kinds": row.measure.errors,
                "elapsed_secs": row.measure.elapsed.as_secs_f64(),
                "bytes_echoed": row.measure.bytes,
                "figures": figures,
                "baseline": baseline_name(row.scenario),
                "ratio_to_baseline": ratios,
                "ratio_to_native": native_ratios,
                "peak_rss_kib": row.memory.peak_rss_kib,
                "peak_pss_kib": row.memory.peak_pss_kib,
                "peak_children": row.memory.peak_children,
                "server_cpu_secs": row.server_cpu_secs,
                "extra": extra,
            })
        })
        .collect();
    let targets: Vec<Value> = targets(rows)
        .into_iter()
        .map(|(text, value, goal)| {
            json!({"target": text, "ratio": opt(value), "goal": goal,
                   "met": value.map(|v| v >= goal)})
        })
        .collect();
    let doc = json!({
        "machine": machine,
        "config": config,
        "results": results,
        "targets": targets,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}
