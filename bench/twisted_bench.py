#!/usr/bin/env python3
"""Measure Twisted's DeferredSemaphore on W1 and W3 and print JSON lines.

Usage:
    twisted_bench.py W1|W3 [--items N]

The first run creates a virtual environment under target/twisted-venv and
installs Twisted into it from PyPI with pip, then runs the case under that
environment's interpreter. Each case prints one JSON line in the format of
the Rust benchmark binary, so bench/run.py reads both the same way.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "target" / "twisted-venv"
VENV_PYTHON = VENV / "bin" / "python"

DEFAULT_ITEMS = {"W1": 1_000_000, "W3": 100_000}
# W3's limit, the same as in the Rust workload.
LIMIT = 64


def peak_rss_kib():
    """Return the peak resident set size (VmHWM) of this process in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def ensure_venv():
    """Create the virtual environment with Twisted unless it already exists."""
    if VENV_PYTHON.exists():
        probe = [str(VENV_PYTHON), "-c", "import twisted"]
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return
    print(f"installing Twisted into {VENV}", file=sys.stderr)
    venv.create(VENV, with_pip=True, clear=True)
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "twisted"]
    subprocess.run(pip, check=True)


def acquire_release(items):
    """W1: acquire and release a one-token DeferredSemaphore `items` times.

    Returns the seconds taken. The token is free every time, so each acquire
    returns a Deferred that has already fired and the release runs at once.
    """
    from twisted.internet.defer import DeferredSemaphore

    sem = DeferredSemaphore(1)

    def release(semaphore):
        semaphore.release()

    start = time.perf_counter()
    for _ in range(items):
        sem.acquire().addCallback(release)
    seconds = time.perf_counter() - start
    if sem.tokens != 1:
        raise RuntimeError(f"expected 1 free token after W1, found {sem.tokens}")
    return seconds


def ordered(items):
    """W3: run `items` calls that wait one reactor turn, at most LIMIT at once.

    DeferredSemaphore.run queues every call at once, and DeferredList
    gathers the results in input order.
    Returns the seconds taken.
    """
    from twisted.internet import reactor, task
    from twisted.internet.defer import DeferredList, DeferredSemaphore

    timing = {}

    def work(item):
        # deferLater with a delay of 0 fires on the next reactor turn, which
        # is the Twisted form of yielding once.
        return task.deferLater(reactor, 0, lambda: item)

    def check(results):
        timing["seconds"] = time.perf_counter() - timing["start"]
        values = [value for ok, value in results if ok]
        if values != list(range(items)):
            raise RuntimeError("W3 results are missing or out of order")

    def start():
        timing["start"] = time.perf_counter()
        sem = DeferredSemaphore(LIMIT)
        runs = [sem.run(work, item) for item in range(items)]
        finished = DeferredList(runs, consumeErrors=True)
        finished.addCallback(check)
        finished.addErrback(lambda failure: timing.setdefault("error", failure))
        finished.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if "error" in timing:
        timing["error"].raiseException()
    return timing["seconds"]


def run_case(workload, items):
    """Run one case in this interpreter and print its JSON line."""
    import twisted

    if workload == "W1":
        seconds = acquire_release(items)
        rate, unit = seconds * 1e9 / items, "ns/cycle"
    else:
        seconds = ordered(items)
        rate, unit = items / seconds, "items/s"
    line = {
        "workload": workload,
        "implementation": "twisted",
        "runtime": "reactor",
        "items": items,
        "seconds": seconds,
        "rate": rate,
        "unit": unit,
        "peak_rss_kib": peak_rss_kib(),
        "version": twisted.__version__,
    }
    print(json.dumps(line))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(DEFAULT_ITEMS))
    parser.add_argument("--items", type=int, help="items or cycles to run")
    args = parser.parse_args()
    items = args.items or DEFAULT_ITEMS[args.workload]
    if Path(sys.prefix).resolve() != VENV.resolve():
        ensure_venv()
        command = [str(VENV_PYTHON), __file__, args.workload, "--items", str(items)]
        os.execv(command[0], command)
    run_case(args.workload, items)


if __name__ == "__main__":
    main()
