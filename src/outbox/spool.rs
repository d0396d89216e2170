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
//!
//! Records the drainer must not deliver (unreadable, or refused by the
//! broker and not dead-lettered) move to a quarantine table with their bytes:
//! never dropped, never in the drain's way. A spool file that is not a
//! readable database at all is moved aside at start ([`Spool::open`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, mpsc, oneshot};
use tracing::error;

use crate::config::SpoolConfig;
use crate::event::Envelope;
use crate::metrics::Metrics;

mod record;
mod store;

pub use record::Quarantined;
pub use store::FILE_NAME;
pub use store::SpoolFile;
use store::{Op, Reply};

#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full")]
    Full,
    #[error("spool storage failed: {0}")]
    Storage(String),
    /// The file is not a readable database (not redb, truncated, damaged).
    #[error("spool file is corrupt: {0}")]
    Corrupt(String),
    #[error("spool is closed")]
    Closed,
    /// Another process (a running relay) holds the file.
    #[error("spool file {0} is locked by another process (a running relay)")]
    Locked(String),
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
    /// Records in quarantine (not counted above: they wait for an operator,
    /// not for the broker).
    pub quarantined: u64,
    pub quarantined_bytes: u64,
}

/// Room taken in the counts for one append before its commit, so that
/// concurrent appends cannot overshoot the bound. Given back on drop unless
/// the commit kept it: however the append ends (commit failed, store
/// closed, the request cancelled while it waited) the counts stay exact.
pub(super) struct Reservation {
    stats: Arc<Mutex<SpoolStats>>,
    bytes: u64,
    kept: bool,
}

impl Reservation {
    fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.kept {
            let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            s.messages = s.messages.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(self.bytes);
            if s.messages == 0 {
                s.oldest_ms = None;
            }
        }
    }
}

pub struct Spool {
    ops: mpsc::Sender<Op>,
    stats: Arc<Mutex<SpoolStats>>,
    config: SpoolConfig,
    metrics: Arc<Metrics>,
    /// Wakes the drainer when something was spooled.
    spooled: Notify,
    /// Wakes the drainer when an operator asks for a drain now.
    drain_requested: Notify,
}

impl Spool {
    /// Opens (or creates) the spool and starts its store thread. A spool
    /// file that is not a readable database is renamed aside (its name
    /// logged, `spool_files_moved_aside` raised) and a fresh spool starts:
    /// a relay that refused to start would lose every new event after
    /// Ocrolus' three retries, while the moved file keeps what it holds for
    /// recovery. Any other failure (locked by another relay, permissions,
    /// disk) refuses to start.
    pub fn open(config: SpoolConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, SpoolError> {
        let (ops, stats) = match store::start(&config.dir, metrics.clone()) {
            Err(SpoolError::Corrupt(reason)) => {
                let moved = move_aside(&config.dir)?;
                error!(
                    %reason,
                    moved_to = %moved.display(),
                    "the spool file is not a readable database: moved aside, starting with a fresh spool. \
                     Events in the moved file are NOT delivered; keep it for recovery and remove it once handled"
                );
                store::start(&config.dir, metrics.clone())?
            }
            opened => opened?,
        };
        metrics
            .spool_files_moved_aside
            .set(i64::try_from(moved_aside(&config.dir)).unwrap_or(i64::MAX));
        let spool = Arc::new(Self {
            ops,
            stats,
            config,
            metrics,
            spooled: Notify::new(),
            drain_requested: Notify::new(),
        });
        spool.refresh_gauges();
        Ok(spool)
    }

    pub fn stats(&self) -> SpoolStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The directory, bounds and maxima the spool was opened with.
    pub fn config(&self) -> &SpoolConfig {
        &self.config
    }

    /// True while one more typical event fits.
    pub fn has_room(&self) -> bool {
        let s = self.stats();
        s.messages < self.config.max_events && s.bytes < self.config.max_bytes
    }

    /// Stores one event durably (fsynced) or says why not.
    pub async fn append(&self, envelope: &Envelope) -> Result<(), SpoolError> {
        let record = record::encode(envelope).map_err(storage)?;
        let reservation = self.reserve(record.len() as u64, envelope.received_at_ms)?;
        let result = self
            .submit(|done| Op::Append(record, reservation, done))
            .await;
        if result.is_ok() {
            self.spooled.notify_one();
        }
        self.refresh_gauges();
        result
    }

    fn reserve(&self, bytes: u64, received_at_ms: i64) -> Result<Reservation, SpoolError> {
        let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        if s.messages + 1 > self.config.max_events || s.bytes + bytes > self.config.max_bytes {
            return Err(SpoolError::Full);
        }
        s.messages += 1;
        s.bytes += bytes;
        s.oldest_ms.get_or_insert(received_at_ms);
        Ok(Reservation {
            stats: self.stats.clone(),
            bytes,
            kept: false,
        })
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
        self.peek_after(None, limit).await
    }

    /// Up to `limit` events with a key above `after`, in arrival order.
    /// Unreadable records met on the way are moved to quarantine.
    pub async fn peek_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Envelope)>, SpoolError> {
        let result = self.submit(|done| Op::Read { after, limit, done }).await;
        if result.is_err() {
            self.metrics.spool_errors.inc();
        }
        self.refresh_gauges();
        result
    }

    /// Moves events to quarantine, each with its reason.
    pub async fn quarantine(&self, moves: Vec<(u64, String)>) -> Result<(), SpoolError> {
        let result = self.submit(|done| Op::Quarantine(moves, done)).await;
        self.refresh_gauges();
        result
    }

    /// The oldest `limit` quarantined records.
    pub async fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, SpoolError> {
        self.submit(|done| Op::ReadQuarantine(limit, done)).await
    }

    /// Moves up to `limit` readable quarantined records back into the
    /// spool (an operator fixed what refused them) and wakes the drainer;
    /// returns how many moved. They count in the spool again, beyond its
    /// bounds if need be: they are on disk already.
    pub async fn requeue_quarantined(&self, limit: usize) -> Result<u64, SpoolError> {
        let result = self.submit(|done| Op::Requeue(limit, done)).await;
        if matches!(result, Ok(moved) if moved > 0) {
            self.spooled.notify_one();
        }
        self.refresh_gauges();
        result
    }

    /// Resolves once an event was appended since the last call.
    pub async fn appended(&self) {
        self.spooled.notified().await;
    }

    /// Asks the drainer for a round now: it stops waiting out its backoff
    /// and tries refused events at once (`POST /spool/drain`). Remembered
    /// if the drainer is busy, so a request during a round is not lost.
    pub fn request_drain(&self) {
        self.drain_requested.notify_one();
    }

    /// Resolves once a drain was requested since the last call.
    pub async fn drain_requested(&self) {
        self.drain_requested.notified().await;
    }

    /// Removes events by key.
    pub async fn remove(&self, keys: Vec<u64>) -> Result<(), SpoolError> {
        let result = self.submit(|done| Op::Remove(keys, done)).await;
        self.refresh_gauges();
        result
    }

    /// Delivery ids currently spooled, each as `(source, id)` (for
    /// de-duplication after a restart).
    pub async fn ids(&self) -> Result<Vec<(String, String)>, SpoolError> {
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
        m.spool_quarantined_messages
            .set(i64::try_from(s.quarantined).unwrap_or(i64::MAX));
    }
}

/// Renames the spool file to `spool.redb.corrupt-<unix ms>` next to it.
fn move_aside(dir: &Path) -> Result<PathBuf, SpoolError> {
    let from = dir.join(FILE_NAME);
    let to = dir.join(format!("{FILE_NAME}.corrupt-{}", crate::now_ms()));
    std::fs::rename(&from, &to).map_err(|e| {
        SpoolError::Storage(format!(
            "the spool file {} is corrupt and could not be moved aside ({e}); move or remove it by hand",
            from.display()
        ))
    })?;
    Ok(to)
}

/// Files moved aside by [`move_aside`] and still present.
fn moved_aside(dir: &Path) -> usize {
    let prefix = format!("{FILE_NAME}.corrupt-");
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .count()
    })
}

#[cfg(test)]
mod tests;
