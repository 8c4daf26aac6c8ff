//! The one reconcile driver, in the style of kube-rs's controller runtime: every loop of the agent
//! is a [`Reconciler`] whose `reconcile` gets the node and what woke it, does one round, and
//! returns what to wait for next ([`Action`]). The driver owns everything else: the triggers
//! (a timer, applied-state changes, nudges), the backoff after an error, the end of the run, a
//! tracing span per loop, and logging a repeated error once rather than on every round.
//!
//! Must not: hold cluster logic (that is the reconcilers' and the core's), or sleep anywhere but
//! in its one wait.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, debug, info_span, warn};

use super::Node;

/// What woke a reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The first round of the loop.
    Start,
    /// The timer of the last [`Action`] ran out (or the backoff after an error).
    Timer,
    /// The applied cluster state changed in more than its KV store (a KV write wakes no loop).
    StateChanged,
    /// Something asked this loop to look again (a pledge taken, `clusteros join`).
    Nudged,
    /// A node-local input changed ([`Node::local_changed`]).
    LocalChanged,
}

impl Wake {
    /// Whether the round is a periodic one (first, or on the timer), when a loop reconciles even
    /// if its inputs look unchanged: what it drives may have drifted.
    pub fn periodic(self) -> bool {
        matches!(self, Wake::Start | Wake::Timer)
    }
}

/// What the driver does after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run again after this long, or earlier on one of the loop's triggers.
    After(Duration),
    /// Run again only on one of the loop's triggers.
    AwaitTrigger,
    /// The loop's work is done for this run.
    Done,
}

/// How loud a failed round is in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Expected while the cluster settles (no leader yet, a peer restarting).
    Debug,
    /// Needs attention when it persists.
    Warn,
}

/// A failed round: the driver logs it (once per distinct message) and retries after the loop's
/// backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopError {
    pub level: Level,
    pub message: String,
}

impl LoopError {
    pub fn debug(message: impl std::fmt::Display) -> LoopError {
        LoopError { level: Level::Debug, message: message.to_string() }
    }

    pub fn warn(message: impl std::fmt::Display) -> LoopError {
        LoopError { level: Level::Warn, message: message.to_string() }
    }
}

/// What wakes a loop besides its timer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Triggers {
    /// A change of the applied cluster state beyond its KV store.
    pub state: bool,
    /// [`Node::nudge`].
    pub nudge: bool,
    /// [`Node::local_changed`].
    pub local: bool,
}

/// Exponential backoff after failed rounds: `first`, doubling up to `max`; reset by a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after `failures` failed rounds in a row (1 or more).
    pub fn after(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.max)
    }
}

/// One loop of the agent.
pub trait Reconciler: Send + 'static {
    /// The loop's name, in its tracing span and log lines.
    const NAME: &'static str;
    /// What wakes the loop besides its timer.
    const TRIGGERS: Triggers;
    /// The wait after a failed round.
    const BACKOFF: Backoff = Backoff { first: Duration::from_millis(500), max: Duration::from_secs(5) };

    /// One round: look at the node, act, and say when to look again.
    fn reconcile(&mut self, node: &Arc<Node>, wake: Wake) -> impl Future<Output = Result<Action, LoopError>> + Send;
}

/// Runs `r` until it is done or the node's run ends, and gives it back (with what it holds).
pub async fn run<R: Reconciler>(node: Arc<Node>, mut r: R) -> R {
    let span = info_span!("loop", name = R::NAME, node_id = %node.id());
    let mut end = node.end_signal();
    let mut changes = node.state.subscribe();
    let mut local = node.local_changes();
    let mut failures = 0u32;
    let mut last_error: Option<String> = None;
    let mut wake = Wake::Start;
    loop {
        if end.borrow().is_some() {
            return r;
        }
        let next = match r.reconcile(&node, wake).instrument(span.clone()).await {
            Ok(action) => {
                failures = 0;
                last_error = None;
                action
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if last_error.as_ref() != Some(&e.message) {
                    let _enter = span.enter();
                    match e.level {
                        Level::Debug => debug!("{}", e.message),
                        Level::Warn => warn!("{}", e.message),
                    }
                    last_error = Some(e.message);
                }
                Action::After(R::BACKOFF.after(failures))
            }
        };
        let timer = match next {
            Action::Done => return r,
            Action::After(d) => Some(d),
            Action::AwaitTrigger => None,
        };
        wake = tokio::select! {
            _ = tokio::time::sleep(timer.unwrap_or_default()), if timer.is_some() => Wake::Timer,
            changed = changes.changed(), if R::TRIGGERS.state => match changed {
                Ok(()) => Wake::StateChanged,
                // The state machine is gone: the run is ending.
                Err(_) => return r,
            },
            _ = node.nudged(), if R::TRIGGERS.nudge => Wake::Nudged,
            // The sender lives as long as the node.
            Ok(()) = local.changed(), if R::TRIGGERS.local => Wake::LocalChanged,
            _ = end.changed() => continue,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_first_to_max() {
        let b = Backoff { first: Duration::from_millis(500), max: Duration::from_secs(5) };
        let waits: Vec<u128> = (1..=7).map(|n| b.after(n).as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(b.after(u32::MAX), Duration::from_secs(5), "no overflow after many failures");
        let flat = Backoff { first: Duration::from_millis(500), max: Duration::from_millis(500) };
        assert_eq!(flat.after(9), Duration::from_millis(500));
    }

    /// Records what woke it and waits for a trigger.
    struct Recorder(tokio::sync::mpsc::UnboundedSender<Wake>);

    impl Reconciler for Recorder {
        const NAME: &'static str = "recorder";
        const TRIGGERS: Triggers = Triggers { state: false, nudge: false, local: true };

        async fn reconcile(&mut self, _node: &Arc<Node>, wake: Wake) -> Result<Action, LoopError> {
            self.0.send(wake).expect("the test listens");
            Ok(Action::AwaitTrigger)
        }
    }

    /// A loop that waits on node-local inputs runs as soon as another loop says they changed
    /// (the services loop when the SLURM state loop installed a copy), not at its next timer.
    #[tokio::test]
    async fn a_local_change_wakes_the_loops_that_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let fake = crate::adapters::peers::FakePeers::default();
        let node = crate::runtime::test_node(dir.path(), &fake, "127.0.0.1:17711", &[], None).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(run(node.clone(), Recorder(tx)));
        assert_eq!(rx.recv().await, Some(Wake::Start));
        node.local_changed();
        let next = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
        assert_eq!(next.expect("no round within 30 s of the change"), Some(Wake::LocalChanged));
        node.request_end(crate::runtime::RunEnd::Shutdown);
        task.await.unwrap();
        assert!(rx.try_recv().is_err(), "no round after the run ended");
        node.raft.shutdown().await.unwrap();
    }

    #[test]
    fn only_first_and_timer_rounds_are_periodic() {
        assert!(Wake::Start.periodic() && Wake::Timer.periodic());
        assert!(!Wake::StateChanged.periodic() && !Wake::Nudged.periodic() && !Wake::LocalChanged.periodic());
    }
}
