//! `bench`: one command that starts each echo server under test on loopback
//! (a native Rust pool, `host serve` threading and forking, Python
//! socketserver threading and forking), drives it with the same load (short
//! connections, streaming, held connections) and reports every figure as a
//! ratio to the native baseline, as a table and as JSON. The `http` scenario
//! runs `host serve` with handlers/http-hello against `wasmtime serve` with
//! bench/wasi-http-hello (when a `wasmtime` binary is found), one HTTP/1.1
//! `GET` per connection, and reports ratios to `wasmtime serve`. The
//! `interactive` scenario (issue 19) holds N line-echo conversations open at
//! once against the servers with their default flags, and an async-only one
//! at 10,000.

mod backlog;
mod epoll;
mod held;
mod interactive;
mod load;
mod map_count;
mod native;
mod net;
mod redis;
mod report;
mod server;
mod wrk;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::held::HeldConfig;
use crate::interactive::InteractiveConfig;
use crate::load::{Exchange, Measure, ShortConfig, StreamConfig};
use crate::report::{Row, WASMTIME};
use crate::server::{Server, ServerSpec};

const SERVERS: [&str; 8] = [
    "native",
    "host-threading",
    HOST_WARN,
    "host-forking",
    "host-prefork",
    "host-async",
    "py-threading",
    "py-forking",
];
/// `host-threading` at `--log-level warn` (no `closed` line per
/// connection): a row of the short scenario only, beside the one at info.
const HOST_WARN: &str = "host-threading-warn";
const SCENARIOS: [&str; 6] = ["short", "stream", "held", "http", "interactive", "redis"];
/// The http scenario's second part: the same, with keep-alive.
const HTTP_KEEP_ALIVE: &str = "http-keep-alive";
/// The interactive scenario's extra row: `host-async` at scale.
const INTERACTIVE_ASYNC: &str = "interactive-async";
/// Worker threads of the native pool and of `host serve --strategy threading`.
const WORKERS: usize = 8;
/// bench/wasi-http-hello, the `wasi:http/proxy` hello for `wasmtime serve`.
const WASI_HTTP_HELLO_WASM: &str =
    "target/bench-wasi-http/wasm32-wasip2/release/wasi_http_hello.wasm";
/// Builds [`WASI_HTTP_HELLO_WASM`]: its own workspace, not ours.
const WASI_HTTP_HELLO_BUILD: [&str; 8] = [
    "build",
    "--release",
    "--target",
    "wasm32-wasip2",
    "--manifest-path",
    "bench/wasi-http-hello/Cargo.toml",
    "--target-dir",
    "target/bench-wasi-http",
];

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Benchmark `host serve` against a native Rust echo pool and Python socketserver on loopback, and (as an HTTP hello) against `wasmtime serve`."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,

    /// A ~30 s smoke run: smaller defaults for every scenario.
    #[arg(long)]
    quick: bool,

    /// Servers to run, comma-separated [default: all]: native,
    /// host-threading, host-threading-warn (short scenario only), host-forking,
    /// host-prefork, host-async, py-threading, py-forking. The http scenario runs the host-* ones among them, and
    /// `wasmtime serve` whenever a `wasmtime` binary is found; the
    /// interactive scenario all but py-forking. A server that does not start
    /// (e.g. a host without `--strategy async`) is skipped with its reason.
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,

    /// Scenarios to run, comma-separated [default: all]: short, stream, held,
    /// http, interactive, redis (redis-benchmark direct, through the host's
    /// redis-guard and through HAProxy; skipped, said so, without Redis).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,

    /// Short connections: concurrent client threads.
    #[arg(long, default_value_t = 32)]
    short_clients: usize,

    /// Short connections: rounds; each round drives every server once, in
    /// a rotating order [default: 3; quick 1].
    #[arg(long)]
    short_rounds: Option<usize>,

    /// Short connections: measured seconds per server per round
    /// [default: 7; quick 2].
    #[arg(long)]
    short_secs: Option<f64>,

    /// Short connections: stop after this many measured connections per
    /// server per round instead of after --short-secs.
    #[arg(long)]
    short_count: Option<u64>,

    /// Short connections: unmeasured warm-up seconds before each round's
    /// measurement [default: 0.5].
    #[arg(long)]
    warmup_secs: Option<f64>,

    /// Streaming: concurrent connections.
    #[arg(long, default_value_t = 4)]
    stream_conns: usize,

    /// Streaming: MiB pushed through each connection [default: 256; quick 16].
    #[arg(long)]
    stream_mib: Option<u64>,

    /// Held connections: how many idle connections to open at once
    /// [default: 1000; quick 200].
    #[arg(long)]
    held: Option<usize>,

    /// Held connections: seconds to hold them idle [default: 2; quick 0.5].
    #[arg(long)]
    hold_secs: Option<f64>,

    /// Interactive: clients connected at once, each holding a line-echo
    /// conversation open [default: 1000; quick 200].
    #[arg(long)]
    interactive_clients: Option<usize>,

    /// Interactive: seconds each client holds its connection idle between
    /// its two lines [default: 3; quick 1].
    #[arg(long)]
    interactive_hold_secs: Option<f64>,

    /// Interactive: clients of the extra host-async row, run with
    /// `--max-connections` of the same number; 0 skips the row
    /// [default: 10000; quick 1000].
    #[arg(long)]
    interactive_async_clients: Option<usize>,

    /// Interactive: hold seconds of the extra host-async row
    /// [default: 5; quick 1].
    #[arg(long)]
    interactive_async_hold_secs: Option<f64>,

    /// Interactive: how long each echo may take before the client counts it
    /// as timed out [default: 10; quick 5].
    #[arg(long)]
    interactive_timeout_secs: Option<f64>,

    /// Interactive: seconds after the last client ends before the server's
    /// memory is read again ("RSS after") [default: 3; quick 1].
    #[arg(long)]
    settle_secs: Option<f64>,

    /// Redis: requests of each redis-benchmark run [default: 100000; quick 20000].
    #[arg(long)]
    redis_requests: Option<u64>,

    /// Where to write the JSON results (relative paths: from the workspace).
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,

    /// An extra argument for both `host serve` servers (repeatable), e.g.
    /// --host-arg=--max-connections=10000 for larger --held runs.
    #[arg(long, allow_hyphen_values = true)]
    host_arg: Vec<String>,

    /// The host binary [default: release/host in cargo's target directory:
    /// $CARGO_TARGET_DIR if set, else target/ in this workspace].
    #[arg(long)]
    host_bin: Option<PathBuf>,

    /// Do not run `cargo build --release -p host` first (nor, for the http
    /// scenario, the builds of the two hello components); use them as they are.
    #[arg(long)]
    no_build: bool,

    /// The `wasmtime` CLI whose `wasmtime serve` the http scenario compares
    /// with [default: `wasmtime` on PATH; without one that comparison is
    /// skipped].
    #[arg(long)]
    wasmtime: Option<PathBuf>,

    /// An extra argument for `wasmtime serve` (repeatable), before the
    /// component, e.g. --wasmtime-arg=-Opooling-pagemap-scan=y.
    #[arg(long, allow_hyphen_values = true)]
    wasmtime_arg: Vec<String>,

    /// The Python interpreter for the socketserver servers.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The native baseline server (started by the bench itself).
    #[command(hide = true)]
    NativeServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// Worker threads of the pool; 0: a thread per connection.
        #[arg(long, default_value_t = WORKERS)]
        workers: usize,
    },
}

/// The resolved sizes of every scenario.
struct Plan {
    /// Rounds of the short scenario; each server gets `short` once per round.
    rounds: usize,
    short: ShortConfig,
    /// The http scenario: the short scenario's clients, rounds and times.
    http: ShortConfig,
    stream: StreamConfig,
    held: HeldConfig,
    interactive: InteractiveConfig,
    /// The host-async row of the interactive scenario (0 clients: skipped).
    interactive_async: InteractiveConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::NativeServer { addr, workers }) = cli.command {
        return match native::serve(addr, workers) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: native server: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory, where `cargo build --release -p host` puts the
/// host: `$CARGO_TARGET_DIR` (relative to the workspace) if set, else
/// `target/` in the workspace.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

fn plan(cli: &Cli) -> Plan {
    let pick = |value: Option<f64>, normal: f64, quick: f64| {
        Duration::from_secs_f64(value.unwrap_or(if cli.quick { quick } else { normal }))
    };
    let short = |exchange| ShortConfig {
        exchange,
        clients: cli.short_clients.max(1),
        warmup: pick(cli.warmup_secs, 0.5, 0.5),
        duration: pick(cli.short_secs, 7.0, 2.0),
        count: cli.short_count,
        payload: 64,
        timeout: Duration::from_secs(10),
    };
    let interactive = |clients, hold| InteractiveConfig {
        clients,
        hold,
        connects_in_flight: 256,
        connect_timeout: Duration::from_secs(10),
        echo_timeout: pick(cli.interactive_timeout_secs, 10.0, 5.0).max(Duration::from_millis(100)),
        settle: pick(cli.settle_secs, 3.0, 1.0),
    };
    Plan {
        rounds: cli
            .short_rounds
            .unwrap_or(if cli.quick { 1 } else { 3 })
            .max(1),
        short: short(Exchange::Echo),
        http: short(Exchange::Http),
        stream: StreamConfig {
            connections: cli.stream_conns.max(1),
            bytes_per_connection: cli.stream_mib.unwrap_or(if cli.quick { 16 } else { 256 }) << 20,
            stall: Duration::from_secs(60),
        },
        held: HeldConfig {
            connections: cli.held.unwrap_or(if cli.quick { 200 } else { 1000 }),
            hold: pick(cli.hold_secs, 2.0, 0.5),
            connect_timeout: Duration::from_secs(10),
            echo_timeout: Duration::from_secs(60),
        },
        interactive: interactive(
            cli.interactive_clients
                .unwrap_or(if cli.quick { 200 } else { 1000 }),
            pick(cli.interactive_hold_secs, 3.0, 1.0),
        ),
        interactive_async: interactive(
            cli.interactive_async_clients
                .unwrap_or(if cli.quick { 1000 } else { 10_000 }),
            pick(cli.interactive_async_hold_secs, 5.0, 1.0),
        ),
    }
}

fn chosen<'a>(
    list: &[String],
    all: &'a [&'static str],
    what: &str,
) -> Result<Vec<&'a str>, String> {
    if list.is_empty() {
        return Ok(all.to_vec());
    }
    list.iter()
        .map(|name| {
            all.iter()
                .find(|a| **a == name.as_str())
                .copied()
                .ok_or_else(|| format!("unknown {what} {name:?} (expected one of {all:?})"))
        })
        .collect()
}

fn specs(cli: &Cli, root: &Path) -> Result<Vec<ServerSpec>, String> {
    let bench =
        std::env::current_exe().map_err(|e| format!("cannot find the bench binary: {e}"))?;
    let host = cli
        .host_bin
        .clone()
        .unwrap_or_else(|| target_dir(root).join("release/host"));
    let script = root.join("bench/py/echo_server.py");
    let host_args = |strategy: &str| {
        let mut args: Vec<String> = ["serve", "--addr", "127.0.0.1:0", "--strategy", strategy]
            .map(String::from)
            .to_vec();
        if strategy == "threading" {
            args.extend(["--workers".into(), WORKERS.to_string()]);
        }
        if strategy == "prefork" {
            // The same 8 workers, in 2 processes of 4.
            args.extend([
                "--processes".into(),
                "2".into(),
                "--workers".into(),
                (WORKERS / 2).to_string(),
            ]);
        }
        // 256 MiB streams must not be cut by the default 30 s handle limit.
        args.extend(["--timeout".into(), "10m".into()]);
        args.extend(cli.host_arg.iter().cloned());
        args
    };
    let py = |mode: &str| vec![script.display().to_string(), mode.into(), "0".into()];
    Ok(vec![
        ServerSpec {
            name: "native",
            program: bench,
            args: vec![
                "native-server".into(),
                "--workers".into(),
                WORKERS.to_string(),
            ],
            forking: false,
        },
        ServerSpec {
            name: "host-threading",
            program: host.clone(),
            args: host_args("threading"),
            // The host process forks the tenant's worker process.
            forking: true,
        },
        ServerSpec {
            name: HOST_WARN,
            program: host.clone(),
            args: [
                host_args("threading"),
                vec!["--log-level".into(), "warn".into()],
            ]
            .concat(),
            forking: true,
        },
        ServerSpec {
            name: "host-forking",
            program: host.clone(),
            args: host_args("forking"),
            forking: true,
        },
        ServerSpec {
            name: "host-prefork",
            program: host.clone(),
            args: host_args("prefork"),
            forking: true,
        },
        ServerSpec {
            name: "host-async",
            program: host,
            args: host_args("async"),
            forking: true,
        },
        ServerSpec {
            name: "py-threading",
            program: cli.python.clone(),
            args: py("threading"),
            forking: false,
        },
        ServerSpec {
            name: "py-forking",
            program: cli.python.clone(),
            args: py("forking"),
            forking: true,
        },
    ])
}

/// `host serve` with its default flags for a strategy (and `--host-arg`s).
fn default_host_args(strategy: &str, cli: &Cli) -> Vec<String> {
    let mut args: Vec<String> = ["serve", "--addr", "127.0.0.1:0", "--strategy", strategy]
        .map(String::from)
        .to_vec();
    args.extend(cli.host_arg.iter().cloned());
    args
}

/// The servers of the interactive scenario: the native server with a thread
/// per connection, `host serve` with its default flags, Python's
/// `ThreadingTCPServer` as it is; `py-forking` sits it out (the issue compares
/// with ThreadingMixIn). The `interactive-async` row: `host-async` alone,
/// with `--max-connections` as large as its client count.
fn interactive_specs(
    scenario: &str,
    specs: &[ServerSpec],
    servers: &[&str],
    cli: &Cli,
    plan: &Plan,
) -> Vec<ServerSpec> {
    let selected = specs.iter().filter(|s| servers.contains(&s.name));
    if scenario == INTERACTIVE_ASYNC {
        let clients = plan.interactive_async.clients;
        return selected
            .filter(|s| s.name == "host-async" && clients > 0)
            .map(|s| {
                let mut spec = s.clone();
                spec.args = default_host_args("async", cli);
                spec.args
                    .extend(["--max-connections".into(), clients.to_string()]);
                spec
            })
            .collect();
    }
    selected
        .filter(|s| s.name != "py-forking")
        .map(|s| {
            let mut spec = s.clone();
            if s.name == "native" {
                spec.args = vec!["native-server".into(), "--workers".into(), "0".into()];
            } else if let Some(strategy) = s.name.strip_prefix("host-") {
                spec.args = default_host_args(strategy, cli);
            }
            spec
        })
        .collect()
}

/// The servers of one scenario, in table order. The echo scenarios run the
/// selected servers as they are. The http scenario runs `wasmtime serve` with
/// bench/wasi-http-hello (its baseline, if `wasmtime` was found) and the
/// selected `host serve` servers with `--handler` handlers/http-hello; the
/// native and Python servers are echo servers and sit it out. The
/// interactive scenarios: see [`interactive_specs`].
fn scenario_specs(
    scenario: &str,
    specs: &[ServerSpec],
    servers: &[&str],
    root: &Path,
    cli: &Cli,
    plan: &Plan,
    wasmtime: Option<&Path>,
) -> Vec<ServerSpec> {
    // The log level's row is a short-connections figure alone.
    let servers: Vec<&str> = servers
        .iter()
        .copied()
        .filter(|name| *name != HOST_WARN || scenario == "short")
        .collect();
    let servers = &servers[..];
    if scenario == "redis" {
        // Its own servers and client: see `redis::run`.
        return Vec::new();
    }
    if scenario == "interactive" || scenario == INTERACTIVE_ASYNC {
        return interactive_specs(scenario, specs, servers, cli, plan);
    }
    let selected = specs.iter().filter(|s| servers.contains(&s.name));
    if scenario != "http" && scenario != HTTP_KEEP_ALIVE {
        return selected.cloned().collect();
    }
    let mut out = Vec::new();
    if let Some(wasmtime) = wasmtime {
        let mut args: Vec<String> = vec![
            "serve".into(),
            // Rust's std on wasm32-wasip2 imports wasi:cli interfaces
            // (environment, exit, ...) beyond the proxy world's, as
            // handlers/http-hello does from the host.
            "-S".into(),
            "cli".into(),
            // Its default too where the address space allows; explicit
            // here, as the host's threading engine pools too.
            "-O".into(),
            "pooling-allocator".into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(cli.wasmtime_arg.iter().cloned());
        args.push(root.join(WASI_HTTP_HELLO_WASM).display().to_string());
        out.push(ServerSpec {
            name: WASMTIME,
            program: wasmtime.to_path_buf(),
            args,
            forking: false,
        });
    }
    // The very .wasm `wasmtime serve` runs: the host detects the
    // `wasi:http/proxy` world and serves it over HTTP/1.1 itself.
    for spec in selected.filter(|s| s.name.starts_with("host-")) {
        let mut spec = spec.clone();
        spec.args.extend([
            "--handler".into(),
            root.join(WASI_HTTP_HELLO_WASM).display().to_string(),
        ]);
        out.push(spec);
    }
    out
}

/// Runs `cargo ARGS` in the workspace (`wasm`: a guest build, which must not
/// get the host's compiler flags or wrappers).
fn cargo(root: &Path, args: &[&str], wasm: bool) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let line = format!("cargo {}", args.join(" "));
    eprintln!("building: {line}");
    let mut command = Command::new(cargo);
    command.args(args).current_dir(root);
    if wasm {
        for var in [
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTFLAGS",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTC_WRAPPER",
            "CARGO_BUILD_TARGET",
        ] {
            command.env_remove(var);
        }
    }
    let status = command
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("{line} failed ({status})"));
    }
    Ok(())
}

fn build_host(root: &Path) -> Result<(), String> {
    cargo(root, &["build", "--release", "-p", "host"], false)
}

/// A component the http scenario needs: built (unless `--no-build`), then
/// required to exist.
fn component(root: &Path, wasm: &str, build: &[&str], no_build: bool) -> Result<(), String> {
    if !no_build {
        cargo(root, build, true)?;
    }
    let path = root.join(wasm);
    if !path.is_file() {
        return Err(format!(
            "no component at {} (run `cargo {}`)",
            path.display(),
            build.join(" ")
        ));
    }
    Ok(())
}

/// The `wasmtime` CLI: `--wasmtime`, which must exist, or `wasmtime` on PATH.
fn find_wasmtime(cli: &Cli) -> Result<Option<PathBuf>, String> {
    match &cli.wasmtime {
        Some(path) if path.is_file() => Ok(Some(path.clone())),
        Some(path) => Err(format!("--wasmtime {}: no such file", path.display())),
        None => Ok(on_path("wasmtime")),
    }
}

/// The first line of `PROGRAM --version`.
fn version(program: &Path) -> Option<String> {
    let output = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Some(text.lines().next()?.trim().to_string())
}

fn machine(python: &Path, wasmtime: Option<&Path>) -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .ok();
    let python_version = version(python);
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({
        "unix_time": unix_time,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "kernel": kernel,
        "python": python_version,
        "wasmtime": wasmtime.and_then(version),
    })
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn run(cli: &Cli) -> Result<(), String> {
    server::install_signal_handlers();
    let root = workspace();
    let plan = plan(cli);
    let servers = chosen(&cli.servers, &SERVERS, "server")?;
    let scenarios = chosen(&cli.scenarios, &SCENARIOS, "scenario")?;
    let nofile = net::raise_nofile_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    if plan.held.connections as u64 + 256 > nofile && scenarios.contains(&"held") {
        return Err(format!(
            "--held {} needs more file descriptors than the limit {nofile} allows",
            plan.held.connections
        ));
    }
    if scenarios.contains(&"interactive") {
        let at_scale = if servers.contains(&"host-async") {
            plan.interactive_async.clients
        } else {
            0
        };
        let most = plan.interactive.clients.max(at_scale);
        if most as u64 + 256 > nofile {
            return Err(format!(
                "{most} interactive clients need more file descriptors than the limit {nofile} allows"
            ));
        }
    }
    let specs = specs(cli, &root)?;
    let http = scenarios.contains(&"http");
    let wasmtime = if http { find_wasmtime(cli)? } else { None };
    let redis_tools = match scenarios.contains(&"redis") {
        false => None,
        true => match redis::tools() {
            Ok(tools) => Some(tools),
            Err(why) => {
                eprintln!("redis scenario skipped: {why}");
                None
            }
        },
    };
    if servers.iter().any(|s| s.starts_with("host-")) || redis_tools.is_some() {
        if !cli.no_build {
            build_host(&root)?;
        }
        let host = &specs[1].program;
        if !host.is_file() {
            return Err(format!(
                "no host binary at {} (run `cargo build --release -p host`)",
                host.display()
            ));
        }
        if redis_tools.is_some() {
            component(&root, redis::GUARD_WASM, &redis::GUARD_BUILD, cli.no_build)?;
        }
    }
    if http {
        component(
            &root,
            WASI_HTTP_HELLO_WASM,
            &WASI_HTTP_HELLO_BUILD,
            cli.no_build,
        )?;
        match &wasmtime {
            None => eprintln!(
                "wasmtime not on PATH: `wasmtime serve` comparison skipped (handlers/install-toolchains.sh wasmtime installs it)"
            ),
            Some(p) => {
                eprintln!(
                    "wasmtime at {} ({}): the http scenario compares with `wasmtime serve`",
                    p.display(),
                    version(p).unwrap_or_else(|| "version unknown".into())
                );
            }
        }
    }
    let machine = machine(&cli.python, wasmtime.as_deref());
    eprintln!("machine: {machine}");

    let runs: Vec<(&'static str, Vec<ServerSpec>)> = scenarios
        .iter()
        .flat_map(|&scenario| match scenario {
            "interactive" => vec![scenario, INTERACTIVE_ASYNC],
            "http" => vec![scenario, HTTP_KEEP_ALIVE],
            _ => vec![scenario],
        })
        .map(|scenario| {
            let specs = scenario_specs(
                scenario,
                &specs,
                &servers,
                &root,
                cli,
                &plan,
                wasmtime.as_deref(),
            );
            (scenario, specs)
        })
        .filter(|(_, specs)| !specs.is_empty())
        .collect();
    let mut rows = Vec::new();
    for (scenario, specs) in &runs {
        eprintln!("running {scenario} ...");
        let _map_count = (*scenario == INTERACTIVE_ASYNC)
            .then(|| map_count::raise_for(plan.interactive_async.clients));
        for row in run_scenario(scenario, specs, &plan) {
            eprintln!("{}", progress(&row));
            rows.push(row);
        }
    }
    let redis_result = match &redis_tools {
        None => None,
        Some(tools) => {
            eprintln!("running redis ...");
            let requests = cli
                .redis_requests
                .unwrap_or(if cli.quick { 20_000 } else { 100_000 });
            Some(redis::run(tools, &root, &specs[1].program, requests)?)
        }
    };

    let rounds = |count: Option<u64>, duration: Duration| match count {
        Some(n) => format!("{n} connections"),
        None => format!("{:.1} s measured", duration.as_secs_f64()),
    };
    let titles = [
        (
            "short",
            format!(
                "short connections: {} clients, 64 B each, {} round(s) of {} \
                 (host-threading-warn: host-threading at --log-level warn)",
                plan.short.clients,
                plan.rounds,
                rounds(plan.short.count, plan.short.duration)
            ),
        ),
        (
            "stream",
            format!(
                "streaming: {} connections x {} MiB (p50/p99 = time for one connection's whole stream)",
                plan.stream.connections,
                plan.stream.bytes_per_connection >> 20
            ),
        ),
        (
            "held",
            format!(
                "held connections: {} opened at once, held {:.1} s, then 16 B echo each (latency = time from release)",
                plan.held.connections,
                plan.held.hold.as_secs_f64()
            ),
        ),
        (
            "http",
            format!(
                "wasi-http-hello (the same .wasm in every server), wrk with {} clients, \
                 `Connection: close`, {} round(s) of {:.1} s; ratios are to wasmtime serve{}",
                plan.http.clients,
                plan.rounds,
                plan.http.duration.max(Duration::from_secs(1)).as_secs_f64(),
                if wasmtime.is_none() {
                    " (not run: no wasmtime)"
                } else {
                    ""
                }
            ),
        ),
        (
            HTTP_KEEP_ALIVE,
            format!(
                "wasi-http-hello, wrk with {} clients, keep-alive, {} round(s) of {:.1} s; \
                 ratios are to wasmtime serve",
                plan.http.clients,
                plan.rounds,
                plan.http.duration.max(Duration::from_secs(1)).as_secs_f64(),
            ),
        ),
        (
            "interactive",
            interactive_title(
                "interactive",
                &plan.interactive,
                "default flags; native: a thread per connection",
            ),
        ),
        (
            INTERACTIVE_ASYNC,
            interactive_title(
                INTERACTIVE_ASYNC,
                &plan.interactive_async,
                &format!(
                    "host-async alone, --max-connections {}",
                    plan.interactive_async.clients
                ),
            ),
        ),
    ];
    println!(
        "ratios are to the native baseline (http: to wasmtime serve); for \
         p50/p99/RSS/PSS/CPU lower is better; RSS sums forked children (shared \
         pages counted per process), PSS splits them"
    );
    for (scenario, title) in &titles {
        if !runs.iter().any(|(s, _)| s == scenario) {
            continue;
        }
        if matches!(*scenario, "interactive" | INTERACTIVE_ASYNC) {
            println!("\n{}", report::interactive_table(&rows, scenario, title));
        } else {
            println!("\n{}", report::table(&rows, scenario, title));
        }
    }
    if let Some((table, _)) = &redis_result {
        println!("\n{table}");
    }
    println!("{}", report::targets_text(&rows));

    let config = json!({
        "quick": cli.quick,
        "servers": servers,
        "scenarios": scenarios,
        "workers": WORKERS,
        "short": {
            "rounds": plan.rounds,
            "clients": plan.short.clients,
            "warmup_secs": plan.short.warmup.as_secs_f64(),
            "secs": plan.short.duration.as_secs_f64(),
            "count": plan.short.count,
            "payload_bytes": plan.short.payload,
        },
        "stream": {
            "connections": plan.stream.connections,
            "bytes_per_connection": plan.stream.bytes_per_connection,
        },
        "held": {
            "connections": plan.held.connections,
            "hold_secs": plan.held.hold.as_secs_f64(),
        },
        "interactive": interactive_json(&plan.interactive),
        "interactive_async": interactive_json(&plan.interactive_async),
        "http": {
            "request": String::from_utf8_lossy(load::HTTP_REQUEST),
            "body": String::from_utf8_lossy(load::HTTP_BODY),
            "wasmtime": wasmtime,
        },
        "redis": redis_result.as_ref().map(|(_, figures)| figures),
        "commands": runs
            .iter()
            .flat_map(|(scenario, specs)| {
                specs.iter().map(move |s| {
                    json!({"scenario": scenario, "server": s.name, "program": s.program, "args": s.args})
                })
            })
            .collect::<Vec<_>>(),
    });
    let out = if cli.out.is_absolute() {
        cli.out.clone()
    } else {
        root.join(&cli.out)
    };
    report::write_json(&out, machine, config, &rows)
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    println!("results written to {}", out.display());
    Ok(())
}

fn interactive_title(scenario: &str, cfg: &InteractiveConfig, servers: &str) -> String {
    format!(
        "{scenario}: {} clients connected at once, each: a line, its echo, {:.1} s idle, \
         a line, its echo, close ({servers}; echo timeout {:.0} s; RSS after = {:.0} s after the last client)",
        cfg.clients,
        cfg.hold.as_secs_f64(),
        cfg.echo_timeout.as_secs_f64(),
        cfg.settle.as_secs_f64()
    )
}

fn interactive_json(cfg: &InteractiveConfig) -> serde_json::Value {
    json!({
        "clients": cfg.clients,
        "hold_secs": cfg.hold.as_secs_f64(),
        "connects_in_flight": cfg.connects_in_flight,
        "connect_timeout_secs": cfg.connect_timeout.as_secs_f64(),
        "echo_timeout_secs": cfg.echo_timeout.as_secs_f64(),
        "settle_secs": cfg.settle.as_secs_f64(),
    })
}

/// Starts every server side by side, fresh for this scenario; drives them one
/// at a time, in rounds whose order rotates (so a burst of outside load is
/// spread over the servers); then reads their CPU time and memory and stops
/// them all.
fn run_scenario(scenario: &'static str, specs: &[ServerSpec], plan: &Plan) -> Vec<Row> {
    let mut rows: Vec<Row> = specs
        .iter()
        .map(|spec| Row {
            scenario,
            server: spec.name,
            measure: Measure::default(),
            memory: Default::default(),
            server_cpu_secs: 0.0,
            server_faults: 0,
            failure: None,
        })
        .collect();
    // Dropping this vector (also on panic) kills every server.
    let mut servers: Vec<Option<Server>> = Vec::with_capacity(specs.len());
    for (row, spec) in rows.iter_mut().zip(specs) {
        match Server::start(spec) {
            Ok(server) => servers.push(Some(server)),
            Err(e) => {
                eprintln!(
                    "{scenario}: skipping {} (it did not start): {}",
                    spec.name,
                    e.trim_end().replace('\n', "\n    ")
                );
                row.failure = Some(e);
                servers.push(None);
            }
        }
    }
    let cpu_before: Vec<f64> = servers
        .iter()
        .map(|s| s.as_ref().map_or(0.0, Server::cpu_secs))
        .collect();
    let faults_before: Vec<u64> = servers
        .iter()
        .map(|s| s.as_ref().map_or(0, Server::minor_faults))
        .collect();
    let rounds = if matches!(scenario, "short" | "http" | HTTP_KEEP_ALIVE) {
        plan.rounds
    } else {
        1
    };
    for round in 0..rounds {
        for k in 0..servers.len() {
            let i = (k + round) % servers.len();
            let Some(server) = &servers[i] else { continue };
            let measure = match scenario {
                "short" => load::short(server.addr, &plan.short),
                "http" => wrk::http(server.addr, &plan.http, false),
                HTTP_KEEP_ALIVE => wrk::http(server.addr, &plan.http, true),
                "stream" => load::stream(server.addr, &plan.stream),
                "held" => held::held(server.addr, &plan.held),
                "interactive" => {
                    interactive::interactive(server.addr, &plan.interactive, &|| server.usage())
                }
                _ => interactive::interactive(server.addr, &plan.interactive_async, &|| {
                    server.usage()
                }),
            };
            rows[i].measure.add_round(measure);
        }
    }
    // Let forked children finish and be reaped so their CPU time is counted.
    std::thread::sleep(Duration::from_millis(300));
    for (i, slot) in servers.iter_mut().enumerate() {
        if let Some(server) = slot {
            rows[i].server_cpu_secs = server.cpu_secs() - cpu_before[i];
            rows[i].server_faults = server.minor_faults().saturating_sub(faults_before[i]);
            rows[i].memory = server.finish_memory();
        }
        *slot = None;
    }
    rows
}

fn progress(row: &Row) -> String {
    if let Some(f) = &row.failure {
        let f = report::failure_summary(f);
        return format!("{:<7} {:<15} FAILED: {f}", row.scenario, row.server);
    }
    if row.scenario.starts_with("interactive") {
        return report::interactive_progress(row);
    }
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    format!(
        "{:<7} {:<15} ok {}/{}  conn/s {}  p50 {} ms  p99 {} ms  MiB/s {}  RSS {} MiB  errors {}",
        row.scenario,
        row.server,
        row.measure.ok,
        row.measure.attempted,
        fmt(row.conn_per_s()),
        row.percentile_ms(50.0)
            .map_or("-".into(), |v| format!("{v:.2}")),
        row.percentile_ms(99.0)
            .map_or("-".into(), |v| format!("{v:.2}")),
        fmt(row.mib_per_s()),
        fmt(row.rss_mib()),
        row.measure.error_count(),
    )
}
