//! The conformance kit: `host check` explains any file, and `host check --run`
//! passes for the echo handler in every language, under every strategy.

use std::path::{Path, PathBuf};

use crate::for_each_strategy;
use crate::support::{guest, language_echo, run_host, Strategy, TempDir};

for_each_strategy!(
    rust_echo_conforms,
    python_echo_conforms,
    javascript_echo_conforms,
    c_echo_conforms,
    go_echo_conforms,
    wat_echo_conforms,
);

/// Runs `host check --run` and checks every scenario passed.
fn conforms(strategy: Strategy, handler: &Path) {
    let out = run_host(&[
        "check",
        "--run",
        "--strategy",
        strategy.name(),
        handler.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}:\n{stdout}", handler.display());
    assert!(stdout.contains("verdict:     can be served"), "{stdout}");
    assert!(stdout.contains("handle:      exported with the type of host:handler/handler@0.1.0"));
    for scenario in [
        "PASS  0 bytes",
        "PASS  1 byte",
        "PASS  1 MiB",
        "PASS  half-close ends the reply",
        "PASS  32 concurrent clients",
        "PASS  one instance per connection",
    ] {
        assert!(stdout.contains(scenario), "{scenario:?} missing:\n{stdout}");
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("conformance: passed"), "{stdout}");
}

fn rust_echo_conforms(strategy: Strategy) {
    conforms(strategy, &guest("echo"));
}

fn python_echo_conforms(strategy: Strategy) {
    conforms(strategy, &language_echo("python"));
}

fn javascript_echo_conforms(strategy: Strategy) {
    conforms(strategy, &language_echo("js"));
}

fn c_echo_conforms(strategy: Strategy) {
    conforms(strategy, &language_echo("c"));
}

fn go_echo_conforms(strategy: Strategy) {
    conforms(strategy, &language_echo("go"));
}

fn wat_echo_conforms(strategy: Strategy) {
    conforms(strategy, &language_echo("wat"));
}

/// `host check` without `--run`; returns (exit ok, stdout).
fn check(path: &Path) -> (bool, String) {
    let out = run_host(&["check", path.to_str().unwrap()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn file_with(dir: &TempDir, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join("handler.wasm");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn check_reports_imports_and_what_is_denied() {
    let (ok, out) = check(&language_echo("python"));
    assert!(ok, "{out}");
    assert!(
        out.contains("format:      a WebAssembly component"),
        "{out}"
    );
    for line in [
        "wasi:sockets/tcp@",
        "denied: no network",
        "wasi:filesystem/preopens@",
        "denied by default: no directories unless --dir",
        "wasi:cli/environment@",
        "denied by default: empty unless --env",
        "wasi:io/streams@0.2.12",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    for field in ["size:", "sha256:", "compile:", "instantiate: p50 "] {
        assert!(out.contains(field), "{field:?} missing:\n{out}");
    }
}

#[test]
fn check_names_a_core_module() {
    let dir = TempDir::new("check");
    let (ok, out) = check(&file_with(&dir, b"\0asm\x01\0\0\0"));
    assert!(!ok);
    assert!(
        out.contains("format:      not a component: it is a core module, not a component"),
        "{out}"
    );
    assert!(
        out.contains("verdict:     cannot be served: the file is a core module"),
        "{out}"
    );
}

#[test]
fn check_names_a_wrong_signature() {
    let (ok, out) = check(&guest("test-wrong-world"));
    assert!(!ok);
    assert!(out.contains("verdict:     cannot be served: "), "{out}");
    assert!(out.contains("type-checking export func `handle`"), "{out}");
    assert!(
        out.contains("expected `handle: func(info: connection-info"),
        "{out}"
    );
}

#[test]
fn check_names_a_missing_handle() {
    let (ok, out) = check(&guest("test-command"));
    assert!(!ok);
    assert!(
        out.contains("exports:     wasi:cli/run@0.2.0 (interface)"),
        "{out}"
    );
    assert!(
        out.contains("cannot be served: it exports no `handle` function"),
        "{out}"
    );
}

#[test]
fn check_refuses_a_missing_file() {
    let out = run_host(&["check", "./no/such.wasm"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: handler ./no/such.wasm cannot be read"),
        "{stderr}"
    );
}
