//! Real agent processes for tests (the crate `clusteros-testkit`): the files of one agent under
//! test (its config, serialized from the agent's own config type, its secret, socket and
//! log) and the command that starts it, so that the host cluster harness (`agent/tests/common`)
//! and the fault suite (`tests/src/faults`) run agents the same way. Also the fast Raft timings
//! both use, and one async poll for a condition.
//!
//! Must not: be a dependency of the agent itself (only of tests: the agent's integration tests and
//! benchmarks take it as a dev-dependency, the tests crate as a dependency). It is a crate of its
//! own, not a feature of the agent, so that the agent library the tests link is the one `make
//! release` builds: a feature would make cargo build the agent twice, once per feature set.

pub mod lan;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clusteros::cli::client::LocalClient;
use clusteros::core::config::{DiscoveryFile, FileConfig, RaftTuning};

/// Raft timings for agents on one host: a heartbeat every 100 ms, elections after 0.8-1.6 s, RPCs
/// given 1 s (the defaults are slower on purpose: real networks, real disks).
pub fn fast_raft(snapshot_after_logs: u64, logs_to_keep: u64) -> RaftTuning {
    RaftTuning {
        heartbeat_ms: 100,
        election_timeout_min_ms: 800,
        election_timeout_max_ms: 1600,
        snapshot_after_logs,
        logs_to_keep,
        rpc_timeout_ms: 1000,
        ..RaftTuning::default()
    }
}

/// The directory of one agent under test: `agent.toml`, `secret`, `agent.sock`, `agent.log`.
#[derive(Debug, Clone)]
pub struct AgentFiles {
    pub dir: PathBuf,
}

impl AgentFiles {
    pub fn new(dir: impl Into<PathBuf>) -> AgentFiles {
        AgentFiles { dir: dir.into() }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    pub fn secret_path(&self) -> PathBuf {
        self.dir.join("secret")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The node id and node key of the agent whose state directory is `state_dir`, as its identity
    /// file records them: to sign requests as that node (a test playing a member, or a removed
    /// one, that still holds its key).
    pub fn node_key_in(state_dir: &Path) -> std::io::Result<(String, clusteros::core::auth::NodeKey)> {
        use base64::Engine;
        let path = state_dir.join(clusteros::adapters::identity::IDENTITY_FILE);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        let bad = |what: &str| std::io::Error::other(format!("{}: no {what}", path.display()));
        let id = clusteros::core::state::NodeId(v["node_id"].as_u64().ok_or_else(|| bad("node_id"))?);
        let seed = v["node_key_seed"].as_str().ok_or_else(|| bad("node_key_seed"))?;
        let seed: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(seed)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("32-byte node_key_seed"))?;
        Ok((id.to_string(), clusteros::core::auth::NodeKey::from_seed(&seed)))
    }

    /// The local API client of this agent.
    pub fn client(&self) -> LocalClient {
        LocalClient::new(&self.socket())
    }

    /// The agent's log so far (empty before its first start).
    pub fn log(&self) -> String {
        std::fs::read(self.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Writes `agent.toml` from `file` (its socket and secret file set to this directory's) and
    /// the secret file. LAN beacons are off unless `file` turns them on: an agent on the host's
    /// network would broadcast onto the host's LAN, so only tests inside network namespaces of
    /// their own turn them on.
    pub fn write_config(&self, file: FileConfig, secret: &str) -> std::io::Result<()> {
        let discovery =
            DiscoveryFile { beacon: Some(file.discovery.beacon.unwrap_or(false)), ..file.discovery.clone() };
        let file = FileConfig {
            socket_path: Some(self.socket()),
            cluster_secret_file: Some(self.secret_path()),
            discovery,
            ..file
        };
        std::fs::write(self.config_path(), file.to_toml())?;
        Self::write_secret(&self.secret_path(), &format!("{secret}\n"))
    }

    /// Writes `accepted-secrets` (one per line) for `accepted_cluster_secrets_file`: its path, or
    /// `None` (and no file) when there are none.
    pub fn write_accepted_secrets(&self, secrets: &[String]) -> std::io::Result<Option<PathBuf>> {
        let path = self.dir.join("accepted-secrets");
        if secrets.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(None),
            };
        }
        Self::write_secret(&path, &(secrets.join("\n") + "\n"))?;
        Ok(Some(path))
    }

    /// A file only its owner reads, written as the agent writes its own.
    fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
        clusteros::adapters::files::write_atomic(path, text.as_bytes(), 0o600).map_err(std::io::Error::other)
    }

    /// Starts `bin agent --config agent.toml` (inside network namespace `netns` when given),
    /// its output appended to the log after the line `banner` (when given); none of the
    /// variables systemd sets for a service leaks in from the test's environment.
    pub fn spawn(&self, bin: &Path, netns: Option<&str>, banner: Option<&str>) -> std::io::Result<Child> {
        use std::io::Write as _;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        if let Some(b) = banner {
            writeln!(log, "{b}")?;
        }
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("agent")
            .arg("--config")
            .arg(self.config_path())
            // CLUSTEROS_TEST_LOG: another log filter for the agents under test (e.g. debug).
            .env("CLUSTEROS_LOG", std::env::var("CLUSTEROS_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {}: {e}", bin.display())))
    }
}

/// Polls `f` every 100 ms until it gives `Some`, at most `timeout` long (`None` then).
pub async fn poll<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
