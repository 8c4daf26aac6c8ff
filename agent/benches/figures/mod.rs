//! Small helpers the benchmarks share: percentiles of latencies and a process's RSS.

use std::time::Duration;

/// The `p` quantile (0..=1) of sorted, non-empty latencies (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Resident set size of a process (KiB), from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}
