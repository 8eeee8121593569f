//! What the command line says about itself: the flags of `host new`,
//! `host completions` and `host manpage`, and the completion scripts and man
//! pages generated from clap's definitions of every command (so they never
//! drift from `--help`).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::{Args, CommandFactory as _};

use super::flags::Cli;

#[derive(Args, Debug)]
pub struct NewArgs {
    /// Where to make the crate; its last component is the package name
    /// (e.g. handlers/my-handler). It must not exist yet.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell: bash, elvish, fish, powershell or zsh.
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManpageArgs {
    /// The command whose page to print, e.g. `serve` or `config check`
    /// [default: host itself]
    #[arg(value_name = "COMMAND")]
    pub command: Vec<String>,

    /// Write every page (host.1, host-serve.1, ...) into this directory
    /// instead of printing one.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    pub out_dir: Option<PathBuf>,
}

/// clap's definition of every command and flag, as `--help` prints them.
pub(crate) fn command() -> clap::Command {
    Cli::command()
}

/// The completion script of `shell` for `host`.
pub(crate) fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command(), "host", &mut script);
    script
}

/// `host manpage`: one page on stdout, or every page into `--out-dir`.
pub(crate) fn manpage(args: &ManpageArgs) -> Result<()> {
    if let Some(dir) = &args.out_dir {
        let cmd = command().disable_help_subcommand(true);
        return clap_mangen::generate_to(cmd, dir)
            .with_context(|| format!("cannot write the man pages into {}", dir.display()));
    }
    let page = man_page(&args.command)?;
    std::io::stdout()
        .write_all(&page)
        .context("cannot write the man page")
}

/// The man page (roff) of `host` or of one of its commands (`["serve"]`,
/// `["config", "check"]`).
pub(crate) fn man_page(path: &[String]) -> Result<Vec<u8>> {
    let mut cmd = command().disable_help_subcommand(true);
    // Names subcommands `host-serve` and so on, as their pages are titled.
    cmd.build();
    for name in path {
        let Some(sub) = cmd.find_subcommand(name).cloned() else {
            let known: Vec<_> = cmd.get_subcommands().map(|s| s.get_name()).collect();
            bail!(
                "no command {name:?} in {}: expected {}",
                cmd.get_display_name().unwrap_or("host"),
                super::values::one_of(&known)
            );
        };
        cmd = sub;
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut page)?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_a_page_that_names_its_flags() {
        let serve = String::from_utf8(man_page(&["serve".to_string()]).unwrap()).unwrap();
        assert!(
            serve.starts_with(".ie") || serve.contains(".TH host-serve 1"),
            "{serve}"
        );
        assert!(serve.contains("max\\-memory"), "{serve}");
        let check = man_page(&["config".to_string(), "check".to_string()]).unwrap();
        assert!(String::from_utf8(check)
            .unwrap()
            .contains(".TH host-config-check 1"));
        let err = man_page(&["nothing".to_string()]).unwrap_err().to_string();
        assert!(
            err.starts_with("no command \"nothing\" in host: expected "),
            "{err}"
        );
    }

    #[test]
    fn completions_name_every_command() {
        let bash = String::from_utf8(completions(clap_complete::Shell::Bash)).unwrap();
        for word in [
            "serve",
            "compile",
            "check",
            "config",
            "new",
            "completions",
            "manpage",
        ] {
            assert!(bash.contains(word), "{word} is missing");
        }
        assert!(bash.contains("--max-memory"));
    }
}
