//! End-to-end tests of `backlog run` with real processes (`sh`, `true`,
//! `false`, `cat`).

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use assert_cmd::cargo::cargo_bin_cmd;
use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::{json, Value};
use tempfile::TempDir;

/// The longest accepted line, in bytes, as the command documents it.
const MAX_LINE_BYTES: usize = 1024 * 1024;

fn backlog() -> Command {
    cargo_bin_cmd!("backlog")
}

/// Writes `contents` to a file named `name` in `dir` and returns its path.
fn write_input(dir: &TempDir, name: &str, contents: &[u8]) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_owned()
}

fn read_results(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| serde_json::from_str(line).expect("each results line is JSON"))
        .collect()
}

/// Returns the result records sorted by item index.
fn results_by_index(path: &Path) -> Vec<Value> {
    let mut records = read_results(path);
    records.sort_by_key(|record| record["index"].as_u64().unwrap());
    records
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn run_all_succeed_exits_zero() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"a\nb\nc\n");
    backlog()
        .args(["run", &input, "--", "true"])
        .assert()
        .code(0)
        .stderr(predicate::str::contains("done 3, failed 0,"));
}

#[test]
fn run_some_fail_exits_one() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"ok\nbad\nok\n");
    let script = r#"[ "$1" = ok ] || { echo "no good: $1" >&2; exit 3; }"#;
    backlog()
        .args(["run", &input, "--", "sh", "-c", script, "sh", "{}"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("done 2, failed 1,"))
        .stderr(predicate::str::contains(
            "FAILED #1 line 2: exit status 3: no good: bad",
        ))
        .stderr(predicate::str::contains(
            "\n  line 2: exit status 3: no good: bad",
        ));
}

#[test]
fn run_every_item_failing_exits_one() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"a\nb\n");
    backlog()
        .args(["run", &input, "--", "false"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("done 0, failed 2,"));
}

#[test]
fn run_missing_input_exits_two() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("x.txt");
    let missing = missing.to_str().unwrap();
    let expected = format!(
        "error: cannot open input file '{missing}': No such file or directory (os error 2)\n"
    );
    backlog()
        .args(["run", missing, "--", "true"])
        .assert()
        .code(2)
        .stdout("")
        .stderr(expected);
}

#[test]
fn run_missing_command_exits_two() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"a\n");
    backlog()
        .args(["run", &input, "--", "backlog-no-such-command", "{}"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "error: command 'backlog-no-such-command' not found in PATH",
        ));
    backlog()
        .args(["run", &input, "--", "./backlog-no-such-file"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "error: command './backlog-no-such-file' not found",
        ));
}

#[test]
fn run_without_command_is_usage_error() {
    backlog().args(["run", "in.txt"]).assert().code(2);
}

#[test]
fn max_run_zero_is_rejected() {
    backlog()
        .args(["run", "--max-run", "0", "in.txt", "--", "true"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "error: invalid value '0' for '--max-run <N>': must be between 1 and 1000000",
        ));
}

#[test]
fn max_run_non_number_is_rejected() {
    backlog()
        .args(["run", "--max-run", "abc", "in.txt", "--", "true"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "error: invalid value 'abc' for '--max-run <N>': must be a whole number between 1 and 1000000",
        ));
}

#[test]
fn run_malformed_items_fail_with_line() {
    let dir = TempDir::new().unwrap();
    let mut contents = b"{\"name\":\"one\"}\n{not json\n{\"name\":\"bad \xff\"}\n".to_vec();
    contents.extend(vec![b'x'; MAX_LINE_BYTES + 1]);
    contents.extend_from_slice(b"\n\n{\"name\":\"two\"}\n");
    let input = write_input(&dir, "in.jsonl", &contents);
    let results = dir.path().join("results.jsonl");

    let output = backlog()
        .args([
            "run",
            "--jsonl",
            "--results",
            results.to_str().unwrap(),
            &input,
        ])
        .args(["--", "echo", "{name}"])
        .output()
        .unwrap();
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(output.stdout, b"one\ntwo\n");
    assert!(
        stderr.contains("done 2, failed 3 (3 malformed),"),
        "{stderr}"
    );
    assert!(
        stderr.contains("  line 2: invalid JSON at column 2: key must be a string\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("  line 3: invalid UTF-8 at byte offset 13\n"),
        "{stderr}"
    );
    let too_long = "  line 4: line is longer than the limit of 1048576 bytes";
    assert!(stderr.contains(too_long), "{stderr}");

    let records = results_by_index(&results);
    let lines: Vec<u64> = records
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [1, 2, 3, 4, 6]);
    let ok: Vec<bool> = records.iter().map(|r| r["ok"].as_bool().unwrap()).collect();
    assert_eq!(ok, [true, false, false, false, true]);
    assert_eq!(records[1]["item"], json!("{not json"));
    assert_eq!(records[2]["item"], json!("{\"name\":\"bad \u{fffd}\"}"));
    assert!(records[3]["error"]
        .as_str()
        .unwrap()
        .contains("longer than the limit"));
}

#[test]
fn run_directory_input_names_path() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    backlog()
        .args(["run", &path, "--", "true"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(format!(
            "cannot open input file '{path}': it is a directory"
        )));
}

#[test]
fn run_missing_field_fails_item() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.jsonl", b"{\"a\":{\"b\":1}}\n{\"a\":{}}\n");
    backlog()
        .args(["run", "--jsonl", &input, "--", "echo", "{a.b}"])
        .assert()
        .code(1)
        .stdout("1\n")
        .stderr(predicate::str::contains(
            "  line 2: field `a.b` not found in item",
        ));
}

#[test]
fn results_file_records_each_item() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"good\n\nbad\r\n");
    let results = dir.path().join("results.jsonl");
    let script = r#"echo "warning 1" >&2; echo "warning 2" >&2; [ "$1" = good ]"#;
    backlog()
        .args(["run", "--results", results.to_str().unwrap(), &input])
        .args(["--", "sh", "-c", script, "sh", "{}"])
        .assert()
        .code(1);

    let records = results_by_index(&results);
    assert_eq!(records.len(), 2);
    let good = &records[0];
    assert_eq!(good["index"], json!(0));
    assert_eq!(good["line"], json!(1));
    assert_eq!(good["item"], json!("good"));
    assert_eq!(good["ok"], json!(true));
    assert_eq!(good["exit_code"], json!(0));
    assert_eq!(good["signal"], Value::Null);
    assert!(good["duration_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(good["stderr_tail"], json!(["warning 1", "warning 2"]));
    assert_eq!(good["error"], Value::Null);

    let bad = &records[1];
    assert_eq!(bad["index"], json!(1));
    assert_eq!(bad["line"], json!(3));
    assert_eq!(bad["item"], json!("bad"));
    assert_eq!(bad["ok"], json!(false));
    assert_eq!(bad["exit_code"], json!(1));
    assert_eq!(bad["error"], json!("exit status 1"));
}

#[test]
fn results_file_records_signal() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"a\n");
    let results = dir.path().join("results.jsonl");
    backlog()
        .args(["run", "--results", results.to_str().unwrap(), &input])
        .args(["--", "sh", "-c", "kill -9 $$"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("killed by signal 9"));
    let records = read_results(&results);
    assert_eq!(records[0]["exit_code"], Value::Null);
    assert_eq!(records[0]["signal"], json!(9));
}

#[test]
fn results_file_is_appended() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"a\n");
    let results = dir.path().join("results.jsonl");
    for _ in 0..2 {
        backlog()
            .args(["run", "--results", results.to_str().unwrap(), &input])
            .args(["--", "true"])
            .assert()
            .code(0);
    }
    assert_eq!(read_results(&results).len(), 2);
}

#[test]
fn run_reads_stdin_dash() {
    backlog()
        .args(["run", "-", "--", "echo", "item={}"])
        .write_stdin("x\ny\n")
        .assert()
        .code(0)
        .stdout(predicate::str::contains("item=x\n"))
        .stdout(predicate::str::contains("item=y\n"));
}

#[test]
fn run_writes_item_to_stdin() {
    backlog()
        .args(["run", "--max-run", "1", "-", "--", "cat"])
        .write_stdin("first line\nsecond\n")
        .assert()
        .code(0)
        .stdout("first line\nsecond\n");
}

#[test]
fn run_writes_json_item_to_stdin() {
    backlog()
        .args(["run", "--jsonl", "-", "--", "cat"])
        .write_stdin("{ \"a\" : 1 }\n")
        .assert()
        .code(0)
        .stdout("{\"a\":1}\n");
}

#[test]
fn run_ignores_command_not_reading_stdin() {
    // An item larger than a pipe buffer, so the write really hits the
    // closed pipe.
    let item = "y".repeat(256 * 1024);
    backlog()
        .args(["run", "-", "--", "true"])
        .write_stdin(format!("{item}\n"))
        .assert()
        .code(0);
}

#[test]
fn run_passes_item_as_one_argument() {
    let item = "a b; echo injected $(echo x) '\"";
    backlog()
        .args([
            "run",
            "-",
            "--",
            "sh",
            "-c",
            r#"printf '%s|' "$@"; echo"#,
            "sh",
            "{}",
        ])
        .write_stdin(format!("{item}\n"))
        .assert()
        .code(0)
        .stdout(format!("{item}|\n"));
}

#[test]
fn run_keeps_other_braces() {
    backlog()
        .args(["run", "-", "--", "awk", "{print $2}"])
        .write_stdin("one two\n")
        .assert()
        .code(0)
        .stdout("two\n");
}

#[test]
fn run_groups_stdout_per_item() {
    // Each item writes two halves with a pause between them. With four
    // running at once, ungrouped output would interleave the halves.
    let script = r#"printf '%s-start ' "$1"; sleep 0.1; printf '%s-end\n' "$1""#;
    let output = backlog()
        .args([
            "run",
            "--max-run",
            "4",
            "-",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            "{}",
        ])
        .write_stdin("a\nb\nc\nd\n")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort_unstable();
    let expected = [
        "a-start a-end",
        "b-start b-end",
        "c-start c-end",
        "d-start d-end",
    ];
    assert_eq!(lines, expected);
}

#[test]
fn run_max_run_limits_concurrency() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"1\n2\n3\n4\n5\n6\n");
    let results = dir.path().join("results.jsonl");
    let started = Instant::now();
    let output = backlog()
        .args([
            "run",
            "--max-run",
            "2",
            "--results",
            results.to_str().unwrap(),
            &input,
        ])
        .args(["--", "sh", "-c", "sleep 0.2", "sh", "{}"])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("at most 2 commands ran at once"),
        "{stderr}"
    );
    let durations: Vec<f64> = read_results(&results)
        .iter()
        .map(|record| record["duration_ms"].as_f64().unwrap())
        .collect();
    assert_eq!(durations.len(), 6);
    assert!(durations.iter().all(|&ms| ms >= 190.0), "{durations:?}");
    // Six items of 0.2 s, two at a time, need three waves.
    let busy: f64 = durations.iter().sum::<f64>() / 1000.0;
    assert!(busy / 2.0 >= 0.55, "{durations:?}");
    assert!(elapsed >= Duration::from_millis(550), "{elapsed:?}");
    let wall_time = summary_wall_time(&stderr);
    assert!(wall_time >= 0.55, "{stderr}");
}

/// Returns the seconds after "wall time " in the summary.
fn summary_wall_time(stderr: &str) -> f64 {
    let after = stderr.split("wall time ").nth(1).expect("a summary line");
    let seconds = after.split('s').next().unwrap();
    seconds.parse().unwrap()
}

#[test]
fn run_log_lines_name_each_item() {
    backlog()
        .args(["run", "-", "--", "true"])
        .write_stdin("a\n")
        .assert()
        .code(0)
        .stderr(
            predicate::str::is_match(r"(?m)^ +\d+\.\d\ds  ok     #0 line 1 \(\d+\.\d\ds\)$")
                .unwrap(),
        );
}

#[test]
fn run_closed_stdout_exits_141() {
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin!("backlog"))
        .args(["run", "--max-run", "2", "-", "--", "echo", "{}"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let items: String = (0..20_000).map(|n| format!("{n}\n")).collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        // The command may stop reading once its stdout is gone.
        let _ = stdin.write_all(items.as_bytes());
    });

    // Read a little output, then close the pipe while items still run.
    let mut first = [0u8; 2];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    writer.join().unwrap();

    let mut stderr = String::new();
    child.stderr.unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(141), "{stderr}");
    assert!(
        stderr.contains("stopped because standard output was closed"),
        "{stderr}"
    );
    // The run stopped at the broken pipe instead of running every item.
    assert!(!stderr.contains("done 20000"), "{stderr}");
}

/// Runs `backlog` with its stdout or results file on `/dev/full`, several
/// times because the failing write can race with the end of the backlog.
fn assert_full_disk_is_fatal(use_results_file: bool, expected: &str) {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"1\n2\n3\n");
    for attempt in 0..10 {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin!("backlog"));
        command.arg("run").arg(&input);
        if use_results_file {
            command.args(["--results", "/dev/full"]);
        } else {
            command.stdout(full);
        }
        let output = command.args(["--", "echo", "{}"]).output().unwrap();
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "attempt {attempt}: {stderr}");
        assert!(stderr.contains(expected), "attempt {attempt}: {stderr}");
    }
}

#[test]
fn results_file_full_disk_exits_two() {
    if !Path::new("/dev/full").exists() {
        eprintln!("skipped: /dev/full is missing");
        return;
    }
    assert_full_disk_is_fatal(true, "cannot write to the results file");
}

#[test]
fn stdout_full_disk_exits_two() {
    if !Path::new("/dev/full").exists() {
        eprintln!("skipped: /dev/full is missing");
        return;
    }
    assert_full_disk_is_fatal(false, "cannot write to standard output");
}

#[test]
fn run_rejects_placeholder_in_shell_script() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"r.txt; touch injected\n");
    backlog()
        .current_dir(dir.path())
        .args(["run", &input, "--", "sh", "-c", "echo processing {}"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "the script of `sh -c` contains a placeholder: 'echo processing {}'",
        ));
    assert!(!dir.path().join("injected").exists());
}

#[test]
fn run_rejects_results_file_equal_to_input() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"1\n2\n");
    backlog()
        .args(["run", &input, "--results", &input, "--", "true"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(format!(
            "--results '{input}' is the input file"
        )));
    assert_eq!(std::fs::read(&input).unwrap(), b"1\n2\n");
}

#[test]
fn run_closed_stderr_still_succeeds() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"1\n2\n3\n");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin!("backlog"))
        .args(["run", &input, "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn run_escapes_stderr_in_log_only() {
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"escape\nlong\n");
    let results = dir.path().join("results.jsonl");
    let script = r#"
        if [ "$1" = escape ]; then printf '\033[31mred\n' >&2
        else head -c 70000 /dev/zero | tr '\0' x >&2
        fi
        exit 1"#;
    let output = backlog()
        .args(["run", &input, "--results", results.to_str().unwrap()])
        .args(["--", "sh", "-c", script, "sh", "{}"])
        .output()
        .unwrap();
    let stderr = stderr_of(&output);
    // Without the cap, stderr contains a 64 KiB line, so show only its start.
    let start: String = stderr.chars().take(1000).collect();

    assert_eq!(output.status.code(), Some(1), "{start}");
    assert!(!stderr.contains('\x1b'), "{start:?}");
    assert!(stderr.contains(r"exit status 1: \x1b[31mred"), "{start}");
    assert!(stderr.contains("…(65"), "{start}");
    assert!(stderr.lines().all(|line| line.len() < 1000), "{start}");
    let records = results_by_index(&results);
    assert_eq!(records[0]["stderr_tail"], json!(["\x1b[31mred"]));
    let long = records[1]["stderr_tail"][0].as_str().unwrap();
    assert_eq!(long.len(), 64 * 1024);
}

#[test]
fn results_file_keeps_records_whole() {
    // Two runs append records of about 60 KB to one results file at once.
    // A record written in several pieces would interleave with the other
    // run's records and leave lines that are not JSON.
    let dir = TempDir::new().unwrap();
    let items: String = (0..100)
        .map(|n| format!("{n}-{}\n", "x".repeat(60_000)))
        .collect();
    let input = write_input(&dir, "in.txt", items.as_bytes());
    let results = dir.path().join("results.jsonl");
    let start_run = || {
        std::process::Command::new(assert_cmd::cargo::cargo_bin!("backlog"))
            .args(["run", "--max-run", "4", "--results"])
            .arg(&results)
            .args([&input, "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut runs = [start_run(), start_run()];
    for run in &mut runs {
        assert_eq!(run.wait().unwrap().code(), Some(0));
    }

    let text = std::fs::read_to_string(&results).unwrap();
    let mut lines = 0;
    for (number, line) in text.lines().enumerate() {
        let record: Result<Value, _> = serde_json::from_str(line);
        assert!(record.is_ok(), "line {} is not JSON", number + 1);
        lines += 1;
    }
    assert_eq!(lines, 200);
}

#[test]
fn results_file_after_torn_record() {
    // A run killed during a write can leave part of a record at the end.
    let dir = TempDir::new().unwrap();
    let input = write_input(&dir, "in.txt", b"a\n");
    let results = dir.path().join("results.jsonl");
    std::fs::write(&results, "{\"index\":0,\"line\":1,\"it").unwrap();
    backlog()
        .args(["run", &input, "--results", results.to_str().unwrap()])
        .args(["--", "true"])
        .assert()
        .code(0);

    let text = std::fs::read_to_string(&results).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], "{\"index\":0,\"line\":1,\"it");
    let record: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(record["item"], json!("a"));
}

#[test]
fn run_help_lists_exit_statuses() {
    let output = backlog().args(["run", "--help"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8(output.stdout).unwrap();
    for status in ["0", "1", "2", "130", "141"] {
        let pattern = format!(r"(?m)^  {status} +\S");
        let listed = predicate::str::is_match(pattern).unwrap();
        assert!(listed.eval(&help), "status {status} missing:\n{help}");
    }
    assert!(help.contains("`{{print}}`"), "{help}");
    assert!(help.contains("128 KiB"), "{help}");
}

#[test]
fn command_without_separator_gets_hint() {
    let hint = "hint: put `--` before the command, as in: backlog run INPUT -- COMMAND ARGS";
    backlog()
        .args(["run", "in.txt", "echo", "hi"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unexpected argument 'echo'"))
        .stderr(predicate::str::contains(hint));
    // With `--` present, the mistake is elsewhere and the hint would mislead.
    backlog()
        .args(["run", "--bogus", "in.txt", "--", "true"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unexpected argument '--bogus'"))
        .stderr(predicate::str::contains("hint:").not());
}

/// Runs `backlog run INPUT ARGS...` through `sh -c` after the shell command
/// `ulimit`, which sets the file descriptor limit that backlog inherits.
fn run_under_ulimit(ulimit: &str, input: &str, args: &[&str]) -> std::process::Output {
    let script = format!(r#"{ulimit} || exit 99; exec "$0" run "$@""#);
    std::process::Command::new("sh")
        .args(["-c", &script])
        .arg(assert_cmd::cargo::cargo_bin!("backlog"))
        .arg(input)
        .args(args)
        .output()
        .unwrap()
}

/// Returns the hard limit on open files of this process.
fn hard_file_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let hard = line.split_whitespace().nth(4).unwrap();
    hard.parse().unwrap_or(u64::MAX)
}

#[test]
fn file_limit_too_low_is_rejected() {
    let dir = TempDir::new().unwrap();
    let items: String = (0..100).map(|n| format!("{n}\n")).collect();
    let input = write_input(&dir, "in.txt", items.as_bytes());
    let output = run_under_ulimit("ulimit -n 64", &input, &["--max-run", "100", "--", "true"]);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--max-run 100 needs up to"), "{stderr}");
    assert!(stderr.contains("limit on open files is 64"), "{stderr}");
    assert!(stderr.contains("ulimit -n"), "{stderr}");
    assert!(!stderr.contains("Too many open files"), "{stderr}");
}

#[test]
fn low_soft_file_limit_is_raised() {
    if hard_file_limit() < 1024 {
        eprintln!("skipped: the hard limit on open files is below 1024");
        return;
    }
    let dir = TempDir::new().unwrap();
    let items: String = (0..60).map(|n| format!("{n}\n")).collect();
    let input = write_input(&dir, "in.txt", items.as_bytes());
    let args = ["--max-run", "60", "--", "sleep", "0.3"];
    let output = run_under_ulimit("ulimit -S -n 64", &input, &args);
    let stderr = stderr_of(&output);

    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("done 60, failed 0,"), "{stderr}");
    assert!(!stderr.contains("Too many open files"), "{stderr}");
}

/// Returns the peak resident set size of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn run_large_output_exact_and_bounded() {
    // The first item writes about 39 MB. The second one sleeps, so that
    // backlog is still alive to be measured once that output has arrived.
    let script = r#"if [ "$1" = big ]; then seq 1 5000000; else sleep 2; fi"#;
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin!("backlog"))
        .args([
            "run",
            "--max-run",
            "1",
            "-",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            "{}",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"big\nsleep\n").unwrap();
    }
    let expected: String = (1..=5_000_000).map(|n| format!("{n}\n")).collect();
    let mut stdout = child.stdout.take().unwrap();
    let mut output = vec![0u8; expected.len()];
    stdout.read_exact(&mut output).unwrap();
    let peak_kib = peak_rss_kib(child.id());
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let status = child.wait().unwrap();

    assert_eq!(status.code(), Some(0));
    assert!(rest.is_empty(), "{} bytes too many", rest.len());
    assert!(output == expected.as_bytes(), "the output differs");
    // The output is 39 MB: holding it whole would exceed this bound.
    assert!(peak_kib < 30 * 1024, "peak RSS {peak_kib} KiB");
}
