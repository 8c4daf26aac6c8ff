//! A minimal QMP client: one command per connection (e.g. `system_powerdown` for an ACPI power-off).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Runs `command` with `arguments` on the QMP socket at `path`; returns its `return` value.
pub fn call(path: &Path, command: &str, arguments: Value, timeout: Duration) -> Result<Value> {
    let sock = UnixStream::connect(path).with_context(|| format!("cannot connect to QMP at {}", path.display()))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut w = sock.try_clone()?;
    let mut r = BufReader::new(sock);
    let mut read = || -> Result<Value> {
        let mut line = String::new();
        if r.read_line(&mut line).context("no answer from QMP")? == 0 {
            bail!("QMP closed the connection");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message {line:?}"))
    };
    let greeting = read()?;
    if greeting.get("QMP").is_none() {
        bail!("not a QMP greeting: {greeting}");
    }
    let mut result = Value::Null;
    for (cmd, args) in [("qmp_capabilities", json!({})), (command, arguments)] {
        let mut req = serde_json::to_vec(&json!({ "execute": cmd, "arguments": args }))?;
        req.push(b'\n');
        w.write_all(&req)?;
        // Events may come before the answer.
        result = loop {
            let m = read()?;
            if let Some(e) = m.get("error") {
                bail!("QMP {cmd}: {}: {}", e["class"], e["desc"]);
            }
            if let Some(r) = m.get("return") {
                break r.clone();
            }
        };
    }
    Ok(result)
}
