//! Builds the echo handler (`handlers/echo`) for `wasm32-wasip2` so that the
//! host can embed it as its built-in handler. The guest workspace is built by
//! a nested cargo with its own target directory (`target/handlers`), which the
//! integration tests share for the other guests.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap();
    let handlers = root.join("handlers");
    for path in ["echo/src", "echo/Cargo.toml", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", handlers.join(path).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    wasmtime_version(&root.join("Cargo.lock"));

    let target_dir = guest_target_dir();
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "echo",
        ])
        .arg("--manifest-path")
        .arg(handlers.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The host's own flags are not meant for the guest.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        // Nor are the wrappers of `cargo clippy`.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .expect("cannot run cargo to build the built-in echo handler");
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint =
            if stderr.contains("wasm32-wasip2") && stderr.contains("target may not be installed") {
                "\n\nthe wasm32-wasip2 target is missing: run `rustup target add wasm32-wasip2`"
            } else {
                ""
            };
        panic!("building the built-in echo handler (handlers/echo) failed:\n{stderr}{hint}");
    }
    let wasm = target_dir.join("wasm32-wasip2/release/echo.wasm");
    assert!(wasm.is_file(), "{} was not built", wasm.display());
    println!("cargo:rustc-env=HOST_BUILTIN_ECHO_WASM={}", wasm.display());
    println!(
        "cargo:rustc-env=HOST_GUEST_TARGET_DIR={}",
        target_dir.display()
    );
}

/// Exports the version of wasmtime in the lock file, for `host --version`
/// (wasmtime has no public constant for it).
fn wasmtime_version(lock: &Path) {
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(lock).expect("cannot read Cargo.lock");
    let version = text
        .split("[[package]]")
        .find_map(|package| {
            let mut lines = package.lines().map(str::trim);
            lines.find(|l| *l == "name = \"wasmtime\"")?;
            lines
                .find_map(|l| l.strip_prefix("version = \""))
                .and_then(|v| v.strip_suffix('"'))
        })
        .expect("Cargo.lock has no wasmtime package");
    println!("cargo:rustc-env=HOST_WASMTIME_VERSION={version}");
}

/// `<cargo target dir>/handlers`: OUT_DIR is `<target>/<profile>/build/<pkg>/out`.
fn guest_target_dir() -> PathBuf {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let target = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("OUT_DIR is inside the target directory");
    target.join("handlers")
}
