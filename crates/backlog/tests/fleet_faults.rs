//! Faults of `backlog run --limiter`: several backlog processes share limits
//! through a real redis-server while the tests kill and stop the workers,
//! their commands and Redis itself.
//!
//! Every command records its start, steps and end with timestamps in files
//! outside backlog (see `fleet/mod.rs`), so the limits and the timing are
//! checked against what the commands did, never against the counts of
//! backlog or the limiter. Each test is skipped, with a printed reason, when
//! redis-server is not installed.
//!
//! All tests use a lease of 2 s. A namespace grants nothing for one lease
//! after it is created or after Redis lost its data.

mod fleet;
mod random;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::sleep;
use std::time::Duration;

use fleet::observer::{
    done_in_results, has_exited, held_fences, intervals, items, journal_items, max_overlap, now,
    signal_group, wait_for, Fleet, Interval, Record, Worker, WorkerSpec, POLL_MAX,
};
use fleet::{limiter_url, limits, set_limits};
use random::Random;
use rustix::process::Signal;
use test_redis::{Persistence, RedisServer};

/// The lease of every namespace in these tests.
const LEASE: Duration = Duration::from_secs(2);

/// The slack allowed on top of lease expiry and polling before a waiting
/// worker starts its command: a fork of backlog's command, the shell, and
/// `date`, on a busy 2-core machine.
const START_MARGIN: Duration = Duration::from_millis(1500);

/// The maximum time any one worker may take to exit.
const WORKER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serializes the tests of this file: their time bounds assume that no
/// other fleet of workers competes for the CPU.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the lock of `SERIAL`, which a failed test leaves poisoned.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts a private redis-server, or returns `None` when the test must be
/// skipped (the reason is printed by `RedisServer::start`).
fn redis(persistence: Persistence) -> Option<RedisServer> {
    RedisServer::start(persistence)
}

/// Creates the namespace `name` with `args` and a 2 s lease, and returns
/// its limiter URL.
fn namespace(server: &RedisServer, name: &str, args: &[&str]) -> String {
    let url = limiter_url(server, name);
    let mut all = args.to_vec();
    all.extend(["--lease", "2s"]);
    set_limits(&url, &all);
    url
}

/// Creates the namespace `name` with a global limit of 3, a limit of 1 on
/// the key `hot` and none on other keys, and returns its limiter URL.
fn hot_namespace(server: &RedisServer, name: &str) -> String {
    let args = [
        "--global",
        "3",
        "--per-key-default",
        "none",
        "--key",
        "hot=1",
    ];
    namespace(server, name, &args)
}

/// Returns 8 items of worker `label`: every `every`-th one, from the
/// first, of the key `hot`, and each other one of a key of its own.
fn items_with_hot(label: &str, every: usize) -> Vec<(String, String)> {
    items(label, 8, |n| {
        if n % every == 0 {
            "hot".to_owned()
        } else {
            format!("{label}{n}")
        }
    })
}

fn starts_of<'a>(records: &'a [Record], worker: &str) -> Vec<&'a Record> {
    records
        .iter()
        .filter(|r| r.event == "start" && r.worker == worker)
        .collect()
}

fn first_start(fleet: &Fleet, worker: &str) -> Option<Record> {
    fleet
        .records()
        .into_iter()
        .find(|r| r.event == "start" && r.worker == worker)
}

/// Returns the records written by the command with process id `pid`.
fn written_by(fleet: &Fleet, pid: u32) -> Vec<Record> {
    fleet
        .records()
        .into_iter()
        .filter(|r| r.pid == pid)
        .collect()
}

/// Checks that every item of `ids` has a completed command in the
/// observer's records.
fn assert_each_completed(records: &[Record], ids: &[(String, String)]) {
    let completed: BTreeSet<String> = intervals(records)
        .into_iter()
        .filter(|interval| interval.completed)
        .map(|interval| interval.id)
        .collect();
    for (id, _) in ids {
        assert!(completed.contains(id), "no command of {id} completed");
    }
}

/// Checks that the journal of worker `label` records every item of `ids`
/// as done, and that its results file records each of them done once over
/// all its runs. With `killed`, an item may be missing from the results
/// file, because a SIGKILL can land between the journal's commit and the
/// results line.
fn assert_done_once(fleet: &Fleet, label: &str, ids: &[(String, String)], killed: bool) {
    let journal = journal_items(&fleet.journal(label));
    assert_eq!(journal.len(), ids.len(), "{label}: {journal:?}");
    for (id, _) in ids {
        let item = &journal[id];
        assert_eq!(item.state, "done", "{label}: {id} is {item:?}");
    }
    let done = done_in_results(&fleet.results(label));
    for (id, _) in ids {
        let count = done.get(id).copied().unwrap_or(0);
        assert!(count <= 1, "{label}: {id} recorded done {count} times");
        if !killed {
            assert_eq!(count, 1, "{label}: {id} recorded done {count} times");
        }
    }
}

/// Waits for the first command of worker B, and checks that it started
/// after `since`, the time of `event`, and within lease + poll + margin of
/// it.
fn assert_b_starts_after_lease(fleet: &Fleet, since: f64, event: &str) {
    let allowed = LEASE + POLL_MAX + START_MARGIN;
    let started = wait_for(allowed + Duration::from_secs(10), "B's command", || {
        first_start(fleet, "B")
    });
    let gap = started.time - since;
    eprintln!("B started {gap:.3} s after {event} (lease {LEASE:?})");
    assert!(gap > 0.0, "B started {gap:.3} s before {event}");
    assert!(
        gap <= allowed.as_secs_f64(),
        "B started {gap:.3} s after {event}, over lease + poll + margin {allowed:?}"
    );
}

/// Worker A with a journal and one item, whose first command holds the
/// only permit of the namespace.
struct Holder {
    worker: Worker,
    items: Vec<(String, String)>,
    /// The start record of the first command.
    command: Record,
    /// The fence of the first command's grant.
    fence: u64,
}

/// Starts [`Holder`] A on `url`, whose command writes `first` steps on its
/// first attempt and `later` steps on a retry, and waits for the command to
/// start.
fn start_holder(fleet: &Fleet, url: &str, first: u32, later: u32) -> Holder {
    let items = items("a", 1, |_| "k".to_owned());
    let mut spec = WorkerSpec::stepping("A", url, items.clone(), first, later);
    spec.journal = true;
    let worker = Worker::start(fleet, &spec);
    let command = wait_for(Duration::from_secs(15), "A's command to start", || {
        first_start(fleet, "A")
    });
    let fences = held_fences(url);
    assert_eq!(fences.len(), 1, "holders: {fences:?}");
    Holder {
        worker,
        items,
        command,
        fence: fences[0],
    }
}

/// Checks that A ran its item a second time after `continued_at`, under a
/// fence above that of the lost first grant, and recorded it done once.
fn assert_rerun_with_new_fence(fleet: &Fleet, holder: &Holder, continued_at: f64) {
    let records = fleet.records();
    let a_starts = starts_of(&records, "A");
    assert_eq!(a_starts.len(), 2, "A's starts: {a_starts:?}");
    assert!(a_starts[1].time > continued_at, "{a_starts:?}");
    assert_each_completed(&records, &holder.items);
    assert_done_once(fleet, "A", &holder.items, false);
    let journal = journal_items(&fleet.journal("A"));
    let fence = journal["a-00"].fence.expect("the journal stores the fence");
    let stale_fence = holder.fence;
    assert!(
        fence > i64::try_from(stale_fence).unwrap(),
        "done with fence {fence}, not above the stale fence {stale_fence}"
    );
}

#[test]
fn limits_hold_across_processes() {
    let _serial = serial();
    let Some(server) = redis(Persistence::None) else {
        return;
    };
    let url = hot_namespace(&server, "spread");
    let fleet = Fleet::new();
    let labels = ["A", "B", "C"];
    let mut all_items = Vec::new();
    let mut workers = Vec::new();
    for label in labels {
        // Every third item of every worker is of the key `hot`.
        let own = items_with_hot(label, 3);
        let mut spec = WorkerSpec::sleeping(label, &url, own.clone(), 0.4);
        spec.max_run = 3;
        workers.push(Worker::start(&fleet, &spec));
        all_items.extend(own);
    }
    for worker in &mut workers {
        worker.assert_exit(WORKER_TIMEOUT, 0);
    }

    let records = fleet.records();
    let runs = intervals(&records);
    assert_eq!(
        runs.len(),
        all_items.len(),
        "a command ran twice: {runs:#?}"
    );
    assert_each_completed(&records, &all_items);
    let (max, at) = max_overlap(&runs);
    assert!(
        max <= 3,
        "{max} commands at once at {at:.3} over the global 3"
    );
    // With 24 items and 9 local slots the global limit is reached, so a
    // maximum below 3 means that the workers did not run at once.
    assert_eq!(max, 3, "the three workers never ran 3 commands at once");
    let (hot, at) = max_overlap(runs.iter().filter(|run| run.key == "hot"));
    assert_eq!(hot, 1, "{hot} commands of `hot` at once at {at:.3}");
    for label in labels {
        assert!(
            runs.iter()
                .any(|run| run.worker == label && run.key == "hot"),
            "worker {label} ran no `hot` item"
        );
    }
}

#[test]
fn sigkill_of_holder_frees_permit_after_lease() {
    let _serial = serial();
    let Some(server) = redis(Persistence::None) else {
        return;
    };
    let url = namespace(&server, "holder", &["--global", "1"]);
    let fleet = Fleet::new();
    // A's command runs 20 s unless killed, and B's runs 0.5 s.
    let a_items = items("a", 1, |_| "k".to_owned());
    let b_items = items("b", 1, |_| "k".to_owned());
    let mut a = Worker::start(&fleet, &WorkerSpec::stepping("A", &url, a_items, 200, 200));
    let held = wait_for(Duration::from_secs(15), "A's command to start", || {
        first_start(&fleet, "A")
    });
    let mut b = Worker::start(&fleet, &WorkerSpec::stepping("B", &url, b_items, 5, 5));
    wait_for(Duration::from_secs(5), "A's command to step", || {
        written_by(&fleet, held.pid)
            .iter()
            .any(|r| r.event == "step")
            .then_some(())
    });
    sleep(Duration::from_millis(500));
    assert_eq!(
        first_start(&fleet, "B"),
        None,
        "B ran while A held the permit"
    );

    let killed_at = a.kill_tree();
    fleet.note_killed(a.pid(), killed_at);
    assert_b_starts_after_lease(&fleet, killed_at, "the SIGKILL of A");
    b.assert_exit(WORKER_TIMEOUT, 0);

    // The killed command wrote nothing after the kill and is gone.
    let late: Vec<Record> = written_by(&fleet, held.pid)
        .into_iter()
        .filter(|r| r.time > killed_at)
        .collect();
    assert!(
        late.is_empty(),
        "A's command wrote after the kill: {late:?}"
    );
    assert!(has_exited(held.pid), "A's command {} still runs", held.pid);
}

#[test]
fn sigstop_of_holder_loses_lease() {
    let _serial = serial();
    let Some(server) = redis(Persistence::None) else {
        return;
    };
    let url = namespace(&server, "stopped", &["--global", "1"]);
    let fleet = Fleet::new();
    // A's first attempt runs 20 s, while its retry and B run a few steps.
    let mut holder = start_holder(&fleet, &url, 200, 3);
    let stale_pid = holder.command.pid;
    let b_items = items("b", 1, |_| "k".to_owned());
    let mut b = Worker::start(&fleet, &WorkerSpec::stepping("B", &url, b_items, 10, 10));
    wait_for(Duration::from_secs(5), "A's command to step twice", || {
        (written_by(&fleet, stale_pid)
            .iter()
            .filter(|r| r.event == "step")
            .count()
            >= 2)
            .then_some(())
    });
    assert_eq!(
        first_start(&fleet, "B"),
        None,
        "B ran while A held the permit"
    );

    let groups = holder.worker.stop_tree();
    let stopped_at = now();
    assert_eq!(groups, vec![stale_pid], "A's command groups");
    assert_b_starts_after_lease(&fleet, stopped_at, "the SIGSTOP of A");

    // Keep A stopped for 2.5 leases in all, then continue backlog first and
    // its command a second later.
    let resume_at = stopped_at + 2.5 * LEASE.as_secs_f64();
    sleep(Duration::from_secs_f64((resume_at - now()).max(0.0)));
    let written_before = written_by(&fleet, stale_pid).len();
    let continued_at = now();
    holder.worker.continue_backlog();
    sleep(Duration::from_secs(1));
    for &group in &groups {
        signal_group(group, Signal::CONT);
    }
    wait_for(Duration::from_secs(10), "A's stale command to exit", || {
        has_exited(stale_pid).then_some(())
    });
    let written_after = written_by(&fleet, stale_pid);
    assert_eq!(
        written_after.len(),
        written_before,
        "A's stale command went on after the lease was lost: {:?}",
        &written_after[written_before..]
    );

    holder.worker.assert_exit(WORKER_TIMEOUT, 0);
    b.assert_exit(WORKER_TIMEOUT, 0);
    let stderr = holder.worker.stderr();
    assert!(
        stderr.to_lowercase().contains("lease lost"),
        "A did not log the lost lease:\n{stderr}"
    );
    // A ran the item again under a new grant, after it went on. The stale
    // command, still stopped, got SIGKILL 100 ms after its SIGTERM.
    assert_rerun_with_new_fence(&fleet, &holder, continued_at);
}

#[test]
fn stopped_backlog_cannot_commit_stale_attempt() {
    let _serial = serial();
    let Some(server) = redis(Persistence::None) else {
        return;
    };
    let url = namespace(&server, "stale", &["--global", "1"]);
    let fleet = Fleet::new();
    // A's first attempt ends by itself while backlog A is stopped.
    let mut holder = start_holder(&fleet, &url, 6, 3);
    let stale_pid = holder.command.pid;
    let b_items = items("b", 1, |_| "k".to_owned());
    let mut b = Worker::start(&fleet, &WorkerSpec::stepping("B", &url, b_items, 5, 5));

    holder.worker.stop_backlog();
    let stopped_at = now();
    wait_for(Duration::from_secs(5), "A's command to end", || {
        written_by(&fleet, stale_pid)
            .iter()
            .any(|r| r.event == "end")
            .then_some(())
    });
    assert_b_starts_after_lease(&fleet, stopped_at, "the SIGSTOP of backlog A");

    let resume_at = stopped_at + 2.5 * LEASE.as_secs_f64();
    sleep(Duration::from_secs_f64((resume_at - now()).max(0.0)));
    let continued_at = now();
    holder.worker.continue_backlog();
    holder.worker.assert_exit(WORKER_TIMEOUT, 0);
    b.assert_exit(WORKER_TIMEOUT, 0);

    let stderr = holder.worker.stderr();
    let lowered = stderr.to_lowercase();
    assert!(
        lowered.contains("lease lost") || lowered.contains("commit rejected: fence"),
        "A committed the attempt of a lost lease:\n{stderr}"
    );
    assert_rerun_with_new_fence(&fleet, &holder, continued_at);
}

/// Runs two workers with journals under a global limit of 3 and a limit of
/// 1 on the key `hot` of every other item. Kills Redis with SIGKILL once a
/// few commands have ended, restarts it after 1 s, and checks the runs, the
/// journals and both limits. Without persistence it also checks that
/// nothing starts for one lease after the restart, and that the limits
/// come back from the workers' cached copies.
fn redis_restart_mid_run(persistence: Persistence) {
    let _serial = serial();
    let Some(mut server) = redis(persistence) else {
        return;
    };
    let url = hot_namespace(&server, "restart");
    let fleet = Fleet::new();
    let labels = ["A", "B"];
    let mut all_items = Vec::new();
    let mut workers = Vec::new();
    for label in labels {
        let own = items_with_hot(label, 2);
        let mut spec = WorkerSpec::sleeping(label, &url, own.clone(), 0.5);
        spec.max_run = 2;
        spec.journal = true;
        workers.push(Worker::start(&fleet, &spec));
        all_items.push(own);
    }
    wait_for(Duration::from_secs(20), "3 commands to end", || {
        let ended = fleet.records().iter().filter(|r| r.event == "end").count();
        (ended >= 3).then_some(())
    });
    server.kill();
    let killed_at = now();
    sleep(Duration::from_secs(1));
    server.restart();
    let ready_at = now();
    for worker in &mut workers {
        worker.assert_exit(WORKER_TIMEOUT, 0);
    }

    let records = fleet.records();
    for (label, own) in labels.iter().zip(&all_items) {
        assert_done_once(&fleet, label, own, false);
        assert_each_completed(&records, own);
    }
    let runs = intervals(&records);
    let (max, at) = max_overlap(&runs);
    assert!(
        max <= 3,
        "{max} commands at once at {at:.3} over the global 3"
    );
    let (hot, at) = max_overlap(runs.iter().filter(|run| run.key == "hot"));
    assert!(hot <= 1, "{hot} commands of `hot` at once at {at:.3}");
    // Nothing is granted while Redis is down. A grant made just before the
    // kill gets 0.5 s to fork its command and write the start record.
    let during_outage: Vec<&Interval> = runs
        .iter()
        .filter(|run| run.start > killed_at + 0.5 && run.start < ready_at)
        .collect();
    assert!(
        during_outage.is_empty(),
        "commands started while Redis was down: {during_outage:?}"
    );
    let after_restart: Vec<f64> = runs
        .iter()
        .map(|run| run.start - ready_at)
        .filter(|&offset| offset >= 0.0)
        .collect();
    let first = after_restart.iter().copied().fold(f64::INFINITY, f64::min);
    eprintln!(
        "{persistence:?}: Redis down {:.3} s, first start {first:.3} s after it answered again",
        ready_at - killed_at
    );
    assert_fences_ordered(&fleet, &labels, &runs, killed_at, ready_at);
    // The limits survive: in the append-only file, or written back from
    // the workers' cached copies when Redis comes back empty.
    let shown = limits(&url, &["--json"]);
    assert!(shown.status.success(), "{shown:?}");
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["global"], 3, "{shown}");
    assert_eq!(shown["per_key"]["hot"], 1, "{shown}");
    assert_eq!(shown["lease_ms"], 2000, "{shown}");
    if persistence == Persistence::None {
        // Every start after the restart comes from a grant made after it,
        // because the outage lasted 1 s, longer than a fork and `date`
        // take. Such grants must wait out the grace of one lease.
        assert!(
            first >= LEASE.as_secs_f64(),
            "a command started {first:.3} s after Redis came back empty, within the lease {LEASE:?}"
        );
    }
}

/// Returns the fence that the journals of `labels` store with each item,
/// checking that every item has one and that no two items share one: each
/// grant is for one attempt of one item.
fn distinct_fences(fleet: &Fleet, labels: &[&str]) -> BTreeMap<String, i64> {
    let mut fences = BTreeMap::new();
    for label in labels {
        for (id, item) in journal_items(&fleet.journal(label)) {
            let fence = item
                .fence
                .unwrap_or_else(|| panic!("{label}: {id} has no fence"));
            fences.insert(id, fence);
        }
    }
    let distinct: BTreeSet<i64> = fences.values().copied().collect();
    assert_eq!(distinct.len(), fences.len(), "shared fences: {fences:?}");
    fences
}

/// Checks that every item whose completed command started after the
/// restart (`ready_at`) has a fence above that of every item completed
/// before Redis was killed: fences must keep growing when Redis loses its
/// data.
fn assert_fences_ordered(
    fleet: &Fleet,
    labels: &[&str],
    runs: &[Interval],
    killed_at: f64,
    ready_at: f64,
) {
    let fences = distinct_fences(fleet, labels);
    let completed = runs.iter().filter(|run| run.completed);
    let before: Vec<i64> = completed
        .clone()
        .filter(|run| run.end < killed_at)
        .map(|run| fences[&run.id])
        .collect();
    let after: Vec<i64> = completed
        .filter(|run| run.start > ready_at)
        .map(|run| fences[&run.id])
        .collect();
    assert!(!before.is_empty(), "no item completed before the kill");
    assert!(!after.is_empty(), "no item started after the restart");
    let (max_before, min_after) = (before.iter().max(), after.iter().min());
    assert!(
        min_after > max_before,
        "fence {min_after:?} granted after the restart is not above {max_before:?} from before"
    );
}

#[test]
fn redis_restart_with_append_only_file() {
    redis_restart_mid_run(Persistence::AppendAlways);
}

#[test]
fn redis_restart_without_persistence() {
    redis_restart_mid_run(Persistence::None);
}

#[test]
fn sigkill_and_rerun_with_journals() {
    const KILLS: usize = 3;
    let _serial = serial();
    let Some(server) = redis(Persistence::None) else {
        return;
    };
    let url = namespace(&server, "journals", &["--global", "2"]);
    let fleet = Fleet::new();
    let seed = (now() * 1e9) as u64 | 1;
    eprintln!("kill points seed: {seed}");
    let mut random = Random(seed);

    let a_items = items("A", 10, |n| format!("A{n}"));
    let b_items = items("B", 10, |n| format!("B{n}"));
    let mut a_spec = WorkerSpec::sleeping("A", &url, a_items.clone(), 0.3);
    a_spec.max_run = 2;
    a_spec.journal = true;
    let mut b_spec = WorkerSpec::sleeping("B", &url, b_items.clone(), 0.3);
    b_spec.max_run = 2;
    b_spec.journal = true;
    let mut b = Worker::start(&fleet, &b_spec);

    for kill in 0..KILLS {
        let mut a = Worker::start(&fleet, &a_spec);
        // Kill once this run of A has started 1 to 3 commands, after a
        // random part of a command's time.
        let grow_by = 1 + random.below(3) as usize;
        wait_for(Duration::from_secs(20), "A to start commands", || {
            let records = fleet.records();
            let started = records
                .iter()
                .filter(|r| r.event == "start" && r.backlog_pid == a.pid())
                .count();
            (started >= grow_by).then_some(())
        });
        sleep(Duration::from_millis(random.below(300)));
        let killed_at = a.kill_tree();
        fleet.note_killed(a.pid(), killed_at);
        eprintln!("kill {kill}: A {} after {grow_by} starts", a.pid());
    }
    let mut a = Worker::start(&fleet, &a_spec);
    a.assert_exit(WORKER_TIMEOUT, 0);
    b.assert_exit(WORKER_TIMEOUT, 0);

    let records = fleet.records();
    assert_done_once(&fleet, "A", &a_items, true);
    assert_done_once(&fleet, "B", &b_items, false);
    assert_each_completed(&records, &a_items);
    assert_each_completed(&records, &b_items);
    let runs = intervals(&records);
    let (max, at) = max_overlap(&runs);
    assert!(
        max <= 2,
        "{max} commands at once at {at:.3} over the global 2"
    );
    distinct_fences(&fleet, &["A", "B"]);
}

#[test]
fn redis_down_past_timeout_exits_2() {
    let _serial = serial();
    let Some(mut server) = redis(Persistence::None) else {
        return;
    };
    let url = namespace(&server, "outage", &["--global", "2"]);
    let fleet = Fleet::new();
    // Each command would run 2 leases, so the ones running when Redis dies
    // outlive their leases unless backlog stops them.
    let own = items("A", 6, |n| format!("A{n}"));
    let mut spec = WorkerSpec::sleeping("A", &url, own, 2.0 * LEASE.as_secs_f64());
    spec.max_run = 2;
    spec.limiter_timeout = "2s";
    let mut worker = Worker::start(&fleet, &spec);
    wait_for(Duration::from_secs(15), "2 commands to start", || {
        let started = fleet
            .records()
            .iter()
            .filter(|r| r.event == "start")
            .count();
        (started >= 2).then_some(())
    });
    server.kill();
    let killed_at = now();

    // --limiter-timeout 2s, the lease of the running commands and their
    // --kill-after of 5 s bound the time to give up.
    worker.assert_exit(Duration::from_secs(15), 2);
    let exited_after = now() - killed_at;
    let stderr = worker.stderr();
    assert!(stderr.contains("could not be reached"), "{stderr}");

    let records = fleet.records();
    let late: Vec<&Record> = records
        .iter()
        .filter(|r| r.event == "start" && r.time > killed_at + 0.5)
        .collect();
    assert!(
        late.is_empty(),
        "commands started after Redis died: {late:?}"
    );
    for record in &records {
        assert!(
            has_exited(record.pid),
            "command {} of {} outlived its worker",
            record.pid,
            record.id
        );
    }
    // A lease that cannot be renewed runs out, and its command is stopped
    // by then: within one lease of the kill, plus START_MARGIN for the
    // signal and the `term` record.
    let runs = intervals(&records);
    assert_eq!(runs.len(), 2, "{runs:?}");
    for run in &runs {
        assert!(!run.completed, "{} ran to its end without a lease", run.id);
        let stopped_after = run.end - killed_at;
        eprintln!("{} stopped {stopped_after:.3} s after Redis died", run.id);
        assert!(
            stopped_after <= (LEASE + START_MARGIN).as_secs_f64(),
            "{} ran {stopped_after:.3} s after Redis died, past its lease {LEASE:?}",
            run.id
        );
    }
    eprintln!("the worker exited {exited_after:.3} s after Redis died");
}
