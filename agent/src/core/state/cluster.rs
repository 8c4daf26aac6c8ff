//! The cluster state and its deterministic `apply`: the same commands applied in the same order
//! give the same state on every node.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// The replicated cluster state: the one source of truth.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ClusterState {
    pub cluster_id: Option<String>,
    pub created_at_ms: u64,
    /// Voters of the last applied membership (both halves of a joint config).
    pub voters: BTreeSet<NodeId>,
    /// Learners of the last applied membership.
    pub learners: BTreeSet<NodeId>,
    pub members: BTreeMap<NodeId, Member>,
    #[serde(default)]
    pub roles: RoleAssignments,
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretEntry>,
    /// The SLURM controller's state directory, for the backup controller.
    #[serde(default)]
    pub slurm_state: Option<SlurmStateCopy>,
    pub kv: BTreeMap<String, KvEntry>,
    /// Client requests applied recently (see [`RequestLog`]).
    #[serde(default)]
    pub requests: RequestLog,
}

/// Checks a KV key and value against the limits; the error says what is wrong.
pub fn validate_kv(key: &str, value: Option<&str>) -> Result<(), String> {
    if key.is_empty() {
        return Err("key is empty: give a non-empty key".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!("key is {} bytes, the limit is {MAX_KEY_BYTES}", key.len()));
    }
    if let Some(v) = value
        && v.len() > MAX_VALUE_BYTES
    {
        return Err(format!("value is {} bytes, the limit is {MAX_VALUE_BYTES}", v.len()));
    }
    Ok(())
}

/// Checks what a node says about itself before it goes into every node's state: its name and
/// labels are written into slurm.conf, k3s and WireGuard settings on every node, its key and
/// address into every node's wg0. A name with a new line would add a line to slurm.conf, one
/// malformed key would break wg0 everywhere. The error says what is wrong.
pub fn validate_member(spec: &MemberSpec) -> Result<(), String> {
    let word = |s: &str, extra: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
    let n = &spec.name;
    if n.is_empty() || n.len() > 253 || !word(n, "-._") || n.starts_with(['-', '.']) {
        return Err(format!(
            "node name {:?} is not a host name: use 1-253 letters, digits, '-', '.' and '_'",
            crate::core::text::printable(n, 80)
        ));
    }
    if !spec.wg_public_key.is_empty() {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.decode(&spec.wg_public_key);
        if key.map_or(true, |k| k.len() != 32) {
            return Err("the WireGuard public key is not 32 bytes in base64 (as `wg pubkey` prints it)".into());
        }
    }
    match spec.api_addr.parse::<std::net::SocketAddr>() {
        Ok(a) if !a.ip().is_unspecified() && a.port() != 0 => {}
        _ => {
            return Err(format!(
                "the peer API address {:?} is not IP:PORT of a real address",
                crate::core::text::printable(&spec.api_addr, 80)
            ));
        }
    }
    for (k, v) in &spec.labels {
        if k.is_empty() || k.len() > 63 || !word(k, "-._/") || v.len() > 255 || !word(v, "-._/:=, ") {
            return Err(format!(
                "label {:?}={:?}: keys are 1-63 letters, digits, '-', '.', '_', '/'; values up to 255 of those, ':', '=', ',' and spaces",
                crate::core::text::printable(k, 80),
                crate::core::text::printable(v, 80)
            ));
        }
    }
    if spec.cluster_keys.len() > 8 || spec.cluster_keys.iter().any(|k| k.len() != 8 || !word(k, "")) {
        return Err("the cluster key fingerprints are not up to 8 values of 8 hex digits".into());
    }
    let f = &spec.facts;
    if f.kernel.len() > 255 || f.arch.len() > 64 || !word(&f.kernel, "-._+~") || !word(&f.arch, "-_") {
        return Err("the node facts (kernel, arch) hold characters a kernel release or architecture does not".into());
    }
    Ok(())
}

impl ClusterState {
    /// A copy without the user KV space and the SLURM state copy: what the node's mesh and
    /// services are derived from, so that neither user writes nor SLURM state copies cost a copy
    /// of those or a reconcile.
    pub fn without_kv(&self) -> ClusterState {
        ClusterState {
            cluster_id: self.cluster_id.clone(),
            created_at_ms: self.created_at_ms,
            voters: self.voters.clone(),
            learners: self.learners.clone(),
            members: self.members.clone(),
            roles: self.roles.clone(),
            secrets: self.secrets.clone(),
            slurm_state: None,
            kv: BTreeMap::new(),
            requests: RequestLog::default(),
        }
    }

    /// Whether Raft's applied membership contains this node (as voter or learner).
    pub fn is_raft_member(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Mirrors an applied membership entry. Member records of nodes that Raft no longer knows
    /// are dropped, so the member list is always a subset of Raft's membership.
    pub fn apply_membership(&mut self, voters: BTreeSet<NodeId>, learners: BTreeSet<NodeId>) {
        self.voters = voters;
        self.learners = learners;
        let (voters, learners) = (&self.voters, &self.learners);
        let known = |id: &NodeId| voters.contains(id) || learners.contains(id);
        self.members.retain(|id, _| known(id));
        let r = &mut self.roles;
        for holder in [&mut r.slurm_controller, &mut r.slurm_backup, &mut r.k3s_server] {
            if holder.is_some_and(|id| !known(&id)) {
                *holder = None;
            }
        }
        r.slurm_workers.retain(|id| known(id));
        r.k3s_agents.retain(|id| known(id));
    }

    /// Applies one command at log index `index`. Pure: no I/O, no clock.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Response {
        match cmd {
            Command::InitCluster { cluster_id, at_ms } => {
                if self.cluster_id.is_none() {
                    self.cluster_id = Some(cluster_id.clone());
                    self.created_at_ms = *at_ms;
                }
                Response::Ok
            }
            Command::UpsertMember { spec, at_ms } => {
                if let Err(reason) = validate_member(spec) {
                    return Response::Rejected { reason };
                }
                if !self.is_raft_member(spec.id) {
                    return Response::Rejected {
                        reason: format!("node {} is not in the Raft membership; join the cluster first", spec.id),
                    };
                }
                if let Some(other) = self.members.values().find(|m| m.spec.name == spec.name && m.spec.id != spec.id) {
                    return Response::Rejected {
                        reason: format!(
                            "node name {:?} is already used by node {}; remove that node or rename this one",
                            spec.name, other.spec.id
                        ),
                    };
                }
                match self.members.get_mut(&spec.id) {
                    Some(m) => m.spec = spec.clone(),
                    None => {
                        self.members.insert(
                            spec.id,
                            Member {
                                spec: spec.clone(),
                                mesh_ip: None,
                                health: Health::Alive,
                                health_since_ms: *at_ms,
                                registered_at_ms: *at_ms,
                            },
                        );
                    }
                }
                Response::Ok
            }
            Command::SetHealth { id, health, at_ms } => match self.members.get_mut(id) {
                Some(m) => {
                    if m.health != *health {
                        m.health = *health;
                        m.health_since_ms = *at_ms;
                    }
                    Response::Ok
                }
                None => Response::Rejected { reason: format!("no member {id}") },
            },
            Command::AssignMeshIp { id, ip } => {
                if let Some(other) = self.members.values().find(|m| m.mesh_ip == Some(*ip) && m.spec.id != *id) {
                    return Response::Rejected {
                        reason: format!("mesh address {ip} is already used by {}", other.spec.id),
                    };
                }
                match self.members.get_mut(id) {
                    Some(m) => {
                        m.mesh_ip = Some(*ip);
                        Response::Ok
                    }
                    None => Response::Rejected { reason: format!("no member {id}") },
                }
            }
            Command::SetRoles { roles } => {
                let holders = [roles.slurm_controller, roles.slurm_backup, roles.k3s_server];
                let all = holders.iter().flatten().chain(&roles.slurm_workers).chain(&roles.k3s_agents);
                if let Some(id) = all.into_iter().find(|id| !self.members.contains_key(id)) {
                    return Response::Rejected { reason: format!("role holder {id} is not a member") };
                }
                self.roles = roles.clone();
                Response::Ok
            }
            Command::SetSecret { name, value, at_ms } => {
                if name.is_empty() || value.is_empty() {
                    return Response::Rejected { reason: "secret name and value must not be empty".into() };
                }
                let version = self.secrets.get(name).map_or(1, |s| s.version + 1);
                self.secrets.insert(name.clone(), SecretEntry { value: value.clone(), version, changed_at_ms: *at_ms });
                Response::Secret { version }
            }
            Command::ResealSecret { name, value, version } => match self.secrets.get_mut(name) {
                Some(e) if e.version == *version && !value.is_empty() => {
                    e.value = value.clone();
                    Response::Secret { version: *version }
                }
                Some(e) => Response::Rejected {
                    reason: format!("secret {name} is at version {}, not {version}: it changed meanwhile", e.version),
                },
                None => Response::Rejected { reason: format!("there is no secret {name} to seal again") },
            },
            Command::SetSlurmState { from, digest, files, bytes, taken_at_ms } => {
                if self.roles.slurm_controller != Some(*from) {
                    return Response::Rejected {
                        reason: format!(
                            "node {from} is not the SLURM controller ({}); only the controller publishes its state",
                            self.roles.slurm_controller.map_or_else(|| "none assigned".into(), |c| format!("{c}"))
                        ),
                    };
                }
                let version = self.slurm_state.as_ref().map_or(1, |c| c.version + 1);
                self.slurm_state = Some(SlurmStateCopy {
                    from: *from,
                    version,
                    digest: digest.clone(),
                    files: *files,
                    bytes: *bytes,
                    taken_at_ms: *taken_at_ms,
                });
                Response::SlurmState { version }
            }
            Command::SlurmTakeover { id } => {
                let r = &mut self.roles;
                match (r.slurm_controller, r.slurm_backup) {
                    (Some(c), Some(b)) if b == *id => {
                        r.slurm_controller = Some(b);
                        r.slurm_backup = Some(c);
                        Response::Ok
                    }
                    _ => Response::Rejected {
                        reason: format!("node {id} is not the SLURM backup controller; nothing to take over"),
                    },
                }
            }
            Command::KvPut { key, value } => {
                if let Err(reason) = validate_kv(key, Some(value)) {
                    return Response::Rejected { reason };
                }
                let previous =
                    self.kv.insert(key.clone(), KvEntry { value: value.clone(), mod_index: index }).map(|e| e.value);
                Response::Kv { previous }
            }
            Command::KvDelete { key } => {
                let previous = self.kv.remove(key).map(|e| e.value);
                Response::Kv { previous }
            }
            Command::KvCas { key, expected, new } => {
                if let Err(reason) = validate_kv(key, new.as_deref()) {
                    return Response::Rejected { reason };
                }
                let current = self.kv.get(key).map(|e| e.value.clone());
                if current != *expected {
                    return Response::Cas { succeeded: false, current };
                }
                match new {
                    Some(v) => {
                        self.kv.insert(key.clone(), KvEntry { value: v.clone(), mod_index: index });
                    }
                    None => {
                        self.kv.remove(key);
                    }
                }
                Response::Cas { succeeded: true, current: new.clone() }
            }
            Command::Request { id, cmd, .. } => {
                match self.requests.get(id) {
                    Some(Some(first)) => return first.clone(),
                    Some(None) => return Response::AlreadyApplied,
                    None => {}
                }
                if matches!(**cmd, Command::Request { .. }) {
                    return Response::Rejected { reason: "a request cannot contain another request".into() };
                }
                let response = self.apply(index, cmd);
                self.requests.record(*id, index, response.clone());
                response
            }
        }
    }
}
