//! `kubectl scim`: the day-two tool for scim-token-operator, as cert-manager users have `cmctl`.
//!
//! Installed as `kubectl-scim` on `PATH`, kubectl runs it for `kubectl scim ...` (plugin discovery;
//! krew's convention), handing it every argument after `scim`, so it reads kubectl's usual flags
//! itself. It uses the operator's own library for the API types, the Secret's issue record and the
//! token format, so it reads exactly what the operator writes.
//!
//! Exit codes: 0 success; 1 an error (one line on stderr); `check`: 0 the token works now, 1 it does
//! not, 2 the check could not be made; 2 also for a command line clap rejects.
// A function longer than a screen is split into named steps (clippy.toml); tests may run longer.
#![warn(clippy::too_many_lines)]
#![cfg_attr(test, allow(clippy::too_many_lines))]

mod cluster;
mod human;
mod inspect;
mod output;
mod redact;
mod rotate;
mod status;
mod token;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::cluster::{Cluster, ConnectionArgs};
use crate::output::OutputFormat;

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-scim",
    bin_name = "kubectl scim",
    version,
    about = "Day-two operations for scim-token-operator's ScimDirectories: status, rotate, hand out and check tokens",
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show directories: readiness, token hash, issue and expiry, overlap, last Event, and what to do
    /// about one that is not Ready.
    Status {
        /// A directory (default: every directory in the namespace).
        name: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long, conflicts_with = "name")]
        all_namespaces: bool,
        #[arg(short = 'o', long, value_enum)]
        output: Option<OutputFormat>,
    },
    /// Request a rotation (sets the scim.tokenops.dev/rotate annotation to a new value, GitOps-safe).
    Rotate {
        name: String,
        /// Wait until the operator has issued the new token; prints its hash (never the token).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, e.g. 60s, 5m.
        #[arg(long, default_value = "60s", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// End a rotation overlap now: the previous token is refused from then on (sets the
    /// scim.tokenops.dev/end-overlap annotation).
    EndOverlap {
        name: String,
        /// Wait until the operator has ended it.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "60s", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// Print the directory's token for pasting into the identity provider: only to a terminal,
    /// unless --force-stdout. Which directory, hash and expiry it is goes to stderr.
    Token {
        name: String,
        /// Write the token to stdout even when it is a pipe or a file.
        #[arg(long, visible_alias = "insecure-pipe")]
        force_stdout: bool,
    },
    /// Read a token on stdin and say whether it is the directory's current one, the previous one in
    /// its overlap, rotated out, expired or malformed. Exit code 0 only for a token that works now.
    Check { name: String },
    /// Show what the operator recorded.
    Inspect {
        #[command(subcommand)]
        what: Inspect,
    },
    /// Print a shell completion script (bash, zsh or fish) for kubectl-scim.
    Completion { shell: CompletionShell },
}

#[derive(Subcommand, Debug)]
enum Inspect {
    /// The issue record on a token Secret (issue reason, generation, request, issue and expiry,
    /// previous token), never the token. NAME is the Secret, or a directory whose Secret is meant.
    Secret {
        name: String,
        #[arg(short = 'o', long, value_enum)]
        output: Option<OutputFormat>,
    },
}

impl Command {
    /// The object name the command was given, if it takes one.
    fn name(&self) -> Option<&str> {
        match self {
            Command::Status { name, .. } => name.as_deref(),
            Command::Rotate { name, .. }
            | Command::EndOverlap { name, .. }
            | Command::Token { name, .. }
            | Command::Check { name }
            | Command::Inspect { what: Inspect::Secret { name, .. } } => Some(name),
            Command::Completion { .. } => None,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let lifetime = scim_token_operator::duration::parse_duration(s).map_err(|e| e.to_string())?;
    Ok(lifetime.as_std())
}

fn main() -> ExitCode {
    // No backtrace, no "thread main panicked at": one line, whatever happens.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("error: internal error: {}", message.lines().next().unwrap_or_default());
    }));
    // `token` and `check` hold a plaintext for a moment: no core dump may carry it to disk.
    scim_token_operator::process::disable_core_dumps();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // clap quotes the argument it rejects: a token pasted there is not repeated.
        Err(e) if redact::contains_token(&e.to_string()) => {
            eprint!("{}", redact::redact(&e.to_string()));
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
        Err(e) => e.exit(),
    };
    let check = matches!(cli.command, Command::Check { .. });
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            // API server messages and explanations quote what tenants wrote: made safe for a terminal; and
            // a token given where a name belongs is not repeated.
            let message = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
            let _ = std::io::stdout().flush();
            eprintln!("error: {}", human::sanitize(&redact::redact(&message)));
            ExitCode::from(if check { 2 } else { 1 })
        }
    }
}

/// Runs a command; `Ok(false)` only for `check` with a token that does not work.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    if let Command::Completion { shell } = cli.command {
        completion(shell, &mut std::io::stdout());
        return Ok(true);
    }
    redact::refuse_token_arguments(&cli)?;
    let cluster = Cluster::connect(&cli.connection).await?;
    match cli.command {
        Command::Status { name, all_namespaces, output } => {
            status::run(&cluster, name.as_deref(), all_namespaces, output).await?
        }
        Command::Rotate { name, wait, timeout } => rotate::rotate(&cluster, &name, wait, timeout).await?,
        Command::EndOverlap { name, wait, timeout } => rotate::end_overlap(&cluster, &name, wait, timeout).await?,
        Command::Token { name, force_stdout } => token::token(&cluster, &name, force_stdout).await?,
        Command::Check { name } => return token::check(&cluster, &name).await,
        Command::Inspect { what: Inspect::Secret { name, output } } => inspect::secret(&cluster, &name, output).await?,
        Command::Completion { .. } => unreachable!("handled above"),
    }
    Ok(true)
}

/// The completion script for the executable's name: shells complete `kubectl-scim`; for
/// `kubectl scim <TAB>` see docs/kubectl-scim.md.
fn completion(shell: CompletionShell, out: &mut dyn Write) {
    use clap_complete::aot::{Bash, Fish, Zsh, generate};
    let mut command = Cli::command();
    match shell {
        CompletionShell::Bash => generate(Bash, &mut command, "kubectl-scim", out),
        CompletionShell::Zsh => generate(Zsh, &mut command, "kubectl-scim", out),
        CompletionShell::Fish => generate(Fish, &mut command, "kubectl-scim", out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kubectl_flags_are_accepted_anywhere() {
        let cli = Cli::try_parse_from([
            "kubectl-scim",
            "rotate",
            "acme",
            "--kubeconfig",
            "/k",
            "-n",
            "tenants",
            "--context",
            "c",
            "--wait",
            "--timeout",
            "2m",
        ])
        .unwrap();
        assert_eq!(cli.connection.namespace.as_deref(), Some("tenants"));
        assert_eq!(cli.connection.context.as_deref(), Some("c"));
        assert!(
            matches!(cli.command, Command::Rotate { wait: true, timeout, .. } if timeout == Duration::from_secs(120))
        );
        assert!(Cli::try_parse_from(["kubectl-scim", "status", "acme", "-A"]).is_err(), "-A with a name");
        assert!(Cli::try_parse_from(["kubectl-scim", "status", "-o", "table"]).is_err());
        assert!(Cli::try_parse_from(["kubectl-scim", "rotate", "acme", "--timeout", "1.5s"]).is_err());
    }

    #[test]
    fn completions_are_generated_for_the_executable_name() {
        for shell in [CompletionShell::Bash, CompletionShell::Zsh, CompletionShell::Fish] {
            let mut buf = Vec::new();
            completion(shell, &mut buf);
            let script = String::from_utf8(buf).unwrap();
            assert!(script.contains("kubectl-scim") && script.contains("end-overlap"), "{shell:?}");
        }
    }
}
