//! A qemu-guest-agent client over the VM's virtio-serial port (a unix socket on the host): runs
//! commands in the guest without any guest network.
//!
//! Each call opens a connection, resynchronises with `guest-sync-delimited` (the agent may hold a
//! half-read request or stale answers from an earlier client), then speaks JSON lines.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

/// What a command in the guest printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit status, or 128+N when killed by signal N.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// `Ok(self)` when the command exited 0, else an error with its output.
    pub fn check(self, what: &str) -> Result<Output> {
        if self.success() { Ok(self) } else { Err(anyhow!("{what}: {self}")) }
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.code)?;
        for (name, s) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let s = s.trim();
            if !s.is_empty() {
                write!(f, "; {name}: {}", truncate(s, 2000))?;
            }
        }
        Ok(())
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The guest agent of one VM. Calls are serialised: QEMU serves one client at a time.
pub struct Qga {
    path: PathBuf,
    lock: Mutex<()>,
}

/// Errors from the agent itself (it answered with an error), as opposed to not answering.
#[derive(Debug)]
pub struct AgentError(pub String);

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest agent error: {}", self.0)
    }
}

impl std::error::Error for AgentError {}

impl Qga {
    pub fn new(path: impl Into<PathBuf>) -> Qga {
        Qga { path: path.into(), lock: Mutex::new(()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Succeeds once the agent answers; each attempt waits up to 3 s for the answer.
    pub fn ping(&self, timeout: Duration) -> Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + timeout;
        let mut c = Conn::connect_retry(&self.path, deadline)?;
        c.call("guest-ping", json!({}), deadline).map(|_| ())
    }

    /// Runs `argv` (looked up in the guest's PATH, no shell) and waits for it, all within `timeout`
    /// (including reaching the agent). `input` becomes its stdin. Output as text (lossy UTF-8).
    pub fn exec(&self, argv: &[&str], input: Option<&[u8]>, timeout: Duration) -> Result<Output> {
        let raw = self.exec_raw(argv, input, timeout)?;
        let mut stderr = String::from_utf8_lossy(&raw.stderr).into_owned();
        if raw.truncated {
            stderr.push_str("\n(output truncated by the guest agent)");
        }
        Ok(Output { code: raw.code, stdout: String::from_utf8_lossy(&raw.stdout).into_owned(), stderr })
    }

    /// [`Qga::exec`] with the output as the bytes the command wrote.
    pub fn exec_raw(&self, argv: &[&str], input: Option<&[u8]>, timeout: Duration) -> Result<RawOutput> {
        let Some((prog, args)) = argv.split_first() else { bail!("exec: empty command") };
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + timeout;
        let mut c = Conn::connect_retry(&self.path, deadline)?;
        let mut req = json!({ "path": prog, "arg": args, "capture-output": true });
        if let Some(input) = input {
            req["input-data"] = json!(B64.encode(input));
        }
        let pid = c.call("guest-exec", req, deadline)?["pid"].as_i64().context("guest-exec returned no pid")?;
        let mut delay = Duration::from_millis(20);
        let st = loop {
            let st = c.call("guest-exec-status", json!({ "pid": pid }), deadline)?;
            if st["exited"].as_bool() == Some(true) {
                break st;
            }
            if Instant::now() + delay > deadline {
                bail!(
                    "`{}` still running in the guest (pid {pid}) after {:.0} s",
                    argv.join(" "),
                    timeout.as_secs_f64()
                );
            }
            // Polling interval for the command's end.
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(250));
        };
        let data = |k: &str| -> Result<Vec<u8>> {
            match st[k].as_str() {
                Some(s) => B64.decode(s).with_context(|| format!("bad base64 in {k}")),
                None => Ok(Vec::new()),
            }
        };
        let truncated = st["out-truncated"].as_bool() == Some(true) || st["err-truncated"].as_bool() == Some(true);
        let code = match st["signal"].as_i64() {
            Some(sig) => 128 + sig as i32,
            None => st["exitcode"].as_i64().context("guest-exec-status: no exit code")? as i32,
        };
        Ok(RawOutput { code, stdout: data("out-data")?, stderr: data("err-data")?, truncated })
    }
}

/// What a command in the guest wrote, as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOutput {
    /// Exit status, or 128+N when killed by signal N.
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The guest agent cut the output short (it keeps a bounded amount).
    pub truncated: bool,
}

struct Conn {
    sock: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    /// The agent starts late in the boot and a fresh connection may be ignored until the guest
    /// opens its end: retry (3 s per attempt) until `deadline`.
    fn connect_retry(path: &Path, deadline: Instant) -> Result<Conn> {
        let mut last = anyhow!("no attempt");
        loop {
            let attempt = (Instant::now() + Duration::from_secs(3)).min(deadline);
            match Conn::connect(path, attempt) {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(last.context(format!("guest agent at {} did not answer", path.display())));
            }
            // Retry interval while the guest boots.
            std::thread::sleep(Duration::from_millis(300).min(deadline - now));
        }
    }

    fn connect(path: &Path, deadline: Instant) -> Result<Conn> {
        let sock = UnixStream::connect(path).with_context(|| format!("cannot connect to {}", path.display()))?;
        sock.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut c = Conn { sock, buf: Vec::new() };
        let id: u32 = rand::random::<u32>() >> 1;
        // 0xFF makes the agent drop a half-written request of an earlier client.
        c.sock.write_all(&[0xff])?;
        c.send(&json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } }))?;
        // The answer is preceded by 0xFF; anything before it is stale.
        loop {
            let line = c.read_line(deadline)?;
            let line = match line.iter().rposition(|b| *b == 0xff) {
                Some(i) => &line[i + 1..],
                None => &line[..],
            };
            let Ok(v) = serde_json::from_slice::<Value>(line) else { continue };
            if v["return"].as_u64() == Some(u64::from(id)) {
                return Ok(c);
            }
        }
    }

    fn send(&mut self, v: &Value) -> Result<()> {
        let mut b = serde_json::to_vec(v)?;
        b.push(b'\n');
        self.sock.write_all(&b).context("cannot write to the guest agent")
    }

    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                return Ok(line);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no answer from the guest agent in time");
            }
            self.sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => bail!("the guest agent closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    bail!("no answer from the guest agent in time")
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("cannot read from the guest agent"),
            }
        }
    }

    fn call(&mut self, command: &str, arguments: Value, deadline: Instant) -> Result<Value> {
        self.send(&json!({ "execute": command, "arguments": arguments }))?;
        loop {
            let line = self.read_line(deadline)?;
            let Ok(v) = serde_json::from_slice::<Value>(&line) else { continue };
            if let Some(e) = v.get("error") {
                return Err(AgentError(format!("{command}: {}: {}", e["class"], e["desc"])).into());
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }
}
