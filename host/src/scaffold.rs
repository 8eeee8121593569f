//! `host new PATH`: makes a Rust handler crate to start from, rendered from
//! the echo handler's own files (embedded at build time, so the scaffold is
//! always the echo the tests run) under the new crate's name, with its own
//! copy of the contract (`wit/`). Inside a cargo workspace (the directory
//! above PATH holds a `[workspace]` manifest, as `handlers/` does) the crate
//! is a member of it; anywhere else it is a workspace of its own, with the
//! guest workspace's release profile and lock file.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};

/// The echo handler's source: what a new crate starts from.
const ECHO_LIB: &str = include_str!("../../handlers/echo/src/lib.rs");
/// The contract and the WASI package it uses.
const HANDLER_WIT: &str = include_str!("../../wit/handler.wit");
const IO_WIT: &str = include_str!("../../wit/deps/io.wit");
/// The guest workspace's manifest (its wit-bindgen version and release
/// profile) and lock file (the versions the tests build with).
const GUEST_WORKSPACE: &str = include_str!("../../handlers/Cargo.toml");
const GUEST_LOCK: &str = include_str!("../../handlers/Cargo.lock");

/// What `host new` made, and how to build it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Made {
    pub dir: PathBuf,
    pub package: String,
    /// The enclosing workspace's manifest, if the crate joined one.
    pub workspace: Option<PathBuf>,
}

impl Made {
    /// The `.wasm` file cargo writes (under the target directory's
    /// `wasm32-wasip2/release/`).
    pub(crate) fn wasm_name(&self) -> String {
        format!("{}.wasm", self.package.replace('-', "_"))
    }

    /// The lines `host new` prints: what it made and the next two commands.
    pub(crate) fn next_steps(&self) -> String {
        let wasm = self.wasm_name();
        let (build, target) = match &self.workspace {
            Some(manifest) => (
                format!(
                    "cargo build --release --target wasm32-wasip2 --manifest-path {} -p {}",
                    manifest.display(),
                    self.package
                ),
                manifest
                    .parent()
                    .map_or(PathBuf::from("target"), |d| d.join("target")),
            ),
            None => (
                format!(
                    "cargo build --release --target wasm32-wasip2 --manifest-path {}",
                    self.dir.join("Cargo.toml").display()
                ),
                self.dir.join("target"),
            ),
        };
        let wasm = target.join("wasm32-wasip2/release").join(wasm);
        format!(
            "made {} (package {}): an echo handler; edit src/lib.rs\n\
             build it:  {build}\n\
             serve it:  host serve {}\n",
            self.dir.display(),
            self.package,
            wasm.display()
        )
    }
}

/// Makes the crate at `dir`, which must not exist.
pub(crate) fn new_handler(dir: &Path) -> Result<Made> {
    if dir.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; host new makes a new crate",
            dir.display()
        );
    }
    let package = package_name(dir)?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!("the directory {} does not exist", parent.display());
    }
    let workspace = parent.join("Cargo.toml");
    let workspace = is_workspace(&workspace).then_some(workspace);
    let mut files = vec![
        ("Cargo.toml", manifest(&package, workspace.is_none())?),
        ("src/lib.rs", lib_rs(&package)?),
        ("wit/handler.wit", HANDLER_WIT.to_string()),
        ("wit/deps/io.wit", IO_WIT.to_string()),
    ];
    if workspace.is_none() {
        files.push(("Cargo.lock", GUEST_LOCK.to_string()));
    }
    for (name, text) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(Made {
        dir: dir.to_path_buf(),
        package,
        workspace,
    })
}

/// The package name: the path's last component, as cargo takes it
/// (letters, digits, `-`, `_`; not starting with a digit).
fn package_name(dir: &Path) -> Result<String> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("invalid path {:?}: it names no crate", dir.display()))?;
    let valid = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if !valid {
        bail!(
            "invalid crate name {name:?}: expected letters, digits, '-' and '_', starting with a letter"
        );
    }
    Ok(name.to_string())
}

/// Whether `manifest` is a cargo workspace's root manifest.
fn is_workspace(manifest: &Path) -> bool {
    fs::read_to_string(manifest)
        .is_ok_and(|text| text.lines().any(|line| line.trim() == "[workspace]"))
}

/// The line of the guest workspace's manifest that starts with `key`.
fn guest_line(key: &str) -> Result<&'static str> {
    GUEST_WORKSPACE
        .lines()
        .find(|line| line.starts_with(key))
        .ok_or_else(|| anyhow!("handlers/Cargo.toml has no {key} line"))
}

/// The guest workspace's `[profile.release]` table.
fn guest_release_profile() -> Result<&'static str> {
    let start = GUEST_WORKSPACE
        .find("[profile.release]")
        .ok_or_else(|| anyhow!("handlers/Cargo.toml has no [profile.release]"))?;
    let rest = &GUEST_WORKSPACE[start..];
    let end = rest[1..].find("\n[").map_or(rest.len(), |i| i + 2);
    Ok(rest[..end].trim_end())
}

/// The new crate's `Cargo.toml`; `alone`: a workspace of its own.
fn manifest(package: &str, alone: bool) -> Result<String> {
    let mut text = format!(
        "[package]\nname = \"{package}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\n{}\n",
        guest_line("wit-bindgen = ")?
    );
    if alone {
        text.push_str(&format!(
            "\n# Not a member of any other workspace.\n[workspace]\n\n{}\n",
            guest_release_profile()?
        ));
    }
    Ok(text)
}

/// The echo handler's source under the new name, reading its own `wit/`.
fn lib_rs(package: &str) -> Result<String> {
    let mut text = ECHO_LIB.to_string();
    let replacements = [
        (
            "//! The echo handler: writes back exactly the bytes it reads, until the input\n//! ends, then returns. The host embeds this component as its built-in handler.\n",
            format!(
                "//! The {package} handler, made by `host new` from the echo handler: it\n//! writes back exactly the bytes it reads, until the input ends, then returns.\n"
            ),
        ),
        ("path: \"../../wit\",", "path: \"wit\",".to_string()),
    ];
    for (from, to) in replacements {
        if !text.contains(from) {
            bail!("the embedded echo handler no longer contains {from:?}");
        }
        text = text.replacen(from, &to, 1);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_echo_handler_renders_under_a_new_name() {
        let lib = lib_rs("my-handler").unwrap();
        assert!(lib.starts_with("//! The my-handler handler, made by `host new`"));
        assert!(lib.contains("path: \"wit\","));
        assert!(lib.contains("export!(Echo);"));
        let alone = manifest("my-handler", true).unwrap();
        assert!(alone.contains("name = \"my-handler\""));
        assert!(alone.contains("wit-bindgen = \"="), "{alone}");
        assert!(alone.contains("[workspace]\n"));
        assert!(
            alone.contains("[profile.release]\nopt-level = \"s\""),
            "{alone}"
        );
        let member = manifest("my-handler", false).unwrap();
        assert!(!member.contains("[workspace]") && !member.contains("[profile"));
    }

    #[test]
    fn bad_names_and_existing_paths_are_refused() {
        let err = new_handler(Path::new("/tmp/9lives")).unwrap_err();
        assert!(err.to_string().starts_with("invalid crate name \"9lives\""));
        let err = new_handler(Path::new("/tmp")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/tmp already exists; host new makes a new crate"
        );
    }

    #[test]
    fn a_crate_alone_and_a_member() {
        let root = std::env::temp_dir().join(format!("host-new-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let alone = new_handler(&root.join("solo")).unwrap();
        assert_eq!(alone.workspace, None);
        assert!(root.join("solo/Cargo.lock").is_file());
        assert!(root.join("solo/wit/deps/io.wit").is_file());
        fs::write(root.join("Cargo.toml"), "[workspace]\nmembers = [\"*\"]\n").unwrap();
        let member = new_handler(&root.join("my-handler")).unwrap();
        assert_eq!(member.workspace, Some(root.join("Cargo.toml")));
        assert_eq!(member.wasm_name(), "my_handler.wasm");
        assert!(!root.join("my-handler/Cargo.lock").exists());
        assert!(member.next_steps().contains("-p my-handler"));
        fs::remove_dir_all(&root).unwrap();
    }
}
