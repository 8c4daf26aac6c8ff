//! Snapshots as the agent reads them: the snapshot file on disk (`StateMachineStore::open`, via
//! `decode_snapshot_file`) and a snapshot received from the leader (`install_snapshot` decodes the
//! `SmData` and checks it against the metadata). What decodes must survive a round trip through
//! the agent's own encoding unchanged.

#![forbid(unsafe_code)]
#![no_main]

use clusteros::adapters::raft::state_machine::{SmData, decode_snapshot_file, encode_snapshot_file};
use libfuzzer_sys::fuzz_target;

fn round_trip(d: &SmData) {
    let bytes = serde_json::to_vec(d).expect("state machine data encodes");
    let back: SmData = serde_json::from_slice(&bytes).expect("encoded state machine data decodes");
    assert!(back == *d, "SmData changed in a round trip:\n{d:?}\n{back:?}");
    assert_eq!(back.state.requests.len(), d.state.requests.len());
}

fuzz_target!(|data: &[u8]| {
    // The file on disk.
    if let Ok((sm, snap)) = decode_snapshot_file(data) {
        assert_eq!(sm.last_applied, snap.meta.last_log_id);
        round_trip(&sm);
        let text = String::from_utf8(snap.snapshot.to_vec()).expect("the data was a JSON string");
        let file = encode_snapshot_file(&snap.meta, text).expect("a decoded snapshot encodes");
        let (sm2, snap2) = decode_snapshot_file(&file).expect("an encoded snapshot decodes");
        assert!(sm2 == sm, "the state changed in a round trip through the snapshot file");
        assert_eq!(snap2.meta, snap.meta);
        assert_eq!(snap2.snapshot, snap.snapshot);
        // What the node then serves to a follower is what `install_snapshot` decodes.
        let received: SmData = serde_json::from_slice(&snap.snapshot).expect("the data decodes as received");
        assert!(received == sm);
    }
    // A snapshot received from the leader.
    if let Ok(sm) = serde_json::from_slice::<SmData>(data) {
        round_trip(&sm);
    }
});
