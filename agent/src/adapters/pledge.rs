//! This node's formation pledge, kept on disk (`STATE/formation-pledge.json`) so that it survives
//! a crash: a node that promised a proposer to form the first cluster with it must still be bound
//! by that promise after a restart, or the proposer could initialize with a member that has since
//! promised another proposal. The decisions are in [`crate::core::membership`]; this is the storage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::adapters::files::WriteError;
use crate::core::formation::{HeldPledge, Pledge, PledgeRefusal};
use crate::core::state::NodeId;

pub const PLEDGE_FILE: &str = "formation-pledge.json";
/// A pledge names `bootstrap_expect` members (a handful); anything larger is not one of ours.
const MAX_FILE_BYTES: u64 = 64 * 1024;

pub struct PledgeStore {
    path: PathBuf,
    /// `Err`: the file exists but cannot be read; formation stops until someone looks at it.
    held: Mutex<Result<Held, String>>,
}

#[derive(Debug, Clone, Default)]
struct Held {
    pledge: Option<HeldPledge>,
    /// The number of this node's last proposal.
    proposed: u64,
    /// This node asked a cluster to admit it: it may be a learner there before any Raft state
    /// reaches it, so it pledges to nothing until it is in a cluster.
    joining: bool,
}

/// The file: the pledge held, the proposal counter (kept when a proposal is withdrawn) and the
/// joining mark. Fields added later must default, so that an older file still reads.
#[derive(Serialize, Deserialize, Default)]
struct OnDisk {
    pledge: Option<Pledge>,
    #[serde(default)]
    proposed: u64,
    #[serde(default)]
    joining: bool,
}

impl PledgeStore {
    /// Loads the pledge a previous run left, if any.
    pub fn open(state_dir: &Path) -> PledgeStore {
        let path = state_dir.join(PLEDGE_FILE);
        let held = load(&path).map(|d| Held {
            pledge: d.pledge.map(|pledge| HeldPledge { pledge, views_from_round: 0 }),
            proposed: d.proposed,
            joining: d.joining,
        });
        PledgeStore { path, held: Mutex::new(held) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pledge this node holds, or why the pledge file cannot be read.
    pub fn held(&self) -> Result<Option<HeldPledge>, String> {
        self.held.lock().expect("pledge lock").as_ref().map(|h| h.pledge.clone()).map_err(Clone::clone)
    }

    /// As `proposer`: holds a new proposal (numbered after every earlier one) for `members`,
    /// unless this node holds another proposer's pledge (`None` then).
    pub fn propose(
        &self,
        proposer: NodeId,
        members: BTreeMap<NodeId, String>,
        views_from_round: u64,
    ) -> Result<Option<Pledge>, TakeError> {
        let mut guard = self.held.lock().expect("pledge lock");
        let held = guard.as_mut().map_err(|e| TakeError::Unreadable(e.clone()))?;
        if held.joining || held.pledge.as_ref().is_some_and(|h| h.pledge.proposer != proposer) {
            return Ok(None);
        }
        let pledge = Pledge { proposer, seq: held.proposed + 1, members };
        let next = Held {
            pledge: Some(HeldPledge { pledge: pledge.clone(), views_from_round }),
            proposed: pledge.seq,
            joining: false,
        };
        self.store(&next).map_err(TakeError::Write)?;
        *held = next;
        Ok(Some(pledge))
    }

    /// Takes `pledge` when `allow` (shown the pledge held now) says so: written and synced to
    /// disk before this returns, so an answer "pledged" is never lost. Views of discovery rounds
    /// from `views_from_round` on count for releasing it.
    pub fn take(
        &self,
        pledge: &Pledge,
        views_from_round: u64,
        allow: impl FnOnce(Option<&Pledge>) -> Result<(), PledgeRefusal>,
    ) -> Result<Result<(), PledgeRefusal>, TakeError> {
        let mut guard = self.held.lock().expect("pledge lock");
        let held = guard.as_mut().map_err(|e| TakeError::Unreadable(e.clone()))?;
        if held.joining {
            return Ok(Err(PledgeRefusal::Joining));
        }
        if let Err(r) = allow(held.pledge.as_ref().map(|h| &h.pledge)) {
            return Ok(Err(r));
        }
        if let Some(h) = held.pledge.as_mut().filter(|h| h.pledge == *pledge) {
            // Asked again. Views asked before now cannot show a withdrawal of this very proposal
            // (a proposer numbers every proposal anew), so this is defence in depth: the
            // release rule then never rests on numbering alone.
            h.views_from_round = h.views_from_round.max(views_from_round);
            return Ok(Ok(()));
        }
        let next = Held { pledge: Some(HeldPledge { pledge: pledge.clone(), views_from_round }), ..held.clone() };
        self.store(&next).map_err(TakeError::Write)?;
        *held = next;
        Ok(Ok(()))
    }

    /// Gives up the pledge `seen` if it is still held as it was seen (not confirmed again since).
    /// Returns whether it was.
    pub fn release(&self, seen: &HeldPledge) -> Result<bool, WriteError> {
        self.drop_pledge(|h| h == seen)
    }

    /// Marks this node as joining an existing cluster (synced before the join request goes out),
    /// unless it holds a pledge: then it must not join elsewhere, and this says why.
    pub fn begin_join(&self) -> Result<(), JoinBlocked> {
        let mut guard = self.held.lock().expect("pledge lock");
        let held = guard.as_mut().map_err(|e| JoinBlocked::Unreadable(e.clone()))?;
        if let Some(h) = &held.pledge {
            return Err(JoinBlocked::Pledged(h.pledge.proposer, self.path.clone()));
        }
        if !held.joining {
            let next = Held { joining: true, ..held.clone() };
            self.store(&next).map_err(JoinBlocked::Write)?;
            *held = next;
        }
        Ok(())
    }

    /// Carries out `Formation::Release` on `seen`, as this node (`me`) saw it: its own proposal is
    /// withdrawn, another's pledge released. Returns whether it was still held.
    pub fn give_up(&self, me: NodeId, seen: &HeldPledge) -> Result<bool, WriteError> {
        if seen.pledge.proposer == me { self.withdraw(&seen.pledge) } else { self.release(seen) }
    }

    /// As its proposer: withdraws `pledge` if it is still held. Returns whether it was.
    pub fn withdraw(&self, pledge: &Pledge) -> Result<bool, WriteError> {
        self.drop_pledge(|h| h.pledge == *pledge)
    }

    fn drop_pledge(&self, held_is: impl FnOnce(&HeldPledge) -> bool) -> Result<bool, WriteError> {
        let mut guard = self.held.lock().expect("pledge lock");
        let Ok(held) = guard.as_mut() else { return Ok(false) };
        if !held.pledge.as_ref().is_some_and(held_is) {
            return Ok(false);
        }
        let next = Held { pledge: None, ..held.clone() };
        self.store(&next)?;
        *held = next;
        Ok(true)
    }

    fn store(&self, held: &Held) -> Result<(), WriteError> {
        let disk = OnDisk {
            pledge: held.pledge.as_ref().map(|h| h.pledge.clone()),
            proposed: held.proposed,
            joining: held.joining,
        };
        let json = serde_json::to_vec_pretty(&disk).expect("a pledge serializes");
        crate::adapters::files::write_atomic(&self.path, &json, 0o600)
    }

    /// Drops everything: this node is in a cluster now (its Raft state says so from here on),
    /// and neither a pledge nor the proposal counter means anything any more (a node that leaves
    /// its cluster comes back with a new id).
    pub fn clear(&self) -> Result<(), WriteError> {
        let mut held = self.held.lock().expect("pledge lock");
        if matches!(&*held, Ok(h) if h.pledge.is_none() && h.proposed == 0 && !h.joining) {
            return Ok(());
        }
        remove(&self.path)?;
        *held = Ok(Held::default());
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinBlocked {
    #[error("{0}")]
    Unreadable(String),
    #[error(
        "this node has pledged to form a new cluster with {} ({}), so it cannot join another; it \
         releases the pledge when that proposal is withdrawn",
        .0, .1.display()
    )]
    Pledged(NodeId, PathBuf),
    #[error("cannot store the joining mark: {0}")]
    Write(WriteError),
}

#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error("{0}")]
    Unreadable(String),
    #[error("cannot store the pledge: {0}")]
    Write(WriteError),
}

fn remove(path: &Path) -> Result<(), WriteError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(WriteError { path: path.to_path_buf(), source }),
    }
}

fn load(path: &Path) -> Result<OnDisk, String> {
    let unreadable = |why: String| {
        format!(
            "the formation pledge {} is unreadable ({why}); it records which nodes this node promised to form the \
             first cluster with. If a cluster has formed, or none of those nodes has Raft state, stop the agent, \
             delete the file and start it again",
            path.display()
        )
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OnDisk::default()),
        Err(e) => return Err(unreadable(e.to_string())),
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(unreadable(format!("{} bytes, more than {MAX_FILE_BYTES}", meta.len())));
    }
    let bytes = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pledge(proposer: u64, ids: &[NodeId]) -> Pledge {
        Pledge { proposer: NodeId(proposer), seq: 1, members: members(ids) }
    }

    fn members(ids: &[NodeId]) -> BTreeMap<NodeId, String> {
        ids.iter().map(|i| (*i, format!("10.0.0.{}:7600", i.0))).collect()
    }

    #[test]
    fn a_pledge_survives_a_restart_and_is_released_only_as_held() {
        let dir = tempfile::tempdir().unwrap();
        let s = PledgeStore::open(dir.path());
        assert_eq!(s.held(), Ok(None));
        let p = pledge(1, &[NodeId(1), NodeId(2), NodeId(3)]);
        assert_eq!(s.take(&p, 7, |_| Ok(())).unwrap(), Ok(()));
        assert_eq!(s.held().unwrap().unwrap().views_from_round, 7);

        let again = PledgeStore::open(dir.path());
        assert_eq!(again.held().unwrap().unwrap().pledge, p, "the pledge is on disk");
        // Another proposal is not released by mistake; the held one is.
        let held = again.held().unwrap().unwrap();
        let other = HeldPledge { pledge: pledge(1, &[NodeId(1), NodeId(2), NodeId(4)]), ..held.clone() };
        assert!(!again.release(&other).unwrap());
        assert!(again.release(&held).unwrap());
        assert_eq!(PledgeStore::open(dir.path()).held(), Ok(None));
    }

    #[test]
    fn a_pledge_confirmed_again_is_not_released_by_a_view_from_before() {
        let dir = tempfile::tempdir().unwrap();
        let s = PledgeStore::open(dir.path());
        let p = pledge(1, &[NodeId(1), NodeId(2), NodeId(3)]);
        s.take(&p, 3, |_| Ok(())).unwrap().unwrap();
        let seen = s.held().unwrap().unwrap();
        // The proposer asks again (round 9 is next): the release decided on `seen` is void.
        s.take(&p, 9, |_| Ok(())).unwrap().unwrap();
        assert_eq!(s.held().unwrap().unwrap().views_from_round, 9);
        assert!(!s.release(&seen).unwrap());
        assert_eq!(s.held().unwrap().unwrap().pledge, p);
    }

    #[test]
    fn proposals_are_numbered_across_withdrawals_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let s = PledgeStore::open(dir.path());
        let first = s.propose(NodeId(1), members(&[NodeId(1), NodeId(2), NodeId(3)]), 1).unwrap().unwrap();
        assert_eq!(first.seq, 1);
        assert!(s.withdraw(&first).unwrap());
        let s = PledgeStore::open(dir.path());
        assert_eq!(s.held(), Ok(None));
        let second = s.propose(NodeId(1), members(&[NodeId(1), NodeId(2), NodeId(3)]), 1).unwrap().unwrap();
        assert_eq!(second.seq, 2, "the same members, a new number");
        // Holding another proposer's pledge, this node does not propose.
        s.withdraw(&second).unwrap();
        s.take(&pledge(0, &[NodeId(0), NodeId(1), NodeId(2)]), 1, |_| Ok(())).unwrap().unwrap();
        assert_eq!(s.propose(NodeId(1), members(&[NodeId(1), NodeId(2), NodeId(3)]), 1).unwrap(), None);
    }

    #[test]
    fn a_joining_node_pledges_to_nothing_and_a_pledged_one_does_not_join() {
        let dir = tempfile::tempdir().unwrap();
        let s = PledgeStore::open(dir.path());
        s.begin_join().unwrap();
        let s = PledgeStore::open(dir.path());
        assert_eq!(
            s.take(&pledge(1, &[NodeId(1), NodeId(2), NodeId(3)]), 1, |_| Ok(())).unwrap(),
            Err(PledgeRefusal::Joining),
            "after a restart too"
        );
        assert_eq!(s.propose(NodeId(2), members(&[NodeId(2), NodeId(3), NodeId(4)]), 1).unwrap(), None);
        s.clear().unwrap();
        s.take(&pledge(1, &[NodeId(1), NodeId(2), NodeId(3)]), 1, |_| Ok(())).unwrap().unwrap();
        let err = s.begin_join().unwrap_err().to_string();
        assert!(err.contains("cannot join") && err.contains(PLEDGE_FILE), "{err}");
    }

    #[test]
    fn an_older_file_without_the_later_fields_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = pledge(1, &[NodeId(1), NodeId(2), NodeId(3)]);
        let old = serde_json::json!({ "pledge": p });
        std::fs::write(dir.path().join(PLEDGE_FILE), old.to_string()).unwrap();
        assert_eq!(PledgeStore::open(dir.path()).held().unwrap().unwrap().pledge, p);
    }

    #[test]
    fn a_refused_pledge_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = PledgeStore::open(dir.path());
        let p = pledge(1, &[NodeId(1), NodeId(2), NodeId(3)]);
        s.take(&p, 1, |_| Ok(())).unwrap().unwrap();
        let r = s.take(&pledge(2, &[NodeId(2), NodeId(3), NodeId(4)]), 1, |cur| {
            Err(PledgeRefusal::PledgedTo(cur.unwrap().proposer))
        });
        assert_eq!(r.unwrap(), Err(PledgeRefusal::PledgedTo(NodeId(1))));
        assert_eq!(PledgeStore::open(dir.path()).held().unwrap().unwrap().pledge, p);
    }

    #[test]
    fn a_corrupt_pledge_file_stops_formation_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PLEDGE_FILE), b"{\"proposer\": 1, \"memb").unwrap();
        let s = PledgeStore::open(dir.path());
        let err = s.held().unwrap_err();
        assert!(err.contains(PLEDGE_FILE) && err.contains("delete the file"), "{err}");
        assert!(matches!(s.take(&pledge(1, &[NodeId(1)]), 1, |_| Ok(())), Err(TakeError::Unreadable(_))));
        assert!(dir.path().join(PLEDGE_FILE).exists(), "the evidence stays");
    }
}
