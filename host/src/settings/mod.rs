//! The settings of the host: what the command line and the config file say,
//! turned once into the validated [`HostConfig`] everything else reads.
//!
//! One path, at start-up and at every reload: the flags ([`flags`]) or the
//! config file ([`file`]) give raw settings ([`raw`]); [`convert`] parses
//! each value ([`values`]) once and makes the [`HostConfig`] ([`model`]);
//! [`describe`] writes one back as TOML. Nothing here depends on the rest of
//! the host but the handler's source and the compile cache's default
//! directory.

mod convert;
mod describe;
mod file;
pub(crate) mod flags;
mod model;
mod raw;
mod values;

use std::path::{Path, PathBuf};

use anyhow::Result;

pub(crate) use describe::describe;
pub(crate) use flags::{Cli, Command, ConfigCommand, LogFormat, ServeArgs};
pub(crate) use model::{
    Access, Grants, HostConfig, Limits, ListenAddr, ServeConfig, Strategy, StrategyKind,
    MAX_TENANTS,
};

/// `host serve`'s config: the config file's tenants, or the one tenant
/// named `default` the flags describe.
pub(crate) fn from_flags(args: ServeArgs) -> Result<HostConfig> {
    let metrics_addr_flag = args.metrics_addr()?;
    let mut raw = match &args.config {
        Some(file) => file::read(file, args.cache_dir())?,
        None => args.into_raw()?,
    };
    raw.metrics_addr_flag = metrics_addr_flag;
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
/// changes only at a restart: a file that changes it is warned about.
pub(crate) fn reload(current: &HostConfig) -> Result<HostConfig> {
    let Some(file) = &current.file else {
        return Ok(current.clone());
    };
    let mut raw = file::read(file, current.cache_dir.clone())?;
    raw.metrics_addr_flag = current.metrics_addr_flag;
    let mut config = convert::host(raw)?;
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
