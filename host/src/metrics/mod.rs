//! Per-tenant Prometheus metrics that stay exact across forked processes: the
//! counters live in one anonymous shared mapping, updated with atomics by
//! whichever process serves a connection, and are rendered (and served over
//! HTTP) by the metrics process.
//!
//! The mapping is created once, before any `fork()`, so every tenant process,
//! every forked per-connection child and the metrics process see the same
//! counters. Updates are single atomic read-modify-writes on 64-bit values
//! (lock-free, hence address-free, so they work between processes) and never
//! allocate, so they are safe in a child forked from a multi-threaded parent.
//!
//! The page is written by `prometheus-client` in the Prometheus text format
//! 0.0.4 ([`CONTENT_TYPE`]), the format `promtool check metrics` accepts: its
//! OpenMetrics text (`info` type, `# UNIT`, counters named without `_total`)
//! is rejected or warned about by promtool.
//!
//! `shared` holds the counters, `page` renders them, `http` serves the page,
//! and `health` says what `/healthz`, `/readyz` and `/` answer.

mod health;
mod http;
mod page;
mod shared;

pub(crate) use health::Readiness;
pub(crate) use http::serve_http;
pub(crate) use shared::{InFlight, Metrics, TenantInfo, TenantMetrics};
