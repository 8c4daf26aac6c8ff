//! LAN beacons at run time: this node's beacon, sent now and then by [`BeaconLoop`], and what it
//! hears (through the listener in `server::beacon`), kept in the pure
//! [`crate::core::beacon::BeaconBook`]. Formation asks [`Node::beacon_targets`] where to say hello
//! when it has no join addresses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::Node;
use super::driver::{Action, Backoff, LoopError, Reconciler, Triggers, Wake};
use crate::adapters::beacon::BeaconSocket;
use crate::core::beacon::{Beacon, BeaconBook, BeaconKey, Heard, encode};
use crate::core::config::BeaconSettings;

/// How often a node that is not yet a member sends its beacon, and a member.
const DISCOVERING_EVERY: Duration = Duration::from_secs(1);
const MEMBER_EVERY: Duration = Duration::from_secs(5);
/// A node heard from no more recently than this is not a discovery target any more.
const HEARD_WITHIN_MS: i64 = 20_000;
/// Neighbours shown by status: heard within this.
const NEIGHBOUR_WITHIN_MS: i64 = 120_000;
/// Members of a formed cluster a joining node says hello to (of those it heard).
const MEMBER_TARGETS: usize = 3;

/// The beacon state of a node that has beacons on.
pub struct Beacons {
    pub settings: BeaconSettings,
    book: Mutex<BeaconBook>,
    socket: OnceLock<Arc<BeaconSocket>>,
    sent: AtomicU64,
    seq: AtomicU64,
    /// The last problem with the socket or a send, for status.
    problem: Mutex<Option<String>>,
}

impl Beacons {
    pub fn new(settings: BeaconSettings, me: crate::core::ids::NodeId, secret: &str, accepted: &[String]) -> Beacons {
        let keys = std::iter::once(secret).chain(accepted.iter().map(String::as_str)).map(BeaconKey::derive).collect();
        Beacons {
            settings,
            book: Mutex::new(BeaconBook::new(me, keys)),
            socket: OnceLock::new(),
            sent: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            problem: Mutex::new(None),
        }
    }

    /// The socket the daemon bound (once), or why it could not.
    pub fn set_socket(&self, s: Result<Arc<BeaconSocket>, String>) {
        match s {
            Ok(s) => {
                let _ = self.socket.set(s);
            }
            Err(e) => *self.problem.lock().expect("beacon problem lock") = Some(e),
        }
    }
}

/// What `status` shows of beacons.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BeaconReport {
    pub port: u16,
    pub sent: u64,
    /// Nodes of this cluster heard recently.
    pub heard: usize,
    /// Beacons of this cluster taken, and of other clusters seen, since the start.
    pub taken: u64,
    pub refused: BTreeMap<String, u64>,
    pub neighbours: Vec<NeighbourReport>,
    pub problem: Option<String>,
}

/// A node of another cluster on this LAN.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NeighbourReport {
    /// Its cluster key's fingerprint.
    pub cluster: String,
    pub id: String,
    pub name: String,
    pub api_addr: String,
    pub member: bool,
    pub heard_ms_ago: u64,
}

impl Node {
    /// Takes or refuses one datagram heard on the beacon port.
    pub fn hear_beacon(&self, from: SocketAddr, datagram: &[u8]) {
        let Some(b) = &self.beacons else { return };
        let now = crate::now_ms() as i64;
        let heard = b.book.lock().expect("beacon book lock").receive(from.ip(), datagram, now);
        match heard {
            Heard::Peer { node, new: true } => {
                debug!(peer = %node, %from, "LAN beacon of a node of this cluster");
                if self.progress().phase != super::Phase::Member {
                    self.settle_address(from);
                    self.nudge();
                }
            }
            Heard::Neighbour => debug!(%from, "LAN beacon of another cluster (a neighbour)"),
            // Counted for status and metrics; a flood of them must not flood the journal.
            Heard::Refused(r) => debug!(%from, "LAN beacon refused: {r}"),
            Heard::Peer { .. } | Heard::Own => {}
        }
    }

    /// A node that guessed its address from the default route settles it by the first node of
    /// its cluster it hears: the address the kernel sends from towards that node is the one the
    /// cluster can reach it at. When it differs, and the node has neither Raft state nor a
    /// formation pledge (which name its address), the run ends and the next one advertises it.
    fn settle_address(&self, heard_from: SocketAddr) {
        if !self.address_guessed.swap(false, Ordering::SeqCst) {
            return;
        }
        let port = self.cfg.listen_addr.port();
        let Some(addr) = crate::adapters::host::source_towards(heard_from.ip(), port) else { return };
        if addr.to_string() == self.api_addr {
            return;
        }
        let has_state = self.metrics().membership_config.membership().nodes().next().is_some();
        if has_state || self.held_pledge().is_some() {
            info!(
                node_id = %self.id(), %heard_from, guessed = %self.api_addr, route = %addr,
                "this node's cluster is reached from {addr}, not {}, but it keeps the address its Raft state or pledge names; set advertise_addr to change it",
                self.api_addr
            );
            return;
        }
        info!(
            node_id = %self.id(), %heard_from, guessed = %self.api_addr, %addr,
            "the first node of this cluster heard is reached from {addr}, not the default route's {}: starting again with it",
            self.api_addr
        );
        self.request_end(super::RunEnd::Readdress { addr });
    }

    /// Where formation says hello when it has no join addresses: the nodes of this cluster whose
    /// beacons it heard lately (a few members, if a cluster is formed). Empty with beacons off.
    pub(super) fn beacon_targets(&self) -> Vec<String> {
        let Some(b) = &self.beacons else { return Vec::new() };
        let now = crate::now_ms() as i64;
        let book = b.book.lock().expect("beacon book lock");
        book.discovery_targets(now, HEARD_WITHIN_MS, MEMBER_TARGETS).iter().map(SocketAddr::to_string).collect()
    }

    /// The beacon part of `status`; `None` with beacons off.
    pub fn beacon_report(&self) -> Option<BeaconReport> {
        let b = self.beacons.as_ref()?;
        let now = crate::now_ms() as i64;
        let book = b.book.lock().expect("beacon book lock");
        let counts = book.counts();
        Some(BeaconReport {
            port: b.settings.port,
            sent: b.sent.load(Ordering::Relaxed),
            heard: book.peers(now, HEARD_WITHIN_MS).len(),
            taken: counts.peer,
            refused: counts.refused.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            neighbours: book
                .neighbours(now, NEIGHBOUR_WITHIN_MS)
                .into_iter()
                .map(|n| NeighbourReport {
                    cluster: n.fingerprint,
                    id: n.node.to_string(),
                    name: n.name,
                    api_addr: n.api_addr.to_string(),
                    member: n.member,
                    heard_ms_ago: now.saturating_sub(n.heard_ms).max(0) as u64,
                })
                .collect(),
            problem: b.problem.lock().expect("beacon problem lock").clone(),
        })
    }
}

/// Sends this node's beacon: every second until it is a member, every 5 s after (jittered by
/// the driver's caller below), for as long as the run lasts.
#[derive(Default)]
pub(super) struct BeaconLoop;

impl Reconciler for BeaconLoop {
    const NAME: &'static str = "beacon";
    const TRIGGERS: Triggers = Triggers { state: false, nudge: false, local: false };
    /// A send that failed (no interface with a broadcast address yet) is tried again, without
    /// filling the journal.
    const BACKOFF: Backoff = Backoff { first: Duration::from_secs(2), max: Duration::from_secs(60) };

    async fn reconcile(&mut self, node: &Arc<Node>, _wake: Wake) -> Result<Action, LoopError> {
        let Some(b) = &node.beacons else { return Ok(Action::Done) };
        let Some(socket) = b.socket.get() else {
            // The daemon could not bind the port; it said why (status shows it).
            return Ok(Action::Done);
        };
        let member = node.raft.is_initialized().await.unwrap_or(false);
        let every = if member { MEMBER_EVERY } else { DISCOVERING_EVERY };
        let api_addr: SocketAddr = node.api_addr.parse().map_err(|e| {
            LoopError::warn(format!("cannot announce {} in a LAN beacon: not IP:PORT ({e})", node.api_addr))
        })?;
        let beacon = Beacon {
            node: node.id(),
            name: node.identity.name.clone(),
            api_addr,
            member,
            time_ms: crate::now_ms() as i64,
            seq: b.seq.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let datagram = encode(&beacon, b.book.lock().expect("beacon book lock").key());
        let sent = socket.send(&datagram).await;
        let mut problem = b.problem.lock().expect("beacon problem lock");
        match sent {
            Ok(targets) => {
                if b.sent.fetch_add(1, Ordering::Relaxed) == 0 {
                    let list: Vec<String> = targets.iter().map(SocketAddr::to_string).collect();
                    info!(node_id = %node.id(), targets = %list.join(","), "sending LAN beacons");
                }
                *problem = None;
                Ok(Action::After(super::formation::jitter(every)))
            }
            Err(e) => {
                *problem = Some(e.to_string());
                Err(LoopError::warn(e))
            }
        }
    }
}
