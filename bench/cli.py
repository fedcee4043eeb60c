#!/usr/bin/env python3
"""Time the `backlog` command against xargs, GNU parallel and rust-parallel.

C1: 10,000 items, each running `true`, at most 8 at once, the same input
for every tool. C2: the same backlog with `--journal`, killed with SIGKILL
once about half of the items are done, then run again to the end; the two
runs together are compared with one uninterrupted run with the journal.

Each case runs as its own process, `--runs` times (3 by default), in turn
with the others, and the tables give the median with the minimum and the
maximum. Tools that are not installed are left out with a note.

Usage: python3 bench/cli.py [--items N] [--runs N] [--backlog PATH]
"""

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

MAX_RUN = 8


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--backlog",
        default=os.path.join("target", "release", "backlog"),
        help="the backlog binary (build it with cargo build --release -p backlog)",
    )
    return parser.parse_args()


def timed(argv, stdin_path=None):
    """Runs argv to the end and returns its wall time in seconds."""
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    started = time.perf_counter()
    try:
        subprocess.run(
            argv,
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
    finally:
        if stdin_path:
            stdin.close()
    return time.perf_counter() - started


def done_count(journal):
    """Returns the number of items marked done, or 0 before the table exists."""
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM items WHERE state = 'done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def killed_and_resumed(backlog, items_path, items, workdir):
    """Runs with a journal, kills the run at about half, then reruns it.

    Returns the wall time of both runs together and the number of items done
    when the kill landed.
    """
    journal = os.path.join(workdir, "c2.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(journal + suffix):
            os.remove(journal + suffix)
    argv = [backlog, "run", items_path, "--max-run", str(MAX_RUN), "--journal", journal, "--", "true"]
    started = time.perf_counter()
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_at_kill = 0
    while first.poll() is None:
        done_at_kill = done_count(journal)
        if done_at_kill >= items // 2:
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    first.wait()
    first_time = time.perf_counter() - started
    if first.returncode != -signal.SIGKILL:
        raise SystemExit(f"the first C2 run ended before the kill (status {first.returncode})")
    second_time = timed(argv)
    if done_count(journal) != items:
        raise SystemExit("the rerun did not finish every item")
    return first_time + second_time, done_at_kill


def summarize(times):
    return statistics.median(times), min(times), max(times)


def row(name, times, baseline):
    median, low, high = summarize(times)
    ratio = median / statistics.median(baseline)
    return f"| {name} | {median:.2f} s | {low:.2f} s | {high:.2f} s | {ratio:.2f} |"


def main():
    args = parse_args()
    if not os.access(args.backlog, os.X_OK):
        raise SystemExit(f"{args.backlog} not found: run `cargo build --release -p backlog` first")
    workdir = tempfile.mkdtemp(prefix="backlog-cli-bench-")
    items_path = os.path.join(workdir, "items.txt")
    with open(items_path, "w") as items_file:
        items_file.writelines(f"{n}\n" for n in range(args.items))

    journal = os.path.join(workdir, "c1.db")
    cases = {
        "backlog": [args.backlog, "run", items_path, "--max-run", str(MAX_RUN), "--", "true"],
        "backlog --journal": None,
        "xargs -P 8": ["xargs", "-P", str(MAX_RUN), "-n", "1", "true"],
        "GNU parallel -j 8": ["parallel", "-j", str(MAX_RUN), "true"],
        "rust-parallel -j 8": ["rust-parallel", "-j", str(MAX_RUN), "true"],
    }
    missing = [name for name, argv in cases.items() if argv and not shutil.which(argv[0])]
    for name in missing:
        del cases[name]
    stdin_cases = {"xargs -P 8", "GNU parallel -j 8", "rust-parallel -j 8"}

    c1 = {name: [] for name in cases}
    c2 = []
    kills = []
    for _ in range(args.runs):
        for name, argv in cases.items():
            if name == "backlog --journal":
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(journal + suffix):
                        os.remove(journal + suffix)
                argv = [args.backlog, "run", items_path, "--max-run", str(MAX_RUN),
                        "--journal", journal, "--", "true"]
            stdin_path = items_path if name in stdin_cases else None
            c1[name].append(timed(argv, stdin_path))
        total, done_at_kill = killed_and_resumed(args.backlog, items_path, args.items, workdir)
        c2.append(total)
        kills.append(done_at_kill)

    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(f"{args.items} items of `true`, at most {MAX_RUN} at once; {args.runs} runs; "
          f"{os.cpu_count()} CPUs ({cpu})\n")
    print("C1: one run over the whole backlog (ratio: median against xargs -P 8)\n")
    print("| tool | median | min | max | ratio |")
    print("| --- | --- | --- | --- | --- |")
    baseline = c1.get("xargs -P 8") or c1["backlog"]
    for name, times in c1.items():
        print(row(name, times, baseline))
    if missing:
        print(f"\nNot installed, so left out: {', '.join(missing)}.")
    print("\nC2: killed with SIGKILL at about half, then rerun (ratio: against one "
          "uninterrupted run with the journal)\n")
    print("| case | median | min | max | ratio |")
    print("| --- | --- | --- | --- | --- |")
    print(row("backlog --journal, uninterrupted", c1["backlog --journal"], c1["backlog --journal"]))
    print(row("backlog --journal, killed and rerun", c2, c1["backlog --journal"]))
    print(f"\nItems done when the kill landed: {', '.join(map(str, kills))}.")
    shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())
