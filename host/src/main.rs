//! `host`: the command-line entry point. Parses the flags, runs the command,
//! and turns any error into one `error: ...` line and a non-zero exit.

use std::process::ExitCode;

use clap::Parser;
use host::cli::{Cli, Command};
use host::server::Shutdown;

fn main() -> ExitCode {
    let cli = Cli::parse();
    host::logging::init();
    let result = match cli.command {
        Command::Serve(args) => args.into_config().and_then(|config| {
            let shutdown = Shutdown::new()?;
            // SIGINT/SIGTERM drain; a second one ends at once.
            shutdown.stop_on_signals()?;
            host::serve(&config, &shutdown)
        }),
        Command::Compile(args) => host::compile(&args.handler, &args.output, args.strategy),
        Command::Check(args) => match host::check::check(&args.handler, args.run, args.strategy) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
