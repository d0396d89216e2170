//! What both load sides share: the load flags, realistic bodies signed in
//! advance, the request schedule and the per-worker tallies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use http::HeaderValue;
use ocrolus_relay::{sample_body, sign};
use serde_json::json;

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Measured requests (pre-signed before the clock starts).
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Unmeasured requests sent first (connections, JIT-free warm caches).
    #[arg(long, default_value_t = 500)]
    pub warmup: usize,
    /// Workers, each with its own keep-alive connection (or confirm loop).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Open loop: start requests at this many per second instead of as fast
    /// as the workers go.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop after this many seconds even if requests are left.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Approximate body size in bytes (a padding field fills it up).
    #[arg(long, default_value_t = 1024)]
    pub body_size: usize,
    /// Event of the generated bodies.
    #[arg(long, default_value = "document.verification_succeeded")]
    pub event: String,
    /// Free-form label copied into the JSON result.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Append the JSON result as one line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Relay process whose RSS (VmRSS, VmHWM) and CPU time are reported.
    #[arg(long)]
    pub relay_pid: Option<u32>,
    /// RabbitMQ process (beam.smp) whose CPU time is reported.
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

/// A realistic delivery body of about `size` bytes: `sample_body` plus a
/// padding string field.
pub fn padded_body(event: &str, size: usize) -> anyhow::Result<Bytes> {
    let mut value = sample_body(event);
    let base = serde_json::to_vec(&value)?.len() + r#","padding":"""#.len();
    value["padding"] = json!("x".repeat(size.saturating_sub(base)));
    Ok(Bytes::from(serde_json::to_vec(&value)?))
}

/// Distinct bodies to cycle through (each has its own uuids), at most
/// ~64 MiB of them.
pub fn body_pool(event: &str, size: usize, wanted: usize) -> anyhow::Result<Vec<Bytes>> {
    let count = (64 << 20) / size.max(1);
    (0..wanted.clamp(1, count.clamp(1, 256)))
        .map(|_| padded_body(event, size))
        .collect()
}

/// One signed delivery, ready to send.
#[derive(Clone)]
pub struct Signed {
    pub id: HeaderValue,
    pub timestamp: HeaderValue,
    pub signature: HeaderValue,
    pub body: Bytes,
}

pub fn read_secret(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{}: no secret", path.display()))
}

pub fn presign(secret: &str, bodies: &[Bytes], count: usize) -> anyhow::Result<Vec<Signed>> {
    let timestamp = (ocrolus_relay::now_ms() / 1000).to_string();
    let ts = HeaderValue::from_str(&timestamp)?;
    (0..count)
        .map(|i| {
            let body = bodies[i % bodies.len()].clone();
            let id = uuid::Uuid::now_v7().to_string();
            let sig = hex::encode(sign(secret.as_bytes(), &timestamp, &id, &body));
            Ok(Signed {
                id: HeaderValue::from_str(&id)?,
                timestamp: ts.clone(),
                signature: HeaderValue::from_str(&sig)?,
                body,
            })
        })
        .collect()
}

/// What one delivery came back as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Status(u16),
    /// 200 whose body says "spooled" (not confirmed by the broker).
    Spooled,
    Error,
}

impl Outcome {
    pub fn label(self) -> String {
        match self {
            Self::Status(s) => s.to_string(),
            Self::Spooled => "200_spooled".into(),
            Self::Error => "error".into(),
        }
    }
}

/// Per-worker tallies, merged at the end.
pub struct Tally {
    pub hist: Histogram<u64>,
    pub outcomes: BTreeMap<Outcome, u64>,
    pub max_lag: Duration,
}

impl Tally {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            outcomes: BTreeMap::new(),
            max_lag: Duration::ZERO,
        })
    }

    pub fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.hist.add(&other.hist)?;
        for (k, v) in other.outcomes {
            *self.outcomes.entry(k).or_default() += v;
        }
        self.max_lag = self.max_lag.max(other.max_lag);
        Ok(())
    }
}

/// Hands out request indexes to the workers and, in open loop, says when
/// each one is due.
pub struct Plan {
    next: AtomicUsize,
    total: usize,
    pub start: Instant,
    deadline: Instant,
    interval: Option<Duration>,
    stopped: AtomicBool,
}

impl Plan {
    pub fn new(total: usize, rate: Option<f64>, duration: f64) -> Self {
        let start = Instant::now();
        Self {
            next: AtomicUsize::new(0),
            total,
            start,
            deadline: start + Duration::from_secs_f64(duration.max(0.1)),
            interval: rate
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            stopped: AtomicBool::new(false),
        }
    }

    /// The next index and its lag behind schedule, or None when done.
    pub async fn take(&self) -> Option<(usize, Duration)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i >= self.total || self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        let mut lag = Duration::ZERO;
        if let Some(interval) = self.interval {
            let due = self.start + interval.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
            let now = Instant::now();
            if due > now {
                tokio::time::sleep_until(due.into()).await;
            } else {
                lag = now - due;
            }
        }
        if Instant::now() >= self.deadline {
            self.stopped.store(true, Ordering::Relaxed);
            return None;
        }
        Some((i, lag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_bodies_have_the_asked_size_and_stay_valid_json() {
        for size in [1024, 65_536, 1 << 20] {
            let body = padded_body("document.verification_succeeded", size).expect("body");
            assert!(body.len().abs_diff(size) <= 2, "{size}: {}", body.len());
            let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(value["event_name"], "document.verification_succeeded");
        }
    }

    #[test]
    fn presigned_deliveries_verify_and_have_unique_ids() {
        let bodies = body_pool("book.verified", 1024, 4).expect("bodies");
        let signed = presign("0123456789abcdef0123", &bodies, 8).expect("presign");
        let ids: std::collections::HashSet<_> = signed.iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids.len(), 8);
        let d = &signed[0];
        let expected = hex::encode(sign(
            b"0123456789abcdef0123",
            d.timestamp.to_str().expect("ts"),
            d.id.to_str().expect("id"),
            &d.body,
        ));
        assert_eq!(d.signature.to_str().expect("sig"), expected);
    }
}
