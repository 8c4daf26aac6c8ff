//! Discovery by DNS SRV records: agents with no join addresses and no LAN beacons find each other
//! through a real DNS server (dnsmasq, from `scripts/install-host-deps`) on loopback.
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{Cluster, Opts, serial, wait_until};

const SRV: &str = "_clusteros._tcp.cluster.test";

/// dnsmasq answering for `cluster.test` only (no upstream, no hosts file), killed on drop.
struct Dnsmasq {
    child: Child,
    addr: String,
}

impl Dnsmasq {
    /// `records`: (host name, IP, port) of each node, published as `SRV 0 10 port host` plus an A
    /// record of the host.
    fn start(records: &[(String, String, u16)]) -> Dnsmasq {
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            "--listen-address=127.0.0.1".into(),
            format!("--port={port}"),
            "--user=root".into(),
            "--pid-file=".into(),
            "--log-queries".into(),
            "--log-facility=-".into(),
        ];
        for (host, ip, p) in records {
            args.push(format!("--srv-host={SRV},{host},{p},0,10"));
            args.push(format!("--host-record={host},{ip}"));
        }
        let child =
            Command::new("dnsmasq").args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect(
                "cannot start dnsmasq: install it with scripts/install-host-deps (Debian package dnsmasq-base)",
            );
        Dnsmasq { child, addr: format!("127.0.0.1:{port}") }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three agents with `bootstrap_expect = 3`, beacons off and no join addresses, whose only way
/// to each other is `[discovery] dns_srv`: they form one cluster, and each says how it looked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_join_addresses_form_one_cluster_by_dns_srv_records() {
    let _g = serial();
    let mut c = Cluster::new(3, Opts::default());
    let records: Vec<(String, String, u16)> = c
        .nodes
        .iter()
        .map(|n| {
            let (ip, port) = n.addr.rsplit_once(':').unwrap();
            (format!("{}.cluster.test", n.name), ip.to_string(), port.parse().unwrap())
        })
        .collect();
    let dns = Dnsmasq::start(&records);
    for i in 0..3 {
        c.nodes[i].join.clear();
        c.reconfigure(i, |o| o.dns = Some((SRV.into(), dns.addr.clone())));
    }
    c.start_all();
    c.wait_converged(3, 0, Duration::from_secs(120)).await;
    for n in &c.nodes {
        let log = n.files.log();
        assert!(log.contains("DNS SRV lookup: "), "{}: no lookup logged", n.name);
        assert!(!log.contains("DNS SRV lookup failed"), "{}: a lookup failed", n.name);
    }
}

/// A name the server does not know: the node says so in `status` and keeps looking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_srv_name_is_reported() {
    let _g = serial();
    let dns = Dnsmasq::start(&[("node9.cluster.test".into(), "127.0.0.99".into(), 7600)]);
    let mut c = Cluster::new(1, Opts::default());
    c.nodes[0].join.clear();
    c.reconfigure(0, |o| {
        o.bootstrap_expect = None;
        o.dns = Some(("_clusteros._tcp.elsewhere.test".into(), dns.addr.clone()));
    });
    c.start(0);
    let detail = wait_until(Duration::from_secs(60), "the lookup's failure in status", || async {
        let d = c.status(0).await.ok()?.phase_detail?;
        d.contains("DNS SRV").then_some(d)
    })
    .await;
    assert!(detail.contains("_clusteros._tcp.elsewhere.test"), "{detail}");
    assert!(detail.contains("no such name") || detail.contains("refused"), "{detail}");
}
