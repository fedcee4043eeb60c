//! End-to-end tests of `backlog run --per-key`, `--rate` and `--burst` with
//! real processes. Each command keeps its own record, under `flock`, of how
//! many commands of its key run at once and when it started, so the checks
//! do not rely on backlog's own counts.

use std::path::Path;

use assert_cmd::cargo::cargo_bin_cmd;
use predicates::prelude::*;
use tempfile::TempDir;

/// Counts running commands per key in `$dir/$key.count`, appends each new
/// count to `$dir/$key.seen`, and logs starts and ends to `$dir/log`, all
/// under one lock. Arguments: the key, the directory, the sleep.
const COUNTING_SCRIPT: &str = r#"
key=$1 dir=$2
(
  flock 9
  n=$(cat "$dir/$key.count" 2>/dev/null || echo 0)
  n=$((n + 1))
  echo "$n" > "$dir/$key.count"
  echo "$n" >> "$dir/$key.seen"
  echo "$key start" >> "$dir/log"
) 9> "$dir/lock"
sleep "$3"
(
  flock 9
  n=$(cat "$dir/$key.count")
  echo $((n - 1)) > "$dir/$key.count"
  echo "$key end" >> "$dir/log"
) 9> "$dir/lock"
"#;

fn write_items(dir: &Path, keys: &[&str]) -> String {
    let lines: String = keys
        .iter()
        .enumerate()
        .map(|(n, key)| format!("{{\"key\":\"{key}\",\"n\":{n}}}\n"))
        .collect();
    let path = dir.join("in.jsonl");
    std::fs::write(&path, lines).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Returns the counts each command of `key` saw when it started.
fn seen_counts(dir: &Path, key: &str) -> Vec<u32> {
    std::fs::read_to_string(dir.join(format!("{key}.seen")))
        .unwrap()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect()
}

#[test]
fn per_key_limit_holds_and_other_keys_flow() {
    let dir = TempDir::new().unwrap();
    let records = dir.path().join("records");
    std::fs::create_dir(&records).unwrap();
    // Six items of `a` come first. A run that waited for the head of the
    // input would start no `b` until the last `a` had started.
    let keys = ["a", "a", "a", "a", "a", "a", "b", "b", "b"];
    let input = write_items(dir.path(), &keys);
    let records = records.to_str().unwrap();
    let args = [
        "run",
        "--jsonl",
        "--max-run",
        "4",
        "--per-key",
        "{key}=2",
        &input,
        "--",
        "sh",
        "-c",
        COUNTING_SCRIPT,
        "sh",
        "{key}",
        records,
        "0.5",
    ];
    cargo_bin_cmd!("backlog")
        .args(args)
        .assert()
        .code(0)
        .stderr(predicate::str::contains("done 9, failed 0,"));

    let dir = Path::new(records);
    for key in ["a", "b"] {
        let counts = seen_counts(dir, key);
        let max = counts.iter().max().copied().unwrap();
        assert!(max <= 2, "{key}: {max} commands at once over --per-key 2");
        assert_eq!(max, 2, "{key}: never ran two at once");
    }
    assert_eq!(seen_counts(dir, "a").len(), 6);
    assert_eq!(seen_counts(dir, "b").len(), 3);

    let log = std::fs::read_to_string(dir.join("log")).unwrap();
    let first_b_start = log.lines().position(|line| line == "b start").unwrap();
    let first_a_end = log.lines().position(|line| line == "a end").unwrap();
    assert!(
        first_b_start < first_a_end,
        "`b` waited for `a` to finish a command:\n{log}"
    );
}

#[test]
fn rate_spaces_command_starts() {
    let dir = TempDir::new().unwrap();
    let input = write_items(dir.path(), &["x"; 5]);
    let log = dir.path().join("starts");
    let log = log.to_str().unwrap();
    let script = r#"date +%s%N >> "$1""#;
    cargo_bin_cmd!("backlog")
        .args([
            "run", "--rate", "5/s", &input, "--", "sh", "-c", script, "sh", log,
        ])
        .assert()
        .code(0);

    let mut starts: Vec<u64> = std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect();
    starts.sort_unstable();
    assert_eq!(starts.len(), 5);
    // 5/s is one start every 200 ms. A process may start late, which
    // shortens the gap after it, so only half the interval is required.
    for pair in starts.windows(2) {
        let gap_ms = (pair[1] - pair[0]) / 1_000_000;
        assert!(gap_ms >= 100, "two starts {gap_ms} ms apart at --rate 5/s");
    }
    let span_ms = (starts[4] - starts[0]) / 1_000_000;
    assert!(
        span_ms >= 700,
        "five starts within {span_ms} ms at --rate 5/s"
    );
}

#[test]
fn burst_lets_starts_through_at_once() {
    let dir = TempDir::new().unwrap();
    let records = dir.path().join("records");
    std::fs::create_dir(&records).unwrap();
    let input = write_items(dir.path(), &["k"; 3]);
    let records = records.to_str().unwrap();
    // A rate of 1 per hour lets only the burst through in a test's time.
    let args = [
        "run",
        "--jsonl",
        "--rate",
        "1/h",
        "--burst",
        "3",
        &input,
        "--",
        "sh",
        "-c",
        COUNTING_SCRIPT,
        "sh",
        "{key}",
        records,
        "0.5",
    ];
    cargo_bin_cmd!("backlog").args(args).assert().code(0);

    let counts = seen_counts(Path::new(records), "k");
    assert_eq!(counts.len(), 3);
    assert_eq!(
        counts.iter().max(),
        Some(&3),
        "the burst did not start together"
    );
}

#[test]
fn bad_limit_values_are_rejected() {
    let cases = [
        (
            ["--rate", "5/x"],
            "invalid value '5/x' for '--rate <N/s>'",
            "N/s, N/m or N/h",
        ),
        (
            ["--rate", "0/s"],
            "invalid value '0/s' for '--rate <N/s>'",
            "N/s, N/m or N/h",
        ),
        (
            ["--per-key", "{key}"],
            "invalid value '{key}' for '--per-key <TEMPLATE=N>'",
            "TEMPLATE=N",
        ),
        (
            ["--per-key", "{key}=0"],
            "invalid value '{key}=0'",
            "TEMPLATE=N",
        ),
        (
            ["--burst", "0"],
            "invalid value '0' for '--burst <N>'",
            "whole number from 1",
        ),
    ];
    for (args, value, forms) in cases {
        cargo_bin_cmd!("backlog")
            .args(["run", "--jsonl"])
            .args(args)
            .args(["in.jsonl", "--", "true"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(value))
            .stderr(predicate::str::contains(forms));
    }
}

#[test]
fn halt_records_items_read_ahead() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a\nb\nc\nd\ne\nf\n").unwrap();
    let results = dir.path().join("results.jsonl");
    let (input, results_path) = (input.to_str().unwrap(), results.to_str().unwrap());
    cargo_bin_cmd!("backlog")
        .args([
            "run",
            "--max-run",
            "1",
            "--per-key",
            "{}=1",
            "--halt",
            "soon,fail=1",
        ])
        .args(["--results", results_path, input, "--", "false"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("5 items not started"));

    // The items read ahead into the window are recorded like the rest.
    let text = std::fs::read_to_string(&results).unwrap();
    let outcomes: Vec<String> = text
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            record["outcome"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(outcomes.len(), 6);
    assert_eq!(outcomes.iter().filter(|o| *o == "not_started").count(), 5);
}

#[test]
fn deadline_ends_rate_waits_at_once() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.txt");
    let lines: String = (0..20).map(|n| format!("{n}\n")).collect();
    std::fs::write(&input, lines).unwrap();
    let started = std::time::Instant::now();
    let output = cargo_bin_cmd!("backlog")
        .args([
            "run",
            input.to_str().unwrap(),
            "--rate",
            "1/m",
            "--deadline",
            "1s",
        ])
        .args(["--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(124), "{stderr}");
    // Without the stop reaching the waiting acquires, the run would wait a
    // minute per item read ahead.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{stderr}"
    );
    assert!(
        stderr.contains("done 1, failed 0, not started 19,"),
        "{stderr}"
    );
}

#[test]
fn per_key_without_placeholder_is_rejected() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a\nb\n").unwrap();
    for template in ["{domain}=1", "static=1"] {
        cargo_bin_cmd!("backlog")
            .args(["run", input.to_str().unwrap(), "--per-key", template])
            .args(["--", "true"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(format!(
                "--per-key '{template}' contains no placeholder"
            )));
    }
}
