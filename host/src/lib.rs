//! The host: serves TCP connections by running the `handle` export of a
//! WebAssembly component in a fresh, sandboxed instance per connection, on a
//! worker thread or in a child process.
//!
//! [`main`] is the command line; `serve`, the whole `host serve` command, is
//! `supervisor::run`: it forks a worker process per tenant (`worker::run`),
//! each running `server::run`, the accept loop. ARCHITECTURE.md has the map.

mod activation;
mod check;
mod check_http;
mod conn;
mod listener;
mod logging;
mod metrics;
mod outcome;
mod server;
mod settings;
mod shutdown;
mod strategy;
mod supervisor;
mod sys;
mod wasm;
mod worker;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser as _;

use crate::settings::{Cli, Command, ConfigCommand, HostConfig, LogFormat, LogLevel, StrategyKind};
use crate::shutdown::Shutdown;
use crate::wasm::engine;
use crate::wasm::handler::{self, HandlerSource};

/// `host`: parses the flags, runs the command, and turns any error into one
/// `error: ...` line and a non-zero exit.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        logging::init(LogFormat::Text, &LogLevel::default());
    }
    let result = match cli.command {
        Command::Serve(args) => {
            let options = supervisor::Options { watch: args.watch };
            let format = args.log_format;
            // The log starts once the settings are read, at the level they
            // give (`--log-level` over the file's): nothing logs before,
            // and an error in them is the one `error:` line below.
            settings::from_flags(args).and_then(|config| {
                logging::init(format, &config.log_level);
                let shutdown = Shutdown::new()?;
                // SIGINT/SIGTERM drain; a second one ends at once.
                shutdown.stop_on_signals()?;
                serve(config, &shutdown, &options)
            })
        }
        Command::Compile(args) => compile(&args.handler, &args.output, args.strategy.into()),
        Command::Check(args) => match check::check(&args.handler, args.run, args.strategy.into()) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Config(ConfigCommand::Check {
            file,
            cache_dir,
            no_cache,
        }) => config_check(&file, settings::cache_dir(cache_dir, no_cache)).map(|text| {
            print!("{text}");
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `host serve`: compile every tenant's handler, bind every listener, print
/// a `listening on ADDR tenant=NAME` line for each, then serve until
/// `shutdown` is triggered.
fn serve(config: HostConfig, shutdown: &Shutdown, options: &supervisor::Options) -> Result<()> {
    // The sockets systemd passed, taken before any thread or child exists.
    activation::take()?;
    supervisor::run(config, shutdown, options)
}

/// `host compile`: writes the handler's compiled form for `strategy`.
fn compile(handler: &Path, output: &Path, strategy: StrategyKind) -> Result<()> {
    let engine = engine::build(strategy, 1, 64 << 20)?;
    let compiled = handler::precompile(&engine, &HandlerSource::File(handler.to_path_buf()))?;
    std::fs::write(output, compiled)
        .with_context(|| format!("cannot write {}", output.display()))?;
    Ok(())
}

/// `host config check FILE`: parses and validates the file, compiles every
/// handler with the engine `serve` would use, and returns the effective
/// settings of every tenant.
fn config_check(file: &Path, cache_dir: Option<std::path::PathBuf>) -> Result<String> {
    let config = settings::load(file, cache_dir)?;
    let (engine, _) = engine::for_host(&config.tenants, true)?;
    let mut async_engine = None;
    for tenant in &config.tenants {
        let for_async = tenant.strategy.kind() == StrategyKind::Async;
        let options = handler::LoadOptions {
            cache: supervisor::open_cache(tenant.cache_dir.as_deref()),
            allow_precompiled: tenant.allow_precompiled,
            for_async,
        };
        let engine = match (for_async, &async_engine) {
            (false, _) => &engine,
            (true, Some(engine)) => engine,
            (true, None) => async_engine.insert(engine::for_async()?),
        };
        handler::Handler::load(engine, &tenant.handler, &options)
            .with_context(|| format!("{}: tenant {}", file.display(), tenant.tenant))?;
    }
    Ok(settings::describe(&config))
}
