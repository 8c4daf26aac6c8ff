//! The systemd boundary: a narrow trait, its D-Bus implementation (zbus, `org.freedesktop.systemd1`)
//! and a recording fake for unit tests.
//!
//! Jobs are awaited the way systemd wants: `Subscribe()` once, start listening for `JobRemoved`
//! before the job is queued, match the job path, bound the wait with a timeout, and then read the
//! unit's `ActiveState` (a `done` job does not mean a `Type=simple` service is still running).

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};
use zbus_systemd::zbus;

/// What systemd says about a unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitStatus {
    pub unit: String,
    /// loaded, not-found, masked, ...
    pub load_state: String,
    /// active, inactive, failed, activating, ...
    pub active_state: String,
    pub sub_state: String,
    /// For services: success, exit-code, signal, timeout, ... (why it failed).
    pub result: Option<String>,
}

impl UnitStatus {
    pub fn is_active(&self) -> bool {
        self.active_state == "active" || self.active_state == "reloading"
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitAction {
    Start,
    Stop,
    Restart,
}

impl std::fmt::Display for UnitAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UnitAction::Start => "start",
            UnitAction::Stop => "stop",
            UnitAction::Restart => "restart",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot talk to systemd on the system bus: {0}")]
    Bus(String),
    #[error("unit {0} does not exist: is its package installed in the image?")]
    NotFound(String),
    #[error("systemd refused to {action} {unit}: {message}")]
    Refused { unit: String, action: UnitAction, message: String },
    #[error("{action} {unit} failed: job {job_result}, unit {active_state} ({result}); see `journalctl -u {unit}`")]
    Failed { unit: String, action: UnitAction, job_result: String, active_state: String, result: String },
}

/// The operations the agent needs from systemd.
pub trait Systemd: Send + Sync {
    fn status(&self, unit: &str) -> impl Future<Output = Result<UnitStatus, SystemdError>> + Send;
    /// Queues the job, waits for it (bounded), and returns the unit's state afterwards.
    fn run(&self, unit: &str, action: UnitAction) -> impl Future<Output = Result<UnitStatus, SystemdError>> + Send;
}

/// systemd over D-Bus.
#[derive(Clone)]
pub struct DbusSystemd {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
    job_timeout: Duration,
}

fn bus_err(e: zbus::Error) -> SystemdError {
    SystemdError::Bus(e.to_string())
}

impl DbusSystemd {
    pub async fn connect(job_timeout: Duration) -> Result<DbusSystemd, SystemdError> {
        let conn = zbus::Connection::system().await.map_err(bus_err)?;
        let manager = ManagerProxy::new(&conn).await.map_err(bus_err)?;
        // Without Subscribe() systemd may not emit JobRemoved to us. Calling it twice is an error
        // systemd reports as "already subscribed"; that is fine.
        if let Err(e) = manager.subscribe().await
            && !e.to_string().contains("lready")
        {
            return Err(bus_err(e));
        }
        Ok(DbusSystemd { conn, manager, job_timeout })
    }
}

impl Systemd for DbusSystemd {
    async fn status(&self, unit: &str) -> Result<UnitStatus, SystemdError> {
        // LoadUnit, not GetUnit: it also answers for units that are not loaded yet.
        let path = self.manager.load_unit(unit.to_string()).await.map_err(bus_err)?;
        let u = UnitProxy::builder(&self.conn).path(path.clone()).build().await.map_err(bus_err)?;
        let load_state = u.load_state().await.map_err(bus_err)?;
        if load_state == "not-found" {
            return Err(SystemdError::NotFound(unit.into()));
        }
        let result = if unit.ends_with(".service") {
            let s = ServiceProxy::builder(&self.conn).path(path).build().await.map_err(bus_err)?;
            s.result().await.ok()
        } else {
            None
        };
        Ok(UnitStatus {
            unit: unit.into(),
            load_state,
            active_state: u.active_state().await.map_err(bus_err)?,
            sub_state: u.sub_state().await.map_err(bus_err)?,
            result,
        })
    }

    async fn run(&self, unit: &str, action: UnitAction) -> Result<UnitStatus, SystemdError> {
        self.status(unit).await?;
        // Listen before queueing, or the signal can be missed.
        let mut removed = self.manager.receive_job_removed().await.map_err(bus_err)?;
        let name = unit.to_string();
        let mode = "replace".to_string();
        let queued = match action {
            UnitAction::Start => self.manager.start_unit(name, mode).await,
            UnitAction::Stop => self.manager.stop_unit(name, mode).await,
            UnitAction::Restart => self.manager.restart_unit(name, mode).await,
        };
        let job = queued.map_err(|e| SystemdError::Refused { unit: unit.into(), action, message: e.to_string() })?;
        let wait = async {
            while let Some(sig) = removed.next().await {
                if let Ok(args) = sig.args()
                    && *args.job() == job
                {
                    return Some(args.result().clone());
                }
            }
            None
        };
        // On timeout the unit's state below decides.
        let job_result =
            tokio::time::timeout(self.job_timeout, wait).await.ok().flatten().unwrap_or_else(|| "timeout".into());
        let after = self.status(unit).await?;
        let ok = match action {
            UnitAction::Stop => !after.is_active(),
            UnitAction::Start | UnitAction::Restart => after.is_active(),
        };
        if !ok || (job_result != "done" && job_result != "timeout") {
            return Err(SystemdError::Failed {
                unit: unit.into(),
                action,
                job_result,
                active_state: after.active_state.clone(),
                result: after.result.clone().unwrap_or_default(),
            });
        }
        Ok(after)
    }
}

#[cfg(test)]
pub use fake::FakeSystemd;

#[cfg(test)]
mod fake {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    use super::{Systemd, SystemdError, UnitAction, UnitStatus};

    /// A systemd that records what it is asked and keeps unit states in memory, for unit tests.
    #[derive(Clone, Default)]
    pub struct FakeSystemd {
        pub calls: Arc<Mutex<Vec<String>>>,
        pub units: Arc<Mutex<BTreeMap<String, UnitStatus>>>,
        /// Units whose start fails.
        pub broken: Arc<Mutex<BTreeSet<String>>>,
    }

    impl FakeSystemd {
        /// A fake that knows these units, all inactive.
        pub fn with_units(units: &[&str]) -> FakeSystemd {
            let f = FakeSystemd::default();
            for u in units {
                f.set(u, "inactive");
            }
            f
        }

        pub fn set(&self, unit: &str, active_state: &str) {
            self.units.lock().unwrap().insert(
                unit.into(),
                UnitStatus {
                    unit: unit.into(),
                    load_state: "loaded".into(),
                    active_state: active_state.into(),
                    sub_state: if active_state == "active" { "running".into() } else { "dead".into() },
                    result: Some("success".into()),
                },
            );
        }

        /// The recorded calls, drained.
        pub fn take_calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl Systemd for FakeSystemd {
        async fn status(&self, unit: &str) -> Result<UnitStatus, SystemdError> {
            self.units.lock().unwrap().get(unit).cloned().ok_or_else(|| SystemdError::NotFound(unit.into()))
        }

        async fn run(&self, unit: &str, action: UnitAction) -> Result<UnitStatus, SystemdError> {
            self.calls.lock().unwrap().push(format!("{action} {unit}"));
            self.status(unit).await?;
            if action != UnitAction::Stop && self.broken.lock().unwrap().contains(unit) {
                self.set(unit, "failed");
                return Err(SystemdError::Failed {
                    unit: unit.into(),
                    action,
                    job_result: "failed".into(),
                    active_state: "failed".into(),
                    result: "exit-code".into(),
                });
            }
            self.set(unit, if action == UnitAction::Stop { "inactive" } else { "active" });
            self.status(unit).await
        }
    }
}
