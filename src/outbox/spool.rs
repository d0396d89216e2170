//! Pipeline step 12: the durable local outbox. An event the broker did not
//! confirm is written here and fsynced before the relay answers 200. This
//! module is pure storage: it knows nothing of the broker; the drainer in
//! [`super::drain`] decides what leaves it.
//!
//! Storage is redb: an embedded, pure-Rust, ACID store whose commits are
//! fsynced (crash-safe under `kill -9` and power loss, no server to run),
//! owned by one thread ([`store`]). The spool is bounded by bytes and by
//! count; when full, it refuses instead of dropping, and the request gets
//! 503 so Ocrolus retries.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::SpoolConfig;
use crate::event::Envelope;
use crate::metrics::Metrics;

mod store;

pub use store::SpoolFile;
use store::{Op, Reply};

#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full")]
    Full,
    #[error("spool storage failed: {0}")]
    Storage(String),
    #[error("spool is closed")]
    Closed,
}

fn storage<E: std::fmt::Display>(e: E) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

/// Counts kept in memory so admission never touches the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub messages: u64,
    pub bytes: u64,
    /// `received_at_ms` of the oldest event, if any.
    pub oldest_ms: Option<i64>,
}

pub struct Spool {
    ops: mpsc::Sender<Op>,
    stats: Arc<Mutex<SpoolStats>>,
    config: SpoolConfig,
    metrics: Arc<Metrics>,
    /// Wakes the drainer when something was spooled.
    spooled: Notify,
}

impl Spool {
    /// Opens (or creates) the spool and starts its store thread.
    pub fn open(config: SpoolConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, SpoolError> {
        let (ops, stats) = store::start(&config.dir, metrics.clone())?;
        let spool = Arc::new(Self {
            ops,
            stats,
            config,
            metrics,
            spooled: Notify::new(),
        });
        spool.refresh_gauges();
        Ok(spool)
    }

    pub fn stats(&self) -> SpoolStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True while one more typical event fits.
    pub fn has_room(&self) -> bool {
        let s = self.stats();
        s.messages < self.config.max_events && s.bytes < self.config.max_bytes
    }

    /// Stores one event durably (fsynced) or says why not.
    pub async fn append(&self, envelope: &Envelope) -> Result<(), SpoolError> {
        let record = postcard::to_stdvec(envelope).map_err(storage)?;
        let len = record.len() as u64;
        {
            let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            if s.messages + 1 > self.config.max_events || s.bytes + len > self.config.max_bytes {
                return Err(SpoolError::Full);
            }
            // Reserve now so concurrent appends cannot overshoot the bound.
            s.messages += 1;
            s.bytes += len;
            s.oldest_ms.get_or_insert(envelope.received_at_ms);
        }
        let result = self.submit(|done| Op::Append(record, done)).await;
        if result.is_err() {
            let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            s.messages = s.messages.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(len);
            self.metrics.spool_errors.inc();
        } else {
            self.spooled.notify_one();
        }
        self.refresh_gauges();
        result
    }

    async fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, SpoolError> {
        let (done, answer) = oneshot::channel();
        self.ops
            .send(make(done))
            .await
            .map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Closes the database file and stops the store thread, so that the
    /// file lock is released when shutdown returns (not whenever the last
    /// handle happens to be dropped): a restart in the same process, or the
    /// `spool` subcommand right after, can open it. Appends after this fail
    /// with [`SpoolError::Closed`], which is a 503, never a 200.
    pub async fn close(&self) {
        let _ = self.submit(Op::Close).await;
    }

    /// The oldest `limit` events, in arrival order.
    pub async fn peek(&self, limit: usize) -> Result<Vec<(u64, Envelope)>, SpoolError> {
        let result = self.submit(|done| Op::Read(limit, done)).await;
        if result.is_err() {
            self.metrics.spool_errors.inc();
        }
        result
    }

    /// Resolves once an event was appended since the last call.
    pub async fn appended(&self) {
        self.spooled.notified().await;
    }

    /// Removes events by key.
    pub async fn remove(&self, keys: Vec<u64>) -> Result<(), SpoolError> {
        let result = self.submit(|done| Op::Remove(keys, done)).await;
        if result.is_err() {
            self.metrics.spool_errors.inc();
        }
        self.refresh_gauges();
        result
    }

    /// Delivery ids currently spooled (for de-duplication after a restart).
    pub async fn ids(&self) -> Result<Vec<String>, SpoolError> {
        self.submit(Op::Ids).await
    }

    /// Sets the spool gauges from the counts (the oldest age moves with
    /// the clock, so the drainer refreshes it while it waits).
    pub fn refresh_gauges(&self) {
        let s = self.stats();
        let m = &self.metrics;
        m.spool_messages
            .set(i64::try_from(s.messages).unwrap_or(i64::MAX));
        m.spool_bytes
            .set(i64::try_from(s.bytes).unwrap_or(i64::MAX));
        m.spool_max_messages
            .set(i64::try_from(self.config.max_events).unwrap_or(i64::MAX));
        m.spool_max_bytes
            .set(i64::try_from(self.config.max_bytes).unwrap_or(i64::MAX));
        let age = s
            .oldest_ms
            .map_or(0, |oldest| (crate::now_ms() - oldest).max(0) / 1000);
        m.spool_oldest_age.set(age);
    }
}

#[cfg(test)]
mod tests;
