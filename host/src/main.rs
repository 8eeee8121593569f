//! `host`: the command-line entry point. Parses the flags, runs the command,
//! and turns any error into one `error: ...` line and a non-zero exit.

use std::process::ExitCode;

use clap::Parser;
use host::cli::{Cli, Command, ConfigCommand, LogFormat};
use host::shutdown::Shutdown;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => LogFormat::Text,
    };
    host::logging::init(format);
    let result = match cli.command {
        Command::Serve(args) => {
            let options = host::supervisor::Options {
                watch: args.watch,
                metrics_addr_flag: args.metrics_addr.is_some(),
            };
            args.into_host_config().and_then(|config| {
                let shutdown = Shutdown::new()?;
                // SIGINT/SIGTERM drain; a second one ends at once.
                shutdown.stop_on_signals()?;
                host::serve(config, &shutdown, &options)
            })
        }
        Command::Compile(args) => host::compile(&args.handler, &args.output, args.strategy),
        Command::Check(args) => match host::check::check(&args.handler, args.run, args.strategy) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Config(ConfigCommand::Check {
            file,
            cache_dir,
            no_cache,
        }) => host::config_check(&file, host::cli::cache_dir(cache_dir, no_cache)).map(|text| {
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
