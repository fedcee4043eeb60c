#!/usr/bin/env python3
"""Run the fleet workload: permits per second and Redis round trips per unit.

Usage:
    python3 bench/fleet.py [--processes 4] [--tasks 64] [--units 20000]
                           [--limit 32] [--runs 3]

Starts a private redis-server on a free loopback port, stores one global
limit, then for each hold time runs `--processes` worker processes at once,
each with `--tasks` tasks, that together take `--units` permits through the
Redis limiter. Beside them, one process runs the same tasks and units on the
in-process semaphore with the same limit. Round trips come from the server's
own command counts (INFO commandstats), not from the client. Each EVAL or
EVALSHA a client sends counts as one round trip; the commands a script runs
inside the server do not count.
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "target" / "release" / "fleet-bench"
SCRIPT_CALLS = ("evalsha", "eval", "evalsha_ro", "eval_ro")
HOLDS_US = [0, 1000]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=4,
                        help="worker processes sharing the limit (default 4)")
    parser.add_argument("--tasks", type=int, default=64,
                        help="tasks in each worker process (default 64)")
    parser.add_argument("--units", type=int, default=20000,
                        help="permits taken in all per hold time (default 20000)")
    parser.add_argument("--limit", type=int, default=32,
                        help="the global limit (default 32)")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs of each case; the table shows the median (default 3)")
    return parser.parse_args()


def free_port():
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port != 6379:
            return port


def command(port, *args):
    """Send one command and return the raw reply text."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        request = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        conn.sendall(request.encode())
        reply = b""
        # A bulk string ($N) may arrive in several pieces, each ending in a
        # line of its own, so read until its announced length is in.
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
            header, sep, body = reply.partition(b"\r\n")
            if not sep:
                continue
            if not header.startswith(b"$") or int(header[1:]) < 0:
                break
            if len(body) >= int(header[1:]) + 2:
                break
        return reply.decode(errors="replace")


def command_counts(port):
    counts = {}
    for line in command(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, fields = line[len("cmdstat_"):].split(":", 1)
            calls = int(fields.split(",")[0].split("=")[1])
            counts[name] = calls
    return counts


def start_redis(workdir):
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
         "--save", "", "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if "PONG" in command(port, "PING"):
                return server, port
        except OSError:
            pass
        time.sleep(0.05)
    server.kill()
    sys.exit(f"redis-server on port {port} did not reply to PING within 10 s")


def run_redis(args, port, namespace, hold_us):
    per_process = args.units // args.processes
    before = command_counts(port)
    started = time.perf_counter()
    workers = [
        subprocess.Popen(
            [str(BINARY), "redis", f"redis://127.0.0.1:{port}", namespace,
             str(args.tasks), str(per_process), str(hold_us)],
            stdout=subprocess.PIPE, text=True)
        for _ in range(args.processes)
    ]
    results = []
    for worker in workers:
        out, _ = worker.communicate()
        if worker.returncode != 0:
            sys.exit(f"a fleet worker failed with status {worker.returncode}")
        results.append(json.loads(out))
    seconds = time.perf_counter() - started
    after = command_counts(port)
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    units = per_process * args.processes
    calls = sum(delta.get(name, 0) for name in SCRIPT_CALLS)
    return {
        "permits_per_s": units / seconds,
        "round_trips_per_unit": calls / units,
        "max_held_in_one_process": max(r["max_held"] for r in results),
    }


def run_local(args, hold_us):
    started = time.perf_counter()
    out = subprocess.run(
        [str(BINARY), "local", str(args.limit), str(args.tasks * args.processes),
         str(args.units), str(hold_us)],
        check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - started
    result = json.loads(out)
    return {"permits_per_s": args.units / seconds, "max_held": result["max_held"]}


def main():
    args = parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "deferred-semaphore-bench",
                    "--bin", "fleet-bench"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as workdir:
        server, port = start_redis(workdir)
        try:
            namespace = "bench"
            subprocess.run([str(BINARY), "setup", f"redis://127.0.0.1:{port}", namespace,
                            str(args.limit), "30000"], check=True, timeout=120)
            rows = []
            for hold_us in HOLDS_US:
                redis_runs, local_runs = [], []
                for _ in range(args.runs):
                    redis_runs.append(run_redis(args, port, namespace, hold_us))
                    local_runs.append(run_local(args, hold_us))
                rows.append((hold_us, redis_runs, local_runs))
        finally:
            server.kill()
            server.wait()
    print(f"{args.processes} processes x {args.tasks} tasks, {args.units} units, "
          f"global limit {args.limit}, median of {args.runs} runs\n")
    print("| hold | Redis limiter permits/s | in-process permits/s | ratio | "
          "round trips per unit (min-max) |")
    print("|---|---|---|---|---|")
    for hold_us, redis_runs, local_runs in rows:
        redis_rate = statistics.median(r["permits_per_s"] for r in redis_runs)
        local_rate = statistics.median(r["permits_per_s"] for r in local_runs)
        trips = [r["round_trips_per_unit"] for r in redis_runs]
        print(f"| {hold_us} µs | {redis_rate:,.0f} | {local_rate:,.0f} | "
              f"{local_rate / redis_rate:.1f}x | {statistics.median(trips):.2f} "
              f"({min(trips):.2f}-{max(trips):.2f}) |")


if __name__ == "__main__":
    main()
