//! The settings of the host: what the command line and the config file say,
//! turned once into the validated [`HostConfig`] everything else reads.
//!
//! One path, at start-up and at every reload: the flags ([`flags`]) or the
//! config file ([`file`], its shape in [`schema`]) give raw settings
//! ([`raw`]); [`convert`] parses each value ([`values`]) once and makes the
//! [`HostConfig`] ([`model`]); [`describe`] writes one back as TOML. Nothing here depends on the rest of
//! the host.

mod convert;
mod describe;
mod extras;
mod file;
mod flags;
mod log_level;
mod model;
mod outbound;
mod proxy;
mod raw;
mod schema;
mod values;

use std::path::{Path, PathBuf};

use anyhow::Result;

pub(crate) use describe::describe;
pub(crate) use extras::{command, completions, manpage};
pub(crate) use flags::{cache_dir, Cli, Command, ConfigCommand, LogFormat, ServeArgs};
pub(crate) use log_level::{Level as LogLevelName, LogLevel};
pub(crate) use model::{
    Access, Grants, HandlerSource, HostConfig, Limits, ListenAddr, ProxyProtocol, ProxyVersion,
    ServeConfig, Strategy, StrategyKind, MAX_TENANTS,
};
#[cfg(test)]
pub(crate) use outbound::parse_grant;
pub(crate) use outbound::Outbound;

/// `host serve`'s config: the config file's tenants, or the one tenant
/// named `default` the flags describe.
pub(crate) fn from_flags(args: ServeArgs) -> Result<HostConfig> {
    let metrics_addr_flag = args.metrics_addr()?;
    let log_level_flag = args.log_level()?;
    let mut raw = match &args.config {
        Some(file) => file::read(file, args.cache_dir())?,
        None => args.into_raw()?,
    };
    raw.metrics_addr_flag = metrics_addr_flag;
    raw.log_level_flag = log_level_flag;
    convert::host(raw)
}

/// The tenant `host serve --handler PATH --strategy STRATEGY --addr
/// 127.0.0.1:0` runs (`None`: the built-in echo), every other setting at its
/// built-in default (`host check`).
pub(crate) fn as_served(handler: Option<&Path>, strategy: StrategyKind) -> Result<ServeConfig> {
    let layer = raw::Layer {
        handler: handler.map(|p| raw::Given::flag(p.to_path_buf())),
        listen: Some(vec![raw::Given::flag("127.0.0.1:0".to_string())]),
        strategy: Some(raw::Given::flag(strategy)),
        ..raw::Layer::default()
    };
    let mut host = convert::host(raw::RawHost {
        tenants: vec![raw::RawTenant {
            name: "default".to_string(),
            at: None,
            layer,
        }],
        ..raw::RawHost::default()
    })?;
    Ok(host.tenants.remove(0))
}

/// The config file `file`, read and validated (`host config check`).
pub(crate) fn load(file: &Path, cache_dir: Option<PathBuf>) -> Result<HostConfig> {
    convert::host(file::read(file, cache_dir)?)
}

/// The config a reload switches to: the config file read again as it was
/// at start-up (same compile cache, `--metrics-addr` still winning), or
/// `current` itself when the tenants came from flags. The metrics address
/// and the log level change only at a restart: a file that changes one is
/// warned about.
pub(crate) fn reload(current: &HostConfig) -> Result<HostConfig> {
    let Some(file) = &current.file else {
        return Ok(current.clone());
    };
    let mut raw = file::read(file, current.cache_dir.clone())?;
    raw.metrics_addr_flag = current.metrics_addr_flag;
    raw.log_level_flag = current.log_level_flag.clone();
    let mut config = convert::host(raw)?;
    if config.log_level != current.log_level {
        tracing::warn!(
            "the log level changes only at a restart; still logging at {}",
            current.log_level
        );
        config.log_level = current.log_level.clone();
    }
    if config.metrics_addr != current.metrics_addr {
        tracing::warn!(
            "the metrics address changes only at a restart; still serving it on {}",
            current
                .metrics_addr
                .map_or("nothing".to_string(), |a| a.to_string())
        );
        config.metrics_addr = current.metrics_addr;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// A config file of its own, removed when dropped.
    struct File(PathBuf);

    impl File {
        fn new(name: &str, text: &str) -> File {
            let path = std::env::temp_dir()
                .join(format!("host-settings-{}-{name}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            File(path)
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn serve(args: &[&str]) -> Result<HostConfig> {
        let mut argv = vec!["host", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(args) => from_flags(args),
            _ => unreachable!("only serve is parsed here"),
        }
    }

    const TENANT: &str = "[tenants.a]\nlisten = [\"127.0.0.1:0\"]\n";

    #[test]
    fn the_flags_and_the_file_take_one_path() {
        let file = File::new("path", &format!("[defaults]\nworkers = 3\n{TENANT}"));
        let path = file.0.to_str().unwrap();
        let from_file = serve(&["--config", path, "--no-cache"]).unwrap();
        let from_flags = serve(&["--addr", "127.0.0.1:0", "--workers", "3", "--no-cache"]).unwrap();
        let (a, default) = (&from_file.tenants[0], &from_flags.tenants[0]);
        assert_eq!(
            (a.tenant.as_str(), default.tenant.as_str()),
            ("a", "default")
        );
        let mut renamed = a.clone();
        renamed.tenant = default.tenant.clone();
        assert_eq!(&renamed, default);
        assert_eq!(from_file.file.as_deref(), Some(file.0.as_path()));
        assert_eq!(from_flags.file, None);
    }

    #[test]
    fn the_metrics_flag_wins_at_start_and_at_reload() {
        let text = format!("[metrics]\naddr = \"127.0.0.1:9464\"\n{TENANT}");
        let file = File::new("metrics", &text);
        let path = file.0.to_str().unwrap();
        let cache = "/var/cache/host-settings-test";
        let args = ["--config", path, "--metrics-addr", "127.0.0.1:9000"];
        let host = serve(&[&args[..], &["--cache-dir", cache]].concat()).unwrap();
        let flag = Some("127.0.0.1:9000".parse().unwrap());
        assert_eq!(host.metrics_addr, flag);
        // The file changes its metrics address and its tenants.
        std::fs::write(
            &file.0,
            format!("[metrics]\naddr = \"127.0.0.1:9465\"\n{TENANT}[tenants.b]\nlisten = [\"127.0.0.1:0\"]\n"),
        )
        .unwrap();
        let reloaded = reload(&host).unwrap();
        assert_eq!(reloaded.metrics_addr, flag);
        assert_eq!(reloaded.tenants.len(), 2);
        let cache = Some(PathBuf::from(cache));
        assert_eq!(reloaded.cache_dir, cache);
        assert_eq!(reloaded.tenants[1].cache_dir, cache);
        // Without the flag, the address of the start stays.
        let host = serve(&["--config", path]).unwrap();
        std::fs::write(
            &file.0,
            format!("[metrics]\naddr = \"127.0.0.1:9466\"\n{TENANT}"),
        )
        .unwrap();
        assert_eq!(reload(&host).unwrap().metrics_addr, host.metrics_addr);
    }

    #[test]
    fn a_bad_metrics_flag_is_named() {
        let err = serve(&["--metrics-addr", "nonsense"])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid --metrics-addr \"nonsense\": "),
            "{err}"
        );
    }
}
