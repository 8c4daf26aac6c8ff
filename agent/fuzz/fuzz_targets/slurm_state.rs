//! The SLURM state copy the backup fetches from the controller (`install_slurm_state`): the
//! sealed blob opened with the cluster key, the files decoded and their paths checked, the
//! digest compared, and the heartbeat checks and install plan on the result.
//!
//! Input: `[flags, now (8 bytes, big-endian seconds)]` then the payload. `flags` bit 0: the
//! payload is the decoded copy (JSON), sealed here with the cluster key so that the decoder past
//! the seal is reached; otherwise it is the sealed text itself. Bit 1: the local directory holds
//! a heartbeat, the first 16 bytes of the payload.

#![forbid(unsafe_code)]
#![no_main]

use std::collections::BTreeSet;
use std::path::{Component, Path};
use std::sync::LazyLock;

use clusteros::adapters::secrets::SecretBox;
use clusteros::adapters::slurm_state::{
    HEARTBEAT, SEAL_NAME, StateFiles, in_control, may_install, parse_heartbeat, stale_job_dirs, valid_path,
};
use clusteros_agent_fuzz::SECRET;
use libfuzzer_sys::fuzz_target;

static BOX: LazyLock<SecretBox> = LazyLock::new(|| SecretBox::new(SECRET, &[]));

/// A path the copy may hold stays inside the state directory.
fn check_path(p: &str) {
    if valid_path(p) {
        let comps: Vec<Component> = Path::new(p).components().collect();
        assert!(
            comps.iter().all(|c| matches!(c, Component::Normal(_))) && (comps.len() == 1 || comps.len() == 3),
            "unsafe path accepted: {p:?}"
        );
        assert!(!p.contains('\0') && !p.ends_with('/'), "unsafe path accepted: {p:?}");
    }
}

/// The heartbeat checks agree with each other.
fn check_heartbeat(hb: Option<&[u8]>, now: u64) {
    let parsed = hb.and_then(parse_heartbeat);
    match parsed {
        Some((_, i)) => {
            // The standby installs unless its own slurmctld (index != 0) is in control.
            assert_eq!(may_install(hb, now), i == 0 || !in_control(hb, i, now));
            assert!(!in_control(hb, i.wrapping_add(1), now));
        }
        None => {
            assert!(may_install(hb, now));
            assert!(!in_control(hb, 0, now) && !in_control(hb, 1, now));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let flags = data[0];
    let now = u64::from_be_bytes(data[1..9].try_into().unwrap());
    let payload = &data[9..];
    let local_hb = (flags & 2 != 0).then(|| &payload[..payload.len().min(16)]);
    check_heartbeat(local_hb, now);
    check_heartbeat(Some(payload), now);

    let sealed =
        if flags & 1 != 0 { BOX.seal(SEAL_NAME, payload) } else { String::from_utf8_lossy(payload).into_owned() };
    let plain = match BOX.open(SEAL_NAME, &sealed) {
        Ok(p) => p,
        Err(e) => {
            assert!(flags & 1 == 0, "a sealed copy does not open: {e}");
            let _ = e.to_string();
            return;
        }
    };
    if flags & 1 != 0 {
        assert_eq!(plain, payload, "opening gave other bytes than were sealed");
    }
    for line in String::from_utf8_lossy(&plain).split(['\n', '"']) {
        check_path(line);
    }
    let files = match StateFiles::from_json(&plain) {
        Ok(f) => f,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    for p in files.0.keys() {
        assert!(valid_path(p), "from_json kept an invalid path {p:?}");
        check_path(p);
    }
    let again = StateFiles::from_json(&files.to_json()).expect("an encoded copy decodes");
    assert_eq!(again, files, "the copy changed in a round trip");
    assert_eq!(again.digest(true), files.digest(true));
    assert_eq!(files.bytes(), files.0.values().map(|v| v.len() as u64).sum::<u64>());
    if !files.0.contains_key(HEARTBEAT) {
        assert_eq!(files.digest(true), files.digest(false));
    }
    check_heartbeat(files.0.get(HEARTBEAT).map(Vec::as_slice), now);

    // The install plan: job directories here that the copy no longer has are removed.
    let mut local: BTreeSet<String> = ["hash.1/job.1", "hash.2/job.12", "hash.0/job.0"].map(String::from).into();
    local.extend(files.0.keys().filter_map(|p| p.rsplit_once('/').map(|(d, _)| d.to_string())).take(2));
    let stale = stale_job_dirs(&local, &files);
    for d in &stale {
        assert!(local.contains(d), "removing a directory that is not here: {d}");
        let prefix = format!("{d}/");
        assert!(!files.0.keys().any(|p| p.starts_with(&prefix)), "removing a job directory the copy has: {d}");
    }
});
