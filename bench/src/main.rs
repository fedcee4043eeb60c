//! Runs one benchmark case per process and prints its result as one JSON line.
//!
//! ```text
//! deferred-semaphore-bench <workload> <implementation> [--items N] [--runtime current|multi]
//! ```
//!
//! One case per process keeps the peak resident set (`VmHWM`) of each case
//! apart from every other. `bench/run.py` runs the cases, repeats them and
//! writes the tables.

mod flows;
mod semaphores;

use std::fmt::Write as _;
use std::future::Future;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Instant;

use flows::Flow;
use semaphores::SemaphoreKind;

const USAGE: &str = "usage: deferred-semaphore-bench <workload> <implementation> \
[--items N] [--runtime current|multi]

workloads:
  W1  one task, limit 1: acquire and release N times (default 10000000)
  W2  1000 tasks share N cycles of acquire, yield, release; limit 8 (default 2000000)
  W3  N items that yield once, limit 64, outcomes kept in input order (default 1000000)
  W4  N items that yield once, limit 64, outcomes discarded (default 10000000)
  W5  N items that sleep 10 ms, limit 100, against the timer floor (default 10000)
  W6  N items that yield once, limit 64, a consumer that sleeps 1 ms per outcome,
      counting items that take over 50 ms from start to finish (default 100000)

implementations:
  W1, W2: deferred-acquire deferred-acquire-owned tokio-acquire tokio-acquire-owned
          async-lock-acquire async-lock-acquire-arc
  W3-W6:  backlog buffered buffer-unordered for-each-concurrent spawn-joinset";

/// The workloads, named as in `BENCHMARKS.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    W1,
    W2,
    W3,
    W4,
    W5,
    W6,
}

impl Workload {
    fn default_items(self) -> u64 {
        match self {
            Workload::W1 | Workload::W4 => 10_000_000,
            Workload::W2 => 2_000_000,
            Workload::W3 => 1_000_000,
            Workload::W5 => 10_000,
            Workload::W6 => 100_000,
        }
    }

    fn default_runtime(self) -> RuntimeKind {
        match self {
            Workload::W2 => RuntimeKind::Multi,
            _ => RuntimeKind::Current,
        }
    }
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "W1" => Ok(Workload::W1),
            "W2" => Ok(Workload::W2),
            "W3" => Ok(Workload::W3),
            "W4" => Ok(Workload::W4),
            "W5" => Ok(Workload::W5),
            "W6" => Ok(Workload::W6),
            _ => Err(format!("unknown workload {name:?}: expected W1 to W6")),
        }
    }
}

/// The tokio runtime a case runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuntimeKind {
    /// `new_current_thread`: everything on the calling thread.
    Current,
    /// `new_multi_thread` with 2 worker threads.
    Multi,
}

impl RuntimeKind {
    fn name(self) -> &'static str {
        match self {
            RuntimeKind::Current => "current",
            RuntimeKind::Multi => "multi",
        }
    }

    fn build(self) -> tokio::runtime::Runtime {
        let mut builder = match self {
            RuntimeKind::Current => tokio::runtime::Builder::new_current_thread(),
            RuntimeKind::Multi => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(2);
                builder
            }
        };
        builder
            .enable_time()
            .build()
            .expect("failed to build the tokio runtime")
    }

    /// Runs `case` as a spawned task, so that on the multi-thread runtime it
    /// runs on a worker thread as application code would, and returns its
    /// output with the wall time it took.
    fn run<F>(self, case: F) -> (F::Output, f64)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self.build();
        let start = Instant::now();
        let task = runtime.spawn(case);
        let output = runtime.block_on(task).expect("the benchmark task panicked");
        let seconds = start.elapsed().as_secs_f64();
        (output, seconds)
    }
}

impl FromStr for RuntimeKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "current" => Ok(RuntimeKind::Current),
            "multi" => Ok(RuntimeKind::Multi),
            _ => Err(format!(
                "invalid runtime {name:?}: expected current or multi"
            )),
        }
    }
}

/// One benchmark case, parsed from the command line.
#[derive(Debug)]
struct Case {
    workload: Workload,
    implementation: String,
    items: u64,
    runtime: RuntimeKind,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Case, String> {
    let workload: Workload = args.next().ok_or("missing workload")?.parse()?;
    let implementation = args.next().ok_or("missing implementation")?;
    let mut items = workload.default_items();
    let mut runtime = workload.default_runtime();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("missing value after {flag}"))?;
        match flag.as_str() {
            "--items" => {
                items = value.parse().map_err(|_| {
                    format!("invalid --items {value:?}: expected a positive integer")
                })?;
                if items == 0 {
                    return Err("invalid --items 0: expected a positive integer".into());
                }
            }
            "--runtime" => runtime = value.parse()?,
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    Ok(Case {
        workload,
        implementation,
        items,
        runtime,
    })
}

/// The figures one case reports besides its name.
#[derive(Debug)]
struct Measurement {
    seconds: f64,
    /// The workload's headline figure, in `unit`.
    rate: f64,
    unit: &'static str,
    /// Figures only some workloads have, such as the timer floor of W5.
    extra: Vec<(&'static str, f64)>,
}

fn measure(case: &Case) -> Result<Measurement, String> {
    let items = case.items;
    match case.workload {
        Workload::W1 | Workload::W2 => {
            let kind: SemaphoreKind = case.implementation.parse()?;
            let (cycles, seconds) = if case.workload == Workload::W1 {
                case.runtime.run(semaphores::single_task(kind, items))
            } else {
                case.runtime.run(semaphores::many_tasks(kind, items))
            };
            let measurement = if case.workload == Workload::W1 {
                Measurement {
                    seconds,
                    rate: seconds * 1e9 / cycles as f64,
                    unit: "ns/cycle",
                    extra: Vec::new(),
                }
            } else {
                Measurement {
                    seconds,
                    rate: cycles as f64 / seconds,
                    unit: "cycles/s",
                    extra: Vec::new(),
                }
            };
            Ok(measurement)
        }
        Workload::W3 | Workload::W4 => {
            let flow: Flow = case.implementation.parse()?;
            let ((), seconds) = if case.workload == Workload::W3 {
                case.runtime.run(flows::ordered(flow, items))
            } else {
                case.runtime.run(flows::discarded(flow, items))
            };
            Ok(Measurement {
                seconds,
                rate: items as f64 / seconds,
                unit: "items/s",
                extra: Vec::new(),
            })
        }
        Workload::W5 => {
            let flow: Flow = case.implementation.parse()?;
            let (floor, _) = case.runtime.run(flows::timer_floor());
            let ((), seconds) = case.runtime.run(flows::sleepers(flow, items));
            Ok(Measurement {
                seconds,
                rate: (seconds / floor - 1.0) * 100.0,
                unit: "% over floor",
                extra: vec![("floor_seconds", floor)],
            })
        }
        Workload::W6 => {
            let flow: Flow = case.implementation.parse()?;
            let (misses, seconds) = case.runtime.run(flows::deadlines(flow, items));
            Ok(Measurement {
                seconds,
                rate: misses as f64,
                unit: "missed deadlines",
                extra: Vec::new(),
            })
        }
    }
}

/// Reads the peak resident set size in KiB (`VmHWM`) from `/proc/self/status`.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn to_json(case: &Case, measurement: &Measurement) -> String {
    let mut line = format!(
        "{{\"workload\":\"{:?}\",\"implementation\":\"{}\",\"runtime\":\"{}\",\"items\":{},\
\"seconds\":{:.6},\"rate\":{:.6},\"unit\":\"{}\"",
        case.workload,
        case.implementation,
        case.runtime.name(),
        case.items,
        measurement.seconds,
        measurement.rate,
        measurement.unit,
    );
    for (name, value) in &measurement.extra {
        write!(line, ",\"{name}\":{value:.6}").expect("writing to a String cannot fail");
    }
    match peak_rss_kib() {
        Some(kib) => write!(line, ",\"peak_rss_kib\":{kib}}}"),
        None => write!(line, ",\"peak_rss_kib\":null}}"),
    }
    .expect("writing to a String cannot fail");
    line
}

fn main() -> ExitCode {
    let case = match parse_args(std::env::args().skip(1)) {
        Ok(case) => case,
        Err(error) => {
            eprintln!("error: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match measure(&case) {
        Ok(measurement) => {
            println!("{}", to_json(&case, &measurement));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
