//! Userspace stand-in for `tc qdisc add dev DEV root netem delay D J` on kernels without
//! `sch_netem`.
//!
//! An iptables rule in the target network namespace sends every IPv4 packet leaving through
//! `DEV` ([`delay_egress`]) or arriving through it ([`delay_ingress`]) to an NFQUEUE; a worker
//! thread that has entered that namespace (so each namespace has
//! its own queue, even with the same queue number) holds each packet in a min-heap keyed by its
//! release time and gives the kernel an `NF_ACCEPT` verdict when that time comes.
//!
//! Needs: root (CAP_NET_ADMIN), `ip` and `iptables` on `PATH`, a namespace created with
//! `ip netns add NAME` (the worker opens `/run/netns/NAME`), and a kernel with
//! `CONFIG_NETFILTER_NETLINK_QUEUE` and `CONFIG_NETFILTER_XT_TARGET_NFQUEUE`.
//!
//! The NFQUEUE protocol is spoken directly over a netlink socket (module `nl`, ~250 lines of
//! safe Rust on `nix`), not through the `nfq` crate: owning the socket lets the worker sleep in
//! `ppoll` until a packet arrives or the next release is due (no busy polling), enlarge the
//! socket's receive buffer, and send many verdicts per syscall.
//!
//! Crates: `anyhow`; `nix` with features `sched` (setns), `socket`, `poll`, `signal` (ppoll)
//! and `resource` (per-thread CPU time).
//!
//! Differences from netem:
//! * IPv4 only (the rule is an `iptables` rule; IPv6 and ARP are not delayed).
//! * [`delay_egress`] holds packets that still belong to their socket (netem orphans them):
//!   they count against `SO_SNDBUF` and TCP Small Queues, which throttles bulk TCP to a few
//!   packets per delay. [`delay_ingress`] on the receiving side does not have this problem.
//! * At most [`MAX_HELD`] packets are held, so at most `MAX_HELD / delay` packets/s are
//!   delayed (41k/s at 100 ms); the excess is accepted undelayed and counted.
//! * Packets the kernel cannot hand to the worker (queue socket buffer full) are accepted
//!   undelayed (fail-open), never dropped; counted in [`Stats::kernel_fail_open`].
#![forbid(unsafe_code)]

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering as AtomicOrdering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// At most this many packets are held at once; beyond it packets are accepted immediately
/// (counted in [`Stats::overflow_accepted`]).
pub const MAX_HELD: usize = 4096;
/// Kernel-side queue length (default 1024): packets held plus packets queued in the socket but
/// not yet read. When it is reached the kernel accepts packets undelayed without counting
/// them anywhere, so it is set well above [`MAX_HELD`] plus what [`NETLINK_RCVBUF`] can hold
/// (~10k messages): a lagging worker then overflows the socket first, which is counted
/// ([`Stats::kernel_fail_open`]).
const KERNEL_QUEUE_MAXLEN: u32 = 32768;
/// At most this many datagrams are read from the socket before due packets are released again.
const RECV_BATCH: usize = 256;
/// Receive buffer of the queue socket (SO_RCVBUFFORCE): room for ~10k queued-packet messages
/// (~200 bytes of truesize each), i.e. ~100 ms of lag at 100k packets/s, so a burst is held
/// rather than passed undelayed by the kernel's fail-open. The default (208 KiB) holds ~1000.
const NETLINK_RCVBUF: usize = 2 << 20;
/// Longest wait for the socket when nothing is due: how soon a stop request is noticed.
const TICK: Duration = Duration::from_millis(10);
/// On exit, the socket must have been empty for this long before it is closed (closing it
/// drops whatever the kernel still has queued for it).
const EXIT_QUIET: Duration = Duration::from_millis(5);
/// ...or after this much draining (if the rule could not be removed, packets keep coming; once
/// the socket is closed they bypass the queue, as `--queue-bypass` says).
const EXIT_MAX: Duration = Duration::from_millis(300);
/// The whole stop (release, rule removal, join) is bounded by this.
const STOP_BUDGET: Duration = Duration::from_millis(1000);
/// Bound on the `ip netns exec ... iptables -A` command.
const ADD_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the `-D` command, part of the stop budget (it takes ~20 ms normally).
const DELETE_TIMEOUT: Duration = Duration::from_millis(800);
/// How often the worker refreshes its CPU time and the kernel queue counters in [`Stats`].
const STATS_EVERY: Duration = Duration::from_millis(100);

const PHASE_RUN: u8 = 0;
/// Release everything held and accept new packets immediately (rule is being removed).
const PHASE_PASSTHROUGH: u8 = 1;
/// Rule is gone: drain the socket, accept, close.
const PHASE_EXIT: u8 = 2;

/// Counters of one delayer. A snapshot; see [`Delay::stats`] and [`Delay::stop`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets received from the kernel queue.
    pub received: u64,
    /// Packets accepted at their release time.
    pub released: u64,
    /// Packets accepted immediately because [`MAX_HELD`] were already held.
    pub overflow_accepted: u64,
    /// Packets accepted early or immediately while stopping.
    pub accepted_on_stop: u64,
    /// Verdicts that could not be sent, or that the kernel answered with an error (such a
    /// packet stays queued in the kernel and is dropped when the queue closes).
    pub verdict_errors: u64,
    /// Errors from receiving or polling (other than "would block"), including socket
    /// overruns (ENOBUFS).
    pub recv_errors: u64,
    /// Most packets held at once.
    pub max_held: u64,
    /// Packets currently held.
    pub held: u64,
    /// Packets the kernel queued for us (`id_sequence` in `/proc/net/netfilter/nfnetlink_queue`
    /// of the namespace), refreshed every 100 ms and at exit.
    pub kernel_queued: u64,
    /// Packets the kernel could not hand to the worker because the netlink socket buffer was
    /// full, and so accepted undelayed (fail-open): `kernel_queued - received`. (Packets
    /// accepted because the kernel queue itself was full, 32768 unverdicted, are counted
    /// nowhere; the socket buffer is sized to overflow long before that.)
    pub kernel_fail_open: u64,
    /// CPU time used by the worker thread.
    pub cpu_time: Duration,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    released: AtomicU64,
    overflow_accepted: AtomicU64,
    accepted_on_stop: AtomicU64,
    verdict_errors: AtomicU64,
    recv_errors: AtomicU64,
    max_held: AtomicU64,
    held: AtomicU64,
    kernel_queued: AtomicU64,
    cpu_nanos: AtomicU64,
}

struct Shared {
    phase: AtomicU8,
    c: Counters,
}

impl Shared {
    fn snapshot(&self) -> Stats {
        let ld = |a: &AtomicU64| a.load(AtomicOrdering::Relaxed);
        let received = ld(&self.c.received);
        let kernel_queued = ld(&self.c.kernel_queued);
        Stats {
            received,
            released: ld(&self.c.released),
            overflow_accepted: ld(&self.c.overflow_accepted),
            accepted_on_stop: ld(&self.c.accepted_on_stop),
            verdict_errors: ld(&self.c.verdict_errors),
            recv_errors: ld(&self.c.recv_errors),
            max_held: ld(&self.c.max_held),
            held: ld(&self.c.held),
            kernel_queued,
            kernel_fail_open: kernel_queued.saturating_sub(received),
            cpu_time: Duration::from_nanos(ld(&self.c.cpu_nanos)),
        }
    }
}

/// Guard of an active delay. Dropping it (or calling [`Delay::stop`]) releases every held
/// packet, removes the iptables rule and stops the worker, within about a second.
pub struct Delay {
    netns: String,
    rule: Vec<String>,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    final_stats: Option<Stats>,
}

impl std::fmt::Debug for Delay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delay")
            .field("netns", &self.netns)
            .field("rule", &self.rule.join(" "))
            .field("running", &self.worker.is_some())
            .finish()
    }
}

/// Delays every IPv4 packet that leaves `netns` through `dev` by `delay` ± `jitter` (uniform,
/// clamped at zero). Order is not kept (netem does not keep it with jitter either).
///
/// `netns` is a name under `/run/netns` (as made by `ip netns add`); `queue` is the NFQUEUE
/// number, which only has to be unique within that namespace. Returns a guard; dropping it
/// removes the iptables rule and stops the worker, after releasing every held packet (accept)
/// so nothing is lost on the way out.
///
/// The rule is `iptables -w -A OUTPUT -o DEV -j NFQUEUE --queue-num N --queue-bypass`, so it
/// delays locally generated packets only (not forwarded ones), and if the worker is gone
/// packets flow undelayed instead of being dropped.
///
/// Caveat: a packet held here still belongs to its socket (netem orphans it), so it counts
/// against the sender's `SO_SNDBUF` and TCP Small Queues: a single TCP flow gets only ~2
/// packets per `delay` through (bulk TCP collapses to ~1 MB/s at 100 ms), and a UDP socket
/// with the default 208 KiB send buffer blocks after ~256 held small datagrams. For bulk TCP
/// use [`delay_ingress`] on the receiving side, which does not have this problem.
pub fn delay_egress(netns: &str, dev: &str, queue: u16, delay: Duration, jitter: Duration) -> anyhow::Result<Delay> {
    let rule = ["-A", "OUTPUT", "-o", dev];
    start(netns, dev, &rule, queue, delay, jitter)
}

/// Delays every IPv4 packet that arrives in `netns` through `dev` by `delay` ± `jitter`
/// (uniform, clamped at zero), like netem on an ifb device. Otherwise as [`delay_egress`],
/// but with the rule `iptables -w -t mangle -A PREROUTING -i DEV -j NFQUEUE --queue-num N
/// --queue-bypass`.
///
/// A packet that crossed a veth pair is no longer charged to the sending socket, so this has
/// no socket-buffer or TCP Small Queues effect: delaying B's ingress from A is what netem on
/// A's egress would do, including for bulk TCP.
pub fn delay_ingress(netns: &str, dev: &str, queue: u16, delay: Duration, jitter: Duration) -> anyhow::Result<Delay> {
    let rule = ["-t", "mangle", "-A", "PREROUTING", "-i", dev];
    start(netns, dev, &rule, queue, delay, jitter)
}

/// `rule` is the iptables arguments up to the target, with `-A` as the operation.
fn start(
    netns: &str,
    dev: &str,
    rule: &[&str],
    queue: u16,
    delay: Duration,
    jitter: Duration,
) -> anyhow::Result<Delay> {
    if netns.is_empty() || netns.contains('/') || netns.starts_with('.') {
        bail!("delay: bad network namespace name {netns:?}");
    }
    if dev.is_empty() || dev.len() > 15 || dev.contains(char::is_whitespace) {
        bail!("delay: bad device name {dev:?} (netns {netns})");
    }
    let queue_s = queue.to_string();
    let mut rule: Vec<String> = rule.iter().map(|s| s.to_string()).collect();
    rule.extend(["-j", "NFQUEUE", "--queue-num", &queue_s, "--queue-bypass"].map(String::from));
    let what = format!("delay {} (netns {netns}, dev {dev}, queue {queue})", rule.join(" "));
    let shared = Arc::new(Shared { phase: AtomicU8::new(PHASE_RUN), c: Counters::default() });
    let path = format!("/run/netns/{netns}");
    if !std::path::Path::new(&path).exists() {
        bail!("{what}: no network namespace {netns} ({path} does not exist)");
    }
    if !dev.ends_with('+') {
        // iptables takes any name, so a typo would silently delay nothing.
        let mut cmd = Command::new("ip");
        cmd.args(["-n", netns, "link", "show", "dev", dev])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        run_bounded(cmd, &format!("ip -n {netns} link show dev {dev}"), ADD_TIMEOUT)
            .with_context(|| format!("{what}: no device {dev} in netns {netns}?"))?;
    }
    let (ready_tx, ready_rx) = mpsc::sync_channel::<anyhow::Result<()>>(1);
    let worker = {
        let shared = Arc::clone(&shared);
        let ns_name = netns.to_owned();
        thread::Builder::new()
            .name(format!("delay-{queue}"))
            .spawn(move || worker_main(&path, &ns_name, queue, delay, jitter, &shared, ready_tx))
            .with_context(|| format!("spawning the delay worker for netns {netns}"))?
    };
    let mut guard = Delay { netns: netns.to_owned(), rule, shared, worker: Some(worker), final_stats: None };
    let started = match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => Err(anyhow!("delay worker did not start within 5 s")),
        Err(RecvTimeoutError::Disconnected) => Err(anyhow!("delay worker died while starting")),
    };
    if let Err(e) = started {
        let _ = guard.shutdown(false);
        return Err(e.context(format!("{what}: starting the NFQUEUE worker")));
    }
    // The queue is bound before the rule exists, so no packet is ever queued to nobody (and
    // with --queue-bypass it would pass anyway).
    if let Err(e) = iptables(netns, &guard.rule, ADD_TIMEOUT) {
        let _ = guard.shutdown(false);
        return Err(e.context(format!("{what}: adding the iptables rule")));
    }
    Ok(guard)
}

impl Delay {
    /// Live counters.
    pub fn stats(&self) -> Stats {
        match &self.final_stats {
            Some(s) => s.clone(),
            None => self.shared.snapshot(),
        }
    }

    /// Stops like drop does, but reports errors and returns the final counters.
    pub fn stop(mut self) -> anyhow::Result<Stats> {
        self.shutdown(true)
    }

    /// 1. the worker releases everything it holds and passes new packets through;
    /// 2. the rule is removed (if `remove_rule`);
    /// 3. the worker drains the socket, accepting, and closes it; we join it.
    fn shutdown(&mut self, remove_rule: bool) -> anyhow::Result<Stats> {
        let Some(worker) = self.worker.take() else {
            return Ok(self.stats());
        };
        let start = Instant::now();
        self.shared.phase.store(PHASE_PASSTHROUGH, AtomicOrdering::Release);
        let rule_result = if remove_rule {
            let mut delete = self.rule.clone();
            if let Some(op) = delete.iter_mut().find(|a| *a == "-A") {
                *op = "-D".to_string();
            }
            iptables(&self.netns, &delete, DELETE_TIMEOUT)
        } else {
            Ok(())
        };
        self.shared.phase.store(PHASE_EXIT, AtomicOrdering::Release);
        let deadline = start + STOP_BUDGET.max(start.elapsed() + Duration::from_millis(100));
        while !worker.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        let join_result = if worker.is_finished() {
            worker.join().map_err(|_| anyhow!("the delay worker panicked"))
        } else {
            // Leave it detached; it exits on its own once its loop sees PHASE_EXIT.
            Err(anyhow!("the delay worker did not stop within {:?}", STOP_BUDGET))
        };
        let stats = self.shared.snapshot();
        self.final_stats = Some(stats.clone());
        match (rule_result, join_result) {
            (Ok(()), Ok(())) => Ok(stats),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => {
                Err(e.context(format!("stopping the delay in netns {}", self.netns)))
            }
            (Err(e1), Err(e2)) => Err(e1.context(format!("stopping the delay in netns {} (also: {e2:#})", self.netns))),
        }
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(true) {
            eprintln!("delay: {e:#}");
        }
    }
}

/// Runs `ip netns exec NETNS iptables -w RULE...`, killed after `timeout`.
fn iptables(netns: &str, rule: &[String], timeout: Duration) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "iptables", "-w"])
        .args(rule)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let shown = format!("ip netns exec {netns} iptables -w {}", rule.join(" "));
    run_bounded(cmd, &shown, timeout)
}

fn run_bounded(mut cmd: Command, shown: &str, timeout: Duration) -> anyhow::Result<()> {
    let mut child = cmd.spawn().with_context(|| format!("running `{shown}`"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("`{shown}` did not finish within {timeout:?}; killed");
            }
            Ok(None) => thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(e).with_context(|| format!("waiting for `{shown}`")),
        }
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    if !status.success() {
        bail!("`{shown}` failed ({status}): {}", stderr.trim());
    }
    Ok(())
}

struct Held {
    release: Instant,
    seq: u64,
    id: u32,
}

// Reversed so that `BinaryHeap` (a max-heap) pops the earliest release first.
impl Ord for Held {
    fn cmp(&self, other: &Self) -> Ordering {
        other.release.cmp(&self.release).then_with(|| other.seq.cmp(&self.seq))
    }
}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Held {}

/// SplitMix64; good enough for jitter.
struct Rng(u64);

impl Rng {
    fn new(salt: u64) -> Rng {
        Rng(RandomState::new().hash_one(salt))
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [delay - jitter, delay + jitter], clamped at zero.
    fn sample(&mut self, delay: Duration, jitter: Duration) -> Duration {
        let j = u64::try_from(jitter.as_nanos()).unwrap_or(u64::MAX).min(u64::MAX / 4);
        if j == 0 {
            return delay;
        }
        let offset = self.next_u64() % (2 * j + 1);
        if offset >= j {
            delay.saturating_add(Duration::from_nanos(offset - j))
        } else {
            delay.saturating_sub(Duration::from_nanos(j - offset))
        }
    }
}

/// A minimal NFQUEUE client over a raw netlink socket (`NETLINK_NETFILTER`), in safe Rust on
/// `nix`: bind a queue in metadata-only mode, receive packet ids, send `NF_ACCEPT` verdicts
/// (many per datagram). Owning the socket lets us poll it with a timeout and enlarge its
/// receive buffer, which the `nfq` crate does not allow.
mod nl {
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use nix::errno::Errno;
    use nix::poll::{PollFd, PollFlags};
    use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
    use nix::sys::time::TimeSpec;

    const NLMSG_HDRLEN: usize = 16;
    const NFGEN_HDRLEN: usize = 4;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NFNL_SUBSYS_QUEUE: u16 = 3;
    const NFQNL_MSG_PACKET: u16 = 0;
    const NFQNL_MSG_VERDICT: u16 = 1;
    const NFQNL_MSG_CONFIG: u16 = 2;
    const NFQA_PACKET_HDR: u16 = 1;
    const NFQA_VERDICT_HDR: u16 = 2;
    const NFQA_CFG_CMD: u16 = 1;
    const NFQA_CFG_PARAMS: u16 = 2;
    const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
    const NFQA_CFG_MASK: u16 = 4;
    const NFQA_CFG_FLAGS: u16 = 5;
    const NFQNL_CFG_CMD_BIND: u8 = 1;
    const NFQNL_COPY_META: u8 = 1;
    pub const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
    pub const NFQA_CFG_F_GSO: u32 = 4;
    const NF_ACCEPT: u32 = 1;
    const NLA_TYPE_MASK: u16 = 0x3fff;
    /// Flush queued verdicts once the datagram gets this big (32 bytes per verdict).
    const TX_FLUSH: usize = 32 * 1024;

    pub struct Socket {
        fd: OwnedFd,
        queue: u16,
        seq: u32,
        rx: Vec<u8>,
        tx: Vec<u8>,
        tx_count: u64,
    }

    /// What one [`Socket::recv`] call saw.
    #[derive(Default)]
    pub struct Received {
        pub datagrams: usize,
        /// Netlink error replies (to verdicts; e.g. ENOENT for an unknown packet id).
        pub error_replies: u64,
        /// The socket overflowed at least once since the last read (ENOBUFS); the kernel
        /// accepted the packets it could not deliver (fail-open).
        pub overruns: u64,
        /// Other receive errors.
        pub errors: u64,
    }

    fn put_msg(buf: &mut Vec<u8>, typ: u16, flags: u16, seq: u32, res_id: u16, attrs: &[(u16, &[u8])]) {
        let start = buf.len();
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
        buf.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | typ).to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        buf.extend_from_slice(&[0, 0]); // nfgenmsg: AF_UNSPEC, NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        for (typ, payload) in attrs {
            let len = 4 + payload.len();
            buf.extend_from_slice(&(len as u16).to_ne_bytes());
            buf.extend_from_slice(&typ.to_ne_bytes());
            buf.extend_from_slice(payload);
            buf.resize(buf.len() + (4 - len % 4) % 4, 0);
        }
        let len = (buf.len() - start) as u32;
        buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }
    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }
    fn be32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    /// Splits a datagram into netlink messages: (type, seq, whole message).
    fn messages(mut b: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
        std::iter::from_fn(move || {
            let len = u32_at(b, 0)? as usize;
            if len < NLMSG_HDRLEN || len > b.len() {
                return None;
            }
            let (msg, rest) = b.split_at(len);
            b = rest.get((4 - len % 4) % 4..).unwrap_or(&[]);
            Some((u16_at(msg, 4)?, u32_at(msg, 8)?, msg))
        })
    }

    /// The packet id of an NFQNL_MSG_PACKET message.
    fn packet_id(msg: &[u8]) -> Option<u32> {
        let mut at = NLMSG_HDRLEN + NFGEN_HDRLEN;
        while at + 4 <= msg.len() {
            let len = u16_at(msg, at)? as usize;
            let typ = u16_at(msg, at + 2)? & NLA_TYPE_MASK;
            if len < 4 {
                return None;
            }
            if typ == NFQA_PACKET_HDR {
                return be32_at(msg, at + 4);
            }
            at += (len + 3) & !3;
        }
        None
    }

    impl Socket {
        /// Opens a netlink socket in the calling thread's network namespace and binds
        /// `queue` (metadata only, fail-open, GSO packets whole, kernel queue `maxlen`).
        pub fn bind(queue: u16, maxlen: u32, rcvbuf: usize) -> anyhow::Result<Socket> {
            let fd = socket::socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkNetFilter,
            )
            .context("socket(AF_NETLINK, NETLINK_NETFILTER)")?;
            socket::bind(fd.as_raw_fd(), &socket::NetlinkAddr::new(0, 0)).context("bind(AF_NETLINK)")?;
            // A burst larger than the buffer is accepted undelayed by the kernel; the default
            // (net.core.rmem_default, 208 KiB) holds only ~1000 packet messages.
            if socket::setsockopt(&fd, socket::sockopt::RcvBufForce, &rcvbuf).is_err() {
                let _ = socket::setsockopt(&fd, socket::sockopt::RcvBuf, &rcvbuf);
            }
            let mut s = Socket {
                fd,
                queue,
                seq: 0,
                rx: vec![0; 256 * 1024],
                tx: Vec::with_capacity(TX_FLUSH + 64),
                tx_count: 0,
            };
            s.config("bind", &[(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])])?;
            s.config("set copy mode META", &[(NFQA_CFG_PARAMS, &[0, 0, 0, 0, NFQNL_COPY_META])])?;
            s.config("set queue maxlen", &[(NFQA_CFG_QUEUE_MAXLEN, &maxlen.to_be_bytes())])?;
            let flags = (NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO).to_be_bytes();
            s.config("set flags FAIL_OPEN|GSO", &[(NFQA_CFG_FLAGS, &flags), (NFQA_CFG_MASK, &flags)])?;
            Ok(s)
        }

        /// Sends one config request and waits (up to 2 s) for its acknowledgement.
        fn config(&mut self, what: &str, attrs: &[(u16, &[u8])]) -> anyhow::Result<()> {
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            let mut msg = Vec::with_capacity(64);
            put_msg(&mut msg, NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, self.queue, attrs);
            socket::send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())
                .with_context(|| format!("NFQUEUE {}: {what}: send", self.queue))?;
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    bail!("NFQUEUE {}: {what}: no reply from the kernel within 2 s", self.queue);
                }
                self.wait(left)?;
                let n = match socket::recv(self.fd.as_raw_fd(), &mut self.rx, MsgFlags::empty()) {
                    Ok(n) => n,
                    Err(Errno::EAGAIN | Errno::EINTR) => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("NFQUEUE {}: {what}: recv", self.queue));
                    }
                };
                for (typ, mseq, m) in messages(&self.rx[..n]) {
                    if typ == NLMSG_ERROR && mseq == seq {
                        let err = u32_at(m, NLMSG_HDRLEN).unwrap_or(0) as i32;
                        if err == 0 {
                            return Ok(());
                        }
                        let e = Errno::from_raw(-err);
                        bail!("NFQUEUE {}: {what}: {e} ({})", self.queue, e.desc());
                    }
                }
            }
        }

        /// Waits until the socket is readable or `timeout` passes.
        pub fn wait(&self, timeout: Duration) -> anyhow::Result<bool> {
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match nix::poll::ppoll(&mut fds, Some(TimeSpec::from_duration(timeout)), None) {
                Ok(n) => Ok(n > 0),
                Err(Errno::EINTR) => Ok(false),
                Err(e) => Err(e).context("ppoll on the NFQUEUE socket"),
            }
        }

        /// Reads up to `max_datagrams` datagrams without blocking; appends packet ids to `ids`.
        pub fn recv(&mut self, ids: &mut Vec<u32>, max_datagrams: usize) -> Received {
            let mut r = Received::default();
            while r.datagrams < max_datagrams {
                let n = match socket::recv(self.fd.as_raw_fd(), &mut self.rx, MsgFlags::MSG_DONTWAIT) {
                    Ok(n) => n,
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => continue,
                    Err(Errno::ENOBUFS) => {
                        r.overruns += 1;
                        continue;
                    }
                    Err(_) => {
                        r.errors += 1;
                        break;
                    }
                };
                r.datagrams += 1;
                for (typ, _, m) in messages(&self.rx[..n]) {
                    if typ == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                        match packet_id(m) {
                            Some(id) => ids.push(id),
                            None => r.errors += 1,
                        }
                    } else if typ == NLMSG_ERROR && u32_at(m, NLMSG_HDRLEN).unwrap_or(0) != 0 {
                        r.error_replies += 1;
                    }
                }
            }
            r
        }

        /// Queues an NF_ACCEPT verdict for packet `id`; sent by [`Socket::flush`].
        pub fn accept(&mut self, id: u32) -> u64 {
            let mut hdr = [0u8; 8];
            hdr[..4].copy_from_slice(&NF_ACCEPT.to_be_bytes());
            hdr[4..].copy_from_slice(&id.to_be_bytes());
            put_msg(&mut self.tx, NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, self.queue, &[(NFQA_VERDICT_HDR, &hdr)]);
            self.tx_count += 1;
            if self.tx.len() >= TX_FLUSH { self.flush() } else { 0 }
        }

        /// Sends the queued verdicts in one datagram; returns how many could not be sent.
        pub fn flush(&mut self) -> u64 {
            if self.tx.is_empty() {
                return 0;
            }
            let mut failed = self.tx_count;
            for _ in 0..3 {
                match socket::send(self.fd.as_raw_fd(), &self.tx, MsgFlags::empty()) {
                    Ok(_) => {
                        failed = 0;
                        break;
                    }
                    Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOBUFS | Errno::ENOMEM) => {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(_) => break,
                }
            }
            self.tx.clear();
            self.tx_count = 0;
            failed
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn verdict_message_layout() {
            let mut b = Vec::new();
            put_msg(&mut b, NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 5, &[(NFQA_VERDICT_HDR, &[0, 0, 0, 1, 0, 0, 0, 42])]);
            assert_eq!(b.len(), 32);
            assert_eq!(u32_at(&b, 0), Some(32));
            assert_eq!(u16_at(&b, 4), Some(0x0301));
            assert_eq!(&b[18..20], &[0, 5]);
            assert_eq!(u16_at(&b, 20), Some(12));
            assert_eq!(u16_at(&b, 22), Some(NFQA_VERDICT_HDR));
            let two = [b.clone(), b].concat();
            assert_eq!(messages(&two).count(), 2);
        }

        #[test]
        fn parses_packet_id_and_survives_garbage() {
            let mut b = Vec::new();
            // an unrelated attribute first, then the packet header (id, hw proto, hook)
            put_msg(&mut b, NFQNL_MSG_PACKET, 0, 0, 5, &[(9, &[1, 2, 3]), (NFQA_PACKET_HDR, &[0, 0, 1, 2, 8, 0, 3])]);
            let (typ, _, m) = messages(&b).next().unwrap();
            assert_eq!(typ, 0x0300);
            assert_eq!(packet_id(m), Some(0x0102));
            for cut in 0..b.len() {
                for (_, _, m) in messages(&b[..cut]) {
                    let _ = packet_id(m);
                }
            }
            let mut bad = b.clone();
            bad[20] = 0; // attribute length 0
            assert_eq!(packet_id(messages(&bad).next().unwrap().2), None);
        }
    }
}

fn open_queue(path: &str, netns: &str, queue: u16) -> anyhow::Result<nl::Socket> {
    let ns = File::open(path).with_context(|| format!("opening {path} (netns {netns})"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {path}"))?;
    nl::Socket::bind(queue, KERNEL_QUEUE_MAXLEN, NETLINK_RCVBUF)
        .with_context(|| format!("binding NFQUEUE {queue} in netns {netns} (EPERM here means another socket has it)"))
}

/// Reads `id_sequence` of `queue` from this thread's namespace.
fn kernel_queued(queue: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first()?.parse::<u16>().ok()? == queue { f.get(7)?.parse::<u64>().ok() } else { None }
    })
}

fn thread_cpu() -> Option<Duration> {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD).ok()?;
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
    };
    Some(tv(u.user_time()) + tv(u.system_time()))
}

fn worker_main(
    path: &str,
    netns: &str,
    queue_num: u16,
    delay: Duration,
    jitter: Duration,
    shared: &Shared,
    ready: SyncSender<anyhow::Result<()>>,
) {
    let mut q = match open_queue(path, netns, queue_num) {
        Ok(q) => q,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);

    let c = &shared.c;
    let add = |a: &AtomicU64, n: u64| {
        if n > 0 {
            a.fetch_add(n, AtomicOrdering::Relaxed);
        }
    };
    let mut heap: BinaryHeap<Held> = BinaryHeap::with_capacity(MAX_HELD);
    let mut ids: Vec<u32> = Vec::with_capacity(1024);
    let mut rng = Rng::new(u64::from(queue_num));
    let mut seq = 0u64;
    let mut quiet_since: Option<Instant> = None;
    let mut exit_since: Option<Instant> = None;
    let mut last_stats = Instant::now();
    let mut warned_overflow = false;

    loop {
        let phase = shared.phase.load(AtomicOrdering::Acquire);
        let r = q.recv(&mut ids, RECV_BATCH);
        add(&c.received, ids.len() as u64);
        add(&c.recv_errors, r.errors + r.overruns);
        add(&c.verdict_errors, r.error_replies);
        let got = ids.len();
        let now = Instant::now();
        for id in ids.drain(..) {
            if phase != PHASE_RUN {
                add(&c.verdict_errors, q.accept(id));
                add(&c.accepted_on_stop, 1);
            } else if heap.len() >= MAX_HELD {
                add(&c.verdict_errors, q.accept(id));
                add(&c.overflow_accepted, 1);
                if !warned_overflow {
                    warned_overflow = true;
                    eprintln!(
                        "delay: netns {netns} queue {queue_num}: {MAX_HELD} packets held, \
                         accepting further packets undelayed"
                    );
                }
            } else {
                let wait = rng.sample(delay, jitter);
                if wait.is_zero() {
                    add(&c.verdict_errors, q.accept(id));
                    add(&c.released, 1);
                } else {
                    seq += 1;
                    heap.push(Held { release: now + wait, seq, id });
                }
            }
        }
        c.max_held.fetch_max(heap.len() as u64, AtomicOrdering::Relaxed);

        let now = Instant::now();
        while let Some(top) = heap.peek() {
            if phase == PHASE_RUN && top.release > now {
                break;
            }
            let Some(h) = heap.pop() else { break };
            add(&c.verdict_errors, q.accept(h.id));
            if phase == PHASE_RUN {
                add(&c.released, 1);
            } else {
                add(&c.accepted_on_stop, 1);
            }
        }
        add(&c.verdict_errors, q.flush());
        c.held.store(heap.len() as u64, AtomicOrdering::Relaxed);

        if now.duration_since(last_stats) >= STATS_EVERY {
            last_stats = now;
            publish_slow_stats(c, queue_num);
        }

        if phase == PHASE_EXIT && heap.is_empty() && now.duration_since(*exit_since.get_or_insert(now)) >= EXIT_MAX {
            break;
        }
        if phase == PHASE_EXIT && heap.is_empty() && got == 0 && r.datagrams == 0 {
            let since = *quiet_since.get_or_insert(now);
            if now.duration_since(since) >= EXIT_QUIET {
                break;
            }
        } else {
            quiet_since = None;
        }
        if r.datagrams >= RECV_BATCH {
            continue; // more may be waiting
        }
        let timeout = match (phase, heap.peek()) {
            (PHASE_RUN, Some(top)) => top.release.saturating_duration_since(now).min(TICK),
            (PHASE_RUN, None) => TICK,
            _ => Duration::from_millis(1),
        };
        if !timeout.is_zero() && q.wait(timeout).is_err() {
            add(&c.recv_errors, 1);
            thread::sleep(Duration::from_millis(1));
        }
    }
    publish_slow_stats(c, queue_num);
    // Dropping `q` closes the socket, which unbinds the queue.
}

fn publish_slow_stats(c: &Counters, queue_num: u16) {
    if let Some(cpu) = thread_cpu() {
        let nanos = u64::try_from(cpu.as_nanos()).unwrap_or(u64::MAX);
        c.cpu_nanos.store(nanos, AtomicOrdering::Relaxed);
    }
    if let Some(n) = kernel_queued(queue_num) {
        c.kernel_queued.store(n, AtomicOrdering::Relaxed);
    }
}

#[cfg(test)]
mod guard_tests {
    #[test]
    fn guard_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Delay>();
    }

    #[test]
    fn jitter_is_uniform_and_clamped() {
        use std::time::Duration;
        let mut r = super::Rng::new(1);
        let ms = Duration::from_millis;
        let v: Vec<Duration> = (0..10_000).map(|_| r.sample(ms(100), ms(50))).collect();
        assert!(v.iter().all(|d| *d >= ms(50) && *d <= ms(150)));
        let below = v.iter().filter(|d| **d < ms(100)).count();
        assert!((4_500..5_500).contains(&below), "{below}");
        assert!((0..1000).all(|_| r.sample(ms(10), ms(50)) <= ms(60)));
        assert_eq!(r.sample(ms(7), Duration::ZERO), ms(7));
    }
}
