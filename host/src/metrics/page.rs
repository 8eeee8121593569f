//! The `/metrics` page: a snapshot of the shared counters, written by
//! `prometheus-client` in the Prometheus text format 0.0.4.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::shared::{Metrics, Slot, TenantInfo, DURATION_BOUNDS_US, MEMORY_BOUNDS};
use crate::outcome::Outcome;

/// The `Content-Type` of the page [`Metrics::render`] writes.
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

impl Metrics {
    /// The whole page in the text format, for the given tenants (only these
    /// are shown; one whose slot is out of range is left out).
    pub(crate) fn render(&self, tenants: &[TenantInfo]) -> String {
        let header = self.map.header();
        let page = Page {
            reloads: [
                header.reloads[0].load(Ordering::Relaxed),
                header.reloads[1].load(Ordering::Relaxed),
            ],
            tenants: tenants
                .iter()
                .filter(|info| info.slot < self.map.max_tenants)
                .map(|info| (info.clone(), Snapshot::of(self.map.slot(info.slot))))
                .collect(),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(page));
        let mut text = String::new();
        // Writing to a String cannot fail, and the collector only passes on
        // the writer's errors.
        if let Err(e) = prometheus_text::encode(&mut text, &registry) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        text
    }
}

/// One tenant's counters, read at render time.
#[derive(Debug)]
struct Snapshot {
    outcomes: [u64; Outcome::ALL.len()],
    in_flight: i64,
    received: u64,
    sent: u64,
    duration_buckets: [u64; DURATION_BOUNDS_US.len() + 1],
    duration_sum_us: u64,
    memory_buckets: [u64; MEMORY_BOUNDS.len() + 1],
    memory_sum: u64,
    outbound: [u64; 2],
    http_status: [u64; 5],
    http_duration_buckets: [u64; DURATION_BOUNDS_US.len() + 1],
    http_duration_sum_us: u64,
}

impl Snapshot {
    fn of(slot: &Slot) -> Snapshot {
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        Snapshot {
            outcomes: slot.outcomes.each_ref().map(load),
            in_flight: slot.in_flight.load(Ordering::Relaxed),
            received: load(&slot.received),
            sent: load(&slot.sent),
            duration_buckets: slot.duration_buckets.each_ref().map(load),
            duration_sum_us: load(&slot.duration_sum_us),
            memory_buckets: slot.memory_buckets.each_ref().map(load),
            memory_sum: load(&slot.memory_sum),
            outbound: slot.outbound.each_ref().map(load),
            http_status: slot.http_status.each_ref().map(load),
            http_duration_buckets: slot.http_duration_buckets.each_ref().map(load),
            http_duration_sum_us: load(&slot.http_duration_sum_us),
        }
    }
}

/// The values of one page, handed to `prometheus-client` as a collector.
#[derive(Debug)]
struct Page {
    reloads: [u64; 2],
    tenants: Vec<(TenantInfo, Snapshot)>,
}

/// A histogram's `(upper bound, count in that bucket)` pairs (not
/// cumulative: the encoder sums them), with the bounds scaled by `scale`.
fn buckets(bounds: &[u64], counts: &[u64], scale: f64) -> Vec<(f64, u64)> {
    bounds
        .iter()
        .zip(counts)
        .map(|(bound, count)| (*bound as f64 / scale, *count))
        .collect()
}

impl Page {
    /// One counter per tenant, from `value`.
    fn tenant_counter(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&Snapshot) -> u64,
    ) -> fmt::Result {
        let mut metric = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for (info, snapshot) in &self.tenants {
            let labels = [("tenant", info.name.as_str())];
            metric
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&value(snapshot), None)?;
        }
        Ok(())
    }
}

impl Page {
    /// The HTTP families, for the tenants that have served an HTTP request
    /// (`wasi:http/proxy` handlers): requests by status class and their
    /// duration.
    fn encode_http(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let http: Vec<_> = self
            .tenants
            .iter()
            .filter(|(_, s)| s.http_status.iter().sum::<u64>() > 0)
            .collect();
        if http.is_empty() {
            return Ok(());
        }
        let mut metric = encoder.encode_descriptor(
            "host_http_requests",
            "HTTP requests answered, by status class.",
            None,
            MetricType::Counter,
        )?;
        for (info, snapshot) in &http {
            for (class, count) in ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .into_iter()
                .zip(snapshot.http_status)
            {
                let labels = [("tenant", info.name.as_str()), ("class", class)];
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "host_http_request_duration",
            "How long HTTP requests took, from their head to their response's last byte.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (info, snapshot) in &http {
            let labels = [("tenant", info.name.as_str())];
            let counts = &snapshot.http_duration_buckets;
            metric
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(
                    snapshot.http_duration_sum_us as f64 / 1e6,
                    counts.iter().sum(),
                    &buckets(&DURATION_BOUNDS_US, counts, 1e6),
                    None,
                )?;
        }
        Ok(())
    }
}

impl Collector for Page {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        if !self.tenants.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "host_handler",
                "The handler each tenant serves with: its SHA-256 (or builtin-echo) and strategy.",
                None,
                MetricType::Info,
            )?;
            for (info, _) in &self.tenants {
                let labels = [
                    ("tenant", info.name.as_str()),
                    ("digest", info.digest.as_str()),
                    ("strategy", info.strategy.as_str()),
                ];
                metric.encode_info(&labels)?;
            }

            let mut metric = encoder.encode_descriptor(
                "host_connections",
                "Connections served, by how they ended.",
                None,
                MetricType::Counter,
            )?;
            for (info, snapshot) in &self.tenants {
                for (outcome, count) in Outcome::ALL.iter().zip(snapshot.outcomes) {
                    let labels = [("tenant", info.name.as_str()), ("outcome", outcome.name())];
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
                }
            }

            let mut metric = encoder.encode_descriptor(
                "host_connections_in_flight",
                "Connections accepted and not yet over.",
                None,
                MetricType::Gauge,
            )?;
            for (info, snapshot) in &self.tenants {
                let labels = [("tenant", info.name.as_str())];
                metric
                    .encode_family(&labels)?
                    .encode_gauge(&snapshot.in_flight)?;
            }

            self.tenant_counter(
                &mut encoder,
                "host_received",
                "Bytes received from clients.",
                Some(&Unit::Bytes),
                |snapshot| snapshot.received,
            )?;
            self.tenant_counter(
                &mut encoder,
                "host_sent",
                "Bytes sent to clients.",
                Some(&Unit::Bytes),
                |snapshot| snapshot.sent,
            )?;

            let mut metric = encoder.encode_descriptor(
                "host_connection_duration",
                "How long connections lasted, from accept to close.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (info, snapshot) in &self.tenants {
                let labels = [("tenant", info.name.as_str())];
                let counts = &snapshot.duration_buckets;
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        snapshot.duration_sum_us as f64 / 1e6,
                        counts.iter().sum(),
                        &buckets(&DURATION_BOUNDS_US, counts, 1e6),
                        None,
                    )?;
            }

            let mut metric = encoder.encode_descriptor(
                "host_instance_memory_peak",
                "Peak memory (all memories and tables) of each instance.",
                Some(&Unit::Bytes),
                MetricType::Histogram,
            )?;
            for (info, snapshot) in &self.tenants {
                let labels = [("tenant", info.name.as_str())];
                let counts = &snapshot.memory_buckets;
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        snapshot.memory_sum as f64,
                        counts.iter().sum(),
                        &buckets(&MEMORY_BOUNDS, counts, 1.0),
                        None,
                    )?;
            }

            let mut metric = encoder.encode_descriptor(
                "host_outbound_connections",
                "Guests' outbound TCP connects, by whether the tenant's grants allowed them.",
                None,
                MetricType::Counter,
            )?;
            for (info, snapshot) in &self.tenants {
                for (result, count) in ["opened", "refused"].into_iter().zip(snapshot.outbound) {
                    let labels = [("tenant", info.name.as_str()), ("result", result)];
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
                }
            }
        }

        self.encode_http(&mut encoder)?;

        let mut metric = encoder.encode_descriptor(
            "host_reloads",
            "Configuration reload attempts, by result.",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in ["ok", "failed"].into_iter().zip(self.reloads) {
            metric
                .encode_family(&[("result", result)])?
                .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::{self, Write as _};
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    fn info(name: &str, slot: usize) -> TenantInfo {
        TenantInfo {
            name: name.to_string(),
            slot,
            digest: "builtin-echo".to_string(),
            strategy: "threading".to_string(),
        }
    }

    /// The page's samples: `name{labels}` to value.
    fn samples(page: &str) -> BTreeMap<String, String> {
        page.lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("a sample line");
                (series.to_string(), value.to_string())
            })
            .collect()
    }

    fn value(samples: &BTreeMap<String, String>, series: &str) -> String {
        samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in {samples:#?}"))
            .clone()
    }

    /// Forks a child that runs `work` and `_exit(0)`s; returns its pid.
    /// `work` must not allocate (the test process has other threads).
    fn fork_child(work: impl FnOnce()) -> libc::pid_t {
        // SAFETY: the child runs only `work` (atomics, no allocation or
        // locks) and then `_exit`s without unwinding or running destructors.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", io::Error::last_os_error()),
            0 => {
                work();
                // SAFETY: ends the child at once, as intended.
                unsafe { libc::_exit(0) }
            }
            pid => pid,
        }
    }

    fn wait_child(pid: libc::pid_t) {
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child with a valid status pointer.
            let got = unsafe { libc::waitpid(pid, &mut status, 0) };
            if got == pid {
                break;
            }
            let e = io::Error::last_os_error();
            assert_eq!(e.kind(), io::ErrorKind::Interrupted, "waitpid: {e}");
        }
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
    }

    #[test]
    fn counts_from_forked_children_are_visible_and_exact() {
        let metrics = Metrics::new(3).unwrap();
        let tenant = metrics.tenant(2);
        let children: Vec<_> = (0..8)
            .map(|_| {
                let tenant = tenant.clone();
                fork_child(move || {
                    for _ in 0..1000 {
                        let in_flight = tenant.in_flight();
                        tenant.record(Outcome::Ok, 3, 5, 2 * MS, Some(100 << 10));
                        drop(in_flight);
                    }
                    // Still in flight when the child exits.
                    std::mem::forget(tenant.in_flight());
                })
            })
            .collect();
        metrics.reloaded(true);
        for pid in children {
            wait_child(pid);
        }
        let page = metrics.render(&[info("forked", 2)]);
        let samples = samples(&page);
        let get = |series: &str| value(&samples, series);
        assert_eq!(
            get(r#"host_connections_total{tenant="forked",outcome="ok"}"#),
            "8000"
        );
        assert_eq!(get(r#"host_connections_in_flight{tenant="forked"}"#), "8");
        assert_eq!(
            get(r#"host_received_bytes_total{tenant="forked"}"#),
            "24000"
        );
        assert_eq!(get(r#"host_sent_bytes_total{tenant="forked"}"#), "40000");
        assert_eq!(
            get(r#"host_connection_duration_seconds_count{tenant="forked"}"#),
            "8000"
        );
        assert_eq!(
            get(r#"host_connection_duration_seconds_bucket{tenant="forked",le="0.005"}"#),
            "8000"
        );
        assert_eq!(
            get(r#"host_instance_memory_peak_bytes_bucket{tenant="forked",le="262144"}"#),
            "8000"
        );
        assert_eq!(get(r#"host_reloads_total{result="ok"}"#), "1");
    }

    #[test]
    fn exact_counts_per_tenant_and_outcome() {
        let metrics = Metrics::new(4).unwrap();
        assert_eq!(metrics.max_tenants(), 4);
        let a = metrics.tenant(0);
        let b = metrics.tenant(3);
        let hidden = metrics.tenant(1);
        for _ in 0..3 {
            a.record(Outcome::Ok, 10, 20, MS, Some(1 << 20));
        }
        a.record(Outcome::Trap, 1, 0, MS, Some(1 << 20));
        // (Outcomes are no longer strings, so none is unknown: the host-error
        // an unknown one counted as is recorded as one.)
        a.record(Outcome::HostError, 0, 0, MS, Some(1 << 20));
        b.record(Outcome::Denied, 0, 0, Duration::ZERO, None);
        b.record(Outcome::Timeout, 7, 0, 5 * MS, Some(64 << 10));
        b.record(Outcome::HostError, 0, 0, MS, None);
        hidden.record(Outcome::Ok, 1, 1, MS, None);
        let first = a.in_flight();
        let _second = a.in_flight();
        drop(first);
        metrics.reloaded(true);
        metrics.reloaded(false);
        metrics.reloaded(false);

        let page = metrics.render(&[info("a", 0), info("b", 3)]);
        let samples = samples(&page);
        let get = |series: &str| value(&samples, series);
        let expected_a = [3, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0];
        let expected_b = [0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0];
        for (tenant, expected) in [("a", expected_a), ("b", expected_b)] {
            for (outcome, count) in Outcome::ALL.iter().map(|o| o.name()).zip(expected) {
                assert_eq!(
                    get(&format!(
                        r#"host_connections_total{{tenant="{tenant}",outcome="{outcome}"}}"#
                    )),
                    count.to_string(),
                    "{tenant} {outcome}"
                );
            }
        }
        assert_eq!(get(r#"host_connections_in_flight{tenant="a"}"#), "1");
        assert_eq!(get(r#"host_connections_in_flight{tenant="b"}"#), "0");
        assert_eq!(get(r#"host_received_bytes_total{tenant="a"}"#), "31");
        assert_eq!(get(r#"host_sent_bytes_total{tenant="a"}"#), "60");
        assert_eq!(get(r#"host_received_bytes_total{tenant="b"}"#), "7");
        assert_eq!(get(r#"host_reloads_total{result="ok"}"#), "1");
        assert_eq!(get(r#"host_reloads_total{result="failed"}"#), "2");
        assert_eq!(
            get(r#"host_handler_info{tenant="b",digest="builtin-echo",strategy="threading"}"#),
            "1"
        );
        // Memory is only counted when an instance was created.
        assert_eq!(
            get(r#"host_instance_memory_peak_bytes_count{tenant="b"}"#),
            "1"
        );
        assert_eq!(
            get(r#"host_connection_duration_seconds_count{tenant="b"}"#),
            "3"
        );
        // Only the tenants asked for are shown: 12 outcomes for each of two.
        assert!(!page.contains(r#"tenant="1""#) && !page.contains("hidden"));
        let connection_lines = samples
            .keys()
            .filter(|series| series.starts_with("host_connections_total{"))
            .count();
        assert_eq!(connection_lines, 24);
        // A slot out of range is left out rather than panicking.
        let page = metrics.render(&[info("gone", 99)]);
        assert!(!page.contains("gone"));
    }

    #[test]
    fn histograms_are_cumulative_with_count_and_sum() {
        let metrics = Metrics::new(1).unwrap();
        let t = metrics.tenant(0);
        // Durations: on a bound (inclusive), just above it, in the middle,
        // and above every bound.
        t.record(Outcome::Ok, 0, 0, MS, Some(64 << 10));
        t.record(
            Outcome::Ok,
            0,
            0,
            MS + Duration::from_nanos(1),
            Some((64 << 10) + 1),
        );
        t.record(Outcome::Ok, 0, 0, Duration::from_millis(300), Some(4 << 30));
        t.record(Outcome::Ok, 0, 0, Duration::from_secs(90), Some(5 << 30));
        t.record(Outcome::Denied, 0, 0, Duration::from_micros(500), None);

        let samples = samples(&metrics.render(&[info("h", 0)]));
        let get = |series: &str| value(&samples, series);
        let duration = |le: &str| {
            get(&format!(
                r#"host_connection_duration_seconds_bucket{{tenant="h",le="{le}"}}"#
            ))
        };
        assert_eq!(duration("0.001"), "2");
        assert_eq!(duration("0.005"), "3");
        assert_eq!(duration("0.25"), "3");
        assert_eq!(duration("0.5"), "4");
        assert_eq!(duration("60"), "4");
        assert_eq!(duration("+Inf"), "5");
        assert_eq!(
            get(r#"host_connection_duration_seconds_count{tenant="h"}"#),
            "5"
        );
        let sum: f64 = get(r#"host_connection_duration_seconds_sum{tenant="h"}"#)
            .parse()
            .unwrap();
        assert!((sum - 90.3025).abs() < 1e-9, "sum {sum}");

        let memory = |le: &str| {
            get(&format!(
                r#"host_instance_memory_peak_bytes_bucket{{tenant="h",le="{le}"}}"#
            ))
        };
        assert_eq!(memory("65536"), "1");
        assert_eq!(memory("262144"), "2");
        assert_eq!(memory("1.073741824e+09"), "2");
        assert_eq!(memory("4.294967296e+09"), "3");
        assert_eq!(memory("+Inf"), "4");
        assert_eq!(
            get(r#"host_instance_memory_peak_bytes_count{tenant="h"}"#),
            "4"
        );
        let sum: f64 = get(r#"host_instance_memory_peak_bytes_sum{tenant="h"}"#)
            .parse()
            .unwrap();
        let expected = (64 << 10) + (64 << 10) + 1 + (4u64 << 30) + (5u64 << 30);
        assert_eq!(sum, expected as f64);
        // Every bucket, in order, each at least the one before.
        let counts: Vec<u64> = samples
            .iter()
            .filter(|(series, _)| series.starts_with("host_connection_duration_seconds_bucket"))
            .map(|(_, v)| v.parse().unwrap())
            .collect();
        assert_eq!(counts.len(), DURATION_BOUNDS_US.len() + 1);
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new(1).unwrap();
        metrics.tenant(0).record(Outcome::Ok, 1, 1, MS, None);
        let page = metrics.render(&[info("we\"ird\\name\n", 0)]);
        assert!(page.contains(r#"tenant="we\"ird\\name\n""#), "{page}");
    }

    /// `promtool check metrics` on a page, if promtool is installed; in CI
    /// (`CI` set, as `.ci/run` runs), whose `handlers/install-toolchains.sh`
    /// installs it, a missing promtool fails the test.
    fn promtool(page: &str) -> Option<(bool, String)> {
        use std::process::{Command, Stdio};
        let mut child = match Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "promtool not run ({e}); CI installs it: handlers/install-toolchains.sh promtool"
                );
                eprintln!("promtool not run ({e}); install the `prometheus` package");
                return None;
            }
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        Some((output.status.success(), text))
    }

    #[test]
    fn page_passes_promtool() {
        let metrics = Metrics::new(3).unwrap();
        metrics
            .tenant(0)
            .record(Outcome::Ok, 5, 5, 3 * MS, Some(1 << 20));
        metrics.tenant(2).record(Outcome::Denied, 0, 0, MS, None);
        metrics.tenant(2).record_request(404, 2 * MS);
        metrics.reloaded(false);
        let tenants = [
            info("a", 0),
            TenantInfo {
                name: "b \"quoted\"".to_string(),
                slot: 2,
                digest: "ab".repeat(32),
                strategy: "forking".to_string(),
            },
        ];
        for page in [metrics.render(&tenants), metrics.render(&[])] {
            if let Some((ok, output)) = promtool(&page) {
                assert!(ok && output.trim().is_empty(), "{output}\n{page}");
            }
        }
    }
}
