//! What a member may ask of the cluster over the peer API, by who it is: the permission table
//! the receiver of a forwarded command checks against the sender that the request's node
//! signature proved ([`crate::core::auth::Origin`]). Pure: no I/O.
//!
//! | command | who may send it to the leader |
//! |---|---|
//! | `UpsertMember` | the member it describes, only |
//! | `SetSlurmState` | the node it names as `from` (the state machine then refuses anyone but the SLURM controller) |
//! | `SlurmTakeover` | the node it names (the backup whose slurmctld took control) |
//! | `SetSecret` | any member, for its operator (`clusteros secrets rotate`): see below |
//! | `KvPut`, `KvDelete`, `KvCas` | any member, for its operator and its workloads |
//! | `InitCluster`, `SetHealth`, `AssignMeshIp`, `SetRoles`, `ResealSecret` | nobody: the leader decides these itself and proposes them on its own node; a forwarded one is refused |
//! | `Request { cmd }` | as `cmd` |
//!
//! Other routes: a node leaves only itself (`/peer/v1/leave`); a join under the id of an existing
//! member must be signed by that member (it may change the member's address); an append or a
//! snapshot must come from the leader its vote names, a vote or pre-vote request from its
//! candidate.
//!
//! Root on any member is an operator of the cluster: it may write KV data and rotate the managed
//! secrets (each member holds their values anyway, to run munged and k3s, so choosing the new
//! value grants it nothing it did not have). Removing another member or changing roles by hand
//! is not offered over the peer API at all.

use crate::core::state::{Command, NodeId};

/// Why a forwarded command was refused: shown to the sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {sender} may not ask for {op}: {why}")]
pub struct Forbidden {
    pub sender: NodeId,
    pub op: &'static str,
    pub why: String,
}

fn op(cmd: &Command) -> &'static str {
    match cmd {
        Command::InitCluster { .. } => "init_cluster",
        Command::UpsertMember { .. } => "upsert_member",
        Command::SetHealth { .. } => "set_health",
        Command::AssignMeshIp { .. } => "assign_mesh_ip",
        Command::SetRoles { .. } => "set_roles",
        Command::SetSecret { .. } => "set_secret",
        Command::ResealSecret { .. } => "reseal_secret",
        Command::SetSlurmState { .. } => "set_slurm_state",
        Command::SlurmTakeover { .. } => "slurm_takeover",
        Command::KvPut { .. } => "kv_put",
        Command::KvDelete { .. } => "kv_delete",
        Command::KvCas { .. } => "kv_cas",
        Command::Request { .. } => "request",
    }
}

/// Whether member `sender` may have the leader propose `cmd` (see the module's table).
pub fn may_forward(sender: NodeId, cmd: &Command) -> Result<(), Forbidden> {
    let refuse = |why: String| Err(Forbidden { sender, op: op(cmd), why });
    let only = |subject: NodeId, what: &str| {
        if subject == sender { Ok(()) } else { refuse(format!("{what} {subject}, and only that node may")) }
    };
    match cmd {
        Command::Request { cmd, .. } => may_forward(sender, cmd),
        Command::UpsertMember { spec, .. } => only(spec.id, "the record is node"),
        Command::SetSlurmState { from, .. } => only(*from, "the copy is announced as node"),
        Command::SlurmTakeover { id } => only(*id, "the takeover is by node"),
        Command::SetSecret { .. } | Command::KvPut { .. } | Command::KvDelete { .. } | Command::KvCas { .. } => Ok(()),
        Command::InitCluster { .. }
        | Command::SetHealth { .. }
        | Command::AssignMeshIp { .. }
        | Command::SetRoles { .. }
        | Command::ResealSecret { .. } => refuse("the leader decides this itself; no node can ask for it".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::state::{Health, MemberSpec, NodeFacts, RequestId, RoleAssignments};

    fn spec(id: u64) -> MemberSpec {
        MemberSpec {
            id: NodeId(id),
            name: format!("n{id}"),
            api_addr: "10.0.0.1:7600".into(),
            wg_public_key: String::new(),
            facts: NodeFacts::default(),
            labels: Default::default(),
            cluster_keys: Vec::new(),
        }
    }

    #[test]
    fn the_table() {
        let me = NodeId(1);
        let other = NodeId(2);
        let kv = Command::KvPut { key: "k".into(), value: "v".into() };
        let wrap =
            |cmd: Command| Command::Request { id: RequestId { origin: 9, seq: 1 }, at_ms: 0, cmd: Box::new(cmd) };
        let slurm = |from| Command::SetSlurmState { from, digest: "d".into(), files: 1, bytes: 1, taken_at_ms: 0 };
        let table: Vec<(Command, bool)> = vec![
            (Command::UpsertMember { spec: spec(1), at_ms: 0 }, true),
            (Command::UpsertMember { spec: spec(2), at_ms: 0 }, false),
            (slurm(me), true),
            (slurm(other), false),
            (Command::SlurmTakeover { id: me }, true),
            (Command::SlurmTakeover { id: other }, false),
            (Command::SetSecret { name: "munge-key".into(), value: "x".into(), at_ms: 0 }, true),
            (kv.clone(), true),
            (Command::KvDelete { key: "k".into() }, true),
            (Command::KvCas { key: "k".into(), expected: None, new: Some("v".into()) }, true),
            (Command::InitCluster { cluster_id: "c".into(), at_ms: 0 }, false),
            (Command::SetHealth { id: me, health: Health::Alive, at_ms: 0 }, false),
            (Command::AssignMeshIp { id: me, ip: "10.90.0.1".parse().unwrap() }, false),
            (Command::SetRoles { roles: RoleAssignments::default() }, false),
            (Command::ResealSecret { name: "munge-key".into(), value: "x".into(), version: 1 }, false),
            (wrap(kv), true),
            (wrap(Command::UpsertMember { spec: spec(1), at_ms: 0 }), true),
            (wrap(Command::UpsertMember { spec: spec(2), at_ms: 0 }), false),
            (wrap(Command::SetRoles { roles: RoleAssignments::default() }), false),
        ];
        for (cmd, allowed) in table {
            let got = may_forward(me, &cmd);
            assert_eq!(got.is_ok(), allowed, "{cmd:?}: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().starts_with("node 0000000000000001 may not ask for "), "{e}");
            }
        }
    }
}
