//! `clusteros agent`: binds the sockets, runs the agent, talks to systemd (READY, STATUS,
//! watchdog) and restarts the agent in-process after it leaves or is removed from the cluster.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sd_notify::NotifyState;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::adapters::identity::Identity;
use crate::core::config::{Config, MetricsListen, SECRET_HOWTO};
use crate::runtime::driver::{Action, Backoff, LoopError, Reconciler, Triggers, Wake};
use crate::runtime::{Node, Phase, RunEnd, StartError, finish_membership_reset, reset_membership};
use crate::server::accept::Limits;
use crate::server::local::LocalState;

fn notify(states: &[NotifyState]) {
    // Not under systemd (tests, manual runs): nothing to tell.
    let _ = sd_notify::notify(states);
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

/// Binds the root-only unix socket for the CLI, replacing a stale one.
fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale socket {}", path.display())),
    }
    let l = UnixListener::bind(path).with_context(|| format!("cannot bind the CLI socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {} to root", path.display()))?;
    Ok(l)
}

/// Resolves once `stop` turns true: the servers' graceful-shutdown signal.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs a server future in its own task and logs how it failed, if it does.
fn spawn_server<F>(what: &'static str, serve: F) -> tokio::task::JoinHandle<()>
where
    F: std::future::IntoFuture<Output = std::io::Result<()>> + Send + 'static,
    F::IntoFuture: Send,
{
    tokio::spawn(async move {
        if let Err(e) = serve.await {
            error!("{what} server failed: {e}");
        }
    })
}

fn spawn_local(listener: UnixListener, state: LocalState, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    let app = crate::server::local::router(state);
    spawn_server("local API", axum::serve(listener, app).with_graceful_shutdown(stopped(stop)))
}

fn watchdog_task() {
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            loop {
                notify(&[NotifyState::Watchdog]);
                tokio::time::sleep(interval / 2).await;
            }
        });
    }
}

/// Runs an agent that cannot form a cluster (no secret, invalid config) so that `clusteros status`
/// can say what is wrong. Returns on a shutdown signal.
async fn run_unconfigured(socket: &Path, name: String, problems: Vec<String>) -> Result<()> {
    serve_problems(socket, name, problems, shutdown_signal()).await?;
    notify(&[NotifyState::Stopping]);
    Ok(())
}

/// Serves only `status` (which lists `problems`) until `until` resolves.
async fn serve_problems(
    socket: &Path,
    name: String,
    problems: Vec<String>,
    until: impl std::future::Future<Output = ()>,
) -> Result<()> {
    for p in &problems {
        error!("{p}");
    }
    serve_problems_quietly(socket, name, problems, until).await
}

/// [`serve_problems`] without logging them (the caller does, rate-limited).
async fn serve_problems_quietly(
    socket: &Path,
    name: String,
    problems: Vec<String>,
    until: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let local =
        spawn_local(bind_socket(socket)?, LocalState::Unconfigured { name, problems: problems.clone() }, stop_rx);
    notify(&[NotifyState::Ready, NotifyState::Status(&format!("not running: {}", problems.join("; ")))]);
    until.await;
    let _ = stop_tx.send(true);
    let _ = local.await;
    Ok(())
}

fn status_line(agent: &Node) -> String {
    let p = agent.progress();
    if p.phase != Phase::Member {
        return format!("{}: {}", p.phase, p.detail);
    }
    let m = agent.metrics();
    let membership = m.membership_config.membership();
    let leader = m
        .current_leader
        .map(|l| {
            agent.state.read(|d| d.state.members.get(&l).map(|r| r.spec.name.clone())).unwrap_or_else(|| l.to_string())
        })
        .unwrap_or_else(|| "none".into());
    format!(
        "member · {:?} · leader {} · term {} · {} voters, {} learners",
        m.state,
        leader,
        m.current_term,
        membership.voter_ids().count(),
        membership.learner_ids().count()
    )
}

/// The `clusteros agent` entry point. `config` is the loaded configuration, or the error that
/// loading it gave (then the agent serves only its status).
pub async fn run(config: Result<Config, String>, fallback_socket: PathBuf) -> Result<()> {
    watchdog_task();
    raise_descriptor_limit();
    let mut cfg = match config {
        Ok(c) => c,
        Err(problem) => {
            let problem = format!("configuration error: {problem}; fix it and restart clusteros-agent.service");
            return run_unconfigured(&fallback_socket, crate::adapters::identity::hostname(), vec![problem]).await;
        }
    };
    let name = cfg.node_name.clone().unwrap_or_else(crate::adapters::identity::hostname);
    let Some(secret) = cfg.cluster_secret.clone() else {
        let problem =
            format!("no cluster secret provided, so this node will not form or join a cluster: {SECRET_HOWTO}");
        return run_unconfigured(&cfg.socket_path, name, vec![problem]).await;
    };
    crate::adapters::files::ensure_dir(&cfg.state_dir, 0o700)?;
    let mut extra_join: Vec<String> = Vec::new();
    let mut signal = Box::pin(shutdown_signal());
    // Without an address other nodes can dial there is nothing to start yet: say so in `status`
    // while the network comes up, and start as soon as the kernel has a route to dial from.
    if let Err(e) = crate::adapters::host::resolve_advertise(&cfg) {
        let problem = format!(
            "cannot work out this node's address ({e}): set advertise_addr in /etc/clusteros/agent.toml, or give the node a default route or a join address"
        );
        let mut stopped = false;
        let until = async {
            loop {
                tokio::select! {
                    _ = &mut signal => {
                        stopped = true;
                        break;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                if crate::adapters::host::resolve_advertise(&cfg).is_ok() {
                    break;
                }
            }
        };
        serve_problems(&cfg.socket_path, name.clone(), vec![problem], until).await?;
        if stopped {
            notify(&[NotifyState::Stopping]);
            return Ok(());
        }
    }
    let mut storage_log = crate::server::Throttle::new(Duration::from_secs(60), 1);
    // Bound once for every run of the agent (a run after `leave` must not race the last one's
    // socket); a port that cannot be bound leaves beacons off, said in the journal and `status`.
    let beacon_socket = match &cfg.discovery.beacon {
        Some(settings) => Some(match crate::adapters::beacon::BeaconSocket::open(settings).await {
            Ok(s) => Ok(Arc::new(s)),
            Err(e) => {
                warn!("{e}");
                Err(e.to_string())
            }
        }),
        None => None,
    };
    loop {
        // The state directory must take writes before Raft starts on it: a full or read-only
        // disk is reported in `status` (and the metrics) and retried, not met halfway through a
        // log append.
        let agent = loop {
            let problem = match probe_state_dir(&cfg.state_dir).await {
                Err(e) => storage_problem(&cfg, &e),
                Ok(()) => {
                    // A reset a crash interrupted is completed before the identity is read.
                    let identity = finish_membership_reset(&cfg.state_dir, &name)
                        .map_err(|e| e.to_string())
                        .and_then(|_| Identity::load_or_create(&cfg.state_dir, &name).map_err(|e| e.to_string()));
                    let opened = match identity {
                        Ok(identity) => Node::open(cfg.clone(), identity, &secret, extra_join.clone())
                            .await
                            .map_err(|e| (e.is_storage(), e.to_string())),
                        Err(e) => Err((true, e)),
                    };
                    match opened {
                        Ok(agent) => break agent,
                        Err((true, e)) => storage_problem(&cfg, &e),
                        Err((false, e)) => anyhow::bail!(e),
                    }
                }
            };
            if let Some(held) = storage_log.due_unless_repeated(&problem) {
                match held {
                    0 => warn!("{problem}"),
                    n => warn!("{problem} ({n} more checks found the same since it was last logged)"),
                }
            }
            if !wait_with_problem(&cfg, &name, problem, &mut signal).await? {
                notify(&[NotifyState::Stopping]);
                return Ok(());
            }
        };
        extra_join.clear();
        info!(
            node_id = %agent.id(),
            name = %agent.identity.name,
            api_addr = %agent.api_addr,
            cluster_keys = %agent.gate.keys.fingerprints().join(","),
            "agent starting"
        );
        let peer = TcpListener::bind(cfg.listen_addr)
            .await
            .map_err(|source| StartError::Listen { addr: cfg.listen_addr, source })?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let peer_task = tokio::spawn(serve_peer("peer API", peer, agent.clone(), stop_rx.clone()));
        let mesh_peer_task = tokio::spawn(serve_on_mesh(agent.clone(), stop_rx.clone()));
        let mut servers = vec![peer_task, mesh_peer_task];
        if let Some(addr) = metrics_addr_now(cfg.metrics) {
            match TcpListener::bind(addr).await {
                Ok(l) => servers.push(spawn_metrics(l, LocalState::Running(agent.clone()), stop_rx.clone())),
                Err(e) => warn!("cannot serve metrics on {addr}: {e}; set metrics_addr to a free address or \"off\""),
            }
        }
        if let MetricsListen::LoopbackAndMesh(port) = cfg.metrics {
            servers.push(tokio::spawn(serve_metrics_on_mesh(agent.clone(), port, stop_rx.clone())));
        }
        if let (Some(socket), Some(beacons)) = (&beacon_socket, &agent.beacons) {
            beacons.set_socket(socket.clone());
            if let Ok(s) = socket {
                servers.push(tokio::spawn(crate::server::beacon::serve(s.clone(), agent.clone(), stop_rx.clone())));
            }
        }
        let local_task = spawn_local(bind_socket(&cfg.socket_path)?, LocalState::Running(agent.clone()), stop_rx);
        let loops = crate::runtime::start(&agent);
        notify(&[NotifyState::Ready, NotifyState::Status(&status_line(&agent))]);

        let mut end = agent.end_signal();
        let outcome = loop {
            tokio::select! {
                _ = &mut signal => break RunEnd::Shutdown,
                why = raft_fatal(&agent) => {
                    error!(node_id = %agent.id(), "{}", fatal_message(&cfg, &why));
                    break RunEnd::Fatal(why);
                }
                r = end.changed() => {
                    if r.is_ok() && let Some(e) = end.borrow().clone() { break e; }
                }
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    notify(&[NotifyState::Status(&status_line(&agent))]);
                }
            }
        };
        info!(node_id = %agent.id(), "agent stopping: {outcome:?}");
        notify(&[NotifyState::Stopping]);
        agent.request_end(outcome.clone());
        let _ = stop_tx.send(true);
        // A leader that stops for good hands its office to the voter furthest along, which then
        // need not wait out an election timeout (this also stops Raft).
        if matches!(outcome, RunEnd::Shutdown) {
            agent.hand_off().await;
        }
        if let Err(e) = agent.raft.shutdown().await {
            warn!("Raft shutdown: {e}");
        }
        for mut t in loops.into_iter().chain(servers.into_iter().chain([local_task])) {
            if tokio::time::timeout(Duration::from_secs(10), &mut t).await.is_err() {
                t.abort();
                let _ = t.await;
            }
        }
        let state_dir = cfg.state_dir.clone();
        drop(agent);
        match outcome {
            RunEnd::Shutdown => return Ok(()),
            // Nothing acknowledged is lost: a write is acknowledged only after its log entry was
            // synced. systemd starts the agent again; it waits until the directory takes writes.
            RunEnd::Fatal(why) => anyhow::bail!(fatal_message(&cfg, &why)),
            // Nothing to reset: a node that readdresses has no Raft state and no pledge.
            RunEnd::Readdress { addr } => {
                cfg.advertise_addr = Some(addr);
                notify(&[NotifyState::Reloading]);
            }
            RunEnd::Left | RunEnd::Rejoin { .. } => {
                // A new member needs a new node id: node ids are never reused.
                reset_membership(&state_dir, &name)?;
                if let RunEnd::Rejoin { via } = outcome {
                    extra_join = via;
                }
                notify(&[NotifyState::Reloading]);
            }
        }
    }
}

/// Raises the soft limit on open files to the hard one (at most 2^20): the peer API holds up to
/// [`Limits::PEER`] connections, more than the customary soft limit of 1,024. The unit sets
/// `LimitNOFILE=65536` already; this covers an agent started any other way.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let want = hard.min(1 << 20);
    if soft < want
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard)
    {
        warn!("cannot raise the open-file limit from {soft} to {want}: {e}; the peer API may refuse connections");
    }
}

/// How often the agent looks again at a state directory that cannot be used.
const STORAGE_RETRY: Duration = Duration::from_secs(2);

/// How much the state directory must take before Raft starts on it.
const STATE_PROBE_BYTES: usize = 1 << 20;

/// How long the storage probe may take before the disk counts as hung.
const STATE_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Removes what a crash left behind in the state directory, then checks that it takes a synced
/// write (off the async threads, bounded: a hung disk is reported, not waited for).
async fn probe_state_dir(dir: &Path) -> Result<(), String> {
    let dir = dir.to_owned();
    let probe = tokio::task::spawn_blocking(move || {
        crate::adapters::files::remove_leftovers(&dir);
        crate::adapters::files::remove_leftovers(&dir.join(crate::runtime::RAFT_DIR));
        crate::adapters::files::probe_writable(&dir, STATE_PROBE_BYTES)
    });
    match tokio::time::timeout(STATE_PROBE_TIMEOUT, probe).await {
        Ok(Ok(r)) => r.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(format!("the storage check failed: {e}")),
        Err(_) => {
            Err(format!("a 1 MiB write did not finish within {} s (the disk hangs)", STATE_PROBE_TIMEOUT.as_secs()))
        }
    }
}

/// The `status` problem for a state directory that cannot be used.
fn storage_problem(cfg: &Config, error: &str) -> String {
    // A corrupt file says itself what to do; a full or read-only disk needs space or a remount.
    let fix = if error.contains("corrupt") { "do what it says" } else { "free space or make it writable" };
    format!(
        "the state directory {} cannot be used ({error}): {fix}; the agent tries again every 2 s and nothing the cluster acknowledged is lost",
        cfg.state_dir.display()
    )
}

/// The journal line (and exit error) when Raft stopped on a storage error.
fn fatal_message(cfg: &Config, why: &str) -> String {
    format!(
        "Raft stopped: {why}; check that {} is writable and has free space. The agent exits so that systemd starts it again; it waits until the directory takes writes, and nothing the cluster acknowledged is lost",
        cfg.state_dir.display()
    )
}

/// Resolves with the reason once Raft has stopped on a fatal error (a storage write failed).
async fn raft_fatal(agent: &Node) -> String {
    let mut rx = agent.raft.metrics();
    loop {
        // The guard is dropped before the await.
        if let Err(f) = &rx.borrow_and_update().running_state {
            return f.to_string();
        }
        if rx.changed().await.is_err() {
            return "Raft stopped".into();
        }
    }
}

/// Serves `problem` in `status` (and the metrics) for [`STORAGE_RETRY`]. Returns false on a
/// shutdown signal.
async fn wait_with_problem(
    cfg: &Config,
    name: &str,
    problem: String,
    signal: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
) -> Result<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Retried every STORAGE_RETRY: a bind that fails stays quiet here.
    let metrics = match metrics_addr_now(cfg.metrics) {
        Some(addr) => TcpListener::bind(addr).await.ok().map(|l| {
            let state = LocalState::Unconfigured { name: name.to_string(), problems: vec![problem.clone()] };
            spawn_metrics(l, state, stop_rx)
        }),
        None => None,
    };
    let mut stopped = false;
    let until = async {
        tokio::select! {
            _ = signal.as_mut() => stopped = true,
            _ = tokio::time::sleep(STORAGE_RETRY) => {}
        }
    };
    let served = serve_problems_quietly(&cfg.socket_path, name.to_string(), vec![problem], until).await;
    let _ = stop_tx.send(true);
    if let Some(m) = metrics {
        let _ = m.await;
    }
    served?;
    Ok(!stopped)
}

/// When the peer API listens on one specific address (not 0.0.0.0), it also has to answer on the
/// node's mesh address for Raft to move onto the mesh: bind a second listener there once the
/// leader has assigned the address and the kernel has it (wg0 is up), and serve the same router.
async fn serve_on_mesh(agent: Arc<Node>, stop: watch::Receiver<bool>) {
    if agent.cfg.listen_addr.ip().is_unspecified() {
        return;
    }
    let port = agent.cfg.listen_addr.port();
    let bound = crate::runtime::driver::run(agent.clone(), MeshListener::new("peer API", port)).await;
    // None: the run ended first.
    let Some(listener) = bound.listener else { return };
    agent.set_mesh_listening();
    serve_peer("peer API (mesh)", listener, agent, stop).await;
}

/// Where `/metrics` listens from the start: the configured address, or loopback by default
/// (the mesh address follows in [`serve_metrics_on_mesh`]).
fn metrics_addr_now(m: MetricsListen) -> Option<SocketAddr> {
    match m {
        MetricsListen::Off => None,
        MetricsListen::At(a) => Some(a),
        MetricsListen::LoopbackAndMesh(port) => Some(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port))),
    }
}

/// The default metrics listener on the mesh: bound once the node's mesh address is on `wg0`, so
/// other members (and a Prometheus on the mesh) can scrape it, and nothing on the underlay can.
async fn serve_metrics_on_mesh(agent: Arc<Node>, port: u16, stop: watch::Receiver<bool>) {
    let bound = crate::runtime::driver::run(agent.clone(), MeshListener::new("metrics", port)).await;
    let Some(listener) = bound.listener else { return };
    // Served in this task (not a spawned one), so that aborting it at shutdown stops the server.
    let app = crate::server::local::metrics_router(LocalState::Running(agent));
    let refused = crate::server::metrics::count_refused_metrics_connection;
    crate::server::accept::serve("metrics (mesh)", listener, app, Limits::METRICS, None, stop, refused).await;
}

/// Serves the peer API on `listener` within [`Limits::PEER`], over TLS with this node's key.
async fn serve_peer(what: &'static str, listener: TcpListener, agent: Arc<Node>, stop: watch::Receiver<bool>) {
    let tls = crate::adapters::tls::server_config(agent.identity.node_key());
    let app = crate::server::peer::router(agent);
    let refused = crate::server::metrics::count_refused_peer_connection;
    crate::server::accept::serve(what, listener, app, Limits::PEER, Some(tls), stop, refused).await;
}

/// Serves `/metrics` on `listener` within [`Limits::METRICS`].
fn spawn_metrics(listener: TcpListener, state: LocalState, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    let app = crate::server::local::metrics_router(state);
    let refused = crate::server::metrics::count_refused_metrics_connection;
    tokio::spawn(crate::server::accept::serve("metrics", listener, app, Limits::METRICS, None, stop, refused))
}

/// Binds a listener on this node's mesh address and `port` once it can (on every applied change
/// and every 5 s); done when bound.
struct MeshListener {
    what: &'static str,
    port: u16,
    listener: Option<TcpListener>,
}

impl MeshListener {
    fn new(what: &'static str, port: u16) -> MeshListener {
        MeshListener { what, port, listener: None }
    }
}

impl Reconciler for MeshListener {
    const NAME: &'static str = "mesh-listener";
    const TRIGGERS: Triggers = Triggers { state: true, nudge: false, local: false };
    const BACKOFF: Backoff = Backoff { first: Duration::from_secs(1), max: Duration::from_secs(5) };

    async fn reconcile(&mut self, agent: &Arc<Node>, _wake: Wake) -> Result<Action, LoopError> {
        let Some(ip) = agent.state.read(|d| d.state.members.get(&agent.id()).and_then(|m| m.mesh_ip)) else {
            return Ok(Action::After(Duration::from_secs(5)));
        };
        let addr = SocketAddr::new(ip.into(), self.port);
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| LoopError::debug(format!("{}: mesh address {addr} not bindable yet: {e}", self.what)))?;
        info!(node_id = %agent.id(), addr = %addr, "{} also listening on the mesh address", self.what);
        self.listener = Some(l);
        Ok(Action::Done)
    }
}
