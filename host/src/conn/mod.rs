//! The connection layer: one connection, start to end, whatever strategy
//! runs it. `service` is the path itself (`Service::serve`), `store` its store and
//! instance; `proxy` reads a
//! balancer's PROXY protocol header first, `proxy_header` parses it; `report` names
//! how it ended and writes its `closed` line; `socket` is the accepted socket
//! and how the connection waits on it, `streams` the guest's `wasi:io`
//! streams over it; `guest_log` turns the guest's stdout and
//! stderr into log lines; `timing` is `host check`'s measurements of the
//! same path. `http` serves a `wasi:http/proxy` handler's connection
//! instead (hyper over `http_io`, an instance per request in
//! `http_request`); `dispatch` picks one path or the other, and `phase`
//! is where a tenant's HTTP connections stand (serving, draining,
//! aborting).

pub(crate) mod dispatch;
pub(crate) mod guest_log;
pub(crate) mod http;
pub(crate) mod http_io;
pub(crate) mod http_request;
pub(crate) mod phase;
pub(crate) mod proxy;
pub(crate) mod proxy_header;
pub(crate) mod report;
pub(crate) mod service;
pub(crate) mod socket;
pub(crate) mod store;
pub(crate) mod streams;
pub(crate) mod timing;
