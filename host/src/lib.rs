//! The host: serves TCP connections by running the `handle` export of a
//! WebAssembly component in a fresh, sandboxed instance per connection, on a
//! worker thread or in a child process.
//!
//! [`main`] is the command line; `serve`, the whole `host serve` command, is
//! `supervisor::run`: it forks a worker process per tenant (`worker::run`),
//! each running `server::run`, the accept loop. ARCHITECTURE.md has the map.

mod about;
mod activation;
mod check;
mod check_http;
mod conn;
mod handoff;
mod listener;
mod logging;
mod metrics;
mod outcome;
mod scaffold;
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
use clap::FromArgMatches as _;

use crate::settings::{Cli, Command, ConfigCommand, HostConfig, LogFormat, LogLevel, StrategyKind};
use crate::shutdown::Shutdown;
use crate::wasm::engine;
use crate::wasm::handler::{self, HandlerSource};

/// `host`: parses the flags, runs the command, and turns any error into one
/// `error: ...` line and a non-zero exit.
pub fn main() -> ExitCode {
    let mut command = settings::command();
    if about::asked(std::env::args_os()) {
        // Built once, for the one run that prints it.
        command = command.long_version(&*Box::leak(about::long_version().into_boxed_str()));
    }
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    if !matches!(cli.command, Command::Serve(_)) {
        logging::init(LogFormat::Text, &LogLevel::default());
    }
    let result = match cli.command {
        Command::Serve(args) => {
            let format = args.log_format;
            let options = args
                .shutdown_delay()
                .map(|shutdown_delay| supervisor::Options {
                    watch: args.watch,
                    upgrade_socket: args.upgrade_socket.clone(),
                    take_over: args.take_over,
                    shutdown_delay,
                });
            // The log starts once the settings are read, at the level they
            // give (`--log-level` over the file's): nothing logs before,
            // and an error in them is the one `error:` line below.
            options
                .and_then(|options| Ok((options, settings::from_flags(args)?)))
                .and_then(|(options, config)| {
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
        Command::New(args) => scaffold::new_handler(&args.path).map(|made| {
            print!("{}", made.next_steps());
        }),
        Command::Completions(args) => {
            use std::io::Write as _;
            std::io::stdout()
                .write_all(&settings::completions(args.shell))
                .context("cannot write the completions")
        }
        Command::Manpage(args) => settings::manpage(&args),
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
