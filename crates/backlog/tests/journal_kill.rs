//! Kills `backlog run --journal` with SIGKILL again and again in the middle
//! of a backlog and reruns it each time. The commands append their item to
//! a ledger file, which shows that no item is lost and that each kill made
//! at most `--max-run` items run twice.

mod random;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};
use tempfile::TempDir;

use random::Random;

const ITEMS: usize = 200;
const MAX_RUN: usize = 4;
const KILLS: usize = 20;

/// The maximum time a run may take to reach its kill point or its end.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

fn start_run(dir: &Path) -> Child {
    Command::new(assert_cmd::cargo::cargo_bin!("backlog"))
        .current_dir(dir)
        .args(["run", "in.txt", "--max-run", &MAX_RUN.to_string()])
        .args(["--journal", "journal.db", "--results", "results.jsonl"])
        .args([
            "--",
            "sh",
            "-c",
            "sleep 0.02; echo \"$1\" >> ledger",
            "sh",
            "{}",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Returns the pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The fields after the command name, which is in parentheses and
        // may contain spaces: state, then the parent's pid.
        let Some((_, fields)) = stat.rsplit_once(')') else {
            continue;
        };
        if fields.split_whitespace().nth(1) == Some(&parent.to_string()) {
            children.push(pid);
        }
    }
    children
}

fn send(signal: &str, pid: u32) {
    // A process may exit between the listing and the signal, so a failed
    // kill is fine here.
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Sends SIGKILL to the run and every process it started, as a service
/// manager stopping the run's cgroup would, and reaps the run. The run is
/// stopped first, so that it starts nothing while its tree is listed.
fn kill_group(child: &mut Child) {
    let root = child.id();
    send("STOP", root);
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        let children = children_of(tree[next]);
        tree.extend(children);
        next += 1;
    }
    for &pid in tree.iter().rev() {
        send("KILL", pid);
    }
    child.wait().unwrap();
}

fn ledger(dir: &Path) -> Vec<String> {
    match std::fs::read_to_string(dir.join("ledger")) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

/// Returns the item text and state of every item in the journal.
fn journal_states(dir: &Path) -> BTreeMap<String, String> {
    let path = dir.join("journal.db");
    if !path.exists() {
        return BTreeMap::new();
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let tables: u32 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'items'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    if tables == 0 {
        return BTreeMap::new();
    }
    let mut statement = conn.prepare("SELECT item, state FROM items").unwrap();
    let rows = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

#[test]
fn kill_and_rerun_loses_and_repeats_nothing() {
    let started = Instant::now();
    let dir = TempDir::new().unwrap();
    let items: Vec<String> = (0..ITEMS).map(|n| format!("item-{n:03}")).collect();
    std::fs::write(dir.path().join("in.txt"), items.join("\n") + "\n").unwrap();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill points seed: {seed}");
    let mut random = Random(seed);

    // The ledger length after each kill: run k appended lines
    // boundaries[k]..boundaries[k + 1].
    let mut boundaries = vec![0];
    let mut kills_that_hit = 0;
    for _ in 0..KILLS {
        let before = ledger(dir.path()).len();
        // Kill once the ledger has grown by a random number of lines, so
        // that every kill lands in the middle of the backlog, then after a
        // random part of an item's time. Zero kills during start-up.
        let grow_by = random.below(10) as usize;
        let mut child = start_run(dir.path());
        let deadline = Instant::now() + RUN_TIMEOUT;
        while ledger(dir.path()).len() < before + grow_by {
            assert!(Instant::now() < deadline, "the run made no progress");
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before its kill point"
            );
            sleep(Duration::from_millis(2));
        }
        sleep(Duration::from_millis(random.below(30)));
        if child.try_wait().unwrap().is_none() {
            kills_that_hit += 1;
        }
        kill_group(&mut child);

        let lines = ledger(dir.path());
        boundaries.push(lines.len());
        // A journal never records as done an item whose command did not
        // finish, and finished commands have written their ledger line.
        let in_ledger: BTreeSet<&String> = lines.iter().collect();
        for (item, state) in journal_states(dir.path()) {
            if state == "done" {
                assert!(in_ledger.contains(&item), "{item} is done but never ran");
            }
        }
    }

    let output = Command::new(assert_cmd::cargo::cargo_bin!("backlog"))
        .current_dir(dir.path())
        .args(["run", "in.txt", "--max-run", &MAX_RUN.to_string()])
        .args(["--journal", "journal.db", "--results", "results.jsonl"])
        .args([
            "--",
            "sh",
            "-c",
            "sleep 0.02; echo \"$1\" >> ledger",
            "sh",
            "{}",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(" done earlier"), "{stderr}");
    let lines = ledger(dir.path());
    boundaries.push(lines.len());

    // Every item is done, once, in the journal.
    let states = journal_states(dir.path());
    assert_eq!(states.len(), ITEMS);
    assert!(states.values().all(|state| state == "done"), "{states:?}");
    let journaled: Vec<&String> = states.keys().collect();
    let mut expected: Vec<&String> = items.iter().collect();
    expected.sort();
    assert_eq!(journaled, expected);

    // No item is lost: every one ran at least once.
    let mut runs_of: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (run, range) in boundaries.windows(2).enumerate() {
        for line in &lines[range[0]..range[1]] {
            runs_of.entry(line.as_str()).or_default().push(run);
        }
    }
    let ran: Vec<&str> = runs_of.keys().copied().collect();
    let expected: Vec<&str> = expected.iter().map(|item| item.as_str()).collect();
    assert_eq!(ran, expected, "some items never ran");

    // One run never runs an item twice, and each kill made at most
    // --max-run items run again: the commands running when it struck.
    for (item, runs) in &runs_of {
        let distinct: BTreeSet<&usize> = runs.iter().collect();
        assert_eq!(distinct.len(), runs.len(), "{item} ran twice in one run");
    }
    for kill in 0..KILLS {
        let repeated: Vec<&&str> = runs_of
            .iter()
            .filter(|(_, runs)| runs.contains(&kill) && runs.iter().any(|&run| run > kill))
            .map(|(item, _)| item)
            .collect();
        assert!(
            repeated.len() <= MAX_RUN,
            "kill {kill} made {} items run twice: {repeated:?}",
            repeated.len()
        );
    }
    assert!(
        kills_that_hit >= KILLS / 2,
        "only {kills_that_hit} of {KILLS} kills hit a running backlog"
    );
    let total_repeats = lines.len() - ITEMS;
    eprintln!(
        "{KILLS} kills ({kills_that_hit} hit a live run), {total_repeats} items ran twice, {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
