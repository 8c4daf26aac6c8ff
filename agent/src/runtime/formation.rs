//! Forming or joining a cluster: discovery rounds with `bootstrap_expect`, the pledges that make
//! the initial member set safe (decided by [`crate::core::membership`]), joining through a running
//! cluster, and the answers this node gives to others' hellos and pledge requests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::core::raft_types::PeerNode;
use openraft::error::{InitializeError, RaftError};
use rand::Rng;

use tracing::{debug, info, warn};

use super::ApiError;
use crate::core::formation::{self, Formation, PeerView, Pledge, PledgeOutcome};
use crate::core::state::NodeId;
use crate::proto::{Candidate, HelloRequest, HelloResponse, JoinRequest, JoinResponse, PledgeResponse, paths};

use super::driver::{Action, Backoff, LoopError, Reconciler, Triggers, Wake};
use super::{Node, Phase};

/// A candidate of discovery: heard from directly (its hello, or its answer to ours), or named by
/// another candidate.
pub(super) struct Discovered {
    candidate: Candidate,
    /// Its answer to this node's last hello that it answered.
    view: Option<PeerView>,
    /// When this node last heard from it directly.
    heard: Option<Instant>,
}

pub(super) fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(ms / 2 + rand::thread_rng().gen_range(0..=ms / 2 + 1))
}

/// Forms or joins a cluster; done once this node is initialized (a member). A round that made no
/// progress doubles the wait (500 ms to 5 s, jittered); a nudge (a pledge taken, `clusteros
/// join`) looks again at once.
pub(super) struct FormationLoop {
    /// Rounds in a row that made no progress.
    stalled: u32,
}

impl FormationLoop {
    /// The wait between rounds: 500 ms after progress, doubling per round without it, up to 5 s.
    const ROUNDS: Backoff = Backoff { first: Duration::from_millis(500), max: Duration::from_secs(5) };

    pub(super) fn new() -> FormationLoop {
        FormationLoop { stalled: 0 }
    }
}

impl Reconciler for FormationLoop {
    const NAME: &'static str = "formation";
    const TRIGGERS: Triggers = Triggers { state: false, nudge: true, local: false };

    async fn reconcile(&mut self, node: &Arc<Node>, _wake: Wake) -> Result<Action, LoopError> {
        if node.raft.is_initialized().await.unwrap_or(false) {
            if let Err(e) = node.pledges.clear() {
                warn!(node_id = %node.id(), "cannot remove the formation pledge, which no longer applies: {e}");
            }
            node.set_progress(Phase::Member, "member of the cluster", None);
            return Ok(Action::Done);
        }
        if node.left_marker().exists() {
            node.set_progress(Phase::Left, "this node left the cluster; run `clusteros join ADDR` to join again", None);
            return Ok(Action::AwaitTrigger);
        }
        // Join addresses, when given, are the way in; without them, the addresses the DNS SRV
        // records name and the nodes whose LAN beacons this node heard.
        let mut targets = node.join_targets.lock().expect("join lock").clone();
        if targets.is_empty() {
            if let Some(Ok(addrs)) = node.dns_targets().await {
                targets = addrs;
            }
            for t in node.beacon_targets() {
                if !targets.contains(&t) {
                    targets.push(t);
                }
            }
        }
        let progressed = match node.cfg.bootstrap_expect {
            Some(expect) => node.discovery_round(expect, &targets).await,
            None if !targets.is_empty() => node.join_round(&targets).await,
            None if node.beacons.is_some() || node.dns.is_some() => {
                let dns = match node.dns_targets().await {
                    Some(Err(e)) => format!(" (DNS SRV: {e})"),
                    _ => String::new(),
                };
                node.set_progress(
                    Phase::Idle,
                    format!("no join addresses, no bootstrap_expect, and no node of this cluster found by LAN beacon or DNS SRV yet{dns}: set bootstrap_expect (1 for a single node) or join (clusteros.join), or run `clusteros join ADDR`"),
                    None,
                );
                // A beacon heard nudges this loop; the timer looks again in case one was missed.
                return Ok(Action::After(Duration::from_secs(5)));
            }
            None => {
                node.set_progress(
                    Phase::Idle,
                    "no join addresses and no bootstrap_expect: set bootstrap_expect (1 for a single node) or join (clusteros.join), or run `clusteros join ADDR`",
                    None,
                );
                return Ok(Action::AwaitTrigger);
            }
        };
        self.stalled = if progressed { 0 } else { self.stalled.saturating_add(1) };
        Ok(Action::After(jitter(Self::ROUNDS.after(self.stalled + 1))))
    }
}

impl Node {
    pub async fn hello(&self, req: HelloRequest) -> HelloResponse {
        // Read in this order: a proposer drops its pledge only once it is initialized, so a
        // pledge read as gone, followed by "not initialized", really means withdrawn (read the
        // other way round, a proposer that initializes in between would look withdrawn).
        let pledged = self.held_pledge();
        let initialized = self.raft.is_initialized().await.unwrap_or(false);
        let m = self.metrics();
        let mut d = self.discovered.lock().expect("discovered lock");
        if req.from.id != self.id() {
            let view = d.remove(&req.from.id).and_then(|e| e.view);
            d.insert(req.from.id, Discovered { candidate: req.from.clone(), view, heard: Some(Instant::now()) });
        }
        let forget = self.forget_after();
        let known =
            d.values().filter(|e| e.heard.is_some_and(|t| t.elapsed() < forget)).map(|e| e.candidate.clone()).collect();
        drop(d);
        // One read: the index must be the index of these members.
        let applied = self.applied_members();
        HelloResponse {
            me: self.candidate(initialized, pledged),
            known,
            leader: m.current_leader,
            members: applied.addrs,
            members_index: applied.log_id.map(|l| l.index),
            members_log_id: applied.log_id,
            member_keys: applied.keys,
        }
    }

    /// One round of `bootstrap_expect` discovery. Returns whether it made progress.
    pub(super) async fn discovery_round(&self, expect: usize, targets: &[String]) -> bool {
        let mut addrs: BTreeSet<String> = targets.iter().cloned().collect();
        addrs.extend(self.discovered.lock().expect("discovered lock").values().map(|e| e.candidate.api_addr.clone()));
        addrs.remove(&self.api_addr);
        let req = HelloRequest { from: self.candidate(false, self.held_pledge()) };
        let round = self.discovery_rounds.fetch_add(1, Ordering::SeqCst) + 1;
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        let calls = addrs.iter().map(|a| {
            let req = req.clone();
            async move { (a.clone(), self.client.call_any::<_, HelloResponse>(a, paths::HELLO, &req, t).await) }
        });
        let results = futures::future::join_all(calls).await;
        let mut errors = Vec::new();
        {
            let mut d = self.discovered.lock().expect("discovered lock");
            for (addr, r) in results {
                match r {
                    Ok(resp) if resp.me.id == self.id() => {}
                    Ok(resp) => {
                        if resp.me.bootstrap_expect.is_some()
                            && resp.me.bootstrap_expect != Some(expect)
                            && !resp.me.initialized
                        {
                            errors.push(format!(
                                "{} ({addr}) has bootstrap_expect {:?}, this node {expect}: give every node the same value",
                                resp.me.name, resp.me.bootstrap_expect
                            ));
                        }
                        let mut known: BTreeSet<NodeId> = resp.known.iter().map(|c| c.id).collect();
                        known.insert(resp.me.id);
                        let view = PeerView {
                            addr: resp.me.api_addr.clone(),
                            initialized: resp.me.initialized || resp.leader.is_some(),
                            known,
                            pledged: resp.me.pledged.clone(),
                            members: resp.members.keys().copied().collect(),
                            round,
                        };
                        d.insert(
                            resp.me.id,
                            Discovered { candidate: resp.me.clone(), view: Some(view), heard: Some(Instant::now()) },
                        );
                        for c in resp.known {
                            if c.id != self.id() {
                                d.entry(c.id).or_insert(Discovered { candidate: c, view: None, heard: None });
                            }
                        }
                    }
                    Err(e) => {
                        if e.is_auth() {
                            warn!(node_id = %self.id(), peer_addr = %addr, "discovery refused: {e}");
                        } else {
                            debug!(peer_addr = %addr, "discovery: {e}");
                        }
                        errors.push(e.to_string());
                    }
                }
            }
        }
        let forget = self.forget_after();
        let views: BTreeMap<NodeId, PeerView> = self
            .discovered
            .lock()
            .expect("discovered lock")
            .iter()
            .filter(|(_, e)| e.heard.is_some_and(|t| t.elapsed() < forget))
            .filter_map(|(id, e)| e.view.clone().map(|v| (*id, v)))
            .collect();
        let last_error = errors.first().cloned();
        let held = match self.pledges.held() {
            Ok(h) => h,
            Err(e) => {
                self.set_progress(Phase::Discovering, "formation stopped: the pledge file is unreadable", Some(e));
                return false;
            }
        };
        match formation::decide_formation(self.id(), &self.api_addr, expect, held.as_ref(), &views) {
            Formation::Wait { seen, expected } => {
                let no_join = self.join_targets.lock().expect("join lock").is_empty();
                let mut ways = Vec::new();
                if no_join && let Some(d) = &self.dns {
                    ways.push(match self.dns_targets().await {
                        Some(Err(e)) => format!("DNS SRV failed: {e}"),
                        _ => format!("by DNS SRV {}", d.settings.srv),
                    });
                }
                if no_join && let Some(b) = &self.beacons {
                    ways.push(format!("by LAN beacons on UDP port {}", b.settings.port));
                }
                let how =
                    if ways.is_empty() { String::new() } else { format!(" (no join addresses: {})", ways.join("; ")) };
                self.set_progress(
                    Phase::Discovering,
                    format!("{seen} of {expected} expected nodes seen{how}"),
                    last_error,
                );
                false
            }
            Formation::Settling { chosen } => {
                self.set_progress(
                    Phase::Discovering,
                    format!(
                        "{} candidates seen; waiting for the initial {} nodes to agree",
                        views.len() + 1,
                        chosen.len()
                    ),
                    last_error,
                );
                true
            }
            Formation::Join { via } => self.join_round(&[via]).await,
            Formation::Pledged { proposer } => {
                let who = self.describe_candidate(proposer);
                let silent = views.get(&proposer).is_none_or(|v| v.round != round);
                let error = silent.then(|| {
                    format!(
                        "{who} does not answer; start it again. If it is gone for good and formed no cluster, stop this \
                         agent, delete {} and start it again",
                        self.pledges.path().display()
                    )
                });
                self.set_progress(
                    Phase::Discovering,
                    format!("pledged to form the cluster proposed by {who}; waiting for it"),
                    error.or(last_error),
                );
                true
            }
            Formation::Release => {
                if let Some(h) = held {
                    match self.pledges.give_up(self.id(), &h) {
                        Ok(_) => info!(
                            node_id = %self.id(),
                            proposer = %h.pledge.proposer,
                            "formation pledge released: its proposal was withdrawn or another cluster formed"
                        ),
                        Err(e) => self.set_last_error(Some(format!("cannot release the formation pledge: {e}"))),
                    }
                }
                true
            }
            Formation::Propose { members } => match self.pledges.propose(self.id(), members, round + 1) {
                Ok(Some(pledge)) => self.ask_pledges(pledge).await,
                // A pledge request came in meanwhile: this node holds another's pledge now.
                Ok(None) => true,
                Err(e) => {
                    self.set_last_error(Some(e.to_string()));
                    false
                }
            },
            Formation::AskAgain { pledge } => self.ask_pledges(pledge).await,
        }
    }

    /// "name (address)" of a discovered candidate, or its id.
    pub(super) fn describe_candidate(&self, id: NodeId) -> String {
        match self.discovered.lock().expect("discovered lock").get(&id) {
            Some(e) => format!("{} ({})", e.candidate.name, e.candidate.api_addr),
            None => id.to_string(),
        }
    }

    /// As proposer, holding `pledge`: asks every other member for theirs, and initializes Raft
    /// once all of them hold it. Returns whether it made progress.
    pub(super) async fn ask_pledges(&self, pledge: Pledge) -> bool {
        let me = self.id();
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        let calls = pledge.members.iter().filter(|(id, _)| **id != me).map(|(id, addr)| {
            let req = pledge.clone();
            async move { (*id, self.client.call::<_, PledgeResponse>(addr, *id, paths::PLEDGE, &req, t).await) }
        });
        let mut keys = BTreeMap::from([(me, self.identity.node_key().public())]);
        let answers: BTreeMap<NodeId, Result<(), Option<formation::PledgeRefusal>>> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|(id, r)| {
                let a = match r {
                    Ok(PledgeResponse { refused: None, node_key }) if crate::core::auth::is_node_key(&node_key) => {
                        keys.insert(id, node_key);
                        Ok(())
                    }
                    Ok(PledgeResponse { refused: None, .. }) => {
                        debug!(peer = %id, "pledged without a valid node key (an agent from before node keys?)");
                        Err(None)
                    }
                    Ok(PledgeResponse { refused: Some(why), .. }) => Err(Some(why)),
                    Err(e) => {
                        debug!(peer = %id, "pledge request: {e}");
                        Err(None)
                    }
                };
                (id, a)
            })
            .collect();
        let members = pledge.members.keys().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        match formation::pledge_outcome(me, &answers) {
            PledgeOutcome::Retry { why } => {
                self.set_progress(
                    Phase::Discovering,
                    format!("proposed forming the cluster with {members}; waiting for their pledges"),
                    Some(why),
                );
                false
            }
            PledgeOutcome::Withdraw { why } => {
                info!(node_id = %me, members = %members, "formation proposal withdrawn: {why}");
                self.set_progress(
                    Phase::Discovering,
                    format!("withdrew the proposal to form the cluster with {members}"),
                    Some(why),
                );
                if let Err(e) = self.pledges.withdraw(&pledge) {
                    self.set_last_error(Some(format!("cannot withdraw the formation proposal: {e}")));
                }
                true
            }
            PledgeOutcome::Initialize => {
                // Every member answered with its node key (or the outcome would be Retry).
                let nodes: BTreeMap<NodeId, PeerNode> = pledge
                    .members
                    .iter()
                    .map(|(id, a)| (*id, PeerNode::new(a, keys.get(id).cloned().unwrap_or_default())))
                    .collect();
                info!(node_id = %me, members = %members, "every member pledged: bootstrapping the cluster with {} voters", nodes.len());
                match self.raft.initialize(nodes).await {
                    Ok(()) => {}
                    Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                        debug!("initialize not allowed: this node already has Raft state");
                    }
                    Err(e) => {
                        self.set_last_error(Some(format!("initialize failed: {e}")));
                        return false;
                    }
                }
                true
            }
        }
    }

    /// Answers a proposer's pledge request (see [`formation::answer_pledge`]).
    pub async fn answer_pledge(&self, req: Pledge) -> Result<PledgeResponse, ApiError> {
        let _formation = self.formation_lock.lock().await;
        let initialized = self.raft.is_initialized().await.unwrap_or(true);
        let from_round = self.discovery_rounds.load(Ordering::SeqCst) + 1;
        let taken = self.pledges.take(&req, from_round, |cur| {
            formation::answer_pledge(self.id(), self.cfg.bootstrap_expect, initialized, cur, &req)
        });
        match taken {
            Ok(Ok(())) => {
                info!(node_id = %self.id(), proposer = %req.proposer, "pledged to form the cluster with {} nodes", req.members.len());
                self.nudge();
                Ok(PledgeResponse { refused: None, node_key: self.identity.node_key().public() })
            }
            Ok(Err(why)) => Ok(PledgeResponse { refused: Some(why), node_key: self.identity.node_key().public() }),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }

    /// Asks each target in turn to admit this node. Returns whether one accepted.
    pub(super) async fn join_round(&self, targets: &[String]) -> bool {
        let _formation = self.formation_lock.lock().await;
        // Once asked, a cluster may admit this node at any time, even after an answer that timed
        // out or a restart: from now on it pledges to no new cluster.
        if let Err(e) = self.pledges.begin_join() {
            self.set_progress(Phase::Joining, "cannot join", Some(e.to_string()));
            return false;
        }
        let req = JoinRequest {
            id: self.id(),
            name: self.identity.name.clone(),
            api_addr: self.api_addr.clone(),
            node_key: self.identity.node_key().public(),
        };
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 12);
        let mut last = None;
        let tried = targets.join(", ");
        self.set_progress(Phase::Joining, format!("asking {tried} to admit this node"), self.progress().last_error);
        for addr in targets.iter().filter(|a| **a != self.api_addr) {
            match self.client.call_any::<_, JoinResponse>(addr, paths::JOIN, &req, t).await {
                Ok(resp) => {
                    info!(node_id = %self.id(), leader = %resp.leader, via = %addr, "admitted to the cluster; catching up");
                    self.set_progress(Phase::Joining, format!("admitted by leader {}; catching up", resp.leader), None);
                    // Wait (bounded) for the leader's first replication, then re-check.
                    let mut rx = self.raft.metrics();
                    let _ = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|m| m.last_log_index.is_some()))
                        .await;
                    return true;
                }
                Err(e) => {
                    let msg = e.to_string();
                    warn!(node_id = %self.id(), peer_addr = %addr, "join failed: {msg}");
                    last = Some(msg);
                }
            }
        }
        self.set_progress(Phase::Joining, format!("asking {tried} to admit this node"), last);
        false
    }

    /// Sets join targets from `clusteros join` and wakes the formation loop.
    pub fn request_join(&self, addr: String) -> Result<(), ApiError> {
        let addr = crate::core::config::normalize_join_addr(&addr).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if self.progress().phase == Phase::Member {
            return Err(ApiError::Refused(
                "this node is already a member of a cluster; run `clusteros leave` first".into(),
            ));
        }
        let _ = std::fs::remove_file(self.left_marker());
        *self.join_targets.lock().expect("join lock") = vec![addr.clone()];
        info!(node_id = %self.id(), via = %addr, "join requested");
        self.nudge();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::adapters::peers::{FakePeers, PeerError};
    use crate::core::formation::{Pledge, PledgeRefusal};
    use crate::core::state::NodeId;
    use crate::proto::{Candidate, HelloRequest, HelloResponse, PledgeResponse, paths};
    use crate::runtime::driver::run;
    use crate::runtime::{Node, Phase};

    const ME: &str = "127.0.0.1:17601";
    const PEERS: [&str; 2] = ["127.0.0.1:17602", "127.0.0.1:17603"];

    async fn node(dir: &std::path::Path, fake: &FakePeers) -> Arc<Node> {
        crate::runtime::test_node(dir, fake, ME, &PEERS, Some(3)).await
    }

    /// Two fake candidates, with ids above this node's (so it is the one to propose), that see all
    /// three and answer pledge requests with `answer`.
    fn candidates(fake: &FakePeers, me: NodeId, answer: fn(NodeId) -> Option<PledgeRefusal>) -> [NodeId; 2] {
        let ids = [NodeId(u64::MAX - 1), NodeId(u64::MAX)];
        assert!(me < ids[0], "this node's random id is below the fakes' (it is, but for 2 ids of 2^64)");
        let cand = |id: NodeId, addr: &str| Candidate {
            id,
            name: format!("fake-{addr}"),
            api_addr: addr.into(),
            initialized: false,
            bootstrap_expect: Some(3),
            pledged: None,
        };
        for (i, (id, addr)) in ids.iter().zip(PEERS).enumerate() {
            let (id, other) = (*id, ids[1 - i]);
            let others = [cand(other, PEERS[1 - i])];
            fake.answer(addr, paths::HELLO, move |req: HelloRequest| -> Result<HelloResponse, PeerError> {
                let mut known = others.to_vec();
                known.push(req.from);
                Ok(HelloResponse {
                    me: cand(id, addr),
                    known,
                    leader: None,
                    members: Default::default(),
                    members_index: None,
                    members_log_id: None,
                    member_keys: Default::default(),
                })
            });
            fake.answer(addr, paths::PLEDGE, move |_: Pledge| -> Result<PledgeResponse, PeerError> {
                Ok(PledgeResponse {
                    refused: answer(id),
                    node_key: crate::core::auth::NodeKey::from_seed(&[id.get() as u8; 32]).public(),
                })
            });
        }
        ids
    }

    #[tokio::test]
    async fn three_candidates_that_see_each_other_form_one_cluster_through_pledges() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakePeers::default();
        let n = node(dir.path(), &fake).await;
        let ids = candidates(&fake, n.id(), |_| None);
        let done = tokio::time::timeout(Duration::from_secs(30), run(n.clone(), super::FormationLoop::new())).await;
        assert!(done.is_ok(), "formation did not finish: {:?}", n.progress());
        assert_eq!(n.progress().phase, Phase::Member);
        let voters: Vec<NodeId> = n.metrics().membership_config.membership().voter_ids().collect();
        assert_eq!(voters, [n.id(), ids[0], ids[1]], "initialized with exactly the pledged members");
        // Both fakes were asked for the same pledge, by this node, naming the three addresses.
        let pledges = fake.calls_to(paths::PLEDGE);
        assert_eq!(pledges.len(), 2, "{pledges:?}");
        let p: Pledge = serde_json::from_value(pledges[0].1.clone()).unwrap();
        assert_eq!(pledges[1].1, pledges[0].1);
        assert_eq!(p.proposer, n.id());
        assert_eq!(p.members.values().cloned().collect::<Vec<_>>(), [ME, PEERS[0], PEERS[1]]);
        assert!(!dir.path().join("formation-pledge.json").exists(), "the pledge is dropped once formed");
        n.raft.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_member_pledged_to_a_smaller_proposer_makes_this_node_withdraw() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakePeers::default();
        let n = node(dir.path(), &fake).await;
        candidates(&fake, n.id(), |id| (id == NodeId(u64::MAX)).then_some(PledgeRefusal::PledgedTo(NodeId(1))));
        let mut f = super::FormationLoop::new();
        // Round by round (no loop): the first proposes and hears the refusal, and withdraws.
        use crate::runtime::driver::{Reconciler, Wake};
        f.reconcile(&n, Wake::Start).await.unwrap();
        let p = n.progress();
        assert_eq!(p.phase, Phase::Discovering);
        assert!(p.detail.starts_with("withdrew the proposal"), "{p:?}");
        assert!(p.last_error.as_deref().is_some_and(|e| e.contains("pledged to")), "{p:?}");
        assert!(!n.raft.is_initialized().await.unwrap(), "no cluster without every member's pledge");
        n.raft.shutdown().await.unwrap();
    }
}
