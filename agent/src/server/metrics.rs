//! Prometheus metrics: the node's status report rendered in the text exposition format (version
//! 0.0.4), served on plain HTTP at `metrics_addr` (`GET /metrics`). Derived from the same
//! [`StatusReport`] as `clusteros status`, so the two never disagree. No secret values: secrets
//! appear only as versions.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::status::StatusReport;

/// Peer requests refused because their proof of the cluster secret was wrong or missing.
static PEER_REQUESTS_REFUSED: AtomicU64 = AtomicU64::new(0);
/// Connections closed at once by the peer API's listeners (see [`crate::server::accept`]).
static PEER_CONNECTIONS_REFUSED: AtomicU64 = AtomicU64::new(0);
/// Connections closed at once by the metrics listener.
static METRICS_CONNECTIONS_REFUSED: AtomicU64 = AtomicU64::new(0);

/// What the agent's servers refused since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    pub peer_requests: u64,
    pub peer_connections: u64,
    pub metrics_connections: u64,
}

impl Refusals {
    pub fn now() -> Refusals {
        Refusals {
            peer_requests: PEER_REQUESTS_REFUSED.load(Ordering::Relaxed),
            peer_connections: PEER_CONNECTIONS_REFUSED.load(Ordering::Relaxed),
            metrics_connections: METRICS_CONNECTIONS_REFUSED.load(Ordering::Relaxed),
        }
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: String,
    samples: Vec<String>,
}

/// Samples grouped by metric: the text format wants each metric's lines together, after its HELP
/// and TYPE lines, however the samples were produced.
struct Out {
    families: Vec<Family>,
}

impl Out {
    fn sample(&mut self, name: &'static str, kind: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        let labels = if labels.is_empty() {
            String::new()
        } else {
            let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", label(v))).collect();
            format!("{{{}}}", inner.join(","))
        };
        let line = format!("{name}{labels} {value}");
        match self.families.iter_mut().find(|f| f.name == name) {
            Some(f) => f.samples.push(line),
            None => self.families.push(Family { name, kind, help: help.into(), samples: vec![line] }),
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for l in &f.samples {
                let _ = writeln!(out, "{l}");
            }
        }
        out
    }

    fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample(name, "gauge", help, labels, value);
    }
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// Renders the report. `now_ms` is the wall clock (ms since the epoch), for ages.
pub fn render(r: &StatusReport, refused: Refusals, now_ms: u64) -> String {
    let mut o = Out { families: Vec::new() };
    let name = r.node.name.as_str();
    o.gauge("clusteros_build_info", "Agent version (always 1).", &[("version", &r.node.version)], 1.0);
    o.gauge("clusteros_configured", "1 when the agent can form or join a cluster.", &[], flag(r.configured));
    o.gauge("clusteros_problems", "Problems a person must fix (see clusteros status).", &[], r.problems.len() as f64);
    if let Some(phase) = r.phase {
        for p in ["discovering", "joining", "member", "left", "idle"] {
            o.gauge(
                "clusteros_phase",
                "Life-cycle phase of this agent.",
                &[("phase", p)],
                flag(phase.to_string() == p),
            );
        }
    }
    if let Some(raft) = &r.raft {
        for s in ["leader", "follower", "candidate", "learner", "shutdown"] {
            o.gauge("clusteros_raft_state", "Raft server state of this node.", &[("state", s)], flag(raft.state == s));
        }
        o.gauge("clusteros_raft_term", "Current Raft term.", &[], raft.term as f64);
        o.gauge("clusteros_raft_has_leader", "1 when this node knows a leader.", &[], flag(raft.leader_id.is_some()));
        let idx: [(&'static str, &str, Option<u64>); 5] = [
            ("clusteros_raft_last_log_index", "Index of the last entry in this node's log.", raft.last_log_index),
            ("clusteros_raft_commit_index", "Highest log index known to be committed.", raft.commit_index),
            ("clusteros_raft_applied_index", "Highest log index applied to the state machine.", raft.applied_index),
            ("clusteros_raft_snapshot_index", "Last log index in the latest snapshot.", raft.snapshot_index),
            ("clusteros_raft_purged_index", "Highest log index purged from the log.", raft.purged_index),
        ];
        for (metric, help, v) in idx {
            if let Some(v) = v {
                o.gauge(metric, help, &[], v as f64);
            }
        }
        o.gauge("clusteros_raft_voters", "Voters in the Raft membership.", &[], raft.voters.len() as f64);
        o.gauge("clusteros_raft_learners", "Learners in the Raft membership.", &[], raft.learners.len() as f64);
        for rep in &raft.replication {
            let peer = rep.name.clone().unwrap_or_else(|| rep.id.clone());
            o.gauge(
                "clusteros_raft_follower_reachable",
                "1 when the follower answered the leader within the shortest election timeout (leader only).",
                &[("peer", &peer)],
                flag(rep.reachable),
            );
            if let Some(lag) = rep.lag {
                o.gauge(
                    "clusteros_raft_replication_lag_entries",
                    "Entries a follower is behind the leader (leader only).",
                    &[("peer", &peer)],
                    lag as f64,
                );
            }
        }
    }
    for m in &r.members {
        let peer = m.name.clone().unwrap_or_else(|| m.id.clone());
        let health = m.health.map_or_else(|| "unknown".to_string(), |h| h.to_string());
        o.gauge(
            "clusteros_member_info",
            "One per member: its Raft role, health and how Raft reaches it (always 1).",
            &[("member", &peer), ("role", &m.role), ("health", &health), ("raft_via", m.raft_via())],
            1.0,
        );
    }
    for h in ["alive", "suspect", "failed", "left"] {
        let n = r.members.iter().filter(|m| m.health.is_some_and(|x| x.to_string() == h)).count();
        o.gauge("clusteros_members", "Members by health.", &[("health", h)], n as f64);
    }
    if let Some(roles) = &r.roles {
        let held = [
            ("slurm_controller", roles.slurm_controller.as_deref() == Some(name)),
            ("slurm_backup", roles.slurm_backup.as_deref() == Some(name)),
            ("slurm_worker", roles.slurm_workers.iter().any(|w| w == name)),
            ("k3s_server", roles.k3s_server.as_deref() == Some(name)),
            ("k3s_agent", roles.k3s_agents.iter().any(|w| w == name)),
        ];
        for (role, holds) in held {
            o.gauge("clusteros_role", "1 when this node holds the role.", &[("role", role)], flag(holds));
        }
    }
    for s in &r.secrets {
        o.gauge(
            "clusteros_secret_version",
            "Version of a cluster secret (never its value).",
            &[("secret", &s.name)],
            s.version as f64,
        );
    }
    if let Some(svc) = &r.services {
        for u in &svc.units {
            let active = u.status.as_ref().is_some_and(|s| s.active_state == "active");
            let failed = u.status.as_ref().is_some_and(|s| s.active_state == "failed");
            o.gauge(
                "clusteros_unit_wanted",
                "1 when the agent wants the unit running.",
                &[("unit", &u.unit)],
                flag(u.wanted),
            );
            o.gauge("clusteros_unit_active", "1 when the unit is active.", &[("unit", &u.unit)], flag(active));
            o.gauge("clusteros_unit_failed", "1 when the unit is failed.", &[("unit", &u.unit)], flag(failed));
        }
        o.gauge(
            "clusteros_services_error",
            "1 when the last services reconcile failed.",
            &[],
            flag(svc.error.is_some()),
        );
    }
    if let Some(mesh) = &r.mesh {
        o.gauge(
            "clusteros_mesh_up",
            "1 when wg0 is configured with this node's mesh address.",
            &[],
            flag(mesh.error.is_none() && mesh.address.is_some()),
        );
        o.gauge("clusteros_mesh_peers", "WireGuard peers on wg0.", &[], mesh.peers.len() as f64);
        for p in &mesh.peers {
            let peer = p.name.clone().unwrap_or_else(|| p.public_key.clone());
            if let Some(age) = p.handshake_age_secs {
                o.gauge(
                    "clusteros_mesh_handshake_age_seconds",
                    "Seconds since the latest WireGuard handshake with a peer.",
                    &[("peer", &peer)],
                    age as f64,
                );
            }
            o.sample(
                "clusteros_mesh_rx_bytes_total",
                "counter",
                "Bytes received from a peer over wg0.",
                &[("peer", &peer)],
                p.rx_bytes as f64,
            );
            o.sample(
                "clusteros_mesh_tx_bytes_total",
                "counter",
                "Bytes sent to a peer over wg0.",
                &[("peer", &peer)],
                p.tx_bytes as f64,
            );
        }
    }
    if let Some(b) = &r.beacons {
        o.sample("clusteros_beacons_sent_total", "counter", "LAN beacons this node sent.", &[], b.sent as f64);
        o.sample(
            "clusteros_beacons_taken_total",
            "counter",
            "LAN beacons of this cluster taken (verified, fresh, not replayed).",
            &[],
            b.taken as f64,
        );
        for reason in crate::core::beacon::BeaconRefusal::ALL.map(|r| r.label()) {
            o.sample(
                "clusteros_beacons_refused_total",
                "counter",
                "Datagrams on the beacon port refused, by reason.",
                &[("reason", reason)],
                b.refused.get(reason).copied().unwrap_or(0) as f64,
            );
        }
        o.gauge("clusteros_beacon_peers", "Nodes of this cluster heard by LAN beacon lately.", &[], b.heard as f64);
        o.gauge(
            "clusteros_beacon_neighbours",
            "Nodes of other clusters (another cluster secret) heard on this LAN lately.",
            &[],
            b.neighbours.len() as f64,
        );
    }
    if let Some(st) = &r.slurm_state {
        if let Some(v) = st.version {
            o.gauge(
                "clusteros_slurm_state_copy_version",
                "Version of the SLURM state copy published or installed last.",
                &[("role", &st.role)],
                v as f64,
            );
        }
        o.gauge(
            "clusteros_slurm_state_copy_bytes",
            "Size of that SLURM state copy.",
            &[("role", &st.role)],
            st.bytes as f64,
        );
        if let Some(t) = st.taken_at_ms {
            o.gauge(
                "clusteros_slurm_state_copy_age_seconds",
                "Seconds since the controller read its state for that copy.",
                &[("role", &st.role)],
                now_ms.saturating_sub(t) as f64 / 1000.0,
            );
        }
    }
    o.sample(
        "clusteros_peer_requests_refused_total",
        "counter",
        "Peer requests refused for a wrong or missing proof of the cluster secret.",
        &[],
        refused.peer_requests as f64,
    );
    for (listener, n) in [("peer", refused.peer_connections), ("metrics", refused.metrics_connections)] {
        o.sample(
            "clusteros_connections_refused_total",
            "counter",
            "Connections closed at once because the listener, or their source address, held its most connections.",
            &[("listener", listener)],
            n as f64,
        );
    }
    o.text()
}

/// Counts one refused peer request.
pub fn count_refused() {
    PEER_REQUESTS_REFUSED.fetch_add(1, Ordering::Relaxed);
}

/// Counts one connection the peer API's listener closed at once.
pub fn count_refused_peer_connection() {
    PEER_CONNECTIONS_REFUSED.fetch_add(1, Ordering::Relaxed);
}

/// Counts one connection the metrics listener closed at once.
pub fn count_refused_metrics_connection() {
    METRICS_CONNECTIONS_REFUSED.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unconfigured_node_exposes_its_problems_and_nothing_secret() {
        let r = crate::status::unconfigured("node\"1", vec!["no cluster secret".into()]);
        let text = render(&r, Refusals { peer_requests: 3, peer_connections: 0, metrics_connections: 5 }, 0);
        assert!(text.contains("clusteros_configured 0\n"), "{text}");
        assert!(text.contains("clusteros_problems 1\n"), "{text}");
        assert!(text.contains("clusteros_peer_requests_refused_total 3\n"), "{text}");
        assert!(text.contains("# TYPE clusteros_peer_requests_refused_total counter\n"), "{text}");
        assert!(text.contains("clusteros_connections_refused_total{listener=\"metrics\"} 5\n"), "{text}");
        assert!(text.contains("clusteros_connections_refused_total{listener=\"peer\"} 0\n"), "{text}");
        // Every sample line is NAME{labels} VALUE and every metric is declared once.
        let mut declared = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(declared.insert(rest.split(' ').next().unwrap().to_string()), "declared twice: {line}");
            } else if !line.starts_with('#') {
                let (_, value) = line.rsplit_once(' ').unwrap();
                value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            }
        }
    }

    #[test]
    fn samples_of_one_metric_are_contiguous() {
        let mut o = Out { families: Vec::new() };
        o.gauge("a", "A.", &[("unit", "x")], 1.0);
        o.gauge("b", "B.", &[("unit", "x")], 0.0);
        o.gauge("a", "A.", &[("unit", "y")], 0.0);
        assert_eq!(
            o.text(),
            "# HELP a A.\n# TYPE a gauge\na{unit=\"x\"} 1\na{unit=\"y\"} 0\n# HELP b B.\n# TYPE b gauge\nb{unit=\"x\"} 0\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
