//! Decisions of SLURM state replication (pure): reading slurmctld's heartbeat (who is in control,
//! and since when), whether a standby may install a copy, and the record a backup keeps of the
//! copy it installed last. The copying itself is [`crate::adapters::slurm_state`]'s; the loop that
//! publishes and installs is the runtime's.

use crate::core::state::NodeId;

/// The heartbeat file slurmctld writes while it is in control: big-endian seconds since the
/// epoch, then the writer's index in the SlurmctldHost list (0: primary). `None` if malformed.
pub fn parse_heartbeat(data: &[u8]) -> Option<(u64, u64)> {
    if data.len() < 16 {
        return None;
    }
    let t = u64::from_be_bytes(data[0..8].try_into().ok()?);
    let i = u64::from_be_bytes(data[8..16].try_into().ok()?);
    Some((t, i))
}

/// How long after its last heartbeat a slurmctld still counts as in control (it writes one every
/// SlurmctldTimeout/4 = 5 s).
pub const HEARTBEAT_FRESH_SECS: u64 = 30;

/// Whether the heartbeat in `data` says a slurmctld with index `index` was in control at most
/// [`HEARTBEAT_FRESH_SECS`] before `now_secs`.
pub fn in_control(data: Option<&[u8]>, index: u64, now_secs: u64) -> bool {
    data.and_then(parse_heartbeat)
        .is_some_and(|(t, i)| i == index && now_secs.saturating_sub(t) <= HEARTBEAT_FRESH_SECS)
}

/// Whether the standby may install a copy now: not while its own slurmctld has taken control
/// (a fresh heartbeat with a non-zero index). Installing then would replace the state it is
/// working on, and slurmctld stops with "Two slurmctld daemons are running as primary".
pub fn may_install(local_heartbeat: Option<&[u8]>, now_secs: u64) -> bool {
    match local_heartbeat.and_then(parse_heartbeat) {
        Some((t, i)) => i == 0 || now_secs.saturating_sub(t) > HEARTBEAT_FRESH_SECS,
        None => true,
    }
}

/// The copy a backup installed last, as recorded in its marker file: `FROM_ID VERSION DIGEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledCopy {
    pub from: NodeId,
    pub version: u64,
    pub digest: String,
}

impl InstalledCopy {
    /// The marker's content; `None` if it is malformed (then the copy is installed again).
    pub fn parse(text: &str) -> Option<InstalledCopy> {
        let mut it = text.split_whitespace();
        let from: NodeId = it.next()?.parse().ok()?;
        let version = it.next()?.parse().ok()?;
        let digest = it.next()?.to_string();
        Some(InstalledCopy { from, version, digest })
    }

    pub fn render(&self) -> String {
        format!("{} {} {}\n", self.from, self.version, self.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(t: u64, i: u64) -> Vec<u8> {
        [t.to_be_bytes(), i.to_be_bytes()].concat()
    }

    #[test]
    fn heartbeats_tell_who_is_in_control() {
        let hb = heartbeat(1000, 0);
        assert_eq!(parse_heartbeat(&hb), Some((1000, 0)));
        assert_eq!(parse_heartbeat(b"short"), None);
        assert!(in_control(Some(&hb), 0, 1010));
        assert!(!in_control(Some(&hb), 0, 1000 + HEARTBEAT_FRESH_SECS + 1), "stale: the primary stopped");
        assert!(!in_control(Some(&hb), 1, 1010), "written by the primary, not the backup");
        assert!(!in_control(None, 0, 1010));
        // The standby installs while the primary's (copied) heartbeat is there or its own is stale,
        // never while it has taken control itself.
        assert!(may_install(None, 1010));
        assert!(may_install(Some(&hb), 1010));
        assert!(!may_install(Some(&heartbeat(1000, 1)), 1010));
        assert!(may_install(Some(&heartbeat(1000, 1)), 1000 + HEARTBEAT_FRESH_SECS + 1));
    }

    #[test]
    fn the_installed_copy_marker_round_trips_and_refuses_garbage() {
        let c = InstalledCopy { from: NodeId(0xabc), version: 7, digest: "ff".repeat(32) };
        assert_eq!(c.render(), format!("0000000000000abc 7 {}\n", "ff".repeat(32)));
        assert_eq!(InstalledCopy::parse(&c.render()), Some(c));
        for bad in ["", "abc", "abc x ff", "zz 1 ff", "abc 1"] {
            assert_eq!(InstalledCopy::parse(bad), None, "{bad:?}");
        }
    }
}
