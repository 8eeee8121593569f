//! The compile cache and `host compile`: a restart loads the compiled handler
//! instead of compiling it; precompiled files are served only on request.

use crate::for_each_strategy;
use crate::support::{exchange, guest, run_host, Server, Strategy, TempDir};

for_each_strategy!(
    a_restart_loads_the_handler_from_the_cache,
    a_damaged_cache_entry_is_recompiled,
    no_cache_compiles_every_time,
    a_precompiled_handler_is_served_only_when_allowed,
);

fn a_restart_loads_the_handler_from_the_cache(strategy: Strategy) {
    let cache = TempDir::new("cache");
    let dir = cache.path().to_str().unwrap();
    let handler = guest("test-guest");
    let first = Server::start(strategy, Some(&handler), &["--cache-dir", dir]);
    first.wait_for_log(|l| l.contains("compiled handler") && l.contains("cached as"));
    drop(first);
    let second = Server::start(strategy, Some(&handler), &["--cache-dir", dir]);
    second.wait_for_log(|l| l.contains("from the compile cache"));
    assert_eq!(exchange(second.addr(), b"count\n"), b"1");
}

fn a_damaged_cache_entry_is_recompiled(strategy: Strategy) {
    let cache = TempDir::new("cache");
    let dir = cache.path().to_str().unwrap();
    let handler = guest("test-guest");
    drop(Server::start(
        strategy,
        Some(&handler),
        &["--cache-dir", dir],
    ));
    for entry in std::fs::read_dir(cache.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"not native code").unwrap();
    }
    let server = Server::start(strategy, Some(&handler), &["--cache-dir", dir]);
    server.wait_for_log(|l| l.contains("ignoring the unusable cache entry"));
    server.wait_for_log(|l| l.contains("compiled handler") && l.contains("cached as"));
    assert_eq!(exchange(server.addr(), b"count\n"), b"1");
}

fn no_cache_compiles_every_time(strategy: Strategy) {
    let server = Server::start(strategy, None, &["--no-cache"]);
    server.wait_for_log(|l| {
        l.contains("compiled handler built-in echo") && l.contains("(no compile cache)")
    });
    assert_eq!(exchange(server.addr(), b"hi"), b"hi");
}

fn a_precompiled_handler_is_served_only_when_allowed(strategy: Strategy) {
    let dir = TempDir::new("cwasm");
    let compiled = dir.path().join("echo.cwasm");
    let out = run_host(&[
        "compile",
        guest("echo").to_str().unwrap(),
        "-o",
        compiled.to_str().unwrap(),
        "--strategy",
        strategy.name(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let path = compiled.to_str().unwrap();
    let refused = run_host(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--strategy",
        strategy.name(),
        "--handler",
        path,
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("error: handler {path} is precompiled native code")),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"));

    let server = Server::start(strategy, Some(&compiled), &["--allow-precompiled"]);
    assert_eq!(exchange(server.addr(), b"precompiled"), b"precompiled");
}
