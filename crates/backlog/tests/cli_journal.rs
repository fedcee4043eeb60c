//! End-to-end tests of `backlog run --journal` and `backlog status` with
//! real processes and real SQLite files.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use assert_cmd::cargo::cargo_bin_cmd;
use assert_cmd::Command;
use serde_json::Value;
use tempfile::TempDir;

/// A command that appends its item to `ledger` and fails with status 3 for
/// items starting with `bad`.
const APPEND_AND_CHECK: &str =
    r#"echo "$1" >> ledger; case "$1" in bad*) echo "no good: $1" >&2; exit 3;; esac"#;

fn backlog(dir: &Path) -> Command {
    let mut command = cargo_bin_cmd!("backlog");
    command.current_dir(dir);
    command
}

/// Runs `backlog run` in `dir` on `input` with the journal `journal.db`,
/// the extra `options` and the command `APPEND_AND_CHECK`.
fn run_journaled(dir: &Path, input: &str, options: &[&str]) -> Output {
    std::fs::write(dir.join("in.txt"), input).unwrap();
    backlog(dir)
        .args(["run", "in.txt", "--journal", "journal.db"])
        .args(options)
        .args(["--", "sh", "-c", APPEND_AND_CHECK, "sh", "{}"])
        .output()
        .unwrap()
}

fn ledger(dir: &Path) -> Vec<String> {
    match std::fs::read_to_string(dir.join("ledger")) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

/// Returns the ledger sorted, because items running at once append to it
/// in any order.
fn sorted_ledger(dir: &Path) -> Vec<String> {
    let mut lines = ledger(dir);
    lines.sort();
    lines
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn status_json(dir: &Path) -> Value {
    let output = backlog(dir)
        .args(["status", "--journal", "journal.db", "--json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn rerun_skips_done_and_failed_items() {
    let dir = TempDir::new().unwrap();
    let first = run_journaled(dir.path(), "a\nbad1\nb\n", &["--results", "results.jsonl"]);
    assert_eq!(first.status.code(), Some(1), "{}", stderr_of(&first));
    assert_eq!(sorted_ledger(dir.path()), ["a", "b", "bad1"]);

    let second = run_journaled(dir.path(), "a\nbad1\nb\n", &["--results", "results.jsonl"]);
    let stderr = stderr_of(&second);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert_eq!(ledger(dir.path()).len(), 3, "nothing runs again");
    assert!(
        stderr.contains("done 0, failed 0, skipped 3 (2 done earlier, 1 failed earlier),"),
        "{stderr}"
    );
    assert!(
        stderr.contains("  line 2: failed in an earlier run: exit status 3"),
        "{stderr}"
    );
    assert!(stderr.contains("add --retry-failed"), "{stderr}");
    assert!(
        stderr.contains("skip   #0 line 1: done in an earlier run"),
        "{stderr}"
    );
    // The results file gets the items that ran, not the skipped ones.
    let results = std::fs::read_to_string(dir.path().join("results.jsonl")).unwrap();
    assert_eq!(results.lines().count(), 3);
}

#[test]
fn retry_failed_runs_failed_items_again() {
    let dir = TempDir::new().unwrap();
    let first = run_journaled(dir.path(), "a\nbad1\n", &[]);
    assert_eq!(first.status.code(), Some(1));
    let retried = run_journaled(dir.path(), "a\nbad1\n", &["--retry-failed"]);
    assert_eq!(retried.status.code(), Some(1));
    assert_eq!(sorted_ledger(dir.path()), ["a", "bad1", "bad1"]);

    let status = status_json(dir.path());
    let failed = &status["failed"][0];
    assert_eq!(failed["item"], "bad1");
    assert_eq!(failed["attempts"], 2);
    assert_eq!(failed["exit_code"], 3);
    assert_eq!(failed["error"], "exit status 3");
    assert_eq!(failed["stderr_tail"], serde_json::json!(["no good: bad1"]));
}

#[test]
fn edited_input_runs_only_new_items() {
    let dir = TempDir::new().unwrap();
    let first = run_journaled(dir.path(), "a\nb\nc\n", &[]);
    assert_eq!(first.status.code(), Some(0));
    // Reordered, one line removed, one added: only the new line runs.
    let second = run_journaled(dir.path(), "x\nc\na\n", &[]);
    let stderr = stderr_of(&second);
    assert_eq!(second.status.code(), Some(0), "{stderr}");
    assert_eq!(sorted_ledger(dir.path()), ["a", "b", "c", "x"]);
    assert!(
        stderr.contains("done 1, failed 0, skipped 2 (2 done earlier),"),
        "{stderr}"
    );
}

#[test]
fn duplicate_keys_run_once() {
    let dir = TempDir::new().unwrap();
    let output = run_journaled(dir.path(), "a\nb\na\n", &["--max-run", "1"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(ledger(dir.path()), ["a", "b"]);
    assert!(
        stderr.contains("skip   #2 line 3: same key as line 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("skipped 1 (1 with a duplicate key)"),
        "{stderr}"
    );
}

#[test]
fn key_template_names_jsonl_items() {
    let dir = TempDir::new().unwrap();
    let run = |input: &str| {
        std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
        backlog(dir.path())
            .args(["run", "in.jsonl", "--jsonl", "--journal", "journal.db"])
            .args(["--key", "{email}"])
            .args(["--", "sh", "-c", APPEND_AND_CHECK, "sh", "{email}"])
            .output()
            .unwrap()
    };
    let first = run("{\"email\":\"a@x\",\"n\":1}\n{\"n\":2}\n");
    let stderr = stderr_of(&first);
    assert_eq!(first.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 2: cannot make the item's key: field `email` not found in item"),
        "{stderr}"
    );

    // Another field changed, same key: the item counts as done.
    let second = run("{\"n\":5,\"email\":\"a@x\"}\n{\"email\":\"b@x\"}\n");
    let stderr = stderr_of(&second);
    assert_eq!(second.status.code(), Some(0), "{stderr}");
    assert_eq!(sorted_ledger(dir.path()), ["a@x", "b@x"]);
    let status = status_json(dir.path());
    assert_eq!(status["counts"]["done"], 2);
}

#[test]
fn other_key_rule_is_rejected() {
    let dir = TempDir::new().unwrap();
    assert_eq!(run_journaled(dir.path(), "a\n", &[]).status.code(), Some(0));
    let output = run_journaled(dir.path(), "a\n", &["--key", "{}"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "journal 'journal.db' identifies items by the SHA-256 of each item (no --key), \
             but this run would use --key '{}'"
        ),
        "{stderr}"
    );
    assert_eq!(ledger(dir.path()), ["a"]);
}

#[test]
fn key_without_placeholder_is_rejected() {
    let dir = TempDir::new().unwrap();
    // Without --jsonl, `{email}` is literal text, not a placeholder.
    let output = run_journaled(dir.path(), "a\nb\n", &["--key", "{email}"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--key '{email}' contains no placeholder"),
        "{stderr}"
    );
    assert!(stderr.contains("with --jsonl"), "{stderr}");
    assert!(ledger(dir.path()).is_empty());
}

#[test]
fn other_input_format_is_rejected() {
    let dir = TempDir::new().unwrap();
    let input = "{\"id\":1}\n";
    let first = run_journaled(dir.path(), input, &["--jsonl", "--key", "{}"]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr_of(&first));
    let output = run_journaled(dir.path(), input, &["--key", "{}"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--key '{}' with --jsonl"), "{stderr}");
    assert_eq!(ledger(dir.path()).len(), 1);
}

#[test]
fn key_without_journal_is_usage_error() {
    let dir = TempDir::new().unwrap();
    let output = backlog(dir.path())
        .args(["run", "-", "--key", "{}", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr_of(&output).contains("--journal <FILE>"));
}

#[test]
fn status_shows_counts_and_failures() {
    let dir = TempDir::new().unwrap();
    run_journaled(dir.path(), "a\nbad1\nb\n", &[]);
    let output = backlog(dir.path())
        .args(["status", "--journal", "journal.db"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.starts_with("journal journal.db\n"), "{stdout}");
    assert!(
        stdout.contains("items: 3 (2 done, 1 failed, 0 running, 0 pending)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("runs: 1, the last run 1 (pid "), "{stdout}");
    assert!(stdout.contains(" and completed at "), "{stdout}");
    assert!(
        stdout.contains("failed items (1):\n  line 2, 1 attempt: exit status 3: no good: bad1\n"),
        "{stdout}"
    );
    assert!(stdout.contains("    item bad1  key "), "{stdout}");

    let status = status_json(dir.path());
    assert_eq!(status["counts"]["total"], 3);
    assert_eq!(status["counts"]["done"], 2);
    assert_eq!(status["counts"]["failed"], 1);
    assert_eq!(status["last_run"]["state"], "completed");
    assert_eq!(status["interrupted"], serde_json::json!([]));
}

#[test]
fn status_shows_run_stopped_by_deadline() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("in.txt"), "a\nb\nc\n").unwrap();
    let output = backlog(dir.path())
        .args(["run", "in.txt", "--journal", "journal.db", "--max-run", "1"])
        .args(["--deadline", "300ms", "--", "sleep", "5"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(124), "{}", stderr_of(&output));

    let status = status_json(dir.path());
    let last_run = &status["last_run"];
    assert_ne!(last_run["state"], "completed", "{status}");
    let outcome = last_run["outcome"].as_str().unwrap();
    assert!(outcome.contains("the deadline of 300ms passed"), "{status}");
}

#[test]
fn stop_during_retry_backoff_leaves_item_pending() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("in.txt"), "a\n").unwrap();
    let output = backlog(dir.path())
        .args(["run", "in.txt", "--journal", "journal.db"])
        .args(["--results", "results.jsonl", "--retries", "3"])
        .args(["--retry-delay", "5s", "--deadline", "500ms"])
        .args([
            "--",
            "sh",
            "-c",
            "echo \"$1\" >> ledger; exit 75",
            "sh",
            "{}",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(124), "{}", stderr_of(&output));
    assert_eq!(ledger(dir.path()), ["a"]);

    let status = status_json(dir.path());
    assert_eq!(status["counts"]["pending"], 1, "{status}");
    assert_eq!(status["counts"]["failed"], 0, "{status}");
    let results = std::fs::read_to_string(dir.path().join("results.jsonl")).unwrap();
    let record: Value = serde_json::from_str(results.trim()).unwrap();
    assert_eq!(record["outcome"], "not_started");
    assert_eq!(record["attempts"], 1);

    // The next run tries the item again instead of skipping it as failed.
    let rerun = run_journaled(dir.path(), "a\n", &[]);
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr_of(&rerun));
    assert_eq!(ledger(dir.path()), ["a", "a"]);
}

#[test]
fn results_file_equal_to_journal_is_rejected() {
    let dir = TempDir::new().unwrap();
    assert_eq!(run_journaled(dir.path(), "a\n", &[]).status.code(), Some(0));
    let output = run_journaled(dir.path(), "a\nb\n", &["--results", "journal.db"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--results 'journal.db' is the journal"),
        "{stderr}"
    );
    assert_eq!(ledger(dir.path()), ["a"]);
}

#[test]
fn waiting_retries_leave_room_for_new_items() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("in.txt"), "a\nb\nc\nd\n").unwrap();
    // a and b fail once and wait 30 s for their retry; c and d must still
    // run at --max-run 1 before the deadline stops the run.
    let script = r#"echo "$1" >> ledger; case "$1" in a|b) exit 75;; esac"#;
    let output = backlog(dir.path())
        .args(["run", "in.txt", "--max-run", "1", "--retries", "1"])
        .args(["--retry-delay", "30s", "--deadline", "3s"])
        .args(["--", "sh", "-c", script, "sh", "{}"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(124), "{}", stderr_of(&output));
    assert_eq!(sorted_ledger(dir.path()), ["a", "b", "c", "d"]);
}

#[test]
fn status_of_missing_journal_fails() {
    let dir = TempDir::new().unwrap();
    let output = backlog(dir.path())
        .args(["status", "--journal", "nothing.db"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr_of(&output).contains("error: journal 'nothing.db' not found"),
        "{}",
        stderr_of(&output)
    );
    assert!(!dir.path().join("nothing.db").exists());
}

#[test]
fn corrupt_journal_is_rejected() {
    let dir = TempDir::new().unwrap();
    let garbage = b"these are not the pages of an SQLite database\n".repeat(200);
    std::fs::write(dir.path().join("journal.db"), &garbage).unwrap();
    let output = run_journaled(dir.path(), "a\n", &[]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "error: 'journal.db' is not a backlog journal: the file is not an SQLite database. \
             Move the file away or pass another path to --journal"
        ),
        "{stderr}"
    );
    assert!(ledger(dir.path()).is_empty(), "no item runs");
    let after = std::fs::read(dir.path().join("journal.db")).unwrap();
    assert_eq!(after, garbage, "the file is left as it was");

    let status = backlog(dir.path())
        .args(["status", "--journal", "journal.db"])
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(2));
    assert!(stderr_of(&status).contains("is not an SQLite database"));
}

#[test]
fn other_sqlite_schema_is_rejected() {
    let dir = TempDir::new().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("journal.db")).unwrap();
    conn.execute_batch("CREATE TABLE users (email TEXT); INSERT INTO users VALUES ('a@x');")
        .unwrap();
    drop(conn);
    let output = run_journaled(dir.path(), "a\n", &[]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "error: 'journal.db' is an SQLite database but not a backlog journal \
             (its tables: users). Pass another path to --journal"
        ),
        "{stderr}"
    );
    assert!(ledger(dir.path()).is_empty());
}

#[test]
fn newer_schema_version_is_rejected() {
    let dir = TempDir::new().unwrap();
    assert_eq!(run_journaled(dir.path(), "a\n", &[]).status.code(), Some(0));
    let conn = rusqlite::Connection::open(dir.path().join("journal.db")).unwrap();
    conn.pragma_update(None, "user_version", 7).unwrap();
    drop(conn);
    let output = run_journaled(dir.path(), "b\n", &[]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "journal 'journal.db' has schema version 7, but this backlog reads versions 1 to 2 only"
        ),
        "{stderr}"
    );
}

/// Starts a run whose items each take 30 s, in its own process group.
fn start_slow_run(dir: &Path) -> Child {
    std::fs::write(dir.join("slow.txt"), "slow1\nslow2\n").unwrap();
    std::process::Command::new(assert_cmd::cargo::cargo_bin!("backlog"))
        .current_dir(dir)
        .args([
            "run",
            "slow.txt",
            "--max-run",
            "1",
            "--journal",
            "journal.db",
        ])
        .args([
            "--",
            "sh",
            "-c",
            "echo \"$1\" >> ledger; sleep 30",
            "sh",
            "{}",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// Waits until the ledger has `count` lines.
fn wait_for_ledger(dir: &Path, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ledger(dir).len() < count {
        assert!(Instant::now() < deadline, "the run did not start its item");
        sleep(Duration::from_millis(10));
    }
}

fn kill_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let killed = std::process::Command::new("kill")
        .args(["-s", "KILL", "--", &group])
        .status()
        .unwrap();
    assert!(killed.success());
    child.wait().unwrap();
}

#[test]
fn live_run_locks_journal_until_killed() {
    let dir = TempDir::new().unwrap();
    let mut live = start_slow_run(dir.path());
    wait_for_ledger(dir.path(), 1);

    let second = run_journaled(dir.path(), "a\n", &[]);
    let stderr = stderr_of(&second);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    let expected = format!(
        "error: journal 'journal.db' is in use by run 1 (pid {} on host ",
        live.id()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        stderr.contains("Wait for that run to end or stop it, then run again"),
        "{stderr}"
    );
    assert_eq!(ledger(dir.path()), ["slow1"], "the second run ran nothing");
    let status = status_json(dir.path());
    assert_eq!(status["last_run"]["state"], "running");
    assert_eq!(status["counts"]["running"], 1);
    assert_eq!(status["interrupted"], serde_json::json!([]));

    kill_group(&mut live);
    let status = status_json(dir.path());
    assert_eq!(status["last_run"]["state"], "died");
    assert_eq!(status["interrupted"][0]["item"], "slow1");
    let text = backlog(dir.path())
        .args(["status", "--journal", "journal.db"])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains(" and died without finishing\n"), "{text}");
    assert!(
        text.contains("items that were running when their run died (1)"),
        "{text}"
    );

    // The lock of the killed run does not block the next one, and the
    // item it left running runs again.
    std::fs::write(dir.path().join("in.txt"), "slow1\nslow2\n").unwrap();
    let rerun = backlog(dir.path())
        .args(["run", "in.txt", "--journal", "journal.db"])
        .args(["--", "sh", "-c", "echo \"$1\" >> ledger", "sh", "{}"])
        .output()
        .unwrap();
    let stderr = stderr_of(&rerun);
    assert_eq!(rerun.status.code(), Some(0), "{stderr}");
    let note = format!("journal: run 1 (pid {} on ", live.id());
    assert!(stderr.contains(&note), "{stderr}");
    assert!(
        stderr.contains("ended without finishing; its 1 running item run again"),
        "{stderr}"
    );
    assert_eq!(sorted_ledger(dir.path()), ["slow1", "slow1", "slow2"]);
    assert_eq!(status_json(dir.path())["counts"]["done"], 2);
}

/// Runs `backlog run` under a file size limit of `blocks` 512-byte blocks,
/// with SIGXFSZ ignored, so that writes past the limit fail with EFBIG as
/// they would on a full disk, instead of killing the process.
fn run_with_file_limit(dir: &Path, blocks: u32) -> Output {
    let backlog: PathBuf = assert_cmd::cargo::cargo_bin!("backlog").to_owned();
    let script = format!(
        "trap '' XFSZ; ulimit -f {blocks}; exec \"$0\" run in.txt --max-run 4 \
         --journal journal.db -- sh -c 'echo \"$1\" >> ledger' sh {{}}"
    );
    std::process::Command::new("sh")
        .current_dir(dir)
        .args(["-c", &script])
        .arg(backlog)
        .output()
        .unwrap()
}

#[test]
fn journal_write_failure_stops_run_cleanly() {
    let dir = TempDir::new().unwrap();
    let items: String = (0..300).map(|n| format!("item-{n:03}\n")).collect();
    std::fs::write(dir.path().join("in.txt"), &items).unwrap();
    let limited = run_with_file_limit(dir.path(), 256);
    let stderr = stderr_of(&limited);
    assert_eq!(limited.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot write to journal 'journal.db': disk I/O error"),
        "{stderr}"
    );
    assert!(
        stderr.contains("then run the same command again: items recorded as done are skipped"),
        "{stderr}"
    );
    let ran_before = ledger(dir.path());
    assert!(ran_before.len() < 300, "the run stopped early");

    // Every item the journal records as done did run.
    let status = status_json(dir.path());
    let done = status["counts"]["done"].as_u64().unwrap() as usize;
    assert!(done <= ran_before.len(), "{status}");

    let rerun = backlog(dir.path())
        .args(["run", "in.txt", "--max-run", "4", "--journal", "journal.db"])
        .args(["--", "sh", "-c", "echo \"$1\" >> ledger", "sh", "{}"])
        .output()
        .unwrap();
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr_of(&rerun));
    let mut ran = ledger(dir.path());
    ran.sort();
    ran.dedup();
    assert_eq!(ran.len(), 300, "every item ran");
    let status = status_json(dir.path());
    assert_eq!(status["counts"]["done"], 300);
    // Only items the journal did not record as done ran again.
    assert!(ledger(dir.path()).len() <= 300 + (ran_before.len() - done));
}

#[test]
fn status_escapes_control_characters() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("in.txt"), "a\u{1b}[2J\n").unwrap();
    let script = r#"printf '\033]0;title\007\n' >&2; exit 3"#;
    let run = backlog(dir.path())
        .args(["run", "in.txt", "--journal", "journal.db"])
        .args(["--", "sh", "-c", script, "sh", "{}"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1), "{}", stderr_of(&run));

    let output = backlog(dir.path())
        .args(["status", "--journal", "journal.db"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(!stdout.contains('\x1b'), "{stdout:?}");
    assert!(!stdout.contains('\x07'), "{stdout:?}");
    assert!(
        stdout.contains(r"exit status 3: \x1b]0;title\x07"),
        "{stdout}"
    );
    assert!(stdout.contains(r"item a\x1b[2J"), "{stdout}");
}
