//! Bad input never starts a server: each is one `error: ...` line naming the
//! bad value, a non-zero exit, and nothing listening.

use std::net::TcpListener;
use std::path::Path;

use crate::for_each_strategy;
use crate::support::{guest, one_error_line, run_host, Strategy, TempDir};

for_each_strategy!(
    a_missing_handler_file,
    a_file_that_is_not_wasm,
    an_empty_file,
    a_core_module,
    a_corrupt_component,
    a_component_of_the_wrong_world,
    a_component_without_handle,
    an_address_in_use,
    an_invalid_address,
);

/// Runs `host serve` expecting refusal; returns its one error line.
fn refused(strategy: Strategy, handler: &Path, addr: &str) -> String {
    let handler = handler.to_str().unwrap();
    let out = run_host(&[
        "serve",
        "--strategy",
        strategy.name(),
        "--addr",
        addr,
        "--handler",
        handler,
    ]);
    one_error_line(&out)
}

fn with_file(bytes: &[u8], check: impl FnOnce(&Path)) {
    let dir = TempDir::new("bad");
    let path = dir.path().join("handler.wasm");
    std::fs::write(&path, bytes).unwrap();
    check(&path);
}

fn a_missing_handler_file(strategy: Strategy) {
    let line = refused(strategy, Path::new("./no/such/handler.wasm"), "127.0.0.1:0");
    assert_eq!(
        line,
        "error: handler ./no/such/handler.wasm cannot be read: No such file or directory (os error 2)"
    );
}

fn a_file_that_is_not_wasm(strategy: Strategy) {
    with_file(b"print('hello')\n", |path| {
        let line = refused(strategy, path, "127.0.0.1:0");
        assert_eq!(
            line,
            format!(
                "error: handler {} is not a WebAssembly file (it does not start with the `\\0asm` header)",
                path.display()
            )
        );
    });
}

fn an_empty_file(strategy: Strategy) {
    with_file(b"", |path| {
        let line = refused(strategy, path, "127.0.0.1:0");
        assert_eq!(
            line,
            format!(
                "error: handler {} is empty, not a WebAssembly component",
                path.display()
            )
        );
    });
}

fn a_core_module(strategy: Strategy) {
    // The smallest valid core module: magic and version 1.
    with_file(b"\0asm\x01\0\0\0", |path| {
        let line = refused(strategy, path, "127.0.0.1:0");
        assert_eq!(
            line,
            format!(
                "error: handler {} is a core module, not a component",
                path.display()
            )
        );
    });
}

fn a_corrupt_component(strategy: Strategy) {
    let whole = std::fs::read(guest("echo")).unwrap();
    with_file(&whole[..whole.len() / 2], |path| {
        let line = refused(strategy, path, "127.0.0.1:0");
        let expected = format!(
            "error: handler {} is not a valid component: ",
            path.display()
        );
        assert!(line.starts_with(&expected), "{line}");
    });
}

fn a_component_of_the_wrong_world(strategy: Strategy) {
    let path = guest("test-wrong-world");
    let line = refused(strategy, &path, "127.0.0.1:0");
    let expected = format!(
        "error: handler {} does not export `handle` of the host:handler/handler@0.1.0 world: ",
        path.display()
    );
    assert!(line.starts_with(&expected), "{line}");
}

fn a_component_without_handle(strategy: Strategy) {
    let path = guest("test-command");
    let line = refused(strategy, &path, "127.0.0.1:0");
    let expected = format!(
        "error: handler {} does not export `handle` of the host:handler/handler@0.1.0 world: ",
        path.display()
    );
    assert!(line.starts_with(&expected), "{line}");
}

fn an_address_in_use(strategy: Strategy) {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let line = refused(strategy, &guest("echo"), &addr);
    assert!(
        line.starts_with(&format!("error: cannot listen on {addr}: ")),
        "{line}"
    );
    assert!(line.contains("in use"), "{line}");
}

fn an_invalid_address(strategy: Strategy) {
    let line = refused(strategy, &guest("echo"), "not-an-address");
    assert!(
        line.starts_with("error: invalid --addr \"not-an-address\""),
        "{line}"
    );
}

#[test]
fn bad_flag_values_are_usage_errors() {
    for (args, named) in [
        (&["serve", "--workers", "0"][..], "'0'"),
        (&["serve", "--strategy", "spawning"][..], "'spawning'"),
        (&["serve", "--max-children", "lots"][..], "'lots'"),
        (&["serve", "--bogus"][..], "'--bogus'"),
    ] {
        let out = run_host(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(named),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("listening on"));
    }
}

#[test]
fn flags_of_the_other_strategy_are_refused() {
    let out = run_host(&[
        "serve",
        "--strategy",
        "forking",
        "--workers",
        "4",
        "--addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        "error: --workers applies to --strategy threading, prefork or async, not forking"
    );
}
