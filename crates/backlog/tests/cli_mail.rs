//! `backlog mail` against a real SMTP server: `tests/smtp_sink.py`, an
//! aiosmtpd sink on a free loopback port that logs every delivery with its
//! counts of open sessions, and injects faults by recipient address.
//!
//! The TLS tests give the sink a certificate for 127.0.0.1 and localhost,
//! signed by a CA that each test makes with openssl.
//!
//! The tests skip, with a printed reason, when python3, aiosmtpd or (for
//! TLS) openssl is missing, unless `BACKLOG_REQUIRE_SERVERS=1`, which makes
//! them fail.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// A running sink server, stopped when dropped.
struct Sink {
    child: Child,
    port: u16,
    log: PathBuf,
}

/// Prints why a test is skipped, or panics under `BACKLOG_REQUIRE_SERVERS=1`.
fn skip(reason: &str) {
    if std::env::var("BACKLOG_REQUIRE_SERVERS").as_deref() == Ok("1") {
        panic!("BACKLOG_REQUIRE_SERVERS=1 but {reason}");
    }
    eprintln!("skipped: {reason}");
}

impl Sink {
    /// Starts the sink with `data_delay` seconds before each DATA reply, or
    /// returns `None` after printing why it cannot run.
    fn start(dir: &Path, data_delay: f64) -> Option<Sink> {
        Sink::start_with(dir, data_delay, &[])
    }

    /// Starts the sink with the options `extra` of `tests/smtp_sink.py`,
    /// in the folder `dir`.
    fn start_with(dir: &Path, data_delay: f64, extra: &[&str]) -> Option<Sink> {
        let available = Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !available {
            skip("python3 with aiosmtpd is missing (python3 -m pip install aiosmtpd)");
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smtp_sink.py");
        let log = dir.join("sink.jsonl");
        let mut child = Command::new("python3")
            .current_dir(dir)
            .arg(script)
            .arg(&log)
            .args(["--data-delay", &data_delay.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot start the sink");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("READY ")
            .and_then(|port| port.trim().parse().ok())
            .unwrap_or_else(|| panic!("the sink did not start: {line:?}"));
        Some(Sink { child, port, log })
    }

    fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Returns the deliveries logged so far.
    fn deliveries(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|line| line.ends_with('}'))
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// Returns how many times each recipient got each Message-ID.
    fn received(&self) -> BTreeMap<(String, String), usize> {
        let mut received = BTreeMap::new();
        for delivery in self.deliveries() {
            let id = delivery["message_id"].as_str().unwrap_or("").to_owned();
            for rcpt in delivery["rcpt_tos"].as_array().unwrap() {
                let key = (id.clone(), rcpt.as_str().unwrap().to_owned());
                *received.entry(key).or_insert(0) += 1;
            }
        }
        received
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mail(dir: &Path, args: &[&str]) -> Output {
    mail_as(dir, None, args)
}

/// Runs `backlog mail` with the user name and password `credentials` in
/// the environment, if given.
fn mail_as(dir: &Path, credentials: Option<(&str, &str)>, args: &[&str]) -> Output {
    let mut command = Command::new(assert_cmd::cargo::cargo_bin!("backlog"));
    command
        .current_dir(dir)
        .arg("mail")
        .args(args)
        .env_remove("BACKLOG_SMTP_USERNAME")
        .env_remove("BACKLOG_SMTP_PASSWORD");
    if let Some((user, password)) = credentials {
        command
            .env("BACKLOG_SMTP_USERNAME", user)
            .env("BACKLOG_SMTP_PASSWORD", password);
    }
    command.output().unwrap()
}

/// Runs openssl with `args` in `dir`, or returns `false` after printing why
/// it cannot run.
fn openssl(dir: &Path, args: &[&str]) -> bool {
    let output = Command::new("openssl").current_dir(dir).args(args).output();
    match output {
        Ok(output) if output.status.success() => true,
        Ok(output) => panic!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => {
            skip(&format!("openssl cannot run: {error}"));
            false
        }
    }
}

/// Makes, in `dir`, a CA (`ca.pem`), a server certificate for 127.0.0.1
/// and localhost signed by it (`server.pem`, `server.key`), and a second CA
/// that signed nothing (`other-ca.pem`). Returns `false` when openssl is
/// missing.
fn make_certificates(dir: &Path) -> bool {
    let new_key = ["-newkey", "rsa:2048", "-nodes", "-days", "1"];
    let ca = [
        &["req", "-x509"][..],
        &new_key,
        &["-subj", "/CN=backlog test CA"],
    ]
    .concat();
    let ca_files = ["-keyout", "ca.key", "-out", "ca.pem"];
    if !openssl(dir, &[&ca[..], &ca_files].concat()) {
        return false;
    }
    let other = [
        "-subj",
        "/CN=another test CA",
        "-keyout",
        "other-ca.key",
        "-out",
        "other-ca.pem",
    ];
    openssl(dir, &[&["req", "-x509"][..], &new_key, &other].concat());
    // A self-signed certificate would be a CA, which rustls rejects as a
    // server's certificate, so the server's is signed by the test CA.
    let server = [
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-keyout",
        "server.key",
        "-out",
        "server.pem",
    ];
    openssl(dir, &[&["req", "-x509"][..], &new_key, &server].concat())
}

/// Starts a sink in `dir` with the TLS certificate of `make_certificates`,
/// made first, and the sink options `options`.
fn start_tls_sink(dir: &Path, options: &[&str]) -> Option<Sink> {
    if !make_certificates(dir) {
        return None;
    }
    let certificate = ["--cert", "server.pem", "--key", "server.key"];
    Sink::start_with(dir, 0.0, &[&certificate[..], options].concat())
}

/// Writes `a.eml`, one message to `to@tls.test`, in `dir`.
fn write_one_message(dir: &Path) {
    write_message(dir, "a.eml", "t1@origin.test", "To: to@tls.test");
}

/// Returns the only record of a results file.
fn only_record(path: &Path) -> Value {
    let mut all = records(path);
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0)
}

fn write_message(dir: &Path, name: &str, id: &str, headers: &str) {
    let text = format!(
        "From: sender@origin.test\n{headers}\nMessage-ID: <{id}>\nSubject: {id}\n\nHello {id}.\n"
    );
    std::fs::write(dir.join(name), text).unwrap();
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn mail_limits_and_single_copies() {
    let dir = TempDir::new().unwrap();
    let Some(sink) = Sink::start(dir.path(), 0.1) else {
        return;
    };
    let outbox = dir.path().join("outbox");
    std::fs::create_dir(&outbox).unwrap();
    let mut expected = BTreeSet::new();
    for n in 0..30 {
        let (a, b) = (["a", "b", "c"][n % 3], ["b", "c", "a"][n % 3]);
        let to = format!("u{n}@{a}.test");
        let bcc = format!("v{n}@{b}.test");
        write_message(
            &outbox,
            &format!("{n:02}.eml"),
            &format!("m{n}@origin.test"),
            &format!("To: {to}\nBcc: {bcc}"),
        );
        expected.insert((format!("<m{n}@origin.test>"), to));
        expected.insert((format!("<m{n}@origin.test>"), bcc));
    }
    // A hidden file is not read.
    std::fs::write(outbox.join(".draft.eml"), "not a message").unwrap();

    let url = sink.url();
    let args = [
        "--smtp",
        &url,
        "--max-run",
        "5",
        "--per-domain",
        "2",
        "--results",
        "r.jsonl",
        "outbox",
    ];
    let output = mail(dir.path(), &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("done 60, failed 0"), "{stderr}");

    let received = sink.received();
    let got: BTreeSet<_> = received.keys().cloned().collect();
    assert_eq!(got, expected);
    assert!(received.values().all(|&count| count == 1), "{received:?}");
    let deliveries = sink.deliveries();
    assert!(deliveries.iter().all(|d| d["bcc_header"] == false));
    let last = deliveries.last().unwrap();
    let max_sessions = last["max_sessions"].as_u64().unwrap();
    assert!((3..=5).contains(&max_sessions), "{last}");
    let per_domain = last["max_per_domain"].as_object().unwrap();
    assert_eq!(per_domain.len(), 3, "{last}");
    assert!(per_domain.values().all(|n| n.as_u64() <= Some(2)), "{last}");
    assert!(per_domain.values().any(|n| n.as_u64() == Some(2)), "{last}");
    assert_eq!(records(&dir.path().join("r.jsonl")).len(), 60);
}

#[test]
fn mail_busy_domain_holds_up_no_other() {
    let dir = TempDir::new().unwrap();
    let Some(sink) = Sink::start(dir.path(), 0.0) else {
        return;
    };
    let outbox = dir.path().join("outbox");
    std::fs::create_dir(&outbox).unwrap();
    // Four slow messages to one domain come first in name order, then four
    // quick ones to another domain.
    for n in 0..4 {
        let id = format!("s{n}@origin.test");
        write_message(
            &outbox,
            &format!("a{n}.eml"),
            &id,
            &format!("To: slow{n}@slow.test"),
        );
        let id = format!("q{n}@origin.test");
        write_message(
            &outbox,
            &format!("b{n}.eml"),
            &id,
            &format!("To: quick{n}@quick.test"),
        );
    }

    let url = sink.url();
    let args = [
        "--smtp",
        &url,
        "--max-run",
        "2",
        "--per-domain",
        "1",
        "outbox",
    ];
    let output = mail(dir.path(), &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");

    // With one session for slow.test at a time, each taking a second, the
    // quick domain must be done before the second slow message is.
    let order: Vec<String> = sink
        .deliveries()
        .iter()
        .map(|d| d["rcpt_tos"][0].as_str().unwrap().to_owned())
        .collect();
    let last_quick = order
        .iter()
        .rposition(|r| r.ends_with("@quick.test"))
        .unwrap();
    let slow_before: usize = order[..last_quick]
        .iter()
        .filter(|r| r.ends_with("@slow.test"))
        .count();
    assert!(slow_before <= 1, "{order:?}");
}

#[test]
fn mail_shared_message_id_fails_under_journal() {
    let dir = TempDir::new().unwrap();
    let Some(sink) = Sink::start(dir.path(), 0.0) else {
        return;
    };
    let outbox = dir.path().join("outbox");
    std::fs::create_dir(&outbox).unwrap();
    write_message(&outbox, "1.eml", "dup@origin.test", "To: alice@a.test");
    write_message(&outbox, "2.eml", "dup@origin.test", "To: bob@a.test");

    let url = sink.url();
    let args = ["--smtp", &url, "--journal", "j.db", "outbox"];
    let output = mail(dir.path(), &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("same journal key as item 1"), "{stderr}");
    let received = sink.received();
    assert_eq!(received.len(), 1, "{received:?}");
}

#[test]
fn mail_faults_get_their_outcome() {
    let dir = TempDir::new().unwrap();
    let Some(sink) = Sink::start(dir.path(), 0.0) else {
        return;
    };
    let outbox = dir.path().join("outbox");
    std::fs::create_dir(&outbox).unwrap();
    let cases = ["temp-once", "reject", "busy-once", "drop-once", "slow"];
    for (n, local) in cases.iter().enumerate() {
        let headers = format!("To: {local}@d{n}.test");
        write_message(
            &outbox,
            &format!("{n}.eml"),
            &format!("f{n}@origin.test"),
            &headers,
        );
    }
    std::fs::write(
        outbox.join("5.eml"),
        "From: sender@origin.test\nSubject: x\n\nno recipient\n",
    )
    .unwrap();
    std::fs::write(outbox.join("6.png"), b"\x89PNG\r\n\x1a\n\0\0").unwrap();
    let mbox = "From x Mon Jan  1 00:00:00 2024\nFrom: s@origin.test\nTo: ok@m.test\nMessage-ID: <mb1@origin.test>\n\none\n\nFrom x Mon Jan  1 00:00:00 2024\nTo: ok@m.test\n\nno sender\n";
    std::fs::write(outbox.join("7.mbox"), mbox).unwrap();
    let merge = "{\"from\": \"s@origin.test\", \"to\": [\"j1@j.test\", \"reject@k.test\"], \"text\": \"hi\"}\n{\"from\": \"s@origin.test\"}\n";
    std::fs::write(dir.path().join("merge.jsonl"), merge).unwrap();

    let url = sink.url();
    let common = [
        "--smtp",
        url.as_str(),
        "--retry-delay",
        "50ms",
        "--timeout",
        "700ms",
        "--results",
        "r.jsonl",
    ];
    let output = mail(dir.path(), &[&common[..], &["outbox"]].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let output = mail(
        dir.path(),
        &[&common[..], &["--jsonl", "merge.jsonl"]].concat(),
    );
    assert_eq!(output.status.code(), Some(1));

    let by_place: BTreeMap<String, Value> = records(&dir.path().join("r.jsonl"))
        .into_iter()
        .map(|r| {
            let place = match &r["item"] {
                Value::String(place) => place.clone(),
                item => format!(
                    "{} {}",
                    item["file"].as_str().unwrap(),
                    item["domain"].as_str().unwrap()
                ),
            };
            (place, r)
        })
        .collect();
    let outcome = |place: &str| {
        let r = by_place
            .get(place)
            .unwrap_or_else(|| panic!("no record of {place}: {by_place:?}"));
        (
            r["outcome"].as_str().unwrap().to_owned(),
            r["attempts"].as_u64().unwrap(),
            r["error"].clone(),
        )
    };
    assert_eq!(outcome("outbox/0.eml d0.test").0, "done");
    assert_eq!(outcome("outbox/0.eml d0.test").1, 2);
    let (rejected, attempts, error) = outcome("outbox/1.eml d1.test");
    assert_eq!((rejected.as_str(), attempts), ("failed", 1));
    assert_eq!(error, "reject@d1.test: 550 5.1.1 no such user");
    let record = &by_place["outbox/1.eml d1.test"];
    assert_eq!(record["recipients"][0]["code"], 550);
    assert_eq!(outcome("outbox/2.eml d2.test").0, "done");
    assert_eq!(outcome("outbox/2.eml d2.test").1, 2);
    assert_eq!(outcome("outbox/3.eml d3.test").0, "done");
    assert_eq!(outcome("outbox/3.eml d3.test").1, 2);
    assert_eq!(outcome("outbox/4.eml d4.test").0, "timed_out");
    assert_eq!(
        outcome("outbox/5.eml").2,
        "no recipient: no address in To, Cc or Bcc"
    );
    assert_eq!(
        outcome("outbox/6.png").2,
        "not an email message: its first line is not a header"
    );
    assert_eq!(outcome("outbox/7.mbox m.test").0, "done");
    assert_eq!(outcome("outbox/7.mbox message 2").2, "no From header");
    assert_eq!(outcome("merge.jsonl j.test").0, "done");
    assert_eq!(outcome("merge.jsonl k.test").0, "failed");
    assert_eq!(
        outcome("merge.jsonl line 2").2,
        "no recipient: no address in To, Cc or Bcc"
    );

    let received = sink.received();
    let count = |address: &str| {
        received
            .iter()
            .filter(|((_, rcpt), _)| rcpt == address)
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    for address in [
        "temp-once@d0.test",
        "busy-once@d2.test",
        "drop-once@d3.test",
        "ok@m.test",
        "j1@j.test",
    ] {
        assert_eq!(count(address), 1, "{address}: {received:?}");
    }
    assert_eq!(count("reject@d1.test"), 0);
}

#[test]
fn mail_rejects_a_password_in_the_url() {
    let dir = TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("a.eml"),
        "From: a@x.test\nTo: b@y.test\n\nhi\n",
    )
    .unwrap();
    let output = mail(
        dir.path(),
        &["--smtp", "smtp://me:hunter2@127.0.0.1:25", "a.eml"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("BACKLOG_SMTP_PASSWORD"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn mail_journal_rerun_after_sigkill() {
    const MESSAGES: usize = 80;
    const MAX_RUN: usize = 4;
    let dir = TempDir::new().unwrap();
    let Some(sink) = Sink::start(dir.path(), 0.03) else {
        return;
    };
    let outbox = dir.path().join("outbox");
    std::fs::create_dir(&outbox).unwrap();
    for n in 0..MESSAGES {
        let headers = format!("To: r{n}@d{}.test", n % 4);
        write_message(
            &outbox,
            &format!("{n:03}.eml"),
            &format!("k{n}@origin.test"),
            &headers,
        );
    }
    let url = sink.url();
    let args = [
        "mail",
        "--smtp",
        &url,
        "--max-run",
        "4",
        "--journal",
        "j.db",
        "outbox",
    ];
    let mut kills = 0;
    let started = Instant::now();
    for target in [15, 40] {
        let mut child = Command::new(assert_cmd::cargo::cargo_bin!("backlog"))
            .current_dir(dir.path())
            .args(args)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while sink.deliveries().len() < target && started.elapsed() < Duration::from_secs(30) {
            sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    let output = mail(dir.path(), &args[1..]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let received = sink.received();
    assert_eq!(received.len(), MESSAGES, "every message arrives");
    let extra: usize = received.values().map(|n| n - 1).sum();
    assert!(
        extra <= kills * MAX_RUN,
        "{extra} extra copies after {kills} kills"
    );
}

#[test]
fn mail_cpython_email_test_data() {
    let data = Path::new("/root/.pyenv/versions/3.11.7/lib/python3.11/test/test_email/data");
    if !data.is_dir() {
        eprintln!("skipped: {} is missing", data.display());
        return;
    }
    let dir = TempDir::new().unwrap();
    let Some(sink) = Sink::start(dir.path(), 0.0) else {
        return;
    };
    let url = sink.url();
    let data_arg = data.to_str().unwrap();
    let output = mail(
        dir.path(),
        &[
            "--smtp",
            &url,
            "--retries",
            "0",
            "--results",
            "r.jsonl",
            data_arg,
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let records = records(&dir.path().join("r.jsonl"));
    let mut files = BTreeSet::new();
    let mut accepted = 0;
    for record in &records {
        match &record["item"] {
            Value::String(place) => {
                files.insert(place.split(' ').next().unwrap().to_owned());
                let reason = record["error"].as_str().unwrap();
                assert!(!reason.is_empty());
            }
            item => {
                files.insert(item["file"].as_str().unwrap().to_owned());
                assert_eq!(record["ok"], true, "{record}");
                accepted += item["to"].as_array().unwrap().len();
            }
        }
    }
    let on_disk = std::fs::read_dir(data).unwrap().count();
    assert_eq!(files.len(), on_disk, "every file has a record");
    let delivered: usize = sink.received().values().sum();
    assert_eq!(delivered, accepted);
    let image = records.iter().find(|r| {
        r["item"]
            .as_str()
            .is_some_and(|p| p.ends_with("python.png"))
    });
    assert_eq!(
        image.unwrap()["error"],
        "not an email message: its first line is not a header"
    );
}

#[test]
fn mail_starttls_required_uses_tls() {
    let dir = TempDir::new().unwrap();
    let Some(sink) = start_tls_sink(dir.path(), &["--tls", "starttls", "--require-starttls"])
    else {
        return;
    };
    write_one_message(dir.path());
    let url = format!("{}?starttls=required", sink.url());
    let output = mail(
        dir.path(),
        &["--smtp", &url, "--smtp-ca", "ca.pem", "a.eml"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let deliveries = sink.deliveries();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    let tls = deliveries[0]["tls"].as_str().unwrap_or_default();
    assert!(tls.starts_with("TLSv1."), "{}", deliveries[0]);
    assert_eq!(deliveries[0]["user"], Value::Null);
}

#[test]
fn mail_smtps_uses_tls() {
    let dir = TempDir::new().unwrap();
    let Some(sink) = start_tls_sink(dir.path(), &["--tls", "implicit"]) else {
        return;
    };
    write_one_message(dir.path());
    let url = format!("smtps://127.0.0.1:{}", sink.port);
    let output = mail(
        dir.path(),
        &["--smtp", &url, "--smtp-ca", "ca.pem", "a.eml"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let deliveries = sink.deliveries();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    let tls = deliveries[0]["tls"].as_str().unwrap_or_default();
    assert!(tls.starts_with("TLSv1."), "{}", deliveries[0]);
}

#[test]
fn mail_auth_delivers_as_user() {
    let dir = TempDir::new().unwrap();
    let options = ["--tls", "starttls", "--auth", "mailer:right horse"];
    let Some(sink) = start_tls_sink(dir.path(), &options) else {
        return;
    };
    write_one_message(dir.path());
    let url = sink.url();
    let args = ["--smtp", &url, "--smtp-ca", "ca.pem", "a.eml"];
    let output = mail_as(dir.path(), Some(("mailer", "right horse")), &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let deliveries = sink.deliveries();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0]["user"], "mailer");
    assert!(deliveries[0]["tls"].is_string(), "{}", deliveries[0]);
}

#[test]
fn mail_auth_wrong_password_fails() {
    let dir = TempDir::new().unwrap();
    let options = ["--tls", "starttls", "--auth", "mailer:right horse"];
    let Some(sink) = start_tls_sink(dir.path(), &options) else {
        return;
    };
    write_one_message(dir.path());
    let url = sink.url();
    let args = [
        "--smtp",
        &url,
        "--smtp-ca",
        "ca.pem",
        "--retry-delay",
        "50ms",
        "--results",
        "r.jsonl",
        "a.eml",
    ];
    let output = mail_as(dir.path(), Some(("mailer", "wrong horse")), &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let record = only_record(&dir.path().join("r.jsonl"));
    assert_eq!(record["outcome"], "failed", "{record}");
    // 535 is permanent, so the envelope is not retried.
    assert_eq!(record["attempts"], 1, "{record}");
    assert_eq!(record["recipients"][0]["code"], 535, "{record}");
    let error = record["error"].as_str().unwrap();
    assert!(
        error.contains("Authentication credentials invalid"),
        "{error}"
    );
    assert!(!stderr.contains("wrong horse"), "{stderr}");
    assert!(sink.deliveries().is_empty());
}

#[test]
fn mail_untrusted_certificate_rejected() {
    let dir = TempDir::new().unwrap();
    let Some(sink) = start_tls_sink(dir.path(), &["--tls", "starttls"]) else {
        return;
    };
    write_one_message(dir.path());
    let url = format!("{}?starttls=required", sink.url());
    let cases: [&[&str]; 2] = [&["--smtp-ca", "other-ca.pem"], &[]];
    for ca in cases {
        let _ = std::fs::remove_file(dir.path().join("r.jsonl"));
        let args = [
            &["--smtp", &url, "--retries", "0", "--results", "r.jsonl"][..],
            ca,
            &["a.eml"],
        ]
        .concat();
        let output = mail(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{ca:?}: {stderr}");
        let record = only_record(&dir.path().join("r.jsonl"));
        let error = record["error"].as_str().unwrap();
        assert!(error.contains("STARTTLS failed"), "{ca:?}: {error}");
        assert!(
            error.contains("invalid peer certificate: UnknownIssuer"),
            "{ca:?}: {error}"
        );
    }
    assert!(sink.deliveries().is_empty());
}

#[test]
fn mail_smtp_ca_must_hold_certificates() {
    let dir = TempDir::new().unwrap();
    write_one_message(dir.path());
    std::fs::write(dir.path().join("notes.txt"), "no certificate here\n").unwrap();
    let broken = "-----BEGIN CERTIFICATE-----\nTUlJQm9uZQ==\n-----END CERTIFICATE-----\n";
    std::fs::write(dir.path().join("broken.pem"), broken).unwrap();
    let cut = "-----BEGIN CERTIFICATE-----\nTUlJQm9uZQ==\n";
    std::fs::write(dir.path().join("cut.pem"), cut).unwrap();
    let cases = [
        ("missing.pem", "cannot read missing.pem"),
        ("notes.txt", "notes.txt contains no certificate"),
        ("broken.pem", "broken.pem contains an invalid certificate"),
        ("cut.pem", "cut.pem is not a valid PEM file"),
    ];
    for (file, expected) in cases {
        let args = ["--smtp", "smtp://127.0.0.1:25", "--smtp-ca", file, "a.eml"];
        let output = mail(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.contains(expected), "{file}: {stderr}");
    }
}

/// Two `backlog mail` processes share a global limit and a limit per
/// recipient domain through a private redis-server. The checks use the
/// sink's own session counts over both processes.
#[test]
fn mail_limiter_shares_limits_between_processes() {
    let dir = TempDir::new().unwrap();
    let Some(sink) = Sink::start(dir.path(), 0.2) else {
        return;
    };
    let Some(redis) = test_redis::RedisServer::start(test_redis::Persistence::None) else {
        return;
    };
    let limiter = format!("{}/mail", redis.url());
    let limits = Command::new(assert_cmd::cargo::cargo_bin!("backlog"))
        .args(["limits", &limiter, "--lease", "2s", "--global", "3"])
        .args(["--per-key-default", "1"])
        .output()
        .unwrap();
    assert!(
        limits.status.success(),
        "{}",
        String::from_utf8_lossy(&limits.stderr)
    );

    let mut expected = BTreeSet::new();
    let mut workers = Vec::new();
    for worker in ["w1", "w2"] {
        let outbox = dir.path().join(worker);
        std::fs::create_dir(&outbox).unwrap();
        for n in 0..9 {
            let domain = ["a", "b", "c", "d"][n % 4];
            let to = format!("{worker}-{n}@{domain}.test");
            let id = format!("{worker}-{n}@origin.test");
            write_message(&outbox, &format!("{n}.eml"), &id, &format!("To: {to}"));
            expected.insert((format!("<{id}>"), to));
        }
        // Locally each process could open 4 sessions, 2 per domain; the
        // shared limits are tighter.
        let child = Command::new(assert_cmd::cargo::cargo_bin!("backlog"))
            .current_dir(dir.path())
            .args(["mail", "--smtp", &sink.url(), "--max-run", "4"])
            .args(["--per-domain", "2", "--limiter", &limiter])
            .arg(worker)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        workers.push(child);
    }
    for worker in workers {
        let output = worker.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        assert!(stderr.contains("done 9, failed 0"), "{stderr}");
    }

    let received = sink.received();
    let got: BTreeSet<_> = received.keys().cloned().collect();
    assert_eq!(got, expected);
    assert!(received.values().all(|&count| count == 1), "{received:?}");
    let deliveries = sink.deliveries();
    let last = deliveries.last().unwrap();
    let max_sessions = last["max_sessions"].as_u64().unwrap();
    assert!(max_sessions <= 3, "{last}");
    let per_domain = last["max_per_domain"].as_object().unwrap();
    assert_eq!(per_domain.len(), 4, "{last}");
    assert!(per_domain.values().all(|n| n.as_u64() == Some(1)), "{last}");
    // Both processes finished, so no lease is left behind.
    assert_eq!(redis.command(&["ZCARD", "dsr:{mail}:h"]).trim(), ":0");
}
