//! Log output rules. openraft logs a WARN or ERROR line for every failed RPC: with one voter
//! unreachable that is one line per heartbeat and one per linearizable read (877 lines on one
//! node in 90 s). Such a condition is reported once, as state (the leader's `status` marks the
//! follower UNREACHABLE, the metric `clusteros_raft_follower_reachable` is 0, and the agent logs
//! the change once); openraft's own WARN and ERROR lines are let through at most once per
//! [`DEPENDENCY_WINDOW`] per source line.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::Metadata;
use tracing::subscriber::Interest;
use tracing_subscriber::layer::{Context, Filter};

/// Starts the agent's logging: to the journal (with structured fields) when stderr is connected to
/// it, else to stderr; the filter from `CLUSTEROS_LOG` (default `info,openraft=warn`); openraft's
/// WARN and ERROR lines rate-limited per source line.
pub fn init() {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLUSTEROS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let limit = || RateLimitDependencies::new(DEPENDENCY_WINDOW);
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    if journal && let Ok(layer) = tracing_journald::layer() {
        let layer = layer.with_field_prefix(None).with_syslog_identifier("clusteros".into());
        tracing_subscriber::registry().with(filter).with(layer.with_filter(limit())).init();
        return;
    }
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    tracing_subscriber::registry().with(filter).with(layer.with_filter(limit())).init();
}

/// How often one noisy source line of a dependency may log.
pub const DEPENDENCY_WINDOW: Duration = Duration::from_secs(30);

/// Lets one event per key through per window.
#[derive(Debug)]
pub struct Limiter<K> {
    window: Duration,
    last: HashMap<K, Instant>,
}

impl<K: Hash + Eq> Limiter<K> {
    pub fn new(window: Duration) -> Limiter<K> {
        Limiter { window, last: HashMap::new() }
    }

    /// Whether the event with `key` at `now` is let through.
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        match self.last.get(&key) {
            Some(t) if now.saturating_duration_since(*t) < self.window => false,
            _ => {
                self.last.insert(key, now);
                true
            }
        }
    }
}

/// A per-layer filter: WARN and ERROR events of openraft, rate-limited per callsite.
pub struct RateLimitDependencies {
    limiter: Mutex<Limiter<tracing::callsite::Identifier>>,
}

impl RateLimitDependencies {
    pub fn new(window: Duration) -> RateLimitDependencies {
        RateLimitDependencies { limiter: Mutex::new(Limiter::new(window)) }
    }
}

fn noisy(meta: &Metadata<'_>) -> bool {
    meta.is_event() && *meta.level() <= tracing::Level::WARN && meta.target().starts_with("openraft")
}

impl<S> Filter<S> for RateLimitDependencies {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        if !noisy(meta) {
            return true;
        }
        let mut l = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        l.allow(meta.callsite(), Instant::now())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        // Asked again for every event of a noisy callsite, so that the limiter decides.
        if noisy(meta) { Interest::sometimes() } else { Interest::always() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_key_and_window() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Duration::from_secs(30));
        assert!(l.allow("a", t0));
        for ms in [1, 100, 29_999] {
            assert!(!l.allow("a", t0 + Duration::from_millis(ms)));
        }
        assert!(l.allow("b", t0 + Duration::from_millis(5)), "another source line is not held back");
        assert!(l.allow("a", t0 + Duration::from_secs(30)));
        assert!(!l.allow("a", t0 + Duration::from_secs(31)));
    }

    /// Through a real subscriber: 200 openraft ERROR lines from one source line give one line of
    /// output, the agent's own lines all come through.
    #[test]
    fn a_flood_of_dependency_errors_is_one_line() {
        use std::io::Write;
        use std::sync::Arc;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::{Layer, fmt};

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let layer = fmt::layer()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_filter(RateLimitDependencies::new(Duration::from_secs(3600)));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..200 {
                tracing::error!(target: "openraft::core::raft_core", "timeout while confirming leadership for read request");
            }
            for i in 0..3 {
                tracing::warn!("agent line {i}");
            }
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.matches("confirming leadership").count(), 1, "{out}");
        assert_eq!(out.matches("agent line").count(), 3, "{out}");
    }
}
