//! The fault suite's LAN: one network namespace per node, each with a veth on one bridge that
//! lives in a hub namespace of its own, so nothing touches the host's network. Faults are
//! nftables rules inside the node namespaces (drop by peer address, one way or both, or a share
//! of all packets at random), so every fault is undone by flushing two chains.
//!
//! The host kernel here has no `sch_netem` (tc netem: "Specified qdisc kind is unknown"), so
//! delay cannot be injected with tc; packet loss uses nftables' `numgen random` instead, which is
//! the same fault at the packet level.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Namespaces of this suite: `cfl-<pid>-<lan>-<hub|nN>`.
const PREFIX: &str = "cfl-";

/// A bridge in a hub namespace and one namespace per node (node `i` at `10.79.<lan>.<10 + i>`),
/// each with the suite's nftables chains.
pub struct Lan {
    base: clusteros_testkit::lan::Lan,
}

impl Lan {
    /// Creates the hub and `n` node namespaces. `id` tells LANs of one test process apart.
    pub fn new(id: u8, n: usize) -> Result<Lan> {
        let base = clusteros_testkit::lan::Lan::new(PREFIX, id, [10, 79, id], n)
            .context("cannot create the fault suite's LAN (it needs root)")?;
        let lan = Lan { base };
        for i in 0..n {
            lan.nft(
                i,
                "add table inet fault\n\
                         add chain inet fault input { type filter hook input priority 0; policy accept; }\n\
                         add chain inet fault output { type filter hook output priority 0; policy accept; }\n",
            )
            .context("cannot set up nftables in a node namespace (install the nftables package)")?;
        }
        Ok(lan)
    }

    pub fn len(&self) -> usize {
        self.base.len()
    }

    pub fn is_empty(&self) -> bool {
        self.base.is_empty()
    }

    /// Node `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.base.ip(i)
    }

    /// Node `i`'s namespace name (for `ip netns exec`).
    pub fn netns(&self, i: usize) -> &str {
        self.base.netns(i)
    }

    /// Feeds `script` to `nft -f -` inside node `i`'s namespace (one atomic transaction).
    fn nft(&self, i: usize, script: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.netns(i), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft")?;
        child.stdin.take().context("nft stdin")?.write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft in {} failed: {}\n{script}", self.netns(i), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Applies `rules` to every node (replacing what was there): one transaction per node.
    pub fn apply(&self, rules: &Rules) -> Result<()> {
        for i in 0..self.len() {
            let mut script = String::from("flush chain inet fault input\nflush chain inet fault output\n");
            let ips = |set: &[usize]| set.iter().map(|j| self.ip(*j).to_string()).collect::<Vec<_>>().join(", ");
            let deaf = rules.deaf_to(i);
            if !deaf.is_empty() {
                script.push_str(&format!("add rule inet fault input ip saddr {{ {} }} drop\n", ips(&deaf)));
            }
            let mute = rules.mute_to(i);
            if !mute.is_empty() {
                script.push_str(&format!("add rule inet fault output ip daddr {{ {} }} drop\n", ips(&mute)));
            }
            if let Some(p) = rules.loss.get(i).copied().flatten() {
                // Only the LAN, not loopback (the agent talks to itself there).
                script.push_str(&format!(
                    "add rule inet fault input iifname \"eth0\" numgen random mod 100 < {p} drop\n\
                     add rule inet fault output oifname \"eth0\" numgen random mod 100 < {p} drop\n"
                ));
            }
            self.nft(i, &script)?;
        }
        Ok(())
    }

    /// Removes every fault rule.
    pub fn heal(&self) -> Result<()> {
        self.apply(&Rules::new(self.len()))
    }
}

/// Which packets are dropped: `drop[a][b]` drops what `a` sends to `b`; `loss[a]` drops that
/// share (percent) of everything `a` sends or receives on the LAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    drop: Vec<Vec<bool>>,
    loss: Vec<Option<u8>>,
}

impl Rules {
    pub fn new(n: usize) -> Rules {
        Rules { drop: vec![vec![false; n]; n], loss: vec![None; n] }
    }

    /// Packets from `from` to `to` are dropped (one way).
    pub fn cut_one_way(&mut self, from: usize, to: usize) {
        self.drop[from][to] = true;
    }

    /// No packets between `a` and `b`.
    pub fn cut(&mut self, a: usize, b: usize) {
        self.cut_one_way(a, b);
        self.cut_one_way(b, a);
    }

    /// Every node in `side` is cut from every node not in it.
    pub fn partition(&mut self, side: &[usize]) {
        let n = self.drop.len();
        for &a in side {
            for b in (0..n).filter(|b| !side.contains(b)) {
                self.cut(a, b);
            }
        }
    }

    pub fn lose(&mut self, node: usize, percent: u8) {
        self.loss[node] = Some(percent.min(100));
    }

    /// Who node `i` must not hear from: the sources whose packets to `i` are dropped. (Dropped at
    /// the receiver's input as well as at the sender's output, so a rule holds even while the
    /// sender's own rules are being replaced.)
    fn deaf_to(&self, i: usize) -> Vec<usize> {
        (0..self.drop.len()).filter(|&a| self.drop[a][i]).collect()
    }

    fn mute_to(&self, i: usize) -> Vec<usize> {
        (0..self.drop.len()).filter(|&b| self.drop[i][b]).collect()
    }

    /// Whether `a` can send to `b`.
    pub fn reaches(&self, a: usize, b: usize) -> bool {
        !self.drop[a][b]
    }
}

/// Deletes namespaces left behind by runs of this suite whose process is gone.
pub fn sweep_stale() {
    clusteros_testkit::lan::sweep(PREFIX);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_cuts_both_ways_and_only_across() {
        let mut r = Rules::new(5);
        r.partition(&[0, 1]);
        assert!(!r.reaches(0, 3) && !r.reaches(3, 0) && !r.reaches(1, 4));
        assert!(r.reaches(0, 1) && r.reaches(2, 3) && r.reaches(3, 4));
        assert_eq!(r.deaf_to(0), vec![2, 3, 4]);
        assert_eq!(r.mute_to(3), vec![0, 1]);
    }

    #[test]
    fn one_way_cut_leaves_the_other_direction() {
        let mut r = Rules::new(3);
        r.cut_one_way(0, 2);
        assert!(!r.reaches(0, 2) && r.reaches(2, 0));
        assert_eq!(r.mute_to(0), vec![2]);
        assert_eq!(r.deaf_to(2), vec![0]);
        assert!(r.deaf_to(0).is_empty());
    }
}
