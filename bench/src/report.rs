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
    if scenario == "http" || scenario == "http-keep-alive" {
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
    /// Minor page faults of the server's processes (and reaped children)
    /// during the scenario.
    pub server_faults: u64,
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

    /// Minor page faults per connection served (forking: mostly each
    /// child's copy-on-write faults).
    pub fn faults_per_conn(&self) -> Option<f64> {
        let served = self.measure.served;
        (served > 0 && self.server_faults > 0).then(|| self.server_faults as f64 / served as f64)
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
    fn figures(&self) -> [(&'static str, Option<f64>); 8] {
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
            (
                "minflt_per_conn",
                self.faults_per_conn().filter(|_| !streaming),
            ),
        ]
    }
}

/// Nearest-rank percentile.
pub fn percentile(samples: &[u64], p: f64) -> Option<u64> {
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

/// A row's failure on one line: its first line and, if the server's log
/// follows, the log's first line (e.g. `host-async exited before listening:
/// error: invalid value 'async' for '--strategy <STRATEGY>'`).
pub fn failure_summary(failure: &str) -> String {
    let mut lines = failure.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    match lines.next() {
        Some(second) => format!("{first} {second}"),
        None => first.to_string(),
    }
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
        "| server | ok | conn/s | p50 ms | p99 ms | MiB/s | peak RSS MiB | peak PSS MiB | server CPU s | CPU µs/conn | minflt/conn | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows.iter().filter(|r| r.scenario == scenario) {
        if let Some(failure) = &row.failure {
            let failure = failure_summary(failure);
            let _ = writeln!(
                out,
                "| {} | failed: {failure} | | | | | | | | | | |",
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
                    "peak_rss_mib" | "peak_pss_mib" | "minflt_per_conn" => 1,
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
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |",
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
            cells[7],
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

/// RSS per live connection, KiB, of an interactive row.
fn rss_per_live_kib(row: &Row) -> Option<f64> {
    row.measure.extra("rss_per_live_kib")
}

/// Whole-exchange seconds of an interactive row.
fn whole_secs(row: &Row) -> Option<f64> {
    (row.measure.attempted > 0).then_some(row.measure.elapsed.as_secs_f64())
}

/// Failures of a row that were timeouts.
fn timeouts(row: &Row) -> u64 {
    row.measure
        .errors
        .iter()
        .filter(|(kind, _)| kind.contains("timed out"))
        .map(|(_, n)| n)
        .sum()
}

fn mib(kib: Option<f64>) -> Option<f64> {
    kib.map(|k| k / 1024.0)
}

/// The table of an interactive scenario: first-echo latency, whole exchange
/// and the server's memory before, at the peak, per live connection, and
/// after; ratios to native where it ran.
pub fn interactive_table(rows: &[Row], scenario: &'static str, title: &str) -> String {
    let base = baseline(rows, scenario);
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    let _ = writeln!(
        out,
        "| server | ok | failed (timed out) | first echo p50 ms | first echo p99 ms | second echo p99 ms | whole s | live at once | idle RSS MiB | peak RSS MiB | RSS/live conn KiB | RSS after MiB | peak PSS MiB | PSS/live conn KiB |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let with_ratio = |row: &Row, figure: &dyn Fn(&Row) -> Option<f64>, digits: usize| {
        cell(
            figure(row),
            ratio(figure(row), base.and_then(figure)),
            digits,
        )
    };
    for row in rows.iter().filter(|r| r.scenario == scenario) {
        if let Some(failure) = &row.failure {
            let failure = failure_summary(failure);
            let _ = writeln!(
                out,
                "| {} | not run: {failure} | | | | | | | | | | | | |",
                row.server
            );
            continue;
        }
        let m = &row.measure;
        let plain = |name: &str, digits: usize| cell(m.extra(name), None, digits);
        let _ = writeln!(
            out,
            "| {} | {}/{} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.server,
            m.ok,
            m.attempted,
            m.error_count(),
            timeouts(row),
            with_ratio(row, &|r| r.percentile_ms(50.0), 2),
            with_ratio(row, &|r| r.percentile_ms(99.0), 2),
            plain("second_echo_p99_ms", 2),
            with_ratio(row, &whole_secs, 2),
            plain("live_peak", 0),
            cell(mib(m.extra("idle_rss_kib")), None, 1),
            with_ratio(row, &|r| mib(r.measure.extra("peak_rss_kib")), 1),
            with_ratio(row, &rss_per_live_kib, 1),
            cell(mib(m.extra("after_rss_kib")), None, 1),
            with_ratio(row, &|r| mib(r.measure.extra("peak_pss_kib")), 1),
            with_ratio(row, &|r| r.measure.extra("pss_per_live_kib"), 1),
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

/// One progress line for an interactive row.
pub fn interactive_progress(row: &Row) -> String {
    let m = &row.measure;
    let fmt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    format!(
        "{} {:<15} ok {}/{} (timed out {})  first echo p50 {} ms p99 {} ms  whole {} s  live {}  RSS idle {} peak {} after {} MiB  {} KiB/live conn (PSS {})",
        row.scenario,
        row.server,
        m.ok,
        m.attempted,
        timeouts(row),
        fmt(row.percentile_ms(50.0), 2),
        fmt(row.percentile_ms(99.0), 2),
        fmt(whole_secs(row), 2),
        fmt(m.extra("live_peak"), 0),
        fmt(mib(m.extra("idle_rss_kib")), 1),
        fmt(mib(m.extra("peak_rss_kib")), 1),
        fmt(mib(m.extra("after_rss_kib")), 1),
        fmt(rss_per_live_kib(row), 1),
        fmt(m.extra("pss_per_live_kib"), 1),
    )
}

/// Issue 19's interactive targets, reported (not asserted): (text, met),
/// `None` when the row did not run.
pub fn interactive_targets(rows: &[Row]) -> Vec<(String, Option<bool>)> {
    let find = |scenario: &str, server: &str| {
        rows.iter()
            .find(|r| r.scenario == scenario && r.server == server && r.failure.is_none())
    };
    let served = |row: &Row| {
        format!(
            "{}/{} ok, first-echo p99 {}",
            row.measure.ok,
            row.measure.attempted,
            row.percentile_ms(99.0)
                .map_or("-".into(), |v| format!("{v:.1} ms"))
        )
    };
    let all_ok = |row: &Row| row.measure.ok == row.measure.attempted;
    let p99_under = |row: &Row, ms: f64| row.percentile_ms(99.0).is_some_and(|p| p < ms);
    let mut out = Vec::new();
    let text = "interactive: host-threading, default flags: every client served, first-echo p99 < 50 ms, whole exchange < hold + 1 s";
    out.push(match find("interactive", "host-threading") {
        None => (text.to_string(), None),
        Some(row) => {
            let hold = row.measure.extra("hold_secs").unwrap_or(0.0);
            let whole = whole_secs(row).unwrap_or(f64::INFINITY);
            (
                format!(
                    "{text} ({} clients, hold {hold:.1} s: {}, whole {whole:.2} s)",
                    row.measure.attempted,
                    served(row)
                ),
                Some(all_ok(row) && p99_under(row, 50.0) && whole < hold + 1.0),
            )
        }
    });
    let text = "interactive-async: host-async: every client served, first-echo p99 < 100 ms, RSS per live connection <= 64 KiB";
    out.push(match find("interactive-async", "host-async") {
        None => (text.to_string(), None),
        Some(row) => {
            let per_live = rss_per_live_kib(row);
            (
                format!(
                    "{text} ({} clients: {}, {} KiB per live connection)",
                    row.measure.attempted,
                    served(row),
                    per_live.map_or("-".into(), |k| format!("{k:.1}"))
                ),
                Some(all_ok(row) && p99_under(row, 100.0) && per_live.is_some_and(|k| k <= 64.0)),
            )
        }
    });
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
            "short conn/s: host-threading at --log-level warn vs at info".into(),
            relative(
                rows,
                "short",
                "host-threading-warn",
                "host-threading",
                Row::conn_per_s,
            ),
            1.0,
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
            "wasi-http-hello requests/s (Connection: close): host-threading vs wasmtime serve"
                .into(),
            relative(rows, "http", "host-threading", WASMTIME, Row::conn_per_s),
            1.5,
        ),
        (
            "wasi-http-hello requests/s (keep-alive): host-threading vs wasmtime serve".into(),
            relative(
                rows,
                "http-keep-alive",
                "host-threading",
                WASMTIME,
                Row::conn_per_s,
            ),
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
    for (text, met) in interactive_targets(rows) {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
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
                "server_minor_faults": row.server_faults,
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
    let interactive_targets: Vec<Value> = interactive_targets(rows)
        .into_iter()
        .map(|(text, met)| json!({"target": text, "met": met}))
        .collect();
    let doc = json!({
        "machine": machine,
        "config": config,
        "results": results,
        "targets": targets,
        "interactive_targets": interactive_targets,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}
