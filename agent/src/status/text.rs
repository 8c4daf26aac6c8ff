//! The text renderers of the status report: tables and lines for people. Every one is a function
//! of the report (and the clock, for ages), checked against the golden files in `testdata/`
//! (`UPDATE_GOLDEN=1 cargo test -p clusteros-agent status` rewrites them after a deliberate change).

use std::fmt::Write as _;

use super::StatusReport;

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), |v| v.to_string())
}

/// The member table.
pub fn render_members(r: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:<1} {:<16} {:<16} {:<8} {:<8} {:<21} {:<15} {:<8} {:>4} {:>7}",
        "", "NAME", "ID", "ROLE", "HEALTH", "ADDRESS", "MESH_IP", "RAFT_VIA", "CPUS", "MEM_MB"
    );
    for m in &r.members {
        let mark = if m.is_leader { "*" } else { "" };
        let name = m.name.clone().unwrap_or_else(|| "(registering)".into()) + if m.is_self { " (this)" } else { "" };
        let _ = writeln!(
            out,
            "  {:<1} {:<16} {:<16} {:<8} {:<8} {:<21} {:<15} {:<8} {:>4} {:>7}",
            mark,
            name,
            m.id,
            m.role,
            opt(&m.health),
            m.api_addr,
            opt(&m.mesh_ip),
            m.raft_via(),
            opt(&m.cpus),
            opt(&m.memory_mb)
        );
    }
    out
}

/// Role holders, SLURM state replication and this node's services.
pub fn render_roles(r: &StatusReport, now_ms: u64) -> String {
    let mut out = String::new();
    let Some(roles) = &r.roles else { return "roles: not available (the agent is not running a cluster)\n".into() };
    let one = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let many = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(", ") };
    let _ = writeln!(out, "slurm controller   {}", one(&roles.slurm_controller));
    let _ = writeln!(out, "slurm backup       {}", one(&roles.slurm_backup));
    let _ = writeln!(out, "slurm workers      {}", many(&roles.slurm_workers));
    let _ = writeln!(out, "k3s server         {}", one(&roles.k3s_server));
    let _ = writeln!(out, "k3s agents         {}", many(&roles.k3s_agents));
    if let Some(st) = &r.slurm_state {
        let age =
            st.taken_at_ms.map_or_else(|| "-".to_string(), |t| format!("{} s ago", now_ms.saturating_sub(t) / 1000));
        let _ = writeln!(
            out,
            "slurm state copy   {} version {} ({} files, {} bytes, read {age}){}",
            st.role,
            opt(&st.version),
            st.files,
            st.bytes,
            st.note.as_ref().map(|n| format!(": {n}")).unwrap_or_default()
        );
    }
    out.push_str(&render_services(r));
    out
}

/// This node's units, notes and the last reconcile error.
pub fn render_services(r: &StatusReport) -> String {
    let mut out = String::new();
    let Some(s) = &r.services else {
        return "services (this node): not managed here (no systemd as PID 1, or manage_services = \"off\")\n".into();
    };
    let _ = writeln!(out, "services (this node):");
    for u in &s.units {
        let state = u
            .status
            .as_ref()
            .map_or_else(|| "unknown".to_string(), |st| format!("{} ({})", st.active_state, st.sub_state));
        let want = if u.wanted { "wanted" } else { "not wanted" };
        let _ = writeln!(out, "  {:<20} {:<24} {:<11} {}", u.unit, u.role, want, state);
        if let Some(e) = &u.error {
            let _ = writeln!(out, "    error: {e}");
        }
    }
    for n in &s.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    if let Some(e) = &s.error {
        let _ = writeln!(out, "  error: {e}");
    }
    out
}

/// The WireGuard interface and its peers.
pub fn render_mesh(r: &StatusReport) -> String {
    let mut out = String::new();
    let Some(m) = &r.mesh else {
        return "mesh: not managed here (no systemd as PID 1, or manage_services = \"off\")\n".into();
    };
    let _ = writeln!(
        out,
        "mesh       {} {} port {} key {}",
        m.interface,
        opt(&m.address),
        opt(&m.listen_port),
        opt(&m.public_key)
    );
    if let Some(e) = &m.error {
        let _ = writeln!(out, "  error: {e}");
    }
    if !m.peers.is_empty() {
        let _ = writeln!(
            out,
            "  {:<16} {:<15} {:<21} {:>10} {:>12} {:>12}",
            "PEER", "MESH_IP", "ENDPOINT", "HANDSHAKE", "RX", "TX"
        );
        for p in &m.peers {
            let hs = p.handshake_age_secs.map_or_else(|| "never".to_string(), |s| format!("{s}s ago"));
            let _ = writeln!(
                out,
                "  {:<16} {:<15} {:<21} {:>10} {:>12} {:>12}",
                p.name.clone().unwrap_or_else(|| "?".into()),
                opt(&p.mesh_ip),
                opt(&p.endpoint),
                hs,
                p.rx_bytes,
                p.tx_bytes
            );
        }
    }
    out
}

/// Raft details.
pub fn render_raft(r: &StatusReport) -> String {
    let mut out = String::new();
    let Some(raft) = &r.raft else { return "raft: not running\n".into() };
    let leader = match (&raft.leader_name, &raft.leader_id) {
        (Some(n), Some(i)) => format!("{n} ({i})"),
        (None, Some(i)) => i.clone(),
        _ => "none".into(),
    };
    let _ = writeln!(out, "state      {} · term {} · leader {}", raft.state, raft.term, leader);
    let _ = writeln!(
        out,
        "log        last {} · commit {} · applied {} · snapshot {} · purged {}",
        opt(&raft.last_log_index),
        opt(&raft.commit_index),
        opt(&raft.applied_index),
        opt(&raft.snapshot_index),
        opt(&raft.purged_index)
    );
    let _ = writeln!(out, "voters     {}", if raft.voters.is_empty() { "-".into() } else { raft.voters.join(", ") });
    let _ =
        writeln!(out, "learners   {}", if raft.learners.is_empty() { "-".into() } else { raft.learners.join(", ") });
    if !raft.replication.is_empty() {
        let _ = writeln!(out, "replication (from this leader):");
        for rep in &raft.replication {
            let _ = writeln!(
                out,
                "  {:<16} {:<16} matched {:>8} lag {:>6}{}",
                rep.name.clone().unwrap_or_default(),
                rep.id,
                opt(&rep.matched_index),
                opt(&rep.lag),
                if rep.reachable {
                    String::new()
                } else {
                    format!("  UNREACHABLE (last contact {} ms ago)", opt(&rep.last_contact_ms))
                }
            );
        }
    }
    out
}

/// The whole status for people; `now_ms` is the wall clock ages are counted to.
pub fn render_status(r: &StatusReport, now_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node       {} {} {} (clusteros {})",
        r.node.name,
        opt(&r.node.id),
        opt(&r.node.api_addr),
        r.node.version
    );
    for p in &r.problems {
        let _ = writeln!(out, "PROBLEM    {p}");
    }
    if !r.configured {
        return out;
    }
    let _ = writeln!(out, "cluster    {}", opt(&r.cluster_id));
    let _ = writeln!(out, "phase      {} · {}", opt(&r.phase), opt(&r.phase_detail));
    if let Some(e) = &r.last_error {
        let _ = writeln!(out, "last error {e}");
    }
    out.push_str(&render_raft(r));
    let _ = writeln!(out, "members ({})", r.members.len());
    out.push_str(&render_members(r));
    if !r.secrets.is_empty() {
        let list: Vec<String> = r
            .secrets
            .iter()
            .map(|s| match s.sealed_with.as_deref() {
                Some("accepted") => format!("{} v{} (sealed with the other cluster secret)", s.name, s.version),
                Some("none") => format!("{} v{} (cannot be opened with this node's cluster secret)", s.name, s.version),
                _ => format!("{} v{}", s.name, s.version),
            })
            .collect();
        let _ = writeln!(out, "secrets    {}", list.join(", "));
    }
    // While the cluster secret is rotated: which secrets this node and each member hold.
    let rotating = r.node.cluster_keys.len() > 1
        || r.members.iter().any(|m| m.cluster_keys.len() > 1 || m.cluster_keys.first() != r.node.cluster_keys.first());
    if rotating && let Some((signs, also)) = r.node.cluster_keys.split_first() {
        let _ = writeln!(
            out,
            "cluster secret signs with {signs}, also accepts {}",
            if also.is_empty() { "-".into() } else { also.join(", ") }
        );
        for m in &r.members {
            let name = m.name.clone().unwrap_or_else(|| m.id.clone());
            let _ = writeln!(
                out,
                "  {name:<16} holds {}",
                if m.cluster_keys.is_empty() { "-".into() } else { m.cluster_keys.join(", ") }
            );
        }
    }
    out.push_str(&render_beacons(r));
    out.push_str(&render_mesh(r));
    out.push_str(&render_roles(r, now_ms));
    out
}

/// LAN beacons, and the nodes of other clusters heard on the LAN (nothing with beacons off).
pub fn render_beacons(r: &StatusReport) -> String {
    let mut out = String::new();
    let Some(b) = &r.beacons else { return out };
    let refused = if b.refused.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = b.refused.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!(" · refused: {}", list.join(", "))
    };
    let _ = writeln!(
        out,
        "beacons    UDP port {} · {} sent · {} of this cluster heard{refused}",
        b.port,
        b.sent,
        if b.heard == 1 { "1 node".to_string() } else { format!("{} nodes", b.heard) }
    );
    if let Some(p) = &b.problem {
        let _ = writeln!(out, "beacons    PROBLEM {p}");
    }
    if !b.neighbours.is_empty() {
        let _ = writeln!(out, "neighbours ({}): nodes of other clusters on this LAN, left alone", b.neighbours.len());
        for n in &b.neighbours {
            let _ = writeln!(
                out,
                "    {:<16} {} {:<21} cluster {} · {} · heard {} s ago",
                n.name,
                n.id,
                n.api_addr,
                n.cluster,
                if n.member { "member" } else { "not a member yet" },
                n.heard_ms_ago / 1000
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::services::{ServiceReport, UnitReport};
    use crate::adapters::systemd::UnitStatus;
    use crate::core::state::Health;
    use crate::runtime::{MeshPeerReport, MeshReport, Phase, SlurmStateReport};
    use crate::status::{
        MemberReport, NodeReport, RaftReport, ReplicationReport, RolesReport, SecretReport, unconfigured,
    };

    const NOW_MS: u64 = 1_764_000_000_000;

    fn member(n: u64, role: &str, health: Health, on_mesh: bool) -> MemberReport {
        let mesh_ip: std::net::Ipv4Addr = format!("10.90.0.{n}").parse().unwrap();
        MemberReport {
            id: format!("{:016x}", 0xa000 + n),
            name: Some(format!("node{n}")),
            api_addr: format!("192.168.50.{}:7600", 10 + n),
            raft_addr: if on_mesh { format!("{mesh_ip}:7600") } else { format!("192.168.50.{}:7600", 10 + n) },
            mesh_ip: Some(mesh_ip),
            role: role.into(),
            health: Some(health),
            health_since_ms: Some(NOW_MS - 60_000),
            cpus: Some(2),
            memory_mb: Some(2048),
            is_leader: n == 1,
            is_self: n == 1,
            node_key: String::new(),
            // node3 has not taken the new cluster secret yet.
            cluster_keys: if n == 3 { vec!["5a6b7c8d".into()] } else { vec!["1c2d3e4f".into(), "5a6b7c8d".into()] },
        }
    }

    fn unit(unit: &str, role: &str, wanted: bool, active: &str, sub: &str, error: Option<&str>) -> UnitReport {
        UnitReport {
            unit: unit.into(),
            role: role.into(),
            wanted,
            status: Some(UnitStatus {
                unit: unit.into(),
                load_state: "loaded".into(),
                active_state: active.into(),
                sub_state: sub.into(),
                result: None,
            }),
            error: error.map(Into::into),
        }
    }

    /// The leader of a four-node cluster with a bit of everything: a suspect member, a learner
    /// still on the underlay, an unreachable follower, a failed unit, a mesh peer that never
    /// shook hands, SLURM state being published.
    fn leader() -> StatusReport {
        StatusReport {
            node: NodeReport {
                id: Some(format!("{:016x}", 0xa001)),
                name: "node1".into(),
                api_addr: Some("192.168.50.11:7600".into()),
                version: "0.1.0".into(),
                node_key: Some("bm90IGEgcmVhbCBrZXksIGEgdGVzdCBmaXh0dXJlISE=".into()),
                cluster_keys: vec!["1c2d3e4f".into(), "5a6b7c8d".into()],
            },
            configured: true,
            phase: Some(Phase::Member),
            phase_detail: Some("member of the cluster".into()),
            problems: vec![],
            last_error: None,
            cluster_id: Some("5f3c2a1b9e8d7c6b".into()),
            raft: Some(RaftReport {
                state: "leader".into(),
                term: 7,
                leader_id: Some(format!("{:016x}", 0xa001)),
                leader_name: Some("node1".into()),
                last_log_index: Some(1234),
                commit_index: Some(1234),
                applied_index: Some(1234),
                snapshot_index: Some(1000),
                purged_index: Some(900),
                voters: vec![format!("{:016x}", 0xa001), format!("{:016x}", 0xa002), format!("{:016x}", 0xa003)],
                learners: vec![format!("{:016x}", 0xa004)],
                replication: vec![
                    ReplicationReport {
                        id: format!("{:016x}", 0xa002),
                        name: Some("node2".into()),
                        matched_index: Some(1234),
                        lag: Some(0),
                        last_contact_ms: Some(40),
                        reachable: true,
                    },
                    ReplicationReport {
                        id: format!("{:016x}", 0xa003),
                        name: Some("node3".into()),
                        matched_index: Some(1100),
                        lag: Some(134),
                        last_contact_ms: Some(4200),
                        reachable: false,
                    },
                    ReplicationReport {
                        id: format!("{:016x}", 0xa004),
                        name: Some("node4".into()),
                        matched_index: Some(1230),
                        lag: Some(4),
                        last_contact_ms: Some(90),
                        reachable: true,
                    },
                ],
            }),
            members: vec![
                member(1, "voter", Health::Alive, true),
                member(2, "voter", Health::Alive, true),
                member(3, "voter", Health::Suspect, true),
                member(4, "learner", Health::Alive, false),
            ],
            roles: Some(RolesReport {
                slurm_controller: Some("node1".into()),
                slurm_backup: Some("node2".into()),
                slurm_workers: vec!["node1".into(), "node2".into(), "node3".into(), "node4".into()],
                k3s_server: Some("node1".into()),
                k3s_agents: vec!["node2".into(), "node3".into(), "node4".into()],
            }),
            secrets: vec![
                SecretReport {
                    name: "k3s-token".into(),
                    version: 1,
                    changed_at_ms: NOW_MS - 3_600_000,
                    sealed_with: Some("current".into()),
                },
                SecretReport {
                    name: "munge-key".into(),
                    version: 2,
                    changed_at_ms: NOW_MS - 600_000,
                    sealed_with: Some("accepted".into()),
                },
            ],
            services: Some(ServiceReport {
                units: vec![
                    unit("munge.service", "munge", true, "active", "running", None),
                    unit("slurmctld.service", "slurm controller", true, "active", "running", None),
                    unit("slurmd.service", "slurm worker", true, "active", "running", None),
                    unit(
                        "k3s.service",
                        "k3s server",
                        true,
                        "failed",
                        "failed",
                        Some(
                            "start k3s.service failed: job failed, unit failed (exit-code); see `journalctl -u k3s.service`",
                        ),
                    ),
                    unit("k3s-agent.service", "k3s agent", false, "inactive", "dead", None),
                ],
                notes: vec!["k3s: no k3s binary in the image; k3s is off".into()],
                files_written: vec![],
                error: None,
            }),
            mesh: Some(MeshReport {
                interface: "wg0".into(),
                address: Some("10.90.0.1/16".into()),
                public_key: Some("dGhpcyBpcyBub3QgYSByZWFsIGtleSwgaXQgaXMgYSB0ZXN0".into()),
                listen_port: Some(51820),
                peers: vec![
                    MeshPeerReport {
                        name: Some("node2".into()),
                        public_key: "K2".into(),
                        mesh_ip: Some("10.90.0.2".parse().unwrap()),
                        endpoint: Some("192.168.50.12:51820".parse().unwrap()),
                        handshake_age_secs: Some(12),
                        rx_bytes: 123_456,
                        tx_bytes: 654_321,
                    },
                    MeshPeerReport {
                        name: None,
                        public_key: "K9".into(),
                        mesh_ip: None,
                        endpoint: None,
                        handshake_age_secs: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                    },
                ],
                error: None,
            }),
            slurm_state: Some(SlurmStateReport {
                role: "publishing".into(),
                version: Some(41),
                files: 12,
                bytes: 40_960,
                taken_at_ms: Some(NOW_MS - 3_000),
                note: None,
            }),
            beacons: None,
        }
    }

    /// A node still discovering its peers, without systemd: no services, no mesh, no roles.
    fn discovering() -> StatusReport {
        StatusReport {
            phase: Some(Phase::Discovering),
            phase_detail: Some("2 of 3 expected nodes seen".into()),
            last_error: Some("192.168.50.13:7600: connection refused".into()),
            cluster_id: None,
            raft: Some(RaftReport {
                state: "learner".into(),
                term: 0,
                leader_id: None,
                leader_name: None,
                last_log_index: None,
                commit_index: None,
                applied_index: None,
                snapshot_index: None,
                purged_index: None,
                voters: vec![],
                learners: vec![],
                replication: vec![],
            }),
            members: vec![],
            roles: None,
            secrets: vec![],
            services: None,
            mesh: None,
            slurm_state: None,
            beacons: Some(crate::runtime::beacon::BeaconReport {
                port: 7609,
                sent: 42,
                heard: 1,
                taken: 40,
                refused: [("bad_mac".to_string(), 2)].into(),
                neighbours: vec![crate::runtime::beacon::NeighbourReport {
                    cluster: "9a8b7c6d".into(),
                    id: "00000000000b0001".into(),
                    name: "lab-node-1".into(),
                    api_addr: "192.168.50.40:7600".into(),
                    member: true,
                    heard_ms_ago: 3_400,
                }],
                problem: None,
            }),
            ..leader()
        }
    }

    #[test]
    fn text_output_matches_the_golden_files() {
        let golden =
            |name: &str, text: String| crate::core::render::check_golden_in("src/status/testdata", name, &text);
        let l = leader();
        golden("leader-status.txt", render_status(&l, NOW_MS));
        golden("leader-members.txt", render_members(&l));
        golden("leader-raft.txt", render_raft(&l));
        golden("leader-mesh.txt", render_mesh(&l));
        golden("leader-roles.txt", render_roles(&l, NOW_MS));
        golden("discovering-status.txt", render_status(&discovering(), NOW_MS));
        let problems = vec![
            "no cluster secret: set cluster_secret_file in /etc/clusteros/agent.toml or the systemd credential clusteros.secret".into(),
        ];
        golden(
            "unconfigured-status.txt",
            render_status(&unconfigured("node9", problems), NOW_MS).replace(super::super::VERSION, "VERSION"),
        );
    }

    #[test]
    fn the_report_reads_back_from_its_json() {
        let l = leader();
        let back: StatusReport = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }
}
