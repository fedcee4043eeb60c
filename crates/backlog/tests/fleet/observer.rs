//! Workers for the fault tests of `--limiter`: `backlog run` processes
//! that share a Redis limiter, their process trees, and an observer that
//! every command writes to outside of backlog.
//!
//! Each command appends lines to `records` under `flock`:
//! `EVENT TIME ITEM KEY PID PPID WORKER [STEP]`, where EVENT is `start`,
//! `step`, `end` or `term` (ended by SIGTERM), TIME comes from
//! `date +%s.%N`, PID is the command's shell and PPID the backlog process
//! that started it. The tests add `killed TIME - - - PID -` after they kill
//! a backlog process tree with SIGKILL. Concurrency and timing come from
//! these lines alone, never from the counts of backlog or the limiter.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};
use rustix::process::{kill_process, kill_process_group, Pid, Signal};

/// The maximum sleep of a waiting grant between two tries without a
/// wake-up: `POLL_MAX` of `src/fleet.rs`, which backlog passes to the
/// limiter.
pub const POLL_MAX: Duration = Duration::from_secs(1);

/// The observer run by each item's command. Arguments: the item id, its
/// key, the records folder, the worker's label, the mode, then for `sleep`
/// the seconds to sleep, and for `steps` the number of 0.1 s steps of the
/// item's first attempt and of its later attempts.
///
/// In `sleep` mode a SIGTERM writes a `term` record, so that a command
/// that backlog stops still has an end. In `steps` mode nothing is trapped,
/// so that a stopped command writes nothing more after it is signalled.
const OBSERVER: &str = r#"
id=$1 key=$2 dir=$3 worker=$4 mode=$5
record() {
  t=$(date +%s.%N)
  ( flock 9; echo "$1 $t $id $key $$ $PPID $worker $2" >> "$dir/records" ) 9> "$dir/lock"
}
if [ "$mode" = steps ]; then
  first=$( ( flock 9
    if [ -e "$dir/$id.tried" ]; then echo no; else : > "$dir/$id.tried"; echo yes; fi
  ) 9> "$dir/lock" )
  n=$7
  if [ "$first" = yes ]; then n=$6; fi
  record start
  i=1
  while [ "$i" -le "$n" ]; do
    sleep 0.1
    record step "$i"
    i=$((i + 1))
  done
  record end
else
  trap 'record term; exit 143' TERM
  record start
  sleep "$6"
  record end
fi
"#;

/// Returns the time now in seconds since the Unix epoch, the clock that
/// `date +%s.%N` reads.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Polls `ready` every 20 ms until it returns `Some`, or panics with
/// `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = ready() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        sleep(Duration::from_millis(20));
    }
}

/// The folder shared by the workers of one test: the observer script, its
/// records and each worker's input, journal, results and stderr.
#[derive(Debug)]
pub struct Fleet {
    dir: tempfile::TempDir,
}

impl Fleet {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("observer.sh"), OBSERVER).unwrap();
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the input of worker `label`: one JSON line per `(id, key)`.
    pub fn write_input(&self, label: &str, items: &[(String, String)]) -> PathBuf {
        let lines: String = items
            .iter()
            .map(|(id, key)| format!("{{\"id\":\"{id}\",\"key\":\"{key}\"}}\n"))
            .collect();
        let path = self.path().join(format!("{label}.jsonl"));
        std::fs::write(&path, lines).unwrap();
        path
    }

    pub fn journal(&self, label: &str) -> PathBuf {
        self.path().join(format!("{label}.db"))
    }

    pub fn results(&self, label: &str) -> PathBuf {
        self.path().join(format!("{label}.results.jsonl"))
    }

    /// Reads every observer record so far.
    pub fn records(&self) -> Vec<Record> {
        match std::fs::read_to_string(self.path().join("records")) {
            Ok(text) => text.lines().filter_map(Record::parse).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Appends `killed` records for the backlog process `backlog_pid`,
    /// which closes the intervals of its commands that the kill ended.
    pub fn note_killed(&self, backlog_pid: u32, time: f64) {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("records"))
            .unwrap();
        // One short write with O_APPEND lands whole between the lines that
        // the commands write under flock.
        file.write_all(format!("killed {time:.9} - - - {backlog_pid} -\n").as_bytes())
            .unwrap();
    }
}

/// One line of the observer's records.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub event: String,
    pub time: f64,
    pub id: String,
    pub key: String,
    pub pid: u32,
    /// The backlog process that started the command.
    pub backlog_pid: u32,
    pub worker: String,
    pub step: Option<u32>,
}

impl Record {
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 7 {
            return None;
        }
        Some(Self {
            event: fields[0].to_owned(),
            time: fields[1].parse().ok()?,
            id: fields[2].to_owned(),
            key: fields[3].to_owned(),
            pid: fields[4].parse().unwrap_or(0),
            backlog_pid: fields[5].parse().ok()?,
            worker: fields[6].to_owned(),
            step: fields.get(7).and_then(|step| step.parse().ok()),
        })
    }
}

/// One command's run as the observer saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Interval {
    pub id: String,
    pub key: String,
    pub worker: String,
    pub pid: u32,
    pub start: f64,
    /// The `end` or `term` record, else the `killed` record of its backlog
    /// process, else infinity: a command with no end counts as running.
    pub end: f64,
    /// Whether the command wrote its `end` record.
    pub completed: bool,
}

/// Pairs each command's `start` record with its end.
pub fn intervals(records: &[Record]) -> Vec<Interval> {
    let mut found = Vec::new();
    for start in records.iter().filter(|r| r.event == "start") {
        let own_end = records
            .iter()
            .find(|r| r.pid == start.pid && (r.event == "end" || r.event == "term"));
        let killed = records
            .iter()
            .filter(|r| r.event == "killed" && r.backlog_pid == start.backlog_pid)
            .find(|r| r.time >= start.time);
        let end = match (own_end, killed) {
            (Some(end), _) => end.time,
            (None, Some(kill)) => kill.time,
            (None, None) => f64::INFINITY,
        };
        found.push(Interval {
            id: start.id.clone(),
            key: start.key.clone(),
            worker: start.worker.clone(),
            pid: start.pid,
            start: start.time,
            end,
            completed: own_end.is_some_and(|end| end.event == "end"),
        });
    }
    found
}

/// Returns the maximum number of intervals open at one instant, and that
/// instant. An interval ending when another starts does not overlap it.
pub fn max_overlap<'a>(intervals: impl IntoIterator<Item = &'a Interval>) -> (usize, f64) {
    let mut edges: Vec<(f64, i32)> = Vec::new();
    for interval in intervals {
        edges.push((interval.start, 1));
        edges.push((interval.end, -1));
    }
    // Ends sort before starts at the same time.
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut open, mut max, mut at) = (0i32, 0i32, 0.0);
    for (time, change) in edges {
        open += change;
        if open > max {
            max = open;
            at = time;
        }
    }
    (usize::try_from(max).unwrap(), at)
}

/// The settings of one `backlog run --limiter` worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub label: String,
    /// `redis://127.0.0.1:PORT/NAMESPACE`.
    pub limiter: String,
    pub items: Vec<(String, String)>,
    pub max_run: u32,
    /// Whether the worker keeps a journal (keyed by item id) and a
    /// results file, both named after its label.
    pub journal: bool,
    /// The observer's mode and its arguments.
    pub mode: Vec<String>,
    pub limiter_timeout: &'static str,
}

impl WorkerSpec {
    /// Returns a worker with `--max-run 1`, no journal and a limiter timeout
    /// of 20 s, whose commands run the observer in `mode`.
    fn new(label: &str, limiter: &str, items: Vec<(String, String)>, mode: Vec<String>) -> Self {
        Self {
            label: label.to_owned(),
            limiter: limiter.to_owned(),
            items,
            max_run: 1,
            journal: false,
            mode,
            limiter_timeout: "20s",
        }
    }

    /// Returns a worker whose commands sleep `seconds` each.
    pub fn sleeping(
        label: &str,
        limiter: &str,
        items: Vec<(String, String)>,
        seconds: f64,
    ) -> Self {
        let mode = vec!["sleep".to_owned(), seconds.to_string()];
        Self::new(label, limiter, items, mode)
    }

    /// Returns a worker whose commands write one step record every 0.1 s: `first`
    /// steps on an item's first attempt, `later` steps on its later ones.
    pub fn stepping(
        label: &str,
        limiter: &str,
        items: Vec<(String, String)>,
        first: u32,
        later: u32,
    ) -> Self {
        let mode = vec!["steps".to_owned(), first.to_string(), later.to_string()];
        Self::new(label, limiter, items, mode)
    }
}

/// A running `backlog run --limiter` process.
#[derive(Debug)]
pub struct Worker {
    pub label: String,
    child: Child,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Worker {
    /// Starts the worker. Its commands are
    /// `sh observer.sh {id} {key} RECORDS LABEL MODE...`, limited per key
    /// by the Redis limit of `{key}`. The local `--per-key` limit is set
    /// far above any Redis limit in these tests, so it never binds.
    pub fn start(fleet: &Fleet, spec: &WorkerSpec) -> Self {
        let input = fleet.write_input(&spec.label, &spec.items);
        let stderr = fleet.path().join(format!("{}.stderr", spec.label));
        let stderr_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr)
            .unwrap();
        let mut command = Command::new(super::backlog_bin());
        command
            .current_dir(fleet.path())
            .arg("run")
            .arg("--jsonl")
            .arg(&input)
            .args(["--max-run", &spec.max_run.to_string()])
            .args(["--limiter", &spec.limiter])
            .args(["--limiter-timeout", spec.limiter_timeout])
            .args(["--per-key", "{key}=1000"])
            .args(["--retries", "0"]);
        if spec.journal {
            command
                .arg("--journal")
                .arg(fleet.journal(&spec.label))
                .args(["--key", "{id}"])
                .arg("--results")
                .arg(fleet.results(&spec.label));
        }
        command
            .args(["--", "sh"])
            .arg(fleet.path().join("observer.sh"))
            .args(["{id}", "{key}"])
            .arg(fleet.path())
            .arg(&spec.label)
            .args(&spec.mode)
            .env_remove("BACKLOG_REDIS_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file);
        let child = command.spawn().unwrap();
        Self {
            label: spec.label.clone(),
            child,
            stderr,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns everything the worker wrote to stderr so far, in all its runs.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Lists the process groups of the worker's commands: its children that
    /// lead a group of their own.
    pub fn command_groups(&self) -> Vec<u32> {
        let pid = self.pid();
        processes()
            .into_iter()
            .filter(|process| process.parent == pid && process.group == process.pid)
            .map(|process| process.pid)
            .collect()
    }

    /// Stops the worker with SIGSTOP, so that it starts nothing new and
    /// renews no lease. Its commands keep running.
    pub fn stop_backlog(&self) {
        signal_process(self.pid(), Signal::STOP);
    }

    /// Stops the worker and then its commands' process groups, and returns
    /// those groups.
    pub fn stop_tree(&self) -> Vec<u32> {
        self.stop_backlog();
        let groups = self.command_groups();
        for &group in &groups {
            signal_group(group, Signal::STOP);
        }
        groups
    }

    pub fn continue_backlog(&self) {
        signal_process(self.pid(), Signal::CONT);
    }

    /// Kills the worker and its commands' process groups with SIGKILL, as
    /// a service manager killing the worker's cgroup would, and reaps it.
    /// Returns the time just before the first SIGKILL.
    pub fn kill_tree(&mut self) -> f64 {
        self.stop_backlog();
        let groups = self.command_groups();
        let killed_at = now();
        for &group in &groups {
            signal_group(group, Signal::KILL);
        }
        signal_process(self.pid(), Signal::KILL);
        self.status = Some(self.child.wait().unwrap());
        killed_at
    }

    /// Waits for the worker to exit, or kills it and panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                return status;
            }
            if Instant::now() >= deadline {
                self.kill_tree();
                panic!(
                    "worker {} did not exit within {timeout:?}; stderr:\n{}",
                    self.label,
                    self.stderr()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the worker and asserts that it exited with `code`.
    pub fn assert_exit(&mut self, timeout: Duration, code: i32) {
        let status = self.wait(timeout);
        assert_eq!(
            status.code(),
            Some(code),
            "worker {} exited with {status}; stderr:\n{}",
            self.label,
            self.stderr()
        );
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.status.is_none() && self.child.try_wait().ok().flatten().is_none() {
            // Continue a stopped tree first, so that nothing stays stopped.
            for group in self.command_groups() {
                signal_group(group, Signal::CONT);
            }
            self.kill_tree();
        }
    }
}

/// Sends `signal` to the process `pid`. A process that already exited is
/// fine.
pub fn signal_process(pid: u32, signal: Signal) {
    if let Some(pid) = Pid::from_raw(i32::try_from(pid).unwrap()) {
        let _ = kill_process(pid, signal);
    }
}

/// Sends `signal` to the process group `group`. A group that already
/// ended is fine.
pub fn signal_group(group: u32, signal: Signal) {
    let group = i32::try_from(group).unwrap();
    // Group 1 would reach every process the test may signal.
    assert!(group > 1, "process group {group}");
    if let Some(pid) = Pid::from_raw(group) {
        let _ = kill_process_group(pid, signal);
    }
}

/// One entry of `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct Process {
    pub pid: u32,
    pub parent: u32,
    pub group: u32,
    /// The state letter: `R`, `S`, `T` (stopped), `Z` (zombie), ...
    pub state: char,
}

/// Lists the processes in `/proc`.
pub fn processes() -> Vec<Process> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(process) = process(pid) {
            found.push(process);
        }
    }
    found
}

/// Reads one process's state, parent and group, or `None` once it is gone.
pub fn process(pid: u32) -> Option<Process> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces, so the
    // fields are read after its closing one: state, parent, group.
    let (_, fields) = stat.rsplit_once(')')?;
    let mut fields = fields.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    let group = fields.next()?.parse().ok()?;
    Some(Process {
        pid,
        parent,
        group,
        state,
    })
}

/// Returns whether the process `pid` has exited (it is gone, or a zombie).
pub fn has_exited(pid: u32) -> bool {
    process(pid).is_none_or(|process| process.state == 'Z')
}

/// Returns every `fence` value in the output of `backlog limits URL --json`:
/// the fences of the leases held now.
pub fn held_fences(url: &str) -> Vec<u64> {
    let output = super::limits(url, &["--json"]);
    assert!(
        output.status.success(),
        "backlog limits --json failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut fences = Vec::new();
    collect_fences(&value, &mut fences);
    fences
}

fn collect_fences(value: &serde_json::Value, fences: &mut Vec<u64>) {
    match value {
        serde_json::Value::Object(map) => {
            for (name, field) in map {
                match field.as_u64() {
                    Some(fence) if name == "fence" => fences.push(fence),
                    _ => collect_fences(field, fences),
                }
            }
        }
        serde_json::Value::Array(values) => {
            for field in values {
                collect_fences(field, fences);
            }
        }
        _ => {}
    }
}

/// One row of a journal's `items` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalItem {
    pub state: String,
    pub attempts: u32,
    /// The fence of the item's last attempt, when the journal stores one.
    pub fence: Option<i64>,
}

/// Reads a journal's items by key.
pub fn journal_items(path: &Path) -> BTreeMap<String, JournalItem> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut statement = conn
        .prepare("SELECT key, state, attempts, fence FROM items")
        .unwrap();
    let rows = statement
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                JournalItem {
                    state: row.get(1)?,
                    attempts: row.get(2)?,
                    fence: row.get(3)?,
                },
            ))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// Counts the `done` lines of each item id in a results file.
pub fn done_in_results(path: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return counts;
    };
    for line in text.lines().filter(|line| !line.is_empty()) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        if record["outcome"] == "done" {
            let id = record["item"]["id"].as_str().unwrap().to_owned();
            *counts.entry(id).or_default() += 1;
        }
    }
    counts
}

/// Returns `count` items `PREFIX-NN`, each with the key that `key_of`
/// returns for its number.
pub fn items(
    prefix: &str,
    count: usize,
    key_of: impl Fn(usize) -> String,
) -> Vec<(String, String)> {
    (0..count)
        .map(|n| (format!("{prefix}-{n:02}"), key_of(n)))
        .collect()
}
