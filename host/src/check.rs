//! `host check`: tells a handler's author, in plain words, whether a file can
//! be served and why not; with `--run`, serves it on loopback and runs the
//! standard echo scenarios against it (the conformance kit).

use std::fmt;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use harness::{Launch, Process};
use wasmtime::component::types::ComponentItem;
use wasmtime::{Engine, Precompiled};

use crate::check_http::ImportVerdict;
use crate::conn::report::Ending;
use crate::conn::service::Service;
use crate::outcome::Outcome;
use crate::settings::{self, ServeConfig, StrategyKind};
use crate::wasm::engine::{self, EpochClock};
use crate::wasm::handler::{self, Handler, HandlerSource};
use crate::wasm::http::World;

/// The most runs each timing (instantiate; instantiate + call) is taken
/// over, after one unmeasured warm-up run.
const RUNS: usize = 1000;
/// A timing stops early once its runs have taken this long, so that `host
/// check` of a slow handler still ends within a few seconds.
const INSTANTIATE_BUDGET: Duration = Duration::from_secs(1);
const CALL_BUDGET: Duration = Duration::from_secs(2);
/// What each timed connection's client sends before it half-closes.
const REQUEST_BYTES: usize = 64;
/// How long one conformance scenario may take.
const SCENARIO_PATIENCE: Duration = Duration::from_secs(30);

/// Runs `host check`; `Ok(true)` when the handler can be served (and, with
/// `run`, passed every scenario).
pub fn check(path: &Path, run: bool, strategy: StrategyKind) -> Result<bool> {
    let source = HandlerSource::File(path.to_path_buf());
    let bytes = handler::read(&source)?;
    println!("handler:     {}", path.display());
    println!(
        "size:        {}",
        bytesize::ByteSize(bytes.len() as u64).display().iec()
    );
    println!(
        "sha256:      {}",
        crate::wasm::compile_cache::digest(&bytes)
    );
    let verdict = |ok: bool, why: &str| {
        if ok {
            println!("verdict:     can be served");
        } else {
            println!("verdict:     cannot be served: {why}");
        }
        ok
    };

    match Engine::detect_precompiled(&bytes) {
        Some(Precompiled::Component) => {
            println!("format:      precompiled native code (from `host compile`)");
            return Ok(verdict(false, "check the .wasm it was compiled from; precompiled files are served only with --allow-precompiled"));
        }
        Some(Precompiled::Module) => {
            println!("format:      a precompiled core module");
            return Ok(verdict(false, "it is not a component"));
        }
        None => {}
    }
    if let Err(what) = handler::check_header(&bytes) {
        println!("format:      not a component: it {what}");
        return Ok(verdict(false, &format!("the file {what}")));
    }
    println!("format:      a WebAssembly component");

    // The engine `host serve --handler PATH --strategy STRATEGY` builds
    // (its pooling allocator included), so the timings are the served ones.
    let config = as_served(Some(path), strategy)?;
    let (engine, _) = engine::for_host(std::slice::from_ref(&config), false)?;
    let started = Instant::now();
    let component = match handler::compile(&engine, &source, &bytes, None) {
        Ok(component) => component,
        Err(e) => return Ok(verdict(false, &format!("{e:#}"))),
    };
    println!("compile:     {:.2?}", started.elapsed());

    let ty = component.component_type();
    // Interfaces and functions; resource types the contract itself names
    // (`input-stream`, `output-stream`) are not imports a host provides.
    let imports: Vec<_> = ty
        .imports(&engine)
        .filter(|(_, item)| {
            matches!(
                item.ty,
                ComponentItem::ComponentInstance(_) | ComponentItem::ComponentFunc(_)
            )
        })
        .map(|(name, _)| name.to_string())
        .collect();
    println!(
        "imports:     {}",
        if imports.is_empty() { "none" } else { "" }
    );
    let world = crate::wasm::http::world_of(&engine, &component);
    let mut unavailable = Vec::new();
    for name in &imports {
        let (verdict, note) = match (world, name.starts_with("wasi:http/")) {
            (World::Http, true) => crate::check_http::classify_import(name),
            _ => classify_import(name),
        };
        if verdict == ImportVerdict::Missing {
            unavailable.push(name.clone());
        }
        println!("  {name:<44} {note}");
    }
    let exports: Vec<_> = ty
        .exports(&engine)
        .map(|(name, item)| match item.ty {
            ComponentItem::ComponentFunc(_) => format!("{name} (function)"),
            ComponentItem::ComponentInstance(_) => format!("{name} (interface)"),
            _ => name.to_string(),
        })
        .collect();
    println!(
        "exports:     {}",
        if exports.is_empty() {
            "none".to_string()
        } else {
            exports.join(", ")
        }
    );

    if world == World::Http {
        return crate::check_http::check_http(
            &engine,
            &source,
            &component,
            &bytes,
            &unavailable,
            run,
            &verdict,
        );
    }
    if !ty.exports(&engine).any(|(name, _)| name == "handle") {
        return Ok(verdict(
            false,
            "it exports no `handle` function: build it for the world host:handler/handler@0.1.0 in wit/handler.wit",
        ));
    }
    let pre = match handler::link(&engine, &source, &component) {
        Ok(pre) => pre,
        Err(e) => {
            let why = if unavailable.is_empty() {
                format!(
                    "{e:#} (expected `handle: func(info: connection-info, input: input-stream, output: output-stream) -> result<_, string>`)"
                )
            } else {
                format!(
                    "it imports {}, which the host does not provide",
                    unavailable.join(", ")
                )
            };
            return Ok(verdict(false, &why));
        }
    };
    println!("world:       {}", World::Handler.name());
    println!("handle:      exported with the type of host:handler/handler@0.1.0");

    let digest = crate::wasm::compile_cache::digest(&bytes);
    let service = service(&config, Handler::from_parts(digest, pre))?;
    let instantiate = match time_instantiation(&service, INSTANTIATE_BUDGET, RUNS) {
        Ok(spread) => spread,
        Err(e) => return Ok(verdict(false, &format!("{e:#}"))),
    };
    println!(
        "instantiate: {instantiate} ({} fresh instances)",
        instantiate.runs
    );
    let calls = time_calls(&service, CALL_BUDGET, RUNS)?;
    println!(
        "instantiate + call: {} ({} connections, {REQUEST_BYTES} B each)",
        calls.spread, calls.spread.runs
    );
    println!("  reply:     {}", calls.describe());
    if !verdict(true, "") {
        return Ok(false);
    }
    if !run {
        return Ok(true);
    }
    conformance(path, strategy)
}

/// The tenant `host serve --handler PATH --strategy STRATEGY` runs (`None`:
/// the built-in echo), every other setting at its default.
fn as_served(path: Option<&Path>, strategy: StrategyKind) -> Result<ServeConfig> {
    settings::as_served(path, strategy)
}

/// The tenant's service, as a threading worker makes it, with its engine's
/// epoch ticker started (a start function that never returns is stopped at
/// the timeout).
fn service(config: &ServeConfig, handler: Handler) -> Result<Service> {
    let clock = EpochClock::start_ticker(handler.engine())?;
    Ok(Service::new(
        handler,
        config.tenant.clone(),
        config.limits.clone(),
        config.grants.clone(),
        clock,
    ))
}

/// The p50, p99 and maximum of one timing's runs.
#[derive(Debug)]
struct Spread {
    runs: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Spread {
    /// Nearest-rank percentiles of `times` (not empty).
    fn of(mut times: Vec<Duration>) -> Spread {
        times.sort();
        let rank = |p: usize| times[(times.len() * p).div_ceil(100).max(1) - 1];
        Spread {
            runs: times.len(),
            p50: rank(50),
            p99: rank(99),
            max: rank(100),
        }
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.1?}, p99 {:.1?}, max {:.1?}",
            self.p50, self.p99, self.max
        )
    }
}

/// Runs `one` once unmeasured (first-use costs a worker pays once, not per
/// connection), then up to `runs` times, stopping early once `budget` has
/// passed since the start (after at least one measured run).
fn repeat<T>(
    budget: Duration,
    runs: usize,
    mut one: impl FnMut(usize) -> Result<(Duration, T)>,
) -> Result<(Spread, Vec<T>)> {
    let started = Instant::now();
    one(0)?;
    let mut times = Vec::with_capacity(runs);
    let mut results = Vec::with_capacity(runs);
    for run in 1..=runs.max(1) {
        if run > 1 && started.elapsed() >= budget {
            break;
        }
        let (took, result) = one(run)?;
        times.push(took);
        results.push(result);
    }
    Ok((Spread::of(times), results))
}

/// Instantiation alone: a fresh store and instance per run, as a connection
/// gets, over one connected loopback socket (instantiation does not touch
/// it); only `instantiate` is timed.
fn time_instantiation(service: &Service, budget: Duration, runs: usize) -> Result<Spread> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let _client = TcpStream::connect(listener.local_addr()?)?;
    let stream = socket2::Socket::from(listener.accept()?.0);
    let (spread, _) = repeat(budget, runs, |_| {
        service.time_instantiate(&stream).map(|took| (took, ()))
    })?;
    Ok(spread)
}

/// Instantiate + call over a loopback connection per run.
struct Calls {
    spread: Spread,
    /// Runs whose client read back exactly what it sent.
    echoed: usize,
    /// Runs that ended with outcome `ok`.
    ok: usize,
    /// The first outcome other than `ok`.
    failure: Option<Ending>,
}

impl Calls {
    fn describe(&self) -> String {
        let runs = self.spread.runs;
        let mut text = if self.echoed == runs {
            format!("the {REQUEST_BYTES} B came back on every connection")
        } else {
            format!(
                "the {REQUEST_BYTES} B came back on {} of {runs} connections",
                self.echoed
            )
        };
        if self.echoed == 0 {
            text.push_str(" (not an echo handler, or its call is broken: reported, not checked)");
        }
        if self.ok == runs {
            text.push_str("; outcome ok");
        } else {
            text.push_str(&format!("; outcome ok on {} of {runs}", self.ok));
        }
        if let Some(failure) = &self.failure {
            text.push_str(&format!(", e.g. {failure}"));
        }
        text
    }
}

/// Instantiate + call, the host-side cost of one connection: per run a fresh
/// loopback connection whose client has already sent [`REQUEST_BYTES`] bytes
/// and half-closed, served as `host serve` serves it (fresh store and
/// instance, the whole `handle` call, the store dropped: see
/// [`Service::time_call`]); then the client reads the reply to its end.
fn time_calls(service: &Service, budget: Duration, runs: usize) -> Result<Calls> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let request = pattern(REQUEST_BYTES as u64, REQUEST_BYTES);
    let (spread, replies) = repeat(budget, runs, |run| {
        let mut client = TcpStream::connect(addr).context("connecting on loopback")?;
        client.write_all(&request)?;
        client.shutdown(Shutdown::Write)?;
        let (stream, _) = listener.accept()?;
        let (took, outcome) = service.time_call(stream.into(), run as u64 + 1);
        client.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reply = Vec::new();
        // A reset or a silent handler: what came back is the reply.
        let _ = client.read_to_end(&mut reply);
        Ok((took, (reply == request, outcome)))
    })?;
    Ok(Calls {
        spread,
        echoed: replies.iter().filter(|(echoed, _)| *echoed).count(),
        ok: replies
            .iter()
            .filter(|(_, o)| o.outcome == Outcome::Ok)
            .count(),
        failure: replies
            .into_iter()
            .map(|(_, ending)| ending)
            .find(|o| o.outcome != Outcome::Ok),
    })
}

/// What the host does with an import, in words.
fn classify_import(name: &str) -> (ImportVerdict, &'static str) {
    let interface = name.split('@').next().unwrap_or(name);
    let package = interface.split('/').next().unwrap_or(interface);
    match (package, interface) {
        (_, "wasi:cli/environment") => (
            ImportVerdict::Denied,
            "denied by default: empty unless --env",
        ),
        (_, "wasi:cli/stdin") => (ImportVerdict::Denied, "denied: always empty"),
        (_, "wasi:cli/stdout" | "wasi:cli/stderr") => {
            (ImportVerdict::Granted, "provided: goes to the host's log")
        }
        ("wasi:filesystem", _) => (
            ImportVerdict::Denied,
            "denied by default: no directories unless --dir",
        ),
        ("wasi:sockets", _) => (ImportVerdict::Denied, "denied: no network"),
        ("wasi:io" | "wasi:clocks" | "wasi:random" | "wasi:cli", _) => {
            (ImportVerdict::Granted, "provided")
        }
        ("host:handler", _) if name == "host:handler/types@0.1.0" => {
            (ImportVerdict::Granted, "provided (the contract's types)")
        }
        ("host:handler", _) => (
            ImportVerdict::Missing,
            "NOT PROVIDED: the host implements host:handler@0.1.0",
        ),
        _ => (ImportVerdict::Missing, "NOT PROVIDED by the host"),
    }
}

/// How long `host serve` may take to print its `listening on` line.
const START_PATIENCE: Duration = Duration::from_secs(120);

/// A `host serve` of the handler, for the conformance run; killed when
/// dropped. In the caller's process group, so a Ctrl-C reaches it too.
struct Served {
    process: Process,
    addr: SocketAddr,
}

fn serve(path: &Path, strategy: StrategyKind) -> Result<Served> {
    let exe = std::env::current_exe().context("cannot find the host binary")?;
    let mut command = Command::new(exe);
    command
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--strategy",
            strategy.name(),
            "--handler",
        ])
        .arg(path);
    // From here on the guard kills the server on every path.
    let process = Launch::new(command)
        .spawn()
        .context("cannot start `host serve`")?;
    let line = process
        .wait_for_line(0, START_PATIENCE, |l| l.starts_with("listening on "))
        .map_err(|_| anyhow!("`host serve` did not start listening"))?;
    let addr =
        harness::listening_addr(&line).context("a `listening on` line without an address")?;
    Ok(Served { process, addr })
}

fn exchange(addr: SocketAddr, data: &[u8]) -> Result<Vec<u8>> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(SCENARIO_PATIENCE))?;
    stream.set_write_timeout(Some(SCENARIO_PATIENCE))?;
    let mut writer = stream.try_clone()?;
    let data = data.to_vec();
    let sender = thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut reply = Vec::new();
    (&stream).read_to_end(&mut reply)?;
    sender
        .join()
        .map_err(|_| anyhow!("the sender panicked"))?
        .context("sending")?;
    Ok(reply)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn echoes(addr: SocketAddr, data: &[u8]) -> Result<()> {
    let reply = exchange(addr, data)?;
    if reply == data {
        return Ok(());
    }
    let first = reply.iter().zip(data).position(|(a, b)| a != b);
    Err(anyhow!(
        "sent {} bytes, got {} back{}",
        data.len(),
        reply.len(),
        first.map_or(String::new(), |i| format!(", first difference at byte {i}"))
    ))
}

/// One conformance scenario: how many connections it made, or what failed.
type Scenario<'a> = Box<dyn FnMut() -> Result<u64> + 'a>;

/// The standard echo scenarios; prints PASS/FAIL per scenario.
fn conformance(path: &Path, strategy: StrategyKind) -> Result<bool> {
    println!(
        "conformance: serving it with the {} strategy",
        strategy.name()
    );
    let served = serve(path, strategy)?;
    let addr = served.addr;
    let mut connections = 0u64;
    let mut scenarios: Vec<(&str, Scenario<'_>)> = vec![
        ("0 bytes", Box::new(|| echoes(addr, b"").map(|()| 1))),
        ("1 byte", Box::new(|| echoes(addr, b"x").map(|()| 1))),
        (
            "1 MiB",
            Box::new(|| echoes(addr, &pattern(1, 1 << 20)).map(|()| 1)),
        ),
        (
            "half-close ends the reply",
            Box::new(|| {
                // Data first, then the half-close: the reply must end (EOF)
                // after exactly the bytes sent.
                echoes(addr, b"half-closed after this").map(|()| 1)
            }),
        ),
        (
            "32 concurrent clients",
            Box::new(|| {
                let clients: Vec<_> = (0..32u64)
                    .map(|i| {
                        thread::spawn(move || {
                            echoes(addr, &pattern(i + 10, 64 * 1024 + i as usize))
                        })
                    })
                    .collect();
                for (i, client) in clients.into_iter().enumerate() {
                    client
                        .join()
                        .map_err(|_| anyhow!("client {i} panicked"))?
                        .with_context(|| format!("client {i}"))?;
                }
                Ok(32)
            }),
        ),
    ];
    let mut passed = true;
    for (name, scenario) in &mut scenarios {
        match scenario() {
            Ok(n) => {
                connections += n;
                println!("  PASS  {name}");
            }
            Err(e) => {
                passed = false;
                println!("  FAIL  {name}: {e:#}");
            }
        }
    }
    // Every connection ran in its own store and instance: the host logs one
    // `closed` line per instance it created; all must have ended ok.
    let is_closed = |line: &str| line.contains(" closed ");
    // Short of them (at the deadline, or the server died), the count says so.
    let _ = served
        .process
        .wait_for_count(connections as usize, SCENARIO_PATIENCE, is_closed);
    let closed_lines: Vec<String> = served
        .process
        .log()
        .into_iter()
        .filter(|l| is_closed(l))
        .take(connections as usize)
        .collect();
    let closed = closed_lines.len() as u64;
    let failed: Vec<String> = closed_lines
        .into_iter()
        .filter(|l| !l.contains("outcome=ok"))
        .collect();
    if passed && closed == connections && failed.is_empty() {
        println!("  PASS  one instance per connection ({connections} connections, {closed} instances, all ok)");
    } else {
        passed = false;
        println!(
            "  FAIL  one instance per connection: {connections} connections, {closed} instances; {}",
            failed.first().map_or("none failed".to_string(), |l| format!("e.g. {l}"))
        );
    }
    println!("conformance: {}", if passed { "passed" } else { "FAILED" });
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let spread = Spread::of((1..=1000).rev().map(Duration::from_micros).collect());
        assert_eq!(spread.runs, 1000);
        assert_eq!(spread.p50, Duration::from_micros(500));
        assert_eq!(spread.p99, Duration::from_micros(990));
        assert_eq!(spread.max, Duration::from_micros(1000));
        let one = Spread::of(vec![Duration::from_micros(7)]);
        assert_eq!((one.p50, one.p99, one.max), (one.max, one.max, one.max));
    }

    /// The timed call is a real one: the built-in echo, served as `host
    /// serve` serves it, sends every connection's 64 B back.
    #[test]
    fn timed_calls_of_the_builtin_echo_echo() {
        for strategy in [StrategyKind::Threading, StrategyKind::Forking] {
            let config = as_served(None, strategy).unwrap();
            assert_eq!(config.handler, HandlerSource::BuiltinEcho);
            let (engine, _) = engine::for_host(std::slice::from_ref(&config), false).unwrap();
            let handler =
                Handler::load(&engine, &config.handler, &handler::LoadOptions::default()).unwrap();
            let service = service(&config, handler).unwrap();
            let budget = Duration::from_secs(30);
            let instantiate = time_instantiation(&service, budget, 20).unwrap();
            assert_eq!(instantiate.runs, 20);
            let calls = time_calls(&service, budget, 20).unwrap();
            assert_eq!(calls.spread.runs, 20);
            assert_eq!((calls.echoed, calls.ok), (20, 20), "{}", calls.describe());
            assert!(calls.failure.is_none());
            assert!(calls.spread.p50 <= calls.spread.p99 && calls.spread.p99 <= calls.spread.max);
            assert_eq!(
                calls.describe(),
                "the 64 B came back on every connection; outcome ok"
            );
        }
    }
}
