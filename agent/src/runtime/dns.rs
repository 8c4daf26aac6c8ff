//! Discovery by DNS SRV records (`[discovery] dns_srv`): the formation loop's addresses to greet
//! when there are no join addresses, looked up again when the records' TTL has passed (at least
//! 5 s and at most 60 s apart), and what the last lookup gave or why it failed, for `status`.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::adapters::dns::{SrvLookup, lookup_srv};
use crate::core::config::DnsSettings;

use super::Node;

const MIN_REFRESH: Duration = Duration::from_secs(5);
const MAX_REFRESH: Duration = Duration::from_secs(60);

/// One lookup: when it was made, how long it stays valid, and what it gave.
struct Lookup {
    at: Instant,
    valid: Duration,
    result: Result<SrvLookup, String>,
}

/// The SRV name and the last lookup.
pub struct DnsDiscovery {
    pub settings: DnsSettings,
    last: tokio::sync::Mutex<Option<Lookup>>,
}

impl DnsDiscovery {
    pub fn new(settings: DnsSettings) -> DnsDiscovery {
        DnsDiscovery { settings, last: tokio::sync::Mutex::new(None) }
    }
}

impl Node {
    /// The addresses the SRV records name (empty without `dns_srv`, or when the lookup failed:
    /// the error is in the result, for the formation's progress).
    pub(super) async fn dns_targets(&self) -> Option<Result<Vec<String>, String>> {
        let d = self.dns.as_ref()?;
        let mut last = d.last.lock().await;
        let fresh = last.as_ref().is_some_and(|l| l.at.elapsed() < l.valid);
        if !fresh {
            let r = lookup_srv(&d.settings).await.map_err(|e| e.to_string());
            let changed = last.as_ref().is_none_or(|prev| prev.result != r);
            let valid = match &r {
                Ok(l) => Duration::from_secs(u64::from(l.ttl)).clamp(MIN_REFRESH, MAX_REFRESH),
                Err(_) => MIN_REFRESH,
            };
            if changed {
                match &r {
                    Ok(l) => info!(name = %d.settings.srv, "DNS SRV lookup: {}", l.addrs.join(", ")),
                    Err(e) => warn!("DNS SRV lookup failed: {e}"),
                }
            }
            *last = Some(Lookup { at: Instant::now(), valid, result: r });
        }
        last.as_ref().map(|l| l.result.clone().map(|found| found.addrs))
    }
}
