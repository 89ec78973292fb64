//! Measurement helpers: HDR histograms (microseconds) that travel between processes as base64,
//! their percentile summaries, wall-clock timestamps shared by all processes, and `/proc`
//! readings of a process's CPU time and resident memory.

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

/// Wall-clock nanoseconds since the Unix epoch. Every process on the machine reads the same
/// clock, so an event stamped in one worker can be compared with a receipt in another.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A latency histogram in microseconds, 1 us to 10 minutes, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Records a duration given in nanoseconds (clamped into the histogram's range).
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    let us = (ns / 1000).clamp(1, 600_000_000);
    h.saturating_record(us);
}

pub fn encode_hist(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("serialising into a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn decode_hist(s: &str) -> Option<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .ok()?;
    let mut out = new_hist();
    out.add(&h).ok()?;
    Some(out)
}

/// Percentiles of a histogram, in milliseconds (floating point, for people).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

pub fn summarize(h: &Histogram<u64>) -> Summary {
    if h.is_empty() {
        return Summary::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Summary {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        mean_ms: h.mean() / 1000.0,
    }
}

/// CPU time (user + system) and resident memory of one process, read from `/proc`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_s: f64,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ; 100 on every Linux we run on).
const CLK_TCK: f64 = 100.0;

pub fn proc_sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        cpu_s: (utime + stime) / CLK_TCK,
        rss_bytes: rss_kb * 1024,
    })
}

/// The sum over several processes (the nodes of a cluster); `None` if any is gone or none is
/// given.
pub fn proc_sample_sum(pids: &[String]) -> Option<ProcSample> {
    let mut sum: Option<ProcSample> = None;
    for pid in pids {
        let s = proc_sample(pid)?;
        let t = sum.get_or_insert_with(ProcSample::default);
        t.cpu_s += s.cpu_s;
        t.rss_bytes += s.rss_bytes;
    }
    sum
}

/// The PID of the only process whose command name is `name`, if exactly one runs.
pub fn find_pid(name: &str) -> Option<u32> {
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == name {
            if found.is_some() {
                return None;
            }
            found = Some(pid);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_trip_between_processes() {
        let mut h = new_hist();
        for v in [1_000_000u64, 2_000_000, 250_000_000] {
            record_ns(&mut h, v);
        }
        let back = decode_hist(&encode_hist(&h)).unwrap();
        assert_eq!(back.len(), 3);
        let s = summarize(&back);
        assert!((s.max_ms - 250.0).abs() < 0.5, "{s:?}");
        assert!((s.p50_ms - 2.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn reads_its_own_process() {
        let s = proc_sample("self").unwrap();
        assert!(s.rss_bytes > 0);
    }
}
