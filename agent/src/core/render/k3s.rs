//! The k3s config file (`/etc/rancher/k3s/config.yaml`): token, server URL and node IP on the
//! mesh, flannel over the WireGuard interface.

use std::fmt;
use std::net::Ipv4Addr;

use super::RenderError;
use crate::core::mesh::WG_INTERFACE;
use crate::core::state::{ClusterState, NodeId};

pub const PATH: &str = "/etc/rancher/k3s/config.yaml";
pub const TOKEN_SECRET: &str = "k3s-token";

#[derive(Clone, PartialEq, Eq)]
pub struct K3sConfig {
    /// `None` on the server itself.
    pub server_url: Option<String>,
    pub token: String,
    pub node_ip: Ipv4Addr,
    pub node_name: String,
}

impl fmt::Debug for K3sConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("K3sConfig")
            .field("server_url", &self.server_url)
            .field("node_ip", &self.node_ip)
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

/// YAML double-quoted string.
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

impl K3sConfig {
    pub fn from_state(s: &ClusterState, me: NodeId, token: &str) -> Result<K3sConfig, RenderError> {
        if token.is_empty() {
            return Err(RenderError::NoK3sToken);
        }
        let server = s.roles.k3s_server.ok_or(RenderError::NoK3sServer)?;
        let ip_of = |id: NodeId| -> Result<Ipv4Addr, RenderError> {
            let m = s.members.get(&id).ok_or_else(|| RenderError::UnknownMember(format!("{id}")))?;
            m.mesh_ip.ok_or_else(|| RenderError::NoMeshAddress(m.spec.name.clone()))
        };
        let node_name = s
            .members
            .get(&me)
            .map(|m| m.spec.name.clone())
            .ok_or_else(|| RenderError::UnknownMember(format!("{me}")))?;
        let server_url = if server == me { None } else { Some(format!("https://{}:6443", ip_of(server)?)) };
        Ok(K3sConfig { server_url, token: token.to_string(), node_ip: ip_of(me)?, node_name })
    }
}

impl fmt::Display for K3sConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# Managed by clusteros from the replicated cluster state; local changes are overwritten.")?;
        if let Some(url) = &self.server_url {
            writeln!(f, "server: {}", q(url))?;
        } else {
            writeln!(f, "advertise-address: {}", q(&self.node_ip.to_string()))?;
            writeln!(f, "write-kubeconfig-mode: \"0600\"")?;
        }
        writeln!(f, "token: {}", q(&self.token))?;
        writeln!(f, "node-name: {}", q(&self.node_name))?;
        writeln!(f, "node-ip: {}", q(&self.node_ip.to_string()))?;
        writeln!(f, "flannel-iface: {}", q(WG_INTERFACE))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::render::check_golden;
    use crate::core::state::{Command, RoleAssignments};

    fn state() -> ClusterState {
        let mut s = crate::core::render::slurm::tests::three_node_state();
        s.apply(
            20,
            &Command::SetRoles {
                roles: RoleAssignments {
                    k3s_server: Some(NodeId(1)),
                    k3s_agents: [NodeId(2), NodeId(3)].into(),
                    ..Default::default()
                },
            },
        );
        s
    }

    #[test]
    fn server_and_agent_configs() {
        let s = state();
        check_golden("k3s-server.yaml.golden", &K3sConfig::from_state(&s, NodeId(1), "tok\"en").unwrap().to_string());
        check_golden("k3s-agent.yaml.golden", &K3sConfig::from_state(&s, NodeId(2), "tok\"en").unwrap().to_string());
    }

    #[test]
    fn missing_inputs_are_named() {
        let s = state();
        assert_eq!(K3sConfig::from_state(&s, NodeId(2), ""), Err(RenderError::NoK3sToken));
        let mut s2 = s.clone();
        s2.roles.k3s_server = None;
        assert_eq!(K3sConfig::from_state(&s2, NodeId(2), "t"), Err(RenderError::NoK3sServer));
        assert!(
            !format!("{:?}", K3sConfig::from_state(&s, NodeId(2), "secret-token").unwrap()).contains("secret-token")
        );
    }
}
