//! The validated configuration of a run, built from the raw arguments.

use std::env;
use std::io::IsTerminal;
use std::num::NonZeroUsize;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::RunArgs;
use crate::fleet::LimiterSettings;
use crate::halt::Halt;
use crate::journal::JournalConfig;
use crate::limits::KeyLimits;
use crate::retry::RetryPolicy;
use crate::source::Format;
use crate::template::Template;

/// Everything a run needs, checked before any item is read.
#[derive(Debug)]
pub struct Config {
    /// The file to read items from, where `-` means standard input.
    pub input: PathBuf,
    /// The format that turns lines into items.
    pub format: Format,
    /// The maximum number of commands running at once.
    pub max_run: NonZeroUsize,
    /// The file that receives one JSON line per finished item.
    pub results: Option<PathBuf>,
    /// The command line with its placeholders.
    pub template: Template,
    /// Whether to draw a progress bar, because stderr is a terminal.
    pub progress_bar: bool,
    /// Whether to write each item's output with the progress bar cleared,
    /// because the output would otherwise land on the bar's screen line.
    pub clear_bar_for_output: bool,
    /// The journal of item states, if `--journal` was given.
    pub journal: Option<JournalConfig>,
    /// Retries, time limits and `--halt` for each item.
    pub rules: ItemRules,
    /// The time between SIGTERM and SIGKILL for a terminated command.
    pub kill_after: Duration,
    /// The time limit of the whole run.
    pub deadline: Option<Duration>,
    /// The limiter shared with other processes (`--limiter`).
    pub limiter: Option<LimiterSettings>,
}

/// The rules every item runs under.
#[derive(Debug, Clone)]
pub struct ItemRules {
    /// When a failed attempt is retried.
    pub retry: RetryPolicy,
    /// The time limit of each attempt.
    pub timeout: Option<Duration>,
    /// When failed items stop the run.
    pub halt: Halt,
    /// `--per-key` and the rates, if any was given.
    pub limits: Option<KeyLimits>,
    /// Whether an item whose journal key an earlier item of the same run
    /// took fails (`backlog mail`, where it means two messages share a
    /// Message-ID) instead of being skipped (`backlog run`).
    pub duplicate_keys_fail: bool,
}

impl Config {
    /// Validates the arguments of `backlog run`.
    ///
    /// # Errors
    ///
    /// Fails when the command's program is not found, so that a typo fails
    /// once instead of once per item.
    pub fn from_args(args: RunArgs) -> anyhow::Result<Self> {
        let format = if args.jsonl {
            Format::JsonLines
        } else {
            Format::Lines
        };
        let template = Template::parse(&args.command, format == Format::JsonLines);
        if let Some(program) = template.fixed_program() {
            check_program(program)?;
        }
        if let Some((shell, script)) = template.placeholder_in_shell_script() {
            bail!(
                "the script of `{shell} -c` contains a placeholder: '{script}'. The shell would \
                 run any shell syntax an item contains. Pass the item as an argument instead, \
                 as in: {shell} -c 'echo \"$1\"' {shell} {{}}"
            );
        }
        let outputs = [
            ("--results", &args.results),
            ("--journal", &args.journal.journal),
        ];
        for (option, output) in outputs {
            if let Some(output) = output {
                check_not_same(&args.input, "the input file", option, output)?;
            }
        }
        if let (Some(results), Some(journal)) = (&args.results, &args.journal.journal) {
            check_not_same(journal, "the journal", "--results", results)?;
        }
        let limits = key_limits(&args.limits, args.jsonl)?;
        let progress_bar = std::io::stderr().is_terminal();
        let max_run = usize::try_from(args.max_run)
            .ok()
            .and_then(NonZeroUsize::new)
            .context("--max-run does not fit in this platform's address size")?;
        Ok(Config {
            input: args.input,
            format,
            max_run,
            results: args.results,
            template,
            progress_bar,
            clear_bar_for_output: clear_bar_for_output(
                progress_bar,
                std::io::stdout().is_terminal(),
            ),
            journal: JournalConfig::from_args(args.journal, args.jsonl)?,
            rules: ItemRules {
                retry: RetryPolicy {
                    retries: args.retry.retries,
                    delay: args.retry.retry_delay,
                    retry_on: args.retry.retry_on_exit,
                },
                timeout: args.stop.timeout,
                halt: args.stop.halt,
                limits,
                duplicate_keys_fail: false,
            },
            kill_after: args.stop.kill_after,
            deadline: args.stop.deadline,
            limiter: args.limiter.settings()?,
        })
    }
}

/// Returns the limits per key and on the rate, or `None` when none was
/// given, so that the run takes the plain path under `--max-run` alone.
///
/// # Errors
///
/// Fails when the `--per-key` template contains no placeholder, which would
/// put every item under one key.
fn key_limits(args: &crate::cli::LimitArgs, jsonl: bool) -> anyhow::Result<Option<KeyLimits>> {
    if args.per_key.is_none() && args.rate.is_none() {
        return Ok(None);
    }
    let key = match &args.per_key {
        Some(per_key) => {
            let source = &per_key.template;
            let option = format!("--per-key '{source}={}'", per_key.limit);
            let template = Template::parse_key(source, jsonl, &option, "domain")
                .map_err(anyhow::Error::msg)?;
            Some(template)
        }
        None => None,
    };
    Ok(Some(KeyLimits {
        key,
        per_key: args.per_key.as_ref().map(|per_key| per_key.limit),
        rate: args.rate.map(|rate| rate.to_rate(args.burst)),
        per_key_rate: args.per_key_rate.map(|rate| rate.to_rate(args.burst)),
    }))
}

/// Returns whether items' output must be written with the progress bar
/// cleared: when the bar is drawn on stderr and stdout is a terminal too.
/// NOTE: both are assumed to be the same terminal. For another terminal,
/// clearing the bar is only needless.
fn clear_bar_for_output(progress_bar: bool, stdout_is_terminal: bool) -> bool {
    progress_bar && stdout_is_terminal
}

/// Checks that `program` names an executable file, either as a path or
/// through `PATH`, as the operating system will look it up.
fn check_program(program: &str) -> anyhow::Result<()> {
    if program.contains('/') {
        let path = Path::new(program);
        if !path.is_file() {
            bail!("command '{program}' not found: no such file");
        }
        if !is_executable(path) {
            bail!("command '{program}' is not executable. Run `chmod +x {program}` or name another program");
        }
        return Ok(());
    }
    let search_path = env::var_os("PATH").unwrap_or_default();
    let found = env::split_paths(&search_path).any(|dir| is_executable(&dir.join(program)));
    if !found {
        bail!("command '{program}' not found in PATH. Install it or give its full path");
    }
    Ok(())
}

/// Checks that an output file is not `other`: the input file, which the
/// run would read its own output from without end, or the journal, whose
/// checkpoints would cut the appended records away.
fn check_not_same(other: &Path, what: &str, option: &str, output: &Path) -> anyhow::Result<()> {
    let (Ok(other_meta), Ok(output_meta)) = (other.metadata(), output.metadata()) else {
        return Ok(());
    };
    if other_meta.dev() == output_meta.dev() && other_meta.ino() == output_meta.ino() {
        bail!(
            "{option} '{}' is {what}. Write it to another file",
            output.display()
        );
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_cleared_only_on_shared_terminal() {
        assert!(clear_bar_for_output(true, true));
        // Output to a pipe or file cannot disturb the bar's line.
        assert!(!clear_bar_for_output(true, false));
        // Without a bar there is nothing to clear.
        assert!(!clear_bar_for_output(false, true));
        assert!(!clear_bar_for_output(false, false));
    }
}
