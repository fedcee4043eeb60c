#!/usr/bin/env python3
"""Run the benchmark workloads and write the result tables as Markdown.

Usage:
    python3 bench/run.py [--output FILE] [--runs N] [--quick] [--no-twisted]

The script builds the benchmark binary in release mode and runs every case
in its own process, so that each peak resident set is that case's alone. It
runs the cases round-robin `--runs` times (3 by default), so that drift on a
busy machine hits every case alike, and reports the median with the minimum
and maximum. Each table compares its rows with one named baseline from the same
run. The raw JSON lines go to target/bench/results.jsonl.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "target" / "release" / "deferred-semaphore-bench"
RAW = ROOT / "target" / "bench" / "results.jsonl"
TWISTED = ROOT / "bench" / "twisted_bench.py"

SEMAPHORES = [
    "deferred-acquire",
    "deferred-acquire-owned",
    "async-lock-acquire",
    "async-lock-acquire-arc",
    "tokio-acquire",
    "tokio-acquire-owned",
]
FLOWS = ["backlog", "buffer-unordered", "buffered", "for-each-concurrent", "spawn-joinset"]
# W6 needs one consumer for all outcomes, which for_each_concurrent lacks:
# its consumer runs inside each item, so the sleeps overlap.
W6_FLOWS = ["backlog", "buffer-unordered", "buffered", "spawn-joinset"]
RUNTIMES = ["current", "multi"]

# Items per case; --quick divides the large ones so the script runs in
# seconds as a smoke test.
ITEMS = {
    "W1": 10_000_000,
    "W2": 2_000_000,
    "W3": 1_000_000,
    "W4-small": 1_000_000,
    "W4": 10_000_000,
    "W5": 10_000,  # --quick keeps this size: the timer floor is fixed at 100 sleeps.
    "W6": 100_000,
    "twisted-W1": 1_000_000,
    "twisted-W3": 100_000,
}
QUICK_DIVISOR = 50


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="write the Markdown here, not to stdout")
    parser.add_argument("--runs", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1/50 of the items, 1 run"
    )
    parser.add_argument("--no-twisted", action="store_true", help="skip the Twisted table")
    return parser.parse_args()


def items_for(key, quick):
    items = ITEMS[key]
    if quick and key != "W5":
        return max(items // QUICK_DIVISOR, 1_000)
    return items


def rust_case(workload, implementation, items, runtime):
    command = [str(BINARY), workload, implementation, "--items", str(items)]
    return command + ["--runtime", runtime]


def run_case(command):
    """Run one case and return its parsed JSON line."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"case failed: {' '.join(command)}\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with RAW.open("a") as raw:
        raw.write(json.dumps(result) + "\n")
    return result


def case_plan(quick, twisted):
    """Return the cases run one at a time, each as (key, command)."""
    plan = []
    for implementation in SEMAPHORES:
        items = items_for("W1", quick)
        plan.append((("W1", implementation, "current", items), rust_case("W1", implementation, items, "current")))
    for implementation in SEMAPHORES:
        items = items_for("W2", quick)
        plan.append((("W2", implementation, "multi", items), rust_case("W2", implementation, items, "multi")))
    # The rows of one ratio run back to back, so drift on the machine
    # between them stays small.
    for runtime in RUNTIMES:
        for workload, size in (("W3", "W3"), ("W4", "W4-small"), ("W4", "W4")):
            items = items_for(size, quick)
            for implementation in FLOWS:
                command = rust_case(workload, implementation, items, runtime)
                plan.append(((workload, implementation, runtime, items), command))
    for implementation in FLOWS:
        items = items_for("W5", quick)
        plan.append((("W5", implementation, "current", items), rust_case("W5", implementation, items, "current")))
    # The Twisted table compares at Twisted's sizes, on one thread as
    # Twisted's reactor runs.
    items = items_for("twisted-W3", quick)
    plan.append((("W3", "backlog", "current", items), rust_case("W3", "backlog", items, "current")))
    if twisted:
        for workload in ("W1", "W3"):
            items = items_for(f"twisted-{workload}", quick)
            command = [sys.executable, str(TWISTED), workload, "--items", str(items)]
            plan.append(((workload, "twisted", "reactor", items), command))
    return plan


def run_all(args):
    """Run every case `runs` times and return {key: [result, ...]}."""
    runs = 1 if args.quick else args.runs
    results = {}
    plan = case_plan(args.quick, not args.no_twisted)
    for round_number in range(runs):
        print(f"round {round_number + 1} of {runs}: {len(plan)} cases", file=sys.stderr)
        for key, command in plan:
            results.setdefault(key, []).append(run_case(command))
    # W6 is bounded by its consumer's sleeps, about 2 ms each with tokio's
    # millisecond timer. Each case uses little CPU, so they run side by side.
    items = items_for("W6", args.quick)
    w6 = [
        (("W6", implementation, "current", items), rust_case("W6", implementation, items, "current"))
        for implementation in W6_FLOWS
        for _ in range(runs)
    ]
    print(f"W6: {len(w6)} cases side by side", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=len(w6)) as pool:
        finished = pool.map(run_case, [command for _, command in w6])
        for (key, _), result in zip(w6, finished):
            results.setdefault(key, []).append(result)
    return results


# Formatting.


def median_min_max(values):
    return statistics.median(values), min(values), max(values)


def fmt_rate(value):
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def fmt_spread(values, fmt):
    middle, low, high = median_min_max(values)
    return f"{fmt(middle)} ({fmt(low)} – {fmt(high)})"


def fmt_mib(results):
    kib = statistics.median(r["peak_rss_kib"] for r in results)
    return f"{kib / 1024:.1f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rates(results):
    return [r["rate"] for r in results]


def w1_table(results, items):
    baseline = statistics.median(rates(results[("W1", "async-lock-acquire", "current", items)]))
    rows = []
    for implementation in SEMAPHORES:
        runs = results[("W1", implementation, "current", items)]
        ns = statistics.median(rates(runs))
        rows.append([
            f"`{implementation}`",
            fmt_spread(rates(runs), lambda v: f"{v:.1f}"),
            f"{baseline / ns:.2f}",
        ])
    header = ["implementation", "ns per acquire+release, median (min – max)", "speed vs `async-lock-acquire`"]
    return table(header, rows)


def w2_table(results, items):
    baseline = statistics.median(rates(results[("W2", "async-lock-acquire", "multi", items)]))
    rows = []
    for implementation in SEMAPHORES:
        runs = results[("W2", implementation, "multi", items)]
        rows.append([
            f"`{implementation}`",
            fmt_spread(rates(runs), fmt_rate),
            f"{statistics.median(rates(runs)) / baseline:.2f}",
        ])
    header = ["implementation", "cycles/s, median (min – max)", "speed vs `async-lock-acquire`"]
    return table(header, rows)


def w3_table(results, items):
    rows = []
    for runtime in RUNTIMES:
        baseline = statistics.median(rates(results[("W3", "buffer-unordered", runtime, items)]))
        for implementation in FLOWS:
            runs = results[("W3", implementation, runtime, items)]
            rows.append([
                f"`{implementation}`",
                runtime,
                fmt_spread(rates(runs), fmt_rate),
                f"{statistics.median(rates(runs)) / baseline:.2f}",
                fmt_mib(runs),
            ])
    header = [
        "implementation",
        "runtime",
        "items/s, median (min – max)",
        "speed vs `buffer-unordered`",
        "peak RSS (MiB)",
    ]
    return table(header, rows)


def w4_table(results, small, large):
    rows = []
    for runtime in RUNTIMES:
        base_small = statistics.median(rates(results[("W4", "buffer-unordered", runtime, small)]))
        base_large = statistics.median(rates(results[("W4", "buffer-unordered", runtime, large)]))
        for implementation in FLOWS:
            runs_small = results[("W4", implementation, runtime, small)]
            runs_large = results[("W4", implementation, runtime, large)]
            rss_small = statistics.median(r["peak_rss_kib"] for r in runs_small)
            rss_large = statistics.median(r["peak_rss_kib"] for r in runs_large)
            rows.append([
                f"`{implementation}`",
                runtime,
                fmt_spread(rates(runs_large), fmt_rate),
                f"{statistics.median(rates(runs_large)) / base_large:.2f}",
                f"{statistics.median(rates(runs_small)) / base_small:.2f}",
                f"{rss_small / 1024:.1f}",
                f"{rss_large / 1024:.1f}",
                f"{rss_large / rss_small:.2f}",
            ])
    header = [
        "implementation",
        "runtime",
        f"items/s at {large:,}, median (min – max)",
        f"speed vs `buffer-unordered` at {large:,}",
        f"at {small:,}",
        f"peak RSS at {small:,} (MiB)",
        f"at {large:,} (MiB)",
        "RSS ratio",
    ]
    return table(header, rows)


def w5_table(results, items):
    rows = []
    for implementation in FLOWS:
        runs = results[("W5", implementation, "current", items)]
        rows.append([
            f"`{implementation}`",
            fmt_spread([r["seconds"] for r in runs], lambda v: f"{v:.3f}"),
            fmt_spread([r["floor_seconds"] for r in runs], lambda v: f"{v:.3f}"),
            fmt_spread(rates(runs), lambda v: f"{v:+.2f}%"),
        ])
    header = [
        "implementation",
        "wall time (s)",
        "timer floor (s)",
        "over the floor, median (min – max)",
    ]
    return table(header, rows)


def w6_table(results, items):
    rows = []
    for implementation in W6_FLOWS:
        runs = results[("W6", implementation, "current", items)]
        rows.append([
            f"`{implementation}`",
            fmt_spread(rates(runs), lambda v: f"{v:,.0f}"),
            fmt_spread([r["seconds"] for r in runs], lambda v: f"{v:.0f}"),
        ])
    header = [
        "implementation",
        f"items over 50 ms, of {items:,}, median (min – max)",
        "wall time (s)",
    ]
    return table(header, rows)


def twisted_table(results, w1_ours, w1_items, w3_items):
    ours_w1 = statistics.median(rates(results[("W1", "deferred-acquire", "current", w1_ours)]))
    ours_w3 = results[("W3", "backlog", "current", w3_items)]
    twisted_w1 = results[("W1", "twisted", "reactor", w1_items)]
    twisted_w3 = results[("W3", "twisted", "reactor", w3_items)]
    twisted_w1_ns = statistics.median(rates(twisted_w1))
    twisted_w3_rate = statistics.median(rates(twisted_w3))
    rows = [
        [
            "W1, ns per acquire+release",
            fmt_spread(rates(twisted_w1), lambda v: f"{v:,.0f}"),
            f"{ours_w1:.1f}",
            f"{twisted_w1_ns / ours_w1:,.0f}",
        ],
        [
            f"W3 at {w3_items:,} items, items/s",
            fmt_spread(rates(twisted_w3), fmt_rate),
            fmt_spread(rates(ours_w3), fmt_rate),
            f"{statistics.median(rates(ours_w3)) / twisted_w3_rate:,.0f}",
        ],
        [
            f"W3 at {w3_items:,} items, peak RSS (MiB)",
            fmt_mib(twisted_w3),
            fmt_mib(ours_w3),
            "",
        ],
    ]
    header = ["case", "Twisted, median (min – max)", "ours, median", "ours as a multiple of Twisted"]
    return table(header, rows)


# The machine and the versions.


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return cpu, command_output(["nproc"])


def locked_versions(names):
    """Return {name: version} from Cargo.lock for the given packages."""
    versions = {}
    name = None
    for line in (ROOT / "Cargo.lock").read_text().splitlines():
        if line.startswith("name = "):
            name = line.split('"')[1]
        elif line.startswith("version = ") and name in names:
            versions[name] = line.split('"')[1]
    return versions


def command_output(command):
    return subprocess.run(command, capture_output=True, text=True).stdout.strip()


def preamble(results, args, elapsed):
    """Return the lines that name the command, the machine and the versions."""
    quick = args.quick
    cpu, cores = machine()
    crates = ["deferred-semaphore", "tokio", "async-lock", "futures", "futures-util"]
    versions = locked_versions(crates)
    version_list = ", ".join(f"{name} {versions[name]}" for name in crates if name in versions)
    twisted = not args.no_twisted
    lines = [
        f"Command: `python3 bench/run.py{' --quick' if quick else ''}` "
        f"({1 if quick else args.runs} runs of each case, {elapsed / 60:.1f} minutes in all).",
        "",
        f"Machine: {cores} cores (`nproc`), {cpu}, Linux {platform.release()}; "
        "shared with other builds and tests while it ran.",
        "",
        f"Versions: {command_output(['rustc', '--version'])}; {version_list} (from Cargo.lock).",
    ]
    if twisted:
        twisted_version = results[("W1", "twisted", "reactor", items_for("twisted-W1", quick))][0]["version"]
        python_version = command_output([sys.executable, "--version"]).split()[-1]
        lines[-1] += f" Twisted {twisted_version} on Python {python_version}."
    return lines


def report(results, args, elapsed):
    """Return the Markdown of every table, each with the line that explains it."""
    quick = args.quick
    twisted = not args.no_twisted
    lines = preamble(results, args, elapsed)
    w1 = items_for("W1", quick)
    w3 = items_for("W3", quick)
    sections = [
        (
            f"W1: one task, limit 1, {w1:,} acquire+release cycles, current-thread runtime",
            "Cost of an uncontended acquire and release; speed above 1 is faster than the baseline.",
            w1_table(results, w1),
        ),
        (
            f"W2: 2 worker threads, 1,000 tasks, {items_for('W2', quick):,} cycles of acquire, yield, release, limit 8",
            "Throughput when waiters queue and hand tokens to one another across threads.",
            w2_table(results, items_for("W2", quick)),
        ),
        (
            f"W3: {w3:,} items that yield once, limit 64, outcomes kept in input order",
            "Throughput of a backlog whose outcomes are all kept, in input order; "
            "`backlog` collects `Outcome` values (index and result), the others write the value to its slot.",
            w3_table(results, w3),
        ),
        (
            "W4: items from a lazy iterator that yield once, limit 64, outcomes discarded",
            "Throughput of a long backlog and whether memory stays flat as it grows "
            "(an RSS ratio near 1.0 means memory follows the limit, not the length).",
            w4_table(results, items_for("W4-small", quick), items_for("W4", quick)),
        ),
        (
            f"W5: {items_for('W5', quick):,} items that sleep 10 ms, limit 100, current-thread runtime",
            "Scheduling overhead when the work itself only waits: the timer floor is "
            "100 sequential 10 ms sleeps in the same process, so 0% means no overhead.",
            w5_table(results, items_for("W5", quick)),
        ),
        (
            f"W6: {items_for('W6', quick):,} items that yield once, limit 64, a consumer that sleeps 1 ms per outcome",
            "Whether work in flight keeps running while the consumer is busy: an item misses when it "
            "takes over 50 ms from the call that created its work to its finish. "
            "These cases ran side by side, since each one mostly sleeps.",
            w6_table(results, items_for("W6", quick)),
        ),
    ]
    if twisted:
        sections.append(
            (
                "Twisted's DeferredSemaphore against ours",
                "Twisted runs W1 with `acquire().addCallback(release)` and W3 with "
                "`DeferredSemaphore.run` and `DeferredList`, on its reactor; ours runs "
                "`deferred-acquire` (W1 above) and `backlog` on the current-thread runtime at the same size.",
                twisted_table(results, w1, items_for("twisted-W1", quick), items_for("twisted-W3", quick)),
            )
        )
    for title, meaning, body in sections:
        lines += ["", f"### {title}", "", meaning, "", body]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    build = ["cargo", "build", "--release", "--locked", "-p", "deferred-semaphore-bench"]
    subprocess.run(build, cwd=ROOT, check=True)
    RAW.parent.mkdir(parents=True, exist_ok=True)
    RAW.write_text("")
    start = time.monotonic()
    results = run_all(args)
    markdown = report(results, args, time.monotonic() - start)
    if args.output:
        args.output.write_text(markdown)
    else:
        sys.stdout.write(markdown)


if __name__ == "__main__":
    main()
