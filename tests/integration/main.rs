//! The integration tests: one binary, every scenario against a real `host`
//! process over real TCP with real components, repeated under each strategy.

mod support;

mod bad_input;
mod cache;
mod cli;
mod clients;
mod conformance;
mod echo;
mod faults;
mod guests;
mod habits;
mod http;
mod live;
mod ops;
mod outbound;
mod proxy;
mod sandbox;
mod shutdown;
mod soak;
mod systemd;
mod tenants;
mod upgrade;
