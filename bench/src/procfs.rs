//! RSS and CPU time of the processes under test, from /proc.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;

/// Samples the relay's VmRSS every 50 ms until dropped; after resetting
/// its VmHWM (`clear_refs` 5) so that the peak belongs to this run.
pub struct RssWatch {
    pid: Option<u32>,
    max_rss_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssWatch {
    pub fn start(pid: Option<u32>) -> Self {
        let max_rss_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(pid) = pid {
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
            let (max, stop) = (max_rss_kib.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = proc_status(pid).get("VmRSS") {
                        max.fetch_max(*rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
        Self {
            pid,
            max_rss_kib,
            stop,
        }
    }

    pub fn finish(&self) -> serde_json::Value {
        self.stop.store(true, Ordering::Relaxed);
        let Some(pid) = self.pid else {
            return serde_json::Value::Null;
        };
        let status = proc_status(pid);
        json!({
            "pid": pid,
            "vm_rss_kib": status.get("VmRSS"),
            "vm_hwm_kib": status.get("VmHWM"),
            "max_sampled_rss_kib": self.max_rss_kib.load(Ordering::Relaxed),
        })
    }
}

/// `Vm*` lines of /proc/<pid>/status in KiB.
pub fn proc_status(pid: u32) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let kib = rest.trim().strip_suffix(" kB")?.trim().parse().ok()?;
            Some((key.to_owned(), kib))
        })
        .collect()
}

/// User + system CPU time of a process (or this one) in clock ticks.
pub fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// CPU time used by the load generator, the relay and the broker during the
/// measured phase, per request.
pub struct CpuWatch {
    pids: Vec<(&'static str, Option<u32>, Option<u64>)>,
}

impl CpuWatch {
    pub fn start(relay: Option<u32>, broker: Option<u32>) -> Self {
        let mut pids = vec![("bench", None, cpu_ticks(None))];
        if relay.is_some() {
            pids.push(("relay", relay, cpu_ticks(relay)));
        }
        if broker.is_some() {
            pids.push(("broker", broker, cpu_ticks(broker)));
        }
        Self { pids }
    }

    /// Microseconds of CPU per request (clock ticks of 10 ms).
    pub fn finish(&self, requests: u64) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, pid, before) in &self.pids {
            if let (Some(before), Some(after)) = (before, cpu_ticks(*pid)) {
                let us = (after.saturating_sub(*before) * 10_000) as f64 / requests.max(1) as f64;
                out.insert((*name).to_owned(), json!(us.round()));
            }
        }
        serde_json::Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_time_and_memory() {
        assert!(cpu_ticks(None).is_some());
        assert!(proc_status(std::process::id()).contains_key("VmRSS"));
    }
}
