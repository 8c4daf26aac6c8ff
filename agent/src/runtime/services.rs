//! Node services: waits until this node has caught up with the cluster, then keeps the services
//! matching the plan that [`crate::core::services::plan`] derives from the applied state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::Node;
use super::driver::{Action, Backoff, LoopError, Reconciler, Triggers, Wake};
use crate::adapters::services::{ServiceApplier, ServiceReport};
use crate::adapters::systemd::DbusSystemd;
use crate::core::services::{PlanInputs, plan};
use crate::core::state::ClusterState;

impl Node {
    /// Whether this agent drives node services.
    pub fn manages_services(&self) -> bool {
        match self.cfg.manage_services {
            crate::core::config::ServiceMode::On => true,
            crate::core::config::ServiceMode::Off => false,
            crate::core::config::ServiceMode::Auto => Path::new("/run/systemd/system").exists(),
        }
    }

    /// Whether this node has installed a copy of the SLURM controller's state, heartbeat included
    /// (see [`Node::run_slurm_state`]).
    pub(super) fn slurm_standby_ready(&self) -> bool {
        let controller = self.state.read(|d| d.state.roles.slurm_controller);
        self.installed_copy().is_some_and(|c| Some(c.from) == controller)
            && Path::new(crate::adapters::slurm_state::STATE_DIR).join(crate::adapters::slurm_state::HEARTBEAT).exists()
    }

    /// Waits until this node has applied everything the leader had committed when asked (a read
    /// barrier through the leader: its commit index, then the local apply catching up to it);
    /// false if `max` passed first or the run ended.
    pub(super) async fn wait_caught_up(&self, max: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        let mut end = self.end_signal();
        let mut rx = self.raft.metrics();
        loop {
            let attempt = async {
                let index = self.read("").await.ok()?.read_index.unwrap_or(0);
                rx.wait_for(|m| m.last_applied.map_or(0, |l| l.index) >= index).await.ok().map(|_| ())
            };
            tokio::select! {
                r = attempt => if r.is_some() { return true },
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = end.changed() => return false,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = end.changed() => return false,
            }
        }
    }
}

/// Keeps node services matching the replicated state, on every state change and every 15 s. Its
/// first round waits (bounded) until this node has caught up with the cluster: after a reboot its
/// log may still name it SLURM controller although the role has moved on.
#[derive(Default)]
pub(super) struct ServicesLoop {
    caught_up: bool,
    applier: Option<ServiceApplier<DbusSystemd>>,
    /// The inputs of the last reconcile: a state change that leaves them alone (a KV write) wakes
    /// the loop but costs nothing; every 15 s it reconciles anyway (units may drift).
    last: Option<(ClusterState, bool)>,
}

impl Reconciler for ServicesLoop {
    const NAME: &'static str = "services";
    const TRIGGERS: Triggers = Triggers { state: true, nudge: false, local: true };
    const BACKOFF: Backoff = Backoff { first: Duration::from_secs(1), max: Duration::from_secs(15) };

    async fn reconcile(&mut self, node: &Arc<Node>, wake: Wake) -> Result<Action, LoopError> {
        const PERIOD: Duration = Duration::from_secs(15);
        const CATCH_UP: Duration = Duration::from_secs(120);
        if !self.caught_up {
            node.publish_services(ServiceReport {
                notes: vec!["waiting to catch up with the cluster before starting services".into()],
                ..Default::default()
            });
            // Without any leader the last known state is the best there is.
            if !node.wait_caught_up(CATCH_UP).await {
                if node.end_signal().borrow().is_some() {
                    return Ok(Action::Done);
                }
                warn!(node_id = %node.id(), "no leader within 120 s; starting services from this node's last known state");
            }
            self.caught_up = true;
        }
        let state = node.state.read(|d| d.state.without_kv());
        let standby_ready = node.slurm_standby_ready();
        let inputs = (state, standby_ready);
        if !wake.periodic() && self.applier.is_some() && self.last.as_ref() == Some(&inputs) {
            return Ok(Action::After(PERIOD));
        }
        if self.applier.is_none() {
            match DbusSystemd::connect(Duration::from_secs(90)).await {
                Ok(s) => self.applier = Some(ServiceApplier { systemd: s, root: PathBuf::from("/") }),
                Err(e) => {
                    node.publish_services(ServiceReport { error: Some(e.to_string()), ..Default::default() });
                    return Err(LoopError::warn(format!("services: {e}")));
                }
            }
        }
        let applier = self.applier.as_ref().expect("connected above");
        let (state, standby_ready) = &inputs;
        let open = |name: &str| {
            state.secrets.get(name).and_then(|s| match node.secret_box.open(name, &s.value) {
                Ok(v) => Some(v),
                Err(e) => {
                    warn!(node_id = %node.id(), "{e}");
                    None
                }
            })
        };
        let munge = open(crate::core::secrets::MUNGE_KEY);
        let token = open(crate::core::secrets::K3S_TOKEN).and_then(|t| String::from_utf8(t).ok());
        let p = plan(&PlanInputs {
            me: node.id(),
            state,
            munge_key: munge.as_deref(),
            k3s_token: token.as_deref(),
            k3s_installed: Path::new(crate::core::services::K3S_BINARY).exists(),
            standby_ready: *standby_ready,
        });
        let report = applier.apply(&p).await;
        if let Some(e) = &report.error {
            warn!(node_id = %node.id(), "services: {e}");
        }
        node.publish_services(report);
        self.last = Some(inputs);
        Ok(Action::After(PERIOD))
    }
}

impl Node {
    fn publish_services(&self, report: ServiceReport) {
        *self.services.lock().expect("services lock") = Some(report);
    }
}
