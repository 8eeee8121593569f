//! The on-disk compile cache: compiled handlers keyed by the engine's
//! compatibility hash (wasmtime's version and every setting that affects
//! code) and the SHA-256 of the component, so a restart loads native code in
//! milliseconds instead of recompiling (seconds for Python or JavaScript
//! components).
//!
//! Precompiled code is trusted native code. It is only ever loaded from this
//! cache, which the host writes itself into a directory it creates with mode
//! 0700, or from a file the user passes with `--allow-precompiled`.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

pub(crate) struct CompileCache {
    dir: PathBuf,
}

/// Feeds `Hash` output into SHA-256 (std's hashers are not stable across
/// builds).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// The SHA-256 of `bytes`, in hex.
pub(crate) fn digest(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The engine half of a cache entry's name: the host's version and the
/// engine's compatibility hash (wasmtime's version and every setting that
/// affects code), hashed. `host --version` prints it.
pub(crate) fn engine_key(engine: &Engine) -> String {
    let mut key = Sha256Hasher(Sha256::new());
    env!("CARGO_PKG_VERSION").hash(&mut key);
    engine.precompile_compatibility_hash().hash(&mut key);
    hex(&key.0.finalize()[..8])
}

impl CompileCache {
    /// Opens (creating it, mode 0700) the cache at `dir`.
    pub(crate) fn open(dir: &Path) -> Result<CompileCache> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the compile cache {}", dir.display()))?;
        let meta = fs::metadata(dir)?;
        if meta.permissions().mode() & 0o022 != 0 {
            anyhow::bail!(
                "the compile cache {} is writable by others; it holds native code, so it must not be",
                dir.display()
            );
        }
        Ok(CompileCache {
            dir: dir.to_path_buf(),
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the compiled form for `engine` of the component whose SHA-256
    /// is `digest` lives.
    pub(crate) fn entry(&self, engine: &Engine, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{}-{digest}.cwasm", engine_key(engine)))
    }

    /// Loads the cached compilation of the component with `digest`, if there
    /// is a usable one.
    pub(crate) fn load(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let path = self.entry(engine, digest);
        if !path.is_file() {
            return None;
        }
        // SAFETY: the file is in the host's own cache directory (mode 0700),
        // written by `store` below under a key that includes the engine's
        // compatibility hash; wasmtime checks that hash again.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(
                    "ignoring the unusable cache entry {}: {}",
                    path.display(),
                    crate::wasm::one_line(&e)
                );
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `component`, compiled from the component with `digest`;
    /// written to a temporary file and renamed, so a reader never sees half
    /// an entry.
    pub(crate) fn store(
        &self,
        engine: &Engine,
        digest: &str,
        component: &Component,
    ) -> Result<PathBuf> {
        let path = self.entry(engine, digest);
        let bytes = component
            .serialize()
            .map_err(|e| anyhow::anyhow!("cannot serialize: {}", crate::wasm::one_line(&e)))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        Ok(path)
    }
}
