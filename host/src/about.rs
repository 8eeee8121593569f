//! What `host --version` says: the host's version, wasmtime's, and the
//! engine hash that names the compile cache's entries, as operators quote
//! them in bug reports.

use crate::wasm::{compile_cache, engine};

/// The text after `host ` that `host --version` prints.
pub(crate) fn long_version() -> String {
    // The async engine: on demand, nothing reserved, and the same
    // compilation settings (so the same hash) as every other engine.
    let hash = match engine::for_async() {
        Ok(engine) => compile_cache::engine_key(&engine),
        Err(e) => format!("unavailable ({e:#})"),
    };
    format!(
        "{}\nwasmtime {}\ncompile cache engine hash {hash}",
        env!("CARGO_PKG_VERSION"),
        env!("HOST_WASMTIME_VERSION"),
    )
}

/// Whether this run asks for `--version` (only `host --version`: clap knows
/// the flag at the top level alone), so the engine is built only then.
pub(crate) fn asked(mut args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    args.nth(1).is_some_and(|arg| arg == "--version")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{as_served, StrategyKind};

    #[test]
    fn the_hash_is_the_one_every_engine_files_its_entries_under() {
        let text = long_version();
        let hash = text.rsplit(' ').next().unwrap();
        assert_eq!(hash.len(), 16, "{text}");
        for strategy in StrategyKind::ALL {
            let tenant = as_served(None, strategy).unwrap();
            let (engine, _) = engine::for_host(&[tenant], false).unwrap();
            assert_eq!(compile_cache::engine_key(&engine), hash, "{strategy:?}");
        }
        assert!(text.contains(&format!("wasmtime {}", env!("HOST_WASMTIME_VERSION"))));
        assert!(asked(["host", "--version"].map(Into::into).into_iter()));
        assert!(!asked(
            ["host", "serve", "--version"].map(Into::into).into_iter()
        ));
    }
}
