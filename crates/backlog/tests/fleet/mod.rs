//! Helpers for the tests of `--limiter` and `backlog limits`: a private
//! redis-server, backlog processes started against it, and a command that
//! counts how many of its kind run at once across every process.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use test_redis::{Persistence, RedisServer};

pub mod observer;

/// Counts running commands in `$dir/all.count` and per key in
/// `$dir/$key.count`, appending each new count to `all.seen` and
/// `$key.seen`, all under one `flock`. Arguments: the key, the directory,
/// the sleep in seconds.
pub const COUNTING_SCRIPT: &str = r#"
key=$1 dir=$2
(
  flock 9
  n=$(cat "$dir/all.count" 2>/dev/null || echo 0)
  echo $((n + 1)) > "$dir/all.count"
  echo $((n + 1)) >> "$dir/all.seen"
  k=$(cat "$dir/$key.count" 2>/dev/null || echo 0)
  echo $((k + 1)) > "$dir/$key.count"
  echo $((k + 1)) >> "$dir/$key.seen"
) 9> "$dir/lock"
sleep "$3"
(
  flock 9
  n=$(cat "$dir/all.count")
  echo $((n - 1)) > "$dir/all.count"
  k=$(cat "$dir/$key.count")
  echo $((k - 1)) > "$dir/$key.count"
) 9> "$dir/lock"
"#;

/// Starts a private redis-server without persistence, or returns `None`
/// after `test_redis` printed why the test is skipped.
pub fn redis() -> Option<RedisServer> {
    RedisServer::start(Persistence::None)
}

/// Returns the `--limiter` URL of `name` on `server`.
pub fn limiter_url(server: &RedisServer, name: &str) -> String {
    format!("{}/{name}", server.url())
}

/// Returns the path of the built `backlog` binary.
pub fn backlog_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_backlog"))
}

/// Runs `backlog limits URL ARGS...` and returns its output.
pub fn limits(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(backlog_bin())
        .arg("limits")
        .arg(url)
        .args(args)
        .args(["--limiter-timeout", "5s"])
        .env_remove("BACKLOG_REDIS_PASSWORD")
        .output()
        .expect("run backlog limits")
}

/// Sets the limits of `url` with `backlog limits`, and checks that it
/// succeeded. Give `--lease` a short time: a new name grants nothing for
/// one lease after its first change.
pub fn set_limits(url: &str, args: &[&str]) {
    let output = limits(url, args);
    assert!(
        output.status.success(),
        "backlog limits failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes one JSON item per key, `{"key": KEY, "n": N}`, to `path`.
pub fn write_items(path: &Path, keys: &[&str]) {
    let lines: String = keys
        .iter()
        .enumerate()
        .map(|(n, key)| format!("{{\"key\":\"{key}\",\"n\":{n}}}\n"))
        .collect();
    std::fs::write(path, lines).unwrap();
}

/// Starts `backlog run --jsonl --limiter URL EXTRA... INPUT --` with the
/// counting script over `records`, each command sleeping `sleep` seconds,
/// with stdout and stderr piped.
pub fn spawn_counting_run(
    url: &str,
    input: &Path,
    records: &Path,
    sleep: &str,
    extra: &[&str],
) -> Child {
    Command::new(backlog_bin())
        .args([
            "run",
            "--jsonl",
            "--limiter",
            url,
            "--limiter-timeout",
            "10s",
        ])
        .args(extra)
        .arg(input)
        .args(["--", "sh", "-c", COUNTING_SCRIPT, "sh", "{key}"])
        .arg(records)
        .arg(sleep)
        .env_remove("BACKLOG_REDIS_PASSWORD")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start backlog run")
}

/// Returns the counts the commands saw when they started, from
/// `$records/$name.seen`, or none when no command wrote there.
pub fn seen_counts(records: &Path, name: &str) -> Vec<u32> {
    std::fs::read_to_string(records.join(format!("{name}.seen")))
        .unwrap_or_default()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect()
}

/// Returns a loopback port with nothing listening on it, as far as can be
/// known: one the system just handed out and was released.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Polls `check` every 100ms, at most `tries` times, until it returns
/// `Some`.
pub fn poll<T>(tries: u32, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..tries {
        if let Some(found) = check() {
            return Some(found);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}
