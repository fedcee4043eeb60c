//! End-to-end tests of `--limiter` and `backlog limits` against a private
//! redis-server per test. The commands count how many of them run at once
//! under `flock`, over every backlog process, so the checks do not rely on
//! backlog's own counts.

mod fleet;

use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

use fleet::{backlog_bin, limiter_url, limits, poll, redis, seen_counts, set_limits};

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `backlog run --limiter URL --limiter-timeout TIMEOUT` with the
/// command `true` over two items, without a Redis password.
fn run_two_items(url: &str, timeout: &str) -> Output {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a\nb\n").unwrap();
    Command::new(backlog_bin())
        .args(["run", "--limiter", url, "--limiter-timeout", timeout])
        .arg(&input)
        .args(["--", "true"])
        .env_remove("BACKLOG_REDIS_PASSWORD")
        .output()
        .unwrap()
}

#[test]
fn limits_set_and_show_text() {
    let Some(server) = redis() else { return };
    let url = limiter_url(&server, "jobs");
    let output = limits(
        &url,
        &[
            "--global",
            "3",
            "--per-key-default",
            "2",
            "--key",
            "a.example=1",
            "--lease",
            "20s",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.starts_with(&format!("Limits of {url}:\n")), "{text}");
    assert!(text.contains("  global           3\n"), "{text}");
    assert!(text.contains("  per-key default  2\n"), "{text}");
    assert!(text.contains("  lease            20s\n"), "{text}");
    assert!(text.contains("  key a.example    1\n"), "{text}");
    assert!(text.ends_with("Holders: none\n"), "{text}");
}

#[test]
fn limits_json_after_changes() {
    let Some(server) = redis() else { return };
    let url = limiter_url(&server, "jobs");
    set_limits(
        &url,
        &[
            "--lease", "2s", "--global", "4", "--key", "a=1", "--key", "b=2",
        ],
    );
    let output = limits(
        &url,
        &["--remove-key", "a", "--per-key-default", "none", "--json"],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let value: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(value["url"], url.as_str());
    assert_eq!(value["global"], 4);
    assert_eq!(value["per_key_default"], Value::Null);
    assert_eq!(value["per_key"], serde_json::json!({"b": 2}));
    assert_eq!(value["lease_ms"], 2000);
    assert_eq!(value["holders"], serde_json::json!([]));
}

#[test]
fn limits_lists_holders_of_a_run() {
    let Some(server) = redis() else { return };
    let url = limiter_url(&server, "jobs");
    set_limits(&url, &["--lease", "2s", "--global", "5"]);
    let dir = TempDir::new().unwrap();
    let (input, records) = (dir.path().join("in.jsonl"), dir.path().join("records"));
    std::fs::create_dir(&records).unwrap();
    fleet::write_items(&input, &["a", "b"]);
    // Two commands that sleep long enough to be listed, without --per-key
    // so their leases count against the global limit alone.
    let mut run = fleet::spawn_counting_run(&url, &input, &records, "5", &["--max-run", "2"]);

    let holders = poll(100, || {
        let output = limits(&url, &["--json"]);
        let value: Value = serde_json::from_slice(&output.stdout).ok()?;
        let holders = value["holders"].as_array()?.clone();
        (holders.len() == 2).then_some(holders)
    });
    let _ = run.kill();
    let _ = run.wait();
    let holders = holders.expect("two leases listed while the run sleeps");
    let pid = format!(":{}", run.id());
    for holder in &holders {
        assert_eq!(holder["key"], Value::Null);
        assert!(
            holder["holder"].as_str().unwrap().ends_with(&pid),
            "{holder}"
        );
        assert!(holder["fence"].as_u64().unwrap() > 0, "{holder}");
    }
    assert_ne!(holders[0]["fence"], holders[1]["fence"]);

    let text = String::from_utf8(limits(&url, &[]).stdout).unwrap();
    assert!(text.contains("KEY  HOLDER"), "{text}");
}

#[test]
fn three_runs_share_global_and_key_limits() {
    let Some(server) = redis() else { return };
    let url = limiter_url(&server, "fleet");
    set_limits(
        &url,
        &["--lease", "2s", "--global", "3", "--per-key-default", "2"],
    );
    let dir = TempDir::new().unwrap();
    let records = dir.path().join("records");
    std::fs::create_dir(&records).unwrap();
    let mut runs = Vec::new();
    for part in 0..3 {
        let input = dir.path().join(format!("part-{part}.jsonl"));
        fleet::write_items(&input, &["a", "b", "a", "b"]);
        let local = ["--max-run", "4", "--per-key", "{key}=4"];
        runs.push(fleet::spawn_counting_run(
            &url, &input, &records, "0.3", &local,
        ));
    }
    for run in runs {
        let output = run.wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
        assert!(stderr_of(&output).contains("done 4, failed 0,"));
    }

    // Every start was counted, and no count went past a shared limit,
    // though each process alone would have run 4 at once.
    let all = seen_counts(&records, "all");
    assert_eq!(all.len(), 12);
    assert!(all.iter().all(|&n| n <= 3), "global counts {all:?}");
    for key in ["a", "b"] {
        let counts = seen_counts(&records, key);
        assert_eq!(counts.len(), 6, "{key}");
        assert!(counts.iter().all(|&n| n <= 2), "{key} counts {counts:?}");
    }
}

#[test]
fn unreachable_redis_fails_closed() {
    let url = format!("redis://127.0.0.1:{}/jobs", fleet::closed_port());
    let output = run_two_items(&url, "1s");
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let expected = format!("Redis at {url} could not be reached for ");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("raise --limiter-timeout"), "{stderr}");
}

#[test]
fn namespace_without_limit_fails_closed() {
    let Some(server) = redis() else { return };
    let url = limiter_url(&server, "unset");
    let output = run_two_items(&url, "5s");
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let fix = format!("Set one with: backlog limits {url} --global N");
    assert!(
        stderr.contains(&format!("{url} has no global limit")),
        "{stderr}"
    );
    assert!(stderr.contains(&fix), "{stderr}");
}

#[test]
fn password_in_url_is_rejected() {
    let url = "redis://worker:hunter2@127.0.0.1:1/jobs";
    let run = Command::new(backlog_bin())
        .args(["run", "--limiter", url, "-", "--", "true"])
        .output()
        .unwrap();
    let shown = Command::new(backlog_bin())
        .args(["limits", url])
        .output()
        .unwrap();
    for output in [run, shown] {
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("BACKLOG_REDIS_PASSWORD"), "{stderr}");
        assert!(
            stderr.contains("redis://worker:***@127.0.0.1:1/jobs"),
            "{stderr}"
        );
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
}

#[test]
fn tls_url_and_bad_name_are_rejected() {
    let cases = [
        (
            "rediss://127.0.0.1:1/jobs",
            "TLS to Redis (rediss://) is not supported",
        ),
        ("redis://127.0.0.1:1/", "the NAME after the port is missing"),
        ("redis://127.0.0.1:1/a:b", "contains ':'"),
    ];
    for (url, expected) in cases {
        let output = Command::new(backlog_bin())
            .args(["limits", url])
            .output()
            .unwrap();
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains(expected), "{url}: {stderr}");
    }
}

#[test]
fn limits_rejects_bad_values() {
    let cases = [
        (vec!["--global", "0"], "expected a whole number from 1"),
        (
            vec!["--global", "18446744073709551615"],
            "from 1 to 1000000000",
        ),
        (vec!["--key", "a=1000000001"], "from 1 to 1000000000"),
        (vec!["--key", "a"], "expected KEY=N"),
        (vec!["--per-key-default", "x"], "or `none`"),
    ];
    for (args, expected) in cases {
        let output = Command::new(backlog_bin())
            .args(["limits", "redis://127.0.0.1:1/jobs"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn finished_run_releases_its_leases_and_reports_grace() {
    let Some(server) = redis() else { return };
    let url = limiter_url(&server, "rel");
    set_limits(&url, &["--lease", "2s", "--global", "5"]);
    // The name is new, so `backlog limits` reports when grants start.
    let output = limits(&url, &["--json"]);
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    let grace = shown["grace_left_ms"]
        .as_u64()
        .expect("a grace on a new name");
    assert!(grace <= 2000, "{shown}");
    // A long lease from now on: a lease left behind by the run would stay
    // listed for a minute.
    set_limits(&url, &["--lease", "60s"]);
    let open = poll(50, || {
        let output = limits(&url, &["--json"]);
        let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
        shown["grace_left_ms"].is_null().then_some(())
    });
    assert!(
        open.is_some(),
        "the grace of a new name ends after its lease"
    );

    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "1\n2\n3\n4\n5\n6\n").unwrap();
    let output = Command::new(backlog_bin())
        .args(["run", "--max-run", "3", "--limiter", &url])
        .arg(&input)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let held = server.command(&["ZCARD", "dsr:{rel}:h"]);
    assert_eq!(held.trim(), ":0", "leases left after the run: {held:?}");
}

#[test]
fn run_says_why_it_waits_in_grace() {
    let Some(server) = redis() else { return };
    let url = limiter_url(&server, "grace");
    // A new name grants nothing for one lease of 7 s. That is longer than
    // the 5 s after which a run logs why it waits.
    set_limits(&url, &["--lease", "7s", "--global", "1"]);
    let output = Command::new(backlog_bin())
        .args(["run", "--limiter", &url, "-", "--", "true"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(b"1\n")?;
            child.wait_with_output()
        })
        .unwrap();
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "waiting over 5s for a lease on {url}: the name grants nothing for "
        )),
        "{stderr}"
    );
}
