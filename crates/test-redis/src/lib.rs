//! A private `redis-server` for tests: started on a free loopback port with
//! its data in a temporary folder, so that a test can kill it, restart it
//! and lose its data without touching any shared server.
//!
//! [`RedisServer::start`] returns `None` with a printed reason when
//! `redis-server` is not installed, and panics instead when the environment
//! variable `BACKLOG_REQUIRE_SERVERS` is `1`, so that CI cannot pass by
//! skipping.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether the server writes its data to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing is kept: a restart starts empty.
    None,
    /// An append-only file synced on every write: a restart, even after
    /// SIGKILL, keeps every acknowledged write.
    AppendAlways,
}

/// A running `redis-server` owned by one test. Killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    persistence: Persistence,
}

impl RedisServer {
    /// Starts a server on a free loopback port, or returns `None` after
    /// printing why when `redis-server` is missing.
    ///
    /// # Panics
    ///
    /// When the server is missing and `BACKLOG_REQUIRE_SERVERS=1`, when it
    /// does not reply to PING within 10 seconds, or when it exits at start
    /// on 5 ports in a row.
    pub fn start(persistence: Persistence) -> Option<Self> {
        let Some(program) = find_program() else {
            let reason = "redis-server is not installed (apt-get install redis-server)";
            assert!(
                std::env::var("BACKLOG_REQUIRE_SERVERS").as_deref() != Ok("1"),
                "BACKLOG_REQUIRE_SERVERS=1 but {reason}"
            );
            eprintln!("skipped: {reason}");
            return None;
        };
        let dir = tempfile::tempdir().expect("create a folder for redis-server");
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            persistence,
        };
        // A port found free can be taken before the server binds it; try a
        // few.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn(&program) {
                return Some(server);
            }
        }
        panic!("redis-server did not start on a free loopback port after 5 tries");
    }

    /// Returns the port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the server's URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Returns the folder that contains the server's files and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused server must die too.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with SIGSTOP, so connections stay open but get no
    /// reply, as behind a network that drops every packet.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server go on with SIGCONT.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let child = self
            .child
            .as_ref()
            .expect("signal to a running redis-server");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Starts the server again on the same port with the same folder, so
    /// that an append-only file, if any, is read back.
    ///
    /// # Panics
    ///
    /// When the server is still running or does not come back.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running redis-server");
        let program = find_program().expect("redis-server went missing");
        // The old socket may linger for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn(&program) {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends one command and returns the reply in RESP text, for checks
    /// that must not go through the code under test.
    ///
    /// # Panics
    ///
    /// When the server cannot be reached.
    pub fn command(&self, args: &[&str]) -> String {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
            .expect("connect to the test redis-server");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set a read timeout");
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream
            .write_all(request.as_bytes())
            .expect("send a command");
        let mut reader = BufReader::new(stream);
        let mut reply = String::new();
        read_reply(&mut reader, &mut reply);
        reply
    }

    fn spawn(&mut self, program: &Path) -> bool {
        let mut command = Command::new(program);
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"));
        match self.persistence {
            Persistence::None => {
                command.args(["--appendonly", "no"]);
            }
            Persistence::AppendAlways => {
                command.args(["--appendonly", "yes", "--appendfsync", "always"]);
            }
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                // Exited: most likely the port was taken.
                return false;
            }
            if ping(self.port) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "redis-server on port {} did not reply to PING within 10 s; see its log {}",
            self.port,
            self.dir.path().join("redis.log").display()
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find_program() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
        let port = listener.local_addr().expect("read the bound port").port();
        // Never the shared server's port.
        if port != 6379 {
            return port;
        }
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn read_reply(reader: &mut impl BufRead, out: &mut String) {
    let mut line = String::new();
    reader.read_line(&mut line).expect("read a reply");
    out.push_str(&line);
    let body = line.trim_end();
    let count = || body[1..].parse::<i64>().expect("a length");
    match body.as_bytes().first() {
        Some(b'$') if count() >= 0 => {
            let mut data = vec![0u8; usize::try_from(count()).expect("a length") + 2];
            reader.read_exact(&mut data).expect("read a bulk string");
            out.push_str(&String::from_utf8_lossy(&data));
        }
        Some(b'*') => {
            for _ in 0..count().max(0) {
                read_reply(reader, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_kill_restart_keeps_data_only_with_persistence() {
        for (persistence, kept) in [
            (Persistence::None, false),
            (Persistence::AppendAlways, true),
        ] {
            let Some(mut server) = RedisServer::start(persistence) else {
                return;
            };
            assert_ne!(server.port(), 6379);
            assert!(server.command(&["SET", "k", "v"]).starts_with("+OK"));
            server.kill();
            assert!(!ping(server.port()));
            server.restart();
            let reply = server.command(&["GET", "k"]);
            assert_eq!(reply.contains("v\r\n"), kept, "{persistence:?}: {reply:?}");
        }
    }
}
