//! Running one item's command: the `Runner` seam, the process runner and a
//! mock for tests.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

use crate::capture::{self, CapturedOutput};
use crate::duration::format_duration;
use crate::group::{collect_or_terminate, Termination};
use crate::source::Item;

/// How many of the last lines of a command's standard error are kept.
pub const STDERR_TAIL_LINES: usize = 10;

/// How many bytes at the end of a command's standard error are kept, so
/// that a command writing without line breaks cannot fill memory.
const STDERR_TAIL_BYTES: usize = 64 * 1024;

/// One command to run: its argument vector and what to write to its stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The program followed by its arguments, placeholders already filled.
    pub argv: Vec<String>,
    /// The bytes written to the command's standard input before it is closed.
    pub stdin: Vec<u8>,
}

/// The outcome of running one item's command.
#[derive(Debug, Default)]
pub struct ItemResult {
    /// The exit code, or `None` when no process ran or a signal ended it.
    pub exit_code: Option<i32>,
    /// The number of the signal that ended the process, if one did.
    pub signal: Option<i32>,
    /// The time from starting the command until it exited and closed its
    /// output.
    pub duration: Duration,
    /// The last lines of the command's standard error.
    pub stderr_tail: Vec<String>,
    /// Everything the command wrote to its standard output.
    pub stdout: CapturedOutput,
    /// The reason the item failed without an exit status, for example
    /// because the command could not start.
    pub error: Option<String>,
    /// The reason `backlog` terminated the command, if it did.
    pub terminated: Option<Termination>,
    /// Each recipient's last reply, when the item is an email. An email
    /// succeeded when every recipient got a 2xx reply.
    pub recipients: Vec<RecipientReply>,
    /// Whether the failure is temporary, as an SMTP 4xx reply is, so that a
    /// retry may succeed whatever `--retry-on-exit` says.
    pub temporary: bool,
    /// The fencing token of the shared lease (`--limiter`) the attempt ran
    /// under.
    pub fence: Option<u64>,
}

/// One recipient's last reply from the SMTP server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecipientReply {
    /// The recipient's address.
    pub address: String,
    /// The reply code, or `None` when no reply came (the connection was
    /// refused or dropped, or the attempt was not made yet).
    pub code: Option<u16>,
    /// The reply's text, or the reason no reply came.
    pub message: String,
}

/// Counts the commands running now and the maximum seen running at once.
#[derive(Debug, Default)]
pub struct Gauge {
    running: AtomicUsize,
    max: AtomicUsize,
}

/// Marks one running command until the guard is dropped.
#[derive(Debug)]
#[must_use = "the command counts as exited once the guard is dropped"]
pub struct GaugeGuard<'a> {
    gauge: &'a Gauge,
}

/// Makes the job of an item: what a `Runner` runs for it.
pub trait MakeJob {
    /// The job a runner takes.
    type Job;

    /// Makes the job of `item`, or the reason it cannot run.
    ///
    /// # Errors
    ///
    /// Fails for a malformed item, or one that lacks what the job needs.
    fn job_for(&self, item: &Item) -> Result<Self::Job, String>;
}

/// Runs the work of one item: a command, or an SMTP delivery.
pub trait Runner {
    /// One attempt's work, cloned for each attempt.
    type Job: Clone;

    /// Runs `job` to completion, or until `terminate` resolves, and reports
    /// any failure in the result.
    fn run(
        &self,
        job: Self::Job,
        terminate: impl Future<Output = Termination>,
    ) -> impl Future<Output = ItemResult>;

    /// Returns the counter of commands (or sessions) running at once.
    fn gauge(&self) -> &Gauge;

    /// Returns what runs, as the summary names it.
    fn what_runs(&self) -> &'static str {
        "command"
    }
}

/// Runs each item as a child process, with no shell in between, in a
/// process group of its own.
#[derive(Debug)]
pub struct ProcessRunner {
    gauge: Gauge,
    kill_after: Duration,
}

impl ItemResult {
    /// Creates the result of an item that failed before any command ran.
    pub fn failed(reason: String) -> Self {
        ItemResult {
            error: Some(reason),
            ..ItemResult::default()
        }
    }

    /// Returns whether the item succeeded: its command exited with status 0
    /// by itself.
    pub fn is_ok(&self) -> bool {
        if !self.recipients.is_empty() {
            return self.error.is_none()
                && self.terminated.is_none()
                && self.recipients.iter().all(RecipientReply::is_ok);
        }
        self.error.is_none() && self.terminated.is_none() && self.exit_code == Some(0)
    }

    /// Returns why the item failed, or `None` when it succeeded.
    pub fn failure_reason(&self) -> Option<String> {
        match self.terminated {
            Some(Termination::TimedOut(after)) => {
                return Some(format!("timed out after {}", format_duration(after)))
            }
            Some(Termination::Stopped) => return Some("killed because the run stopped".to_owned()),
            Some(Termination::LeaseLost) => {
                return Some("stopped because its shared lease was lost".to_owned())
            }
            None => {}
        }
        if let Some(error) = &self.error {
            return Some(error.clone());
        }
        if !self.recipients.is_empty() {
            let failed: Vec<String> = self
                .recipients
                .iter()
                .filter(|reply| !reply.is_ok())
                .map(RecipientReply::to_string)
                .collect();
            return (!failed.is_empty()).then(|| failed.join("; "));
        }
        match (self.exit_code, self.signal) {
            (Some(0), _) => None,
            (Some(code), _) => Some(format!("exit status {code}")),
            (None, Some(signal)) => Some(format!("killed by signal {signal}")),
            (None, None) => Some("exited without a status".to_owned()),
        }
    }
}

impl RecipientReply {
    /// Returns whether the server accepted the message for this recipient.
    pub fn is_ok(&self) -> bool {
        self.code.is_some_and(|code| (200..300).contains(&code))
    }

    /// Returns whether a later attempt may succeed: no reply, or a 4xx one.
    pub fn is_temporary(&self) -> bool {
        self.code.is_none_or(|code| (400..500).contains(&code))
    }
}

impl std::fmt::Display for RecipientReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "{}: {code} {}", self.address, self.message),
            None => write!(f, "{}: {}", self.address, self.message),
        }
    }
}

impl Gauge {
    /// Counts one more running command until the guard is dropped.
    pub fn enter(&self) -> GaugeGuard<'_> {
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(running, Ordering::SeqCst);
        GaugeGuard { gauge: self }
    }

    /// Returns how many commands are running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Returns the maximum number of commands that ran at once.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.gauge.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ProcessRunner {
    /// Creates a runner that sends SIGKILL to a command's process group
    /// `kill_after` its SIGTERM, when it has to be terminated.
    pub fn new(kill_after: Duration) -> Self {
        ProcessRunner {
            gauge: Gauge::default(),
            kill_after,
        }
    }
}

impl Runner for ProcessRunner {
    type Job = Job;

    async fn run(&self, job: Job, terminate: impl Future<Output = Termination>) -> ItemResult {
        let started = Instant::now();
        let mut child = match spawn(&job.argv) {
            Ok(child) => child,
            Err(error) => return ItemResult::failed(spawn_error(&job.argv[0], &error)),
        };
        let group = child.id();
        let running = self.gauge.enter();
        let collecting = collect(&mut child, job.stdin, running);
        let mut result = collect_or_terminate(collecting, group, terminate, self.kill_after).await;
        result.duration = started.elapsed();
        result
    }

    fn gauge(&self) -> &Gauge {
        &self.gauge
    }
}

fn spawn(argv: &[String]) -> io::Result<Child> {
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so that a timeout can end the command's
        // children too and Ctrl-C on the terminal reaches `backlog` alone.
        .process_group(0)
        // A dropped item (a fatal error elsewhere) must not leave its command
        // running unseen.
        .kill_on_drop(true)
        .spawn()
}

fn spawn_error(program: &str, error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => format!("command not found: {program}"),
        _ => format!("cannot run `{program}`: {error}"),
    }
}

/// Feeds the child its stdin and gathers its output and exit status, all at
/// once, because a child blocked on a full pipe would otherwise never exit.
async fn collect(child: &mut Child, input: Vec<u8>, running: GaugeGuard<'_>) -> ItemResult {
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let wait = async {
        let status = child.wait().await;
        drop(running);
        status
    };
    let (status, written, stdout, stderr_tail) = tokio::join!(
        wait,
        write_stdin(stdin, input),
        read_stdout(stdout),
        read_tail(stderr),
    );
    match assemble(status, written, stdout, stderr_tail) {
        Ok(result) => result,
        Err(error) => ItemResult::failed(format!("failed to talk to the command: {error}")),
    }
}

fn assemble(
    status: io::Result<ExitStatus>,
    written: io::Result<()>,
    stdout: io::Result<CapturedOutput>,
    stderr_tail: io::Result<Vec<String>>,
) -> io::Result<ItemResult> {
    let status = status?;
    written?;
    Ok(ItemResult {
        exit_code: status.code(),
        signal: status.signal(),
        stdout: stdout?,
        stderr_tail: stderr_tail?,
        ..ItemResult::default()
    })
}

/// Writes the item to the child's stdin, then closes it. A child that exits
/// without reading its stdin is fine, so a broken pipe is not an error.
async fn write_stdin(stdin: Option<ChildStdin>, input: Vec<u8>) -> io::Result<()> {
    let Some(mut stdin) = stdin else {
        return Ok(());
    };
    match stdin.write_all(&input).await {
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Reads the command's stdout to its end, in memory up to a bound and in a
/// temporary file beyond it.
async fn read_stdout(pipe: Option<impl AsyncRead + Unpin>) -> io::Result<CapturedOutput> {
    match pipe {
        Some(pipe) => CapturedOutput::read_from(pipe, capture::MEMORY_BYTES).await,
        None => Ok(CapturedOutput::default()),
    }
}

/// Reads a pipe to its end, keeping only the last lines.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>) -> io::Result<Vec<String>> {
    let Some(mut pipe) = pipe else {
        return Ok(Vec::new());
    };
    let mut tail = VecDeque::with_capacity(STDERR_TAIL_BYTES);
    let mut chunk = [0u8; 8 * 1024];
    loop {
        let read = pipe.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        tail.extend(&chunk[..read]);
        let excess = tail.len().saturating_sub(STDERR_TAIL_BYTES);
        tail.drain(..excess);
    }
    Ok(last_lines(tail.make_contiguous(), STDERR_TAIL_LINES))
}

/// Returns the last `count` lines of `bytes` as lossy UTF-8. When `bytes` was
/// cut at the byte limit, its first line may be only the end of a line.
fn last_lines(bytes: &[u8], count: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.len().saturating_sub(count);
    lines[first..].iter().map(|line| line.to_string()).collect()
}

/// A runner that returns a result from a function after a delay, for tests
/// that need no real processes.
#[cfg(test)]
#[derive(Debug)]
pub struct MockRunner<F> {
    reply: F,
    gauge: Gauge,
}

#[cfg(test)]
impl<F: Fn(&Job) -> (Duration, ItemResult)> MockRunner<F> {
    /// Creates a runner whose `reply` gives each job's delay and result.
    pub fn new(reply: F) -> Self {
        MockRunner {
            reply,
            gauge: Gauge::default(),
        }
    }
}

#[cfg(test)]
impl<F: Fn(&Job) -> (Duration, ItemResult)> Runner for MockRunner<F> {
    type Job = Job;

    /// Replies after the delay, or as a command killed by SIGTERM once
    /// `terminate` resolves.
    async fn run(&self, job: Job, terminate: impl Future<Output = Termination>) -> ItemResult {
        let (delay, mut result) = (self.reply)(&job);
        let _running = self.gauge.enter();
        let started = tokio::time::Instant::now();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            reason = terminate => {
                result = ItemResult {
                    signal: Some(15),
                    terminated: Some(reason),
                    ..ItemResult::default()
                };
            }
        }
        result.duration = started.elapsed();
        result
    }

    fn gauge(&self) -> &Gauge {
        &self.gauge
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keeps_the_end() {
        let bytes = b"1\n2\n3\n4\n";
        assert_eq!(last_lines(bytes, 2), ["3", "4"]);
        assert_eq!(last_lines(bytes, 10), ["1", "2", "3", "4"]);
        assert!(last_lines(b"", 10).is_empty());
    }

    #[test]
    fn failure_reason_names_the_cause() {
        let exit = |code| ItemResult {
            exit_code: Some(code),
            ..ItemResult::default()
        };
        assert_eq!(exit(0).failure_reason(), None);
        assert_eq!(exit(3).failure_reason().as_deref(), Some("exit status 3"));
        let killed = ItemResult {
            signal: Some(9),
            ..ItemResult::default()
        };
        assert_eq!(
            killed.failure_reason().as_deref(),
            Some("killed by signal 9")
        );
        let failed = ItemResult::failed("command not found: x".to_owned());
        assert_eq!(
            failed.failure_reason().as_deref(),
            Some("command not found: x")
        );
    }

    #[tokio::test]
    async fn run_process_collects_output_and_status() {
        let runner = ProcessRunner::new(Duration::from_secs(5));
        let argv = ["sh", "-c", "cat; echo err >&2; exit 3"];
        let job = Job {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: b"hello\n".to_vec(),
        };
        let result = runner.run(job, std::future::pending()).await;
        let mut stdout = Vec::new();
        result.stdout.write_blocking(&mut stdout).unwrap();
        assert_eq!(stdout, b"hello\n");
        assert_eq!(result.stderr_tail, ["err"]);
        assert_eq!(result.exit_code, Some(3));
        assert_eq!(runner.gauge().max(), 1);
        assert_eq!(runner.gauge().running(), 0);
    }

    #[tokio::test]
    async fn run_missing_program_fails() {
        let runner = ProcessRunner::new(Duration::from_secs(5));
        let job = Job {
            argv: vec!["/nonexistent/backlog-test".to_owned()],
            stdin: Vec::new(),
        };
        let result = runner.run(job, std::future::pending()).await;
        let reason = result.failure_reason();
        assert_eq!(
            reason.as_deref(),
            Some("command not found: /nonexistent/backlog-test")
        );
        assert_eq!(runner.gauge().max(), 0);
    }

    fn sh_job(script: &str) -> Job {
        Job {
            argv: ["sh", "-c", script].iter().map(|s| s.to_string()).collect(),
            stdin: Vec::new(),
        }
    }

    async fn timed_out_after(millis: u64) -> Termination {
        tokio::time::sleep(Duration::from_millis(millis)).await;
        Termination::TimedOut(Duration::from_millis(millis))
    }

    #[tokio::test]
    async fn run_terminates_group_on_timeout() {
        let runner = ProcessRunner::new(Duration::from_secs(5));
        // The background sleep holds stdout open, so the run only ends
        // once the whole group is gone.
        let job = sh_job("sleep 5 & sleep 5");
        let started = Instant::now();
        let result = runner.run(job, timed_out_after(100)).await;

        assert!(started.elapsed() < Duration::from_secs(2), "{result:?}");
        let timed_out = Termination::TimedOut(Duration::from_millis(100));
        assert_eq!(result.terminated, Some(timed_out));
        assert_eq!(result.signal, Some(15));
        assert!(!result.is_ok());
        assert_eq!(
            result.failure_reason().as_deref(),
            Some("timed out after 100ms")
        );
    }

    #[tokio::test]
    async fn run_kills_group_ignoring_sigterm() {
        let runner = ProcessRunner::new(Duration::from_millis(200));
        let job = sh_job("trap '' TERM; sleep 5");
        let started = Instant::now();
        // The stop comes once the shell has had time to set its trap.
        let stopped = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Termination::Stopped
        };
        let result = runner.run(job, stopped).await;

        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert_eq!(result.signal, Some(9));
        assert_eq!(result.terminated, Some(Termination::Stopped));
    }
}
