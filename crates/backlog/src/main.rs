//! `backlog`: works through a backlog of items, running a command for each
//! with at most N at once, and reports every item's outcome.

mod capture;
mod cli;
mod config;
mod duration;
mod engine;
mod exec;
mod file_limit;
mod fleet;
mod group;
mod halt;
mod journal;
mod limits;
mod limits_command;
mod mail;
mod outcome;
mod progress;
mod results;
mod retry;
mod signals;
mod source;
mod status;
mod stop;
mod template;

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::error::ErrorKind;
use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::stop::StopCause;

/// The exit statuses of `backlog`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Status {
    /// Every item succeeded.
    Success = 0,
    /// At least one item failed, and the others still ran.
    ItemsFailed = 1,
    /// The arguments were invalid or the run could not go on. Clap uses the
    /// same status for usage errors.
    Fatal = 2,
    /// The reader of stdout went away, so the run stopped early. A shell
    /// reports the same status, 128 + 13, for a process killed by SIGPIPE.
    StdoutClosed = 141,
    /// `--deadline` passed, as GNU `timeout` reports a time limit.
    DeadlinePassed = 124,
    /// SIGINT (Ctrl-C) stopped the run: 128 plus the signal number 2.
    Interrupted = 130,
    /// SIGTERM stopped the run: 128 plus the signal number 15.
    Terminated = 143,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) if is_broken_pipe(&error) => {
            // stderr may be the same closed pipe, so this line is best effort.
            let _ = writeln!(
                io::stderr(),
                "backlog: stopped because standard output was closed; \
                 running commands were killed and the remaining items did not run"
            );
            ExitCode::from(Status::StdoutClosed as u8)
        }
        Err(error) => {
            let _ = writeln!(io::stderr(), "error: {error:#}");
            ExitCode::from(Status::Fatal as u8)
        }
    }
}

/// The validated settings of the subcommand that works through a backlog.
#[derive(Debug)]
enum Work {
    Run(Config),
    Mail(mail::MailConfig),
}

/// Parses the arguments and runs the subcommand.
fn run() -> anyhow::Result<ExitCode> {
    let (max_run, config) = match parse_args().command {
        Command::Run(args) => {
            let config = Config::from_args(*args)?;
            (config.max_run, Work::Run(config))
        }
        Command::Mail(args) => {
            let config = mail::MailConfig::from_args(*args)?;
            (config.max_run, Work::Mail(config))
        }
        Command::Status(args) => return status::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Limits(args) => return limits_command::run(&args).map(|()| ExitCode::SUCCESS),
    };
    file_limit::ensure_room_for(max_run)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let summary = match &config {
        Work::Run(config) => runtime.block_on(engine::run(config)),
        Work::Mail(config) => runtime.block_on(mail::run(config)),
    };
    // Tokio reads standard input on a blocking thread that may still be
    // waiting for a line, and waiting for that thread would hang the exit.
    runtime.shutdown_background();
    let summary = summary?;
    let status = match summary.stopped {
        Some(StopCause::Interrupt) => Status::Interrupted,
        Some(StopCause::Terminate) => Status::Terminated,
        Some(StopCause::Deadline(_)) => Status::DeadlinePassed,
        Some(StopCause::Halt(_)) => Status::ItemsFailed,
        Some(StopCause::Limiter { message, .. }) => {
            let _ = writeln!(io::stderr(), "error: {message}");
            Status::Fatal
        }
        None if summary.all_succeeded() => Status::Success,
        None => Status::ItemsFailed,
    };
    Ok(ExitCode::from(status as u8))
}

/// Parses the arguments, or prints clap's error or help and exits. An
/// unexpected argument on a command line without `--` is most often the
/// command itself, so its error gets a hint.
fn parse_args() -> Cli {
    let error = match Cli::try_parse() {
        Ok(cli) => return cli,
        Err(error) => error,
    };
    let has_separator = std::env::args_os().skip(1).any(|arg| arg == "--");
    if error.kind() != ErrorKind::UnknownArgument || has_separator {
        error.exit();
    }
    let rendered = if io::stderr().is_terminal() {
        error.render().ansi().to_string()
    } else {
        error.render().to_string()
    };
    let _ = write!(io::stderr(), "{}", with_separator_hint(&rendered));
    std::process::exit(error.exit_code());
}

/// Inserts the hint to put `--` before the command into clap's rendered
/// error, above its usage line, or at the end if there is none.
fn with_separator_hint(rendered: &str) -> String {
    const HINT: &str =
        "  hint: put `--` before the command, as in: backlog run INPUT -- COMMAND ARGS\n\n";
    let usage_line = rendered.find("Usage:").map(|usage| {
        rendered[..usage]
            .rfind('\n')
            .map_or(0, |newline| newline + 1)
    });
    match usage_line {
        Some(start) => format!("{}{HINT}{}", &rendered[..start], &rendered[start..]),
        None => format!("{rendered}\n{HINT}"),
    }
}

/// Returns whether the error comes from writing to a closed pipe, which
/// means that the reader of our output has gone, as with `backlog ... | head`.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}
