//! Zero-touch discovery: agents with only the cluster secret and `bootstrap_expect`, and no join
//! addresses, find each other by LAN beacons on a bridged LAN of network namespaces (needs root;
//! nothing reaches the host's network). Waits on conditions, never on fixed sleeps.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use crate::common::{Cluster, Opts, serial, wait_until};
use clusteros_testkit::lan::Lan;

/// A LAN of `n` namespaces, named apart from every other LAN of this process.
fn lan(n: usize) -> Lan {
    static TAG: AtomicU8 = AtomicU8::new(0);
    let tag = TAG.fetch_add(1, Ordering::SeqCst);
    Lan::new("cdt-", tag, [10, 66, tag], n).expect("cannot build the test LAN (these tests need root and iproute2)")
}

/// 30 identical agents (bootstrap_expect = 3, no join addresses) started together form one
/// cluster of 3 voters and 27 learners, by beacons alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_agents_without_join_addresses_form_one_cluster_by_lan_beacons() {
    let _g = serial();
    let lan = lan(30);
    let mut c = Cluster::on_lan(&lan, 0..30, Opts::default());
    c.start_all();
    // 30 agents on 2 cores: the bound is for a stall, not a measure (bench-scale measures).
    c.wait_converged(3, 27, Duration::from_secs(600)).await;
    for i in 0..30 {
        let s = c.status(i).await.unwrap();
        let b = s.beacons.expect("beacons are on");
        assert!(b.sent > 0 && b.taken > 0, "{}: {b:?}", c.nodes[i].name);
        assert!(b.neighbours.is_empty(), "{}: no other cluster is on this LAN: {b:?}", c.nodes[i].name);
        assert_eq!(b.problem, None);
    }
}

/// Two clusters with different secrets on one bridge stay apart, and each shows the other's
/// nodes as neighbours (with the other cluster's key fingerprint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_with_different_secrets_on_one_lan_stay_apart() {
    let _g = serial();
    let lan = lan(6);
    let mut a = Cluster::on_lan(&lan, 0..3, Opts::default());
    let mut b =
        Cluster::on_lan(&lan, 3..6, Opts { secret: "another-cluster-secret-9876543210".into(), ..Opts::default() });
    a.start_all();
    b.start_all();
    a.wait_converged(3, 0, Duration::from_secs(300)).await;
    b.wait_converged(3, 0, Duration::from_secs(300)).await;
    let (ids_a, ids_b) = (node_ids(&a).await, node_ids(&b).await);
    let (fp_a, fp_b) = (
        a.status(0).await.unwrap().node.cluster_keys[0].clone(),
        b.status(0).await.unwrap().node.cluster_keys[0].clone(),
    );
    assert_ne!(fp_a, fp_b);
    for (mine, their_ids, their_fp) in [(&a, &ids_b, &fp_b), (&b, &ids_a, &fp_a)] {
        for i in 0..3 {
            let s = mine.status(i).await.unwrap();
            let members: BTreeSet<String> = s.members.iter().map(|m| m.id.clone()).collect();
            assert!(members.is_disjoint(their_ids), "the clusters merged: {members:?}");
            // Every node of the other cluster is shown as a neighbour (beacons come every few
            // seconds: wait for all three).
            let name = mine.nodes[i].name.clone();
            wait_until(Duration::from_secs(60), &format!("{name} shows the other cluster's 3 nodes"), || async {
                let b = mine.status(i).await.ok()?.beacons?;
                let seen: BTreeSet<String> =
                    b.neighbours.iter().filter(|n| &n.cluster == their_fp).map(|n| n.id.clone()).collect();
                (seen == *their_ids).then_some(())
            })
            .await;
            let b = mine.status(i).await.unwrap().beacons.unwrap();
            assert_eq!(b.refused.get("bad_mac"), None, "another secret is a neighbour, not a forgery: {b:?}");
        }
    }
}

async fn node_ids(c: &Cluster) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for i in 0..c.nodes.len() {
        ids.insert(c.status(i).await.unwrap().node.id.unwrap());
    }
    ids
}

/// Machines whose default route is on another network (a management or PXE NIC) and that have
/// no join address guess the wrong address at first; each settles it by the first node of its
/// cluster it hears, and the cluster forms with every member at its address on the LAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_whose_default_route_is_elsewhere_advertise_the_lan_their_peers_are_on() {
    let _g = serial();
    let lan = lan(3);
    for i in 0..3 {
        lan.add_default_route_elsewhere(i, [10, 67, i as u8]).expect("a second network in the namespace");
    }
    let mut c = Cluster::on_lan(&lan, 0..3, Opts { listen_any: true, ..Opts::default() });
    c.start_all();
    c.wait_converged(3, 0, Duration::from_secs(300)).await;
    let s = c.status(0).await.unwrap();
    let got: BTreeSet<String> = s.members.iter().map(|m| m.api_addr.clone()).collect();
    let want: BTreeSet<String> = (0..3).map(|i| format!("{}:7600", lan.ip(i))).collect();
    assert_eq!(got, want, "every member is at its LAN address, none at its default route's");
}
