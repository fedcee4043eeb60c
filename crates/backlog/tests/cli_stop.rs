//! End-to-end tests of retries, timeouts, `--deadline`, `--halt` and
//! Ctrl-C, with real processes (`sh`, `sleep`, `touch`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use assert_cmd::cargo::cargo_bin_cmd;
use assert_cmd::Command;
use predicates::prelude::*;
use rustix::process::{kill_process_group, Pid, Signal};
use serde_json::{json, Value};
use tempfile::TempDir;

fn backlog() -> Command {
    cargo_bin_cmd!("backlog")
}

fn write_input(dir: &TempDir, contents: &str) -> String {
    let path = dir.path().join("in.txt");
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Returns the result records sorted by item index.
fn results_by_index(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut records: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("each results line is JSON"))
        .collect();
    records.sort_by_key(|record| record["index"].as_u64().unwrap());
    records
}

fn outcomes(records: &[Value]) -> Vec<&str> {
    records
        .iter()
        .map(|record| record["outcome"].as_str().unwrap())
        .collect()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `backlog run` with `args`, then `--`, then `command`, and returns
/// its output and the time it took. A run still going after ten seconds is
/// killed, and its exit status is then `None`.
fn run_backlog(args: &[&str], command: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = backlog()
        .arg("run")
        .args(args)
        .arg("--")
        .args(command)
        .timeout(Duration::from_secs(10))
        .output()
        .unwrap();
    (output, started.elapsed())
}

/// Waits up to five seconds for `path` to exist.
fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        sleep(Duration::from_millis(10));
    }
}

/// Starts `backlog run` as the leader of a process group of its own, as a
/// shell starts a foreground job, so that a signal to the group plays the
/// part of Ctrl-C on a terminal.
fn spawn_in_own_group(args: &[&str], command: &[&str]) -> Child {
    StdCommand::new(assert_cmd::cargo::cargo_bin!("backlog"))
        .arg("run")
        .args(args)
        .arg("--")
        .args(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// Sends SIGINT to the process group that `child` leads, as Ctrl-C does.
fn press_ctrl_c(child: &Child) {
    let group = Pid::from_raw(child.id() as i32).unwrap();
    kill_process_group(group, Signal::INT).unwrap();
}

/// Waits for `child` to exit. After five seconds the test has failed, and
/// the child's process group is killed so that nothing is left running.
fn wait_bounded(child: Child) -> (Output, Duration) {
    let started = Instant::now();
    let id = child.id();
    let (exited, exit_seen) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if exit_seen.recv_timeout(Duration::from_secs(5)).is_err() {
            if let Some(pid) = Pid::from_raw(id as i32) {
                let _ = kill_process_group(pid, Signal::KILL);
            }
        }
    });
    let output = child.wait_with_output().unwrap();
    // The send fails only once the watchdog has given up and returned.
    let _ = exited.send(());
    watchdog.join().unwrap();
    (output, started.elapsed())
}

/// A script that exits 75 the first time it runs for an item and succeeds
/// after that, keeping a marker file per item in `$2`, and logging each
/// start to `$2/log`.
const TEMP_FAIL_ONCE: &str = r#"echo "start $1" >> "$2/log"
if [ -e "$2/seen-$1" ]; then echo "done $1"; else touch "$2/seen-$1"; exit 75; fi"#;

#[test]
fn retry_then_success() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "a\n");
    let results = dir.path().join("results.jsonl");
    let state = dir.path().to_str().unwrap();
    let args = [
        "--retries",
        "2",
        "--retry-delay",
        "50ms",
        "--results",
        results.to_str().unwrap(),
        &input,
    ];
    let (output, elapsed) = run_backlog(&args, &["sh", "-c", TEMP_FAIL_ONCE, "sh", "{}", state]);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(output.stdout, b"done a\n");
    assert!(
        stderr.contains("retry  #0 line 1: exit status 75; attempt 2 of 3 in "),
        "{stderr}"
    );
    assert!(stderr.contains("done 1, failed 0, retried 1,"), "{stderr}");
    let records = results_by_index(&results);
    assert_eq!(records[0]["attempts"], json!(2));
    assert_eq!(records[0]["outcome"], json!("done"));
    assert_eq!(records[0]["ok"], json!(true));
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[test]
fn temp_failure_without_retries_is_final() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "a\n");
    let state = dir.path().to_str().unwrap();
    let (output, _) = run_backlog(&[&input], &["sh", "-c", TEMP_FAIL_ONCE, "sh", "{}", state]);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("FAILED #0 line 1: exit status 75"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(log, "start a\n");
}

#[test]
fn non_retryable_failure_is_final() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "a\n");
    let results = dir.path().join("results.jsonl");
    let log = dir.path().join("log");
    let script = r#"echo "start $1" >> "$2"; exit 3"#;
    let args = [
        "--retries",
        "3",
        "--retry-delay",
        "10ms",
        "--results",
        results.to_str().unwrap(),
        &input,
    ];
    let (output, _) = run_backlog(
        &args,
        &["sh", "-c", script, "sh", "{}", log.to_str().unwrap()],
    );
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("retry  #"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start a\n");
    let records = results_by_index(&results);
    assert_eq!(records[0]["attempts"], json!(1));
    assert_eq!(records[0]["outcome"], json!("failed"));
    assert_eq!(records[0]["error"], json!("exit status 3"));
}

#[test]
fn retries_run_out_after_limit() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "a\n");
    let results = dir.path().join("results.jsonl");
    let args = [
        "--retries",
        "2",
        "--retry-delay",
        "10ms",
        "--retry-on-exit",
        "9,75",
        "--results",
        results.to_str().unwrap(),
        &input,
    ];
    let (output, _) = run_backlog(&args, &["sh", "-c", "exit 9"]);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("attempt 3 of 3 in "), "{stderr}");
    assert!(
        stderr.contains("  line 1: exit status 9 (after 3 attempts)"),
        "{stderr}"
    );
    let records = results_by_index(&results);
    assert_eq!(records[0]["attempts"], json!(3));
    assert_eq!(records[0]["outcome"], json!("failed"));
}

#[test]
fn backoff_holds_no_permit() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "temp\nother\n");
    let state = dir.path().to_str().unwrap();
    // "temp" fails once and waits 0.5 s to 1 s to retry. With one slot,
    // "other" can only start in between if the wait gives the slot back.
    let script = format!(
        r#"if [ "$1" = other ]; then echo "start other" >> "$2/log"; exit 0; fi
{TEMP_FAIL_ONCE}"#
    );
    let args = [
        "--max-run",
        "1",
        "--retries",
        "1",
        "--retry-delay",
        "1s",
        &input,
    ];
    let (output, elapsed) = run_backlog(&args, &["sh", "-c", &script, "sh", "{}", state]);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(log, "start temp\nstart other\nstart temp\n", "{stderr}");
    assert!(stderr.contains("at most 1 command ran at once"), "{stderr}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
}

#[test]
fn timeout_kills_process_group() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "a\n");
    let late = dir.path().join("late");
    let results = dir.path().join("results.jsonl");
    // The child would write the file after a second, long after the
    // timeout, unless the signal reaches it through the group.
    let script = r#"(sleep 1; touch "$1") & sleep 5"#;
    let args = [
        "--timeout",
        "300ms",
        "--results",
        results.to_str().unwrap(),
        &input,
    ];
    let (output, elapsed) = run_backlog(&args, &["sh", "-c", script, "sh", late.to_str().unwrap()]);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("FAILED #0 line 1: timed out after 300ms"),
        "{stderr}"
    );
    assert!(
        stderr.contains("done 0, failed 1 (1 timed out),"),
        "{stderr}"
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let records = results_by_index(&results);
    assert_eq!(records[0]["outcome"], json!("timed_out"));
    assert_eq!(records[0]["signal"], json!(15));

    sleep(Duration::from_millis(1500));
    assert!(!late.exists(), "a child of the timed-out command survived");
}

#[test]
fn deadline_stops_run() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "0.1\n5\n5\n5\n5\n");
    let results = dir.path().join("results.jsonl");
    let args = [
        "--max-run",
        "2",
        "--deadline",
        "600ms",
        "--results",
        results.to_str().unwrap(),
        &input,
    ];
    let (output, elapsed) = run_backlog(&args, &["sleep", "{}"]);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(124), "{stderr}");
    assert!(
        stderr.contains("deadline of 600ms passed: killing 2 running items"),
        "{stderr}"
    );
    assert!(
        stderr.ends_with("stopped early: the deadline of 600ms passed; 2 items not started\n"),
        "{stderr}"
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let records = results_by_index(&results);
    let expected = [
        "done",
        "interrupted",
        "interrupted",
        "not_started",
        "not_started",
    ];
    assert_eq!(outcomes(&records), expected);
    assert_eq!(
        records[1]["error"],
        json!("killed: the deadline of 600ms passed")
    );
    assert_eq!(records[3]["attempts"], json!(0));
}

/// Items for the `--halt` tests: item 0 fails after 0.1 s, item 1 runs for
/// `slow` seconds, the three after them succeed at once.
fn halt_run(halt: &str, slow: &str) -> (Output, Duration, Vec<Value>) {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, &format!("fail\n{slow}\nok\nok\nok\n"));
    let results = dir.path().join("results.jsonl");
    let script = r#"case "$1" in fail) sleep 0.1; exit 1;; ok) exit 0;; *) sleep "$1";; esac"#;
    let args = [
        "--max-run",
        "2",
        "--halt",
        halt,
        "--results",
        results.to_str().unwrap(),
        &input,
    ];
    let (output, elapsed) = run_backlog(&args, &["sh", "-c", script, "sh", "{}"]);
    let records = results_by_index(&results);
    (output, elapsed, records)
}

#[test]
fn halt_soon_lets_running_finish() {
    let (output, elapsed, records) = halt_run("soon,fail=1", "0.5");
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--halt soon,fail=1 reached: waiting for 1 running item"),
        "{stderr}"
    );
    let expected = [
        "failed",
        "done",
        "not_started",
        "not_started",
        "not_started",
    ];
    assert_eq!(outcomes(&records), expected, "{stderr}");
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
}

#[test]
fn halt_now_kills_running() {
    let (output, elapsed, records) = halt_run("now,fail=1", "5");
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--halt now,fail=1 reached: killing 1 running item"),
        "{stderr}"
    );
    let expected = [
        "failed",
        "interrupted",
        "not_started",
        "not_started",
        "not_started",
    ];
    assert_eq!(outcomes(&records), expected, "{stderr}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[test]
fn halt_percent_waits_for_three() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "1\n1\n0\n0\n0\n0\n");
    let results = dir.path().join("results.jsonl");
    let args = [
        "--max-run",
        "1",
        "--halt",
        "soon,fail=50%",
        "--results",
        results.to_str().unwrap(),
        &input,
    ];
    let (output, _) = run_backlog(&args, &["sh", "-c", "exit $1", "sh", "{}"]);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(1), "{stderr}");
    // Two failures out of two finished items is not enough: the share
    // counts from three finished items on.
    let records = results_by_index(&results);
    let expected = [
        "failed",
        "failed",
        "done",
        "not_started",
        "not_started",
        "not_started",
    ];
    assert_eq!(outcomes(&records), expected, "{stderr}");
}

#[test]
fn halt_bad_value_is_rejected() {
    backlog()
        .args(["run", "--halt", "sometimes", "in.txt", "--", "true"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "invalid value 'sometimes' for '--halt <WHEN>': expected never, soon,fail=N, soon,fail=P%, now,fail=N or now,fail=P%",
        ));
}

#[test]
fn bad_durations_are_rejected() {
    backlog()
        .args(["run", "--timeout", "5", "in.txt", "--", "true"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "invalid value '5' for '--timeout <DUR>': expected a number followed by ms, s, m or h",
        ));
    backlog()
        .args(["run", "--retry-delay", "1h", "in.txt", "--", "true"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("must be at most 300s"));
}

/// Starts a run of two items, one at a time, where each item touches
/// `started-ITEM` in the temporary folder and then sleeps `seconds`.
fn start_interruptible(dir: &TempDir, seconds: &str) -> (Child, PathBuf) {
    let input = write_input(dir, "a\nb\n");
    let results = dir.path().join("results.jsonl");
    let script = r#"touch "$2/started-$1"; sleep "$3"; echo "finished $1""#;
    let state = dir.path().to_str().unwrap();
    let args = [
        "--max-run",
        "1",
        "--results",
        results.to_str().unwrap(),
        &input,
    ];
    let child = spawn_in_own_group(&args, &["sh", "-c", script, "sh", "{}", state, seconds]);
    wait_for_file(&dir.path().join("started-a"));
    (child, results)
}

#[test]
fn ctrl_c_once_waits_for_running() {
    let dir = TempDir::new().unwrap();
    let (child, results) = start_interruptible(&dir, "0.5");
    press_ctrl_c(&child);
    let (output, elapsed) = wait_bounded(child);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted: waiting for 1 running item; press Ctrl-C again to kill them"),
        "{stderr}"
    );
    // The running command did not see the Ctrl-C and finished its work.
    assert_eq!(output.stdout, b"finished a\n");
    assert!(!dir.path().join("started-b").exists(), "{stderr}");
    assert_eq!(
        outcomes(&results_by_index(&results)),
        ["done", "not_started"]
    );
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[test]
fn ctrl_c_twice_kills_running() {
    let dir = TempDir::new().unwrap();
    let (child, results) = start_interruptible(&dir, "5");
    press_ctrl_c(&child);
    sleep(Duration::from_millis(200));
    press_ctrl_c(&child);
    let (output, elapsed) = wait_bounded(child);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted again: killing 1 running item"),
        "{stderr}"
    );
    assert_eq!(output.stdout, b"");
    let records = results_by_index(&results);
    assert_eq!(outcomes(&records), ["interrupted", "not_started"]);
    assert_eq!(records[0]["error"], json!("killed: interrupted"));
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}
