//! Issue 18: a wasmtime user's habits (the handler as a positional argument,
//! `--dir HOST`, `--env NAME`, `--version`, completions, man pages, `host
//! new`) and the README kept honest against `host serve --help`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::for_each_strategy;
use crate::support::{exchange, guest, run_host, run_host_in, Server, Strategy, TempDir};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Starts `host ARGS` (no `--strategy`: the default) and waits for its
/// `listening on` line.
fn serve(args: &[&str], env: &[(&str, &str)]) -> Server {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let mut server = Server::spawn_with(&args, &[], |command| {
        command.envs(env.iter().copied());
    });
    let line = server.wait_for_log(|l| l.starts_with("listening on "));
    server.set_addr(harness::listening_addr(&line).expect("listening on IP:PORT tenant=NAME"));
    server
}

#[test]
fn serve_takes_the_handler_as_a_positional_argument() {
    let handler = guest("test-guest");
    let handler = handler.to_str().unwrap();
    let server = serve(&["serve", handler, "--addr", "127.0.0.1:0"], &[]);
    server.wait_for_log(|l| l.contains("serving ") && l.contains("test_guest.wasm"));
    // The test guest, not the built-in echo, answers.
    assert_eq!(exchange(server.addr(), b"count\n"), b"1");
    drop(server);

    let both = run_host(&["serve", handler, "--handler", handler]);
    assert_eq!(both.status.code(), Some(2));
    let stderr = text(&both.stderr);
    assert!(
        stderr
            .starts_with("error: the argument '[HANDLER]' cannot be used with '--handler <PATH>'")
            || stderr.starts_with(
                "error: the argument '--handler <PATH>' cannot be used with '[HANDLER]'"
            ),
        "{stderr}"
    );
    let with_config = run_host(&["serve", "--config", "host.toml", handler]);
    assert_eq!(with_config.status.code(), Some(2));
    assert!(text(&with_config.stderr).contains("cannot be used with"));
}

for_each_strategy!(grants_are_written_as_wasmtime_writes_them);

/// `--dir HOST` (the same path in the guest), `--dir HOST::GUEST::rw`, and
/// `--env NAME` (the host's value, and only the names given).
fn grants_are_written_as_wasmtime_writes_them(strategy: Strategy) {
    let read_only = TempDir::new("ro");
    std::fs::write(read_only.path().join("hello.txt"), "granted file").unwrap();
    let writable = TempDir::new("rw");
    let ro = read_only.path().to_str().unwrap().to_string();
    let rw = format!("{}::/out::rw", writable.path().display());
    let handler = guest("test-guest");
    let server = serve(
        &[
            "serve",
            handler.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
            "--strategy",
            strategy.name(),
            "--dir",
            &ro,
            "--dir",
            &rw,
            "--env",
            "HOST_HABITS_INHERITED",
            "--env",
            "GREETING=hi",
        ],
        &[("HOST_HABITS_INHERITED", "from the host")],
    );
    server.wait_for_log(|l| {
        l.contains("grants: env HOST_HABITS_INHERITED, GREETING; ")
            && l.contains(&format!("dir {ro} as {ro} (read-only)"))
            && l.contains("as /out (read-write)")
    });
    let ask = |line: String| text(&exchange(server.addr(), line.as_bytes()));
    // Exactly the names given: the host's PATH, HOME... stay out.
    assert_eq!(
        ask("env\n".into()),
        "env: [HOST_HABITS_INHERITED=from the host, GREETING=hi]"
    );
    assert_eq!(
        ask(format!("read-file {ro}/hello.txt\n")),
        "read 12 bytes: granted file"
    );
    let denied = ask(format!("write-file {ro}/new.txt nope\n"));
    assert!(denied.starts_with("denied: "), "{denied}");
    assert!(!read_only.path().join("new.txt").exists());
    assert_eq!(
        ask("write-file /out/new.txt written\n".into()),
        "wrote 7 bytes"
    );
    assert_eq!(
        std::fs::read_to_string(writable.path().join("new.txt")).unwrap(),
        "written"
    );
    // Still nothing outside the grants.
    let outside = ask("write-file /tmp/host-habits-escape x\n".into());
    assert!(outside.starts_with("denied: "), "{outside}");
}

#[test]
fn bad_values_are_named_in_one_line() {
    let cases = [
        (
            vec!["--env", "HOST_HABITS_SURELY_UNSET"],
            "error: invalid --env \"HOST_HABITS_SURELY_UNSET\": HOST_HABITS_SURELY_UNSET is not set in the host's environment (write HOST_HABITS_SURELY_UNSET=VALUE to give a value)\n",
        ),
        (
            vec!["--addr", "999.1.1.1:80"],
            "error: invalid --addr \"999.1.1.1:80\": 999.1.1.1 is not an IP address (expected IP:PORT, e.g. 127.0.0.1:7878 or [::1]:7878)\n",
        ),
        (
            vec!["--max-memory", "64MB"],
            "error: invalid --max-memory \"64MB\": MB is ambiguous (decimal or binary?); write 64MiB for binary units, or the size in bytes\n",
        ),
        (
            vec!["--dir", "/tmp::/x::wx"],
            "error: invalid --dir \"/tmp::/x::wx\": expected HOST_PATH, HOST_PATH::GUEST_PATH or HOST_PATH::GUEST_PATH::rw\n",
        ),
    ];
    for (args, expected) in cases {
        let out = run_host(&[&["serve", "--no-cache"], &args[..]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(text(&out.stderr), expected, "{args:?}");
    }
}

#[test]
fn version_names_wasmtime_and_the_engine_hash_of_the_cache_entries() {
    let out = run_host(&["--version"]);
    assert!(out.status.success());
    let version = text(&out.stdout);
    let lines: Vec<&str> = version.lines().collect();
    assert_eq!(lines.len(), 3, "{version}");
    assert_eq!(lines[0], format!("host {}", env!("CARGO_PKG_VERSION")));
    assert!(lines[1].starts_with("wasmtime 48."), "{version}");
    let hash = lines[2]
        .strip_prefix("compile cache engine hash ")
        .unwrap_or_else(|| panic!("{version}"));
    // The entry a real start writes is named after it.
    let cache = TempDir::new("version-cache");
    let cache_dir = cache.path().to_str().unwrap();
    let server = Server::start(Strategy::Threading, None, &["--cache-dir", cache_dir]);
    drop(server);
    let entries: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        entries
            .iter()
            .any(|e| e.starts_with(&format!("{hash}-")) && e.ends_with(".cwasm")),
        "{hash} names none of {entries:?}"
    );
}

/// The flags `host serve --help` lists (aliases too), without `--help`.
fn serve_flags() -> Vec<String> {
    let out = run_host(&["serve", "--help"]);
    assert!(out.status.success());
    let mut flags = Vec::new();
    for line in text(&out.stdout).lines() {
        let trimmed = line.trim_start();
        let trimmed = trimmed.strip_prefix("-h, ").unwrap_or(trimmed);
        if let Some(rest) = trimmed.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            flags.push(format!("--{name}"));
        }
        if let Some(alias) = trimmed.strip_prefix("[alias: ") {
            flags.push(alias.trim_end_matches(']').to_string());
        }
    }
    flags.retain(|f| f != "--help");
    assert!(flags.len() > 20, "{flags:?}");
    flags
}

/// Every `--flag` in `text`.
fn flags_in(text: &str) -> Vec<String> {
    let mut flags = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("--") {
        let name: String = rest[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !name.is_empty() {
            flags.push(format!("--{name}"));
        }
        rest = &rest[i + 2 + name.len()..];
    }
    flags
}

#[test]
fn the_readme_lists_every_serve_flag_and_no_other() {
    let readme = readme();
    let section = readme
        .split("\n## `host serve`\n")
        .nth(1)
        .expect("README has a `host serve` section");
    let section = section.split("\n## ").next().unwrap();
    // The synopsis (the first code block) and the flag table's first column.
    let synopsis = section.split("```").nth(1).expect("a synopsis");
    let table: String = section
        .lines()
        .filter(|l| l.starts_with("| `--") || l.starts_with("| `HANDLER"))
        .map(|l| l.split(" | ").next().unwrap().to_string() + "\n")
        .collect();
    let help = serve_flags();
    for flag in &help {
        assert!(
            flags_in(&table).contains(flag),
            "{flag} (in host serve --help) is missing from the README's table"
        );
        if flag != "--listen" {
            assert!(
                flags_in(synopsis).contains(flag),
                "{flag} (in host serve --help) is missing from the README's synopsis"
            );
        }
    }
    for flag in flags_in(&table).iter().chain(&flags_in(synopsis)) {
        assert!(
            help.contains(flag),
            "{flag} is in the README's table or synopsis but not in host serve --help"
        );
    }
    assert!(table.contains("`HANDLER`"), "the positional handler");
}

#[test]
fn the_readme_names_every_outcome() {
    let source = std::fs::read_to_string(repo_root().join("host/src/outcome.rs")).unwrap();
    let names: Vec<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Outcome::"))
        .filter_map(|l| l.split(" => \"").nth(1))
        .map(|l| l.trim_end_matches("\","))
        .collect();
    assert_eq!(names.len(), 12, "{names:?}");
    let readme = readme();
    let log = readme.split("### The log").nth(1).unwrap();
    let log = log.split("\n## ").next().unwrap();
    for name in names {
        assert!(
            log.contains(&format!("`{name}`")) || log.contains(&format!("`{name} ")),
            "outcome {name} is missing from the README's log section"
        );
    }
}

#[test]
fn completions_and_man_pages_come_from_the_same_definitions() {
    let flags = serve_flags();
    let bash = run_host(&["completions", "bash"]);
    assert!(bash.status.success());
    let script = TempDir::new("completions");
    let path = script.path().join("host.bash");
    std::fs::write(&path, &bash.stdout).unwrap();
    // bash parses it (bash is the shell the repository's scripts run in).
    let parsed = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(parsed.status.success(), "{}", text(&parsed.stderr));
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run_host(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        for word in [
            "serve",
            "compile",
            "check",
            "config",
            "new",
            "manpage",
            "max-memory",
        ] {
            assert!(script.contains(word), "{shell}: {word} is missing");
        }
    }
    let bad = run_host(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));

    let host = text(&run_host(&["manpage"]).stdout);
    assert!(host.contains(".TH host 1"), "{host}");
    for command in ["serve", "compile", "check", "config", "new", "completions"] {
        assert!(host.contains(command), "{command} is missing from host(1)");
    }
    let page = text(&run_host(&["manpage", "serve"]).stdout);
    assert!(page.contains(".TH host\\-serve 1") || page.contains(".TH host-serve 1"));
    // clap_mangen leaves aliases (--listen) out of the page.
    for flag in flags.iter().filter(|f| *f != "--listen") {
        // roff writes each '-' as "\-".
        let roff = flag.replace('-', "\\-");
        assert!(page.contains(&roff), "{flag} is missing from host-serve(1)");
    }
    let out_dir = TempDir::new("man");
    let all = run_host(&["manpage", "--out-dir", out_dir.path().to_str().unwrap()]);
    assert!(all.status.success(), "{}", text(&all.stderr));
    for file in [
        "host.1",
        "host-serve.1",
        "host-config-check.1",
        "host-new.1",
    ] {
        assert!(out_dir.path().join(file).is_file(), "{file}");
    }
}

/// The code block of the README that follows `marker`.
fn readme_block(marker: &str) -> String {
    let readme = readme();
    let after = readme.split(marker).nth(1).expect("marker in README");
    let block = after.split("```sh\n").nth(1).expect("a sh block");
    block.split("```").next().unwrap().replace("\\\n", " ")
}

/// The README's steps, run as written in a copy of the guest workspace:
/// `host new handlers/my-handler`, the `cargo build ... -p my-handler`, and
/// serving what it wrote. The copy's `target/handlers` is the tests' guest
/// target directory, so the dependencies are not compiled again.
#[test]
fn host_new_and_the_readmes_build_step_serve_a_new_handler() {
    let steps = readme_block("`host new PATH` makes a handler crate");
    let steps: Vec<String> = steps
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert_eq!(steps[0], "host new handlers/my-handler");
    assert!(steps[1].starts_with("cargo build "), "{steps:?}");
    let served = steps[2]
        .strip_prefix("host serve ")
        .expect("host serve WASM");

    let root = TempDir::new("new-handler");
    let handlers = root.path().join("handlers");
    std::fs::create_dir_all(&handlers).unwrap();
    for file in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(repo_root().join("handlers").join(file), handlers.join(file)).unwrap();
    }
    std::fs::create_dir_all(root.path().join("target")).unwrap();
    std::os::unix::fs::symlink(
        env!("HOST_GUEST_TARGET_DIR"),
        root.path().join("target/handlers"),
    )
    .unwrap();

    let made = run_host_in(root.path(), &["new", "handlers/my-handler"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let said = text(&made.stdout);
    assert!(said.contains("-p my-handler"), "{said}");
    assert!(handlers.join("my-handler/src/lib.rs").is_file());
    let again = run_host_in(root.path(), &["new", "handlers/my-handler"]);
    assert_eq!(again.status.code(), Some(1));

    let args: Vec<&str> = steps[1].split(' ').skip(1).collect();
    let status = cargo(root.path())
        .args(&args)
        .status()
        .expect("cannot run cargo");
    assert!(status.success(), "{steps:?} failed");
    let wasm: PathBuf = root.path().join(served);
    assert!(wasm.is_file(), "{} was not built", wasm.display());

    let server = serve(
        &["serve", wasm.to_str().unwrap(), "--addr", "127.0.0.1:0"],
        &[],
    );
    assert_eq!(
        exchange(server.addr(), b"hello, new handler"),
        b"hello, new handler"
    );
    let check = run_host(&["check", wasm.to_str().unwrap()]);
    assert!(check.status.success(), "{}", text(&check.stdout));

    // Outside a workspace the crate is one of its own, built as printed.
    let made = run_host_in(root.path(), &["new", "solo"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let said = text(&made.stdout);
    let build = said
        .lines()
        .find_map(|l| l.strip_prefix("build it:  cargo "))
        .unwrap_or_else(|| panic!("{said}"));
    assert_eq!(
        build,
        "build --release --target wasm32-wasip2 --manifest-path solo/Cargo.toml"
    );
    let status = cargo(root.path())
        .args(build.split(' '))
        .arg("--target-dir")
        .arg(env!("HOST_GUEST_TARGET_DIR"))
        .status()
        .expect("cannot run cargo");
    assert!(status.success(), "building solo failed");
    let solo = Path::new(env!("HOST_GUEST_TARGET_DIR")).join("wasm32-wasip2/release/solo.wasm");
    let check = run_host(&["check", "--run", solo.to_str().unwrap()]);
    assert!(check.status.success(), "{}", text(&check.stdout));
}

/// cargo in `dir`, offline (every dependency is in the lock file and the
/// local registry), without the flags meant for the host.
fn cargo(dir: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(dir)
        .env("CARGO_NET_OFFLINE", "true")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CLIPPY_ARGS");
    command
}

#[test]
fn a_config_files_dirs_take_mode_rw() {
    let dir = TempDir::new("config-rw");
    let file = dir.path().join("host.toml");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let write = |dirs: &str| {
        let text = format!("[tenants.a]\nlisten = [\"127.0.0.1:0\"]\ndirs = {dirs}\n");
        std::fs::write(&file, text).unwrap();
    };
    let check = || run_host(&["config", "check", "--no-cache", file.to_str().unwrap()]);
    write("{ data = { guest = \"/data\", mode = \"rw\" }, \"/tmp\" = \"/tmp\" }");
    let out = check();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = format!(
        "dirs = {{ \"{}\" = {{ guest = \"/data\", mode = \"rw\" }}, \"/tmp\" = \"/tmp\" }}",
        data.display()
    );
    assert!(
        text(&out.stdout).contains(&expected),
        "{}",
        text(&out.stdout)
    );
    write("{ data = { guest = \"/data\", mode = \"wr\" } }");
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: {}:3:43: invalid dirs.data.mode \"wr\": expected \"ro\" or \"rw\"\n",
            file.display()
        )
    );
}
