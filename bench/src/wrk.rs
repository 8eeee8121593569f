//! The http scenarios' load: `wrk` (Debian's, installed by
//! `handlers/install-toolchains.sh http`), a standard HTTP/1.1 load
//! generator, instead of the bench's own client, `GET /` with keep-alive
//! (`http-keep-alive`) or with `Connection: close` (`http`: a connection
//! per request). Its latency quantiles (a Lua `done` hook prints p1 to p100
//! in microseconds) stand in for the per-connection samples of the other
//! scenarios, so p50 and p99 read the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::load::{Measure, ShortConfig};

/// Prints `requests N`, `errors N` and `q P US` for P in 1..=100.
const DONE: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("requests %d\n", summary.requests))
  io.write(string.format("errors %d\n", e.connect + e.read + e.write + e.status + e.timeout))
  io.write(string.format("elapsed_us %d\n", summary.duration))
  for p = 1, 100 do
    io.write(string.format("q %d %d\n", p, latency:percentile(p)))
  end
end
"#;

/// One wrk run against `addr` for the plan's duration (at least 1 s) with
/// its client count, after a warm-up run of the plan's warm-up.
pub fn http(addr: SocketAddr, cfg: &ShortConfig, keep_alive: bool) -> Measure {
    let script = std::env::temp_dir().join(format!("bench-wrk-{}.lua", std::process::id()));
    let mut measure = Measure::default();
    if let Err(e) = std::fs::write(&script, DONE) {
        measure
            .errors
            .insert(format!("cannot write {}: {e}", script.display()), 1);
        return measure;
    }
    if !cfg.warmup.is_zero() {
        let _ = run(addr, cfg, keep_alive, &script, cfg.warmup);
    }
    let duration = cfg.duration.max(Duration::from_secs(1));
    match run(addr, cfg, keep_alive, &script, duration) {
        Ok(out) => parse(&out, &mut measure),
        Err(e) => {
            measure.errors.insert(e, 1);
        }
    }
    let _ = std::fs::remove_file(&script);
    measure
}

fn run(
    addr: SocketAddr,
    cfg: &ShortConfig,
    keep_alive: bool,
    script: &std::path::Path,
    duration: Duration,
) -> Result<String, String> {
    let clients = cfg.clients.max(1);
    let mut command = Command::new("wrk");
    command
        .arg(format!("-t{}", clients.min(2)))
        .arg(format!("-c{clients}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg(format!("--timeout={}s", cfg.timeout.as_secs().max(1)))
        .arg("-s")
        .arg(script);
    if !keep_alive {
        command.args(["-H", "Connection: close"]);
    }
    command.arg(format!("http://{addr}/"));
    let output = command
        .output()
        .map_err(|e| format!("cannot run wrk (handlers/install-toolchains.sh http): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "wrk failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn parse(out: &str, measure: &mut Measure) {
    let mut values = BTreeMap::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("q"), Some(_), Some(us)) => {
                if let Ok(us) = us.parse() {
                    measure.latencies_us.push(us);
                }
            }
            (Some(name), Some(value), None) => {
                if let Ok(value) = value.parse::<u64>() {
                    values.insert(name.to_string(), value);
                }
            }
            _ => {}
        }
    }
    let requests = values.get("requests").copied().unwrap_or(0);
    let errors = values.get("errors").copied().unwrap_or(0);
    measure.attempted = requests + errors;
    measure.ok = requests.saturating_sub(errors);
    measure.served = requests;
    measure.elapsed = Duration::from_micros(values.get("elapsed_us").copied().unwrap_or(0));
    if errors > 0 {
        measure.errors.insert("wrk errors".into(), errors);
    }
}
