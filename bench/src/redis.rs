//! The `redis` scenario (issue 15): Redis's own `redis-benchmark -t set,get
//! -c 50` (and with `-P 16`) against `redis-server` directly, through `host
//! serve` (threading) running handlers/redis-guard with an outbound grant,
//! and through HAProxy in TCP mode (a plain proxy, no inspection), one run
//! each, as requests per second and ratios to direct Redis and to HAProxy.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{Launch, Process};
use serde_json::{json, Value};

/// handlers/redis-guard as the handlers' workspace builds it.
pub const GUARD_WASM: &str = "target/handlers/wasm32-wasip2/release/redis_guard.wasm";
/// Builds [`GUARD_WASM`] (arguments to cargo, run in the workspace).
pub const GUARD_BUILD: [&str; 10] = [
    "build",
    "--release",
    "--target",
    "wasm32-wasip2",
    "--manifest-path",
    "handlers/Cargo.toml",
    "--target-dir",
    "target/handlers",
    "-p",
    "redis-guard",
];
/// redis-benchmark's clients.
const CLIENTS: u32 = 50;
/// How long a server may take to accept its first connection.
const START_PATIENCE: Duration = Duration::from_secs(60);

/// The paths compared, in table order.
const PATHS: [&str; 3] = ["redis direct", "host guard (threading)", "haproxy tcp"];

/// The tools, or why the scenario cannot run.
pub struct Tools {
    server: PathBuf,
    benchmark: PathBuf,
    haproxy: Option<PathBuf>,
}

fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// redis-server and redis-benchmark (HAProxy's row is left out without
/// it), or what is missing.
pub fn tools() -> Result<Tools, String> {
    let need = |program: &str| {
        find(program).ok_or_else(|| {
            format!("{program} not found (handlers/install-toolchains.sh redis installs it)")
        })
    };
    Ok(Tools {
        server: need("redis-server")?,
        benchmark: need("redis-benchmark")?,
        haproxy: find("haproxy"),
    })
}

/// A free port on 127.0.0.1 (free when asked).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Starts `command` in its own group (killed when dropped) and waits until
/// `addr` accepts.
fn start(name: &str, command: Command, addr: SocketAddr) -> Result<Process, String> {
    let mut process = Launch::new(command)
        .own_group()
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = process.try_wait() {
            return Err(format!(
                "{name} exited ({status}):\n{}",
                process.log().join("\n")
            ));
        }
        if TcpStream::connect(addr).is_ok() {
            return Ok(process);
        }
        if started.elapsed() > START_PATIENCE {
            return Err(format!("{name} did not accept on {addr}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One redis-benchmark run: requests per second of SET and GET.
fn benchmark(
    tools: &Tools,
    addr: SocketAddr,
    requests: u64,
    pipeline: u32,
) -> Result<[f64; 2], String> {
    let args: Vec<String> = [
        "-h",
        "127.0.0.1",
        "-p",
        &addr.port().to_string(),
        "-t",
        "set,get",
        "-n",
        &requests.to_string(),
        "-c",
        &CLIENTS.to_string(),
        "-P",
        &pipeline.to_string(),
        "--csv",
    ]
    .map(String::from)
    .to_vec();
    let out = Command::new(&tools.benchmark)
        .args(&args)
        .output()
        .map_err(|e| format!("cannot run redis-benchmark: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || stdout.contains("Error") {
        return Err(format!(
            "redis-benchmark {} failed ({}): {stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let rps = |test: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("\"{test}\"")))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|r| r.trim_matches('"').parse::<f64>().ok())
            .ok_or_else(|| format!("no {test} row in redis-benchmark's output: {stdout}"))
    };
    Ok([rps("SET")?, rps("GET")?])
}

/// Runs the scenario: the table (markdown) and the JSON of its figures.
pub fn run(
    tools: &Tools,
    root: &Path,
    host: &Path,
    requests: u64,
) -> Result<(String, Value), String> {
    let dir = std::env::temp_dir().join(format!("bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    let redis_addr = free_addr();
    let mut redis = Command::new(&tools.server);
    redis
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &redis_addr.port().to_string(),
        ])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&dir);
    let _redis = start("redis-server", redis, redis_addr)?;

    let guard_addr = free_addr();
    let mut guard = Command::new(host);
    guard
        .args([
            "serve",
            "--strategy",
            "threading",
            "--addr",
            &guard_addr.to_string(),
        ])
        .arg("--handler")
        .arg(root.join(GUARD_WASM))
        .args(["--env", &format!("UPSTREAM={redis_addr}")])
        .args(["--allow-outbound", &redis_addr.to_string()])
        // Each benchmark client is one connection for its whole run.
        .args(["--timeout", "10m", "--idle-timeout", "1m"]);
    let _guard = start("host serve (redis-guard)", guard, guard_addr)?;

    let haproxy_addr = free_addr();
    let _haproxy = match &tools.haproxy {
        None => None,
        Some(bin) => {
            let config = dir.join("haproxy.cfg");
            let text = format!(
                "global\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                 timeout client 10m\n  timeout server 10m\n\nfrontend redis\n  bind {haproxy_addr}\n  \
                 default_backend redis\n\nbackend redis\n  server redis {redis_addr}\n"
            );
            std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
            let mut command = Command::new(bin);
            command.arg("-f").arg(&config).arg("-db");
            Some(start("haproxy", command, haproxy_addr)?)
        }
    };

    let targets = [
        Some(redis_addr),
        Some(guard_addr),
        tools.haproxy.as_ref().map(|_| haproxy_addr),
    ];
    // figures[pipeline index][path index] = [SET, GET]
    let mut figures: Vec<Vec<Option<[f64; 2]>>> = Vec::new();
    for pipeline in [1, 16] {
        let mut row = Vec::new();
        for (path, target) in PATHS.iter().zip(targets) {
            let Some(addr) = target else {
                row.push(None);
                continue;
            };
            eprintln!("redis: {path}, -P {pipeline} ...");
            row.push(Some(benchmark(tools, addr, requests, pipeline)?));
        }
        figures.push(row);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((table(&figures, requests), json_of(&figures, requests)))
}

fn table(figures: &[Vec<Option<[f64; 2]>>], requests: u64) -> String {
    let mut out = format!(
        "redis: redis-benchmark -t set,get -n {requests} -c {CLIENTS}, one run each; \
         ratios of requests/s (SET, GET) to direct Redis and to HAProxy (TCP mode)\n\n\
         | path | -P | SET req/s | GET req/s | vs direct | vs haproxy |\n|---|---|---|---|---|---|\n"
    );
    for (pipeline, row) in [1, 16].iter().zip(figures) {
        for (path, cell) in PATHS.iter().zip(row) {
            let Some([set, get]) = cell else {
                out += &format!("| {path} | {pipeline} | not run (no haproxy) | | | |\n");
                continue;
            };
            let ratio = |base: &Option<[f64; 2]>| match base {
                Some([bset, bget]) => format!("{:.2}, {:.2}", set / bset, get / bget),
                None => "-".to_string(),
            };
            out += &format!(
                "| {path} | {pipeline} | {set:.0} | {get:.0} | {} | {} |\n",
                ratio(&row[0]),
                ratio(&row[2])
            );
        }
    }
    if let (Some([dset, dget]), Some([gset, gget])) = (figures[0][0], figures[0][1]) {
        let worst = (gset / dset).min(gget / dget);
        out += &format!(
            "\ntarget: guard >= 0.5x direct Redis at -c {CLIENTS}: {worst:.2}x ({})\n",
            if worst >= 0.5 { "met" } else { "missed" }
        );
        if let Some([hset, hget]) = figures[0][2] {
            let worst = (gset / hset).min(gget / hget);
            out += &format!(
                "target: guard >= 0.7x HAProxy at -c {CLIENTS}: {worst:.2}x ({})\n",
                if worst >= 0.7 { "met" } else { "missed" }
            );
        }
    }
    out
}

fn json_of(figures: &[Vec<Option<[f64; 2]>>], requests: u64) -> Value {
    let rows: Vec<Value> = [1, 16]
        .iter()
        .zip(figures)
        .flat_map(|(pipeline, row)| {
            PATHS.iter().zip(row).map(move |(path, cell)| {
                json!({
                    "path": path,
                    "pipeline": pipeline,
                    "set_rps": cell.map(|c| c[0]),
                    "get_rps": cell.map(|c| c[1]),
                })
            })
        })
        .collect();
    json!({ "requests": requests, "clients": CLIENTS, "rows": rows })
}
