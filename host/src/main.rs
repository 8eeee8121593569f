//! `host`: the command-line entry point; the whole command is
//! [`host::main`].

use std::process::ExitCode;

fn main() -> ExitCode {
    host::main()
}
