//! Pipeline step 12: the durable local outbox. An event the broker did not
//! confirm is written here and fsynced before the relay answers 200; a
//! drainer republishes spooled events in arrival order once the broker is
//! back, removing each only after its confirm.
//!
//! Storage is redb: an embedded, pure-Rust, ACID store whose commits are
//! fsynced (crash-safe under `kill -9` and power loss, no server to run). One
//! writer thread owns all writes and commits whatever has queued up in one
//! transaction, so concurrent requests share an fsync (group commit). The
//! spool is bounded by bytes and by count; when full, it refuses instead of
//! dropping, and the request gets 503 so Ocrolus retries.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::{Backoff, Broker};
use crate::config::SpoolConfig;
use crate::event::Envelope;
use crate::metrics::Metrics;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const FILE_NAME: &str = "spool.redb";
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Events read per drain round.
const DRAIN_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full")]
    Full,
    #[error("spool storage failed: {0}")]
    Storage(String),
    #[error("spool is closed")]
    Closed,
}

impl SpoolError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Full => "spool_full",
            Self::Storage(_) | Self::Closed => "spool_failed",
        }
    }
}

fn storage<E: std::fmt::Display>(e: E) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

enum Write {
    Append(Vec<u8>, oneshot::Sender<Result<(), SpoolError>>),
    Remove(Vec<u64>, oneshot::Sender<Result<(), SpoolError>>),
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
    db: Arc<Database>,
    writes: mpsc::Sender<Write>,
    stats: Arc<Mutex<SpoolStats>>,
    config: SpoolConfig,
    metrics: Arc<Metrics>,
    /// Wakes the drainer when something was spooled.
    spooled: Arc<Notify>,
}

impl Spool {
    /// Opens (or creates) the spool and starts its writer thread.
    pub fn open(config: SpoolConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, SpoolError> {
        let db = Arc::new(open_db(&config.dir)?);
        let stats = Arc::new(Mutex::new(scan(&db)?));
        let (writes, queue) = mpsc::channel(MAX_BATCH * 4);
        let spool = Arc::new(Self {
            db: db.clone(),
            writes,
            stats: stats.clone(),
            config,
            metrics,
            spooled: Arc::new(Notify::new()),
        });
        spool.publish_stats();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer(db, queue, stats))
            .map_err(storage)?;
        Ok(spool)
    }

    pub fn stats(&self) -> SpoolStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

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
        let result = self.submit(|done| Write::Append(record, done)).await;
        if result.is_err() {
            let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            s.messages = s.messages.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(len);
            self.metrics.spool_errors.inc();
        } else {
            self.spooled.notify_one();
        }
        self.publish_stats();
        result
    }

    async fn submit(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), SpoolError>>) -> Write,
    ) -> Result<(), SpoolError> {
        let (done, answer) = oneshot::channel();
        self.writes
            .send(make(done))
            .await
            .map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// The oldest `limit` events, in arrival order.
    pub async fn peek(&self, limit: usize) -> Result<Vec<(u64, Envelope)>, SpoolError> {
        let db = self.db.clone();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || read_first(&db, limit, &metrics))
            .await
            .map_err(storage)?
    }

    /// Removes confirmed events.
    pub async fn remove(&self, keys: Vec<u64>) -> Result<(), SpoolError> {
        let result = self.submit(|done| Write::Remove(keys, done)).await;
        if result.is_err() {
            self.metrics.spool_errors.inc();
        }
        self.publish_stats();
        result
    }

    /// Delivery ids currently spooled (for de-duplication after a restart).
    pub async fn ids(&self) -> Result<Vec<String>, SpoolError> {
        Ok(self
            .peek(usize::MAX)
            .await?
            .into_iter()
            .map(|(_, e)| e.id)
            .collect())
    }

    fn publish_stats(&self) {
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

    /// Republishes spooled events, oldest first, whenever the broker is up.
    /// Each event leaves the spool only after its confirm.
    pub async fn drain(self: Arc<Self>, broker: Arc<Broker>, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            self.publish_stats();
            let idle = self.stats().messages == 0 || !broker.is_up();
            if idle {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.spooled.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            let batch = match self.peek(DRAIN_BATCH).await {
                Ok(batch) => batch,
                Err(e) => {
                    error!(error = %e, "spool read failed");
                    self.metrics.spool_errors.inc();
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            let mut confirmed = Vec::with_capacity(batch.len());
            let mut failure = None;
            for (key, envelope) in &batch {
                if shutdown.is_cancelled() {
                    break;
                }
                match broker.publish_ordered(envelope).await {
                    Ok(()) => confirmed.push(*key),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let drained = confirmed.len() as u64;
            if drained > 0 {
                match self.remove(confirmed).await {
                    Ok(()) => {
                        self.metrics.spool_drained.inc_by(drained);
                        info!(drained, left = self.stats().messages, "spool drained");
                        backoff.reset();
                    }
                    Err(e) => {
                        error!(error = %e, "spool remove failed; events may be published twice")
                    }
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            if let Some(e) = failure {
                warn!(error = %e, "spool drain paused");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

fn open_db(dir: &Path) -> Result<Database, SpoolError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| SpoolError::Storage(format!("spool dir {}: {e}", dir.display())))?;
    let path: PathBuf = dir.join(FILE_NAME);
    let db = Database::create(&path)
        .map_err(|e| SpoolError::Storage(format!("spool {}: {e}", path.display())))?;
    let txn = db.begin_write().map_err(storage)?;
    txn.open_table(EVENTS).map_err(storage)?;
    txn.commit().map_err(storage)?;
    Ok(db)
}

fn scan(db: &Database) -> Result<SpoolStats, SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(EVENTS).map_err(storage)?;
    let mut stats = SpoolStats::default();
    for row in table.iter().map_err(storage)? {
        let (_, value) = row.map_err(storage)?;
        stats.messages += 1;
        stats.bytes += value.value().len() as u64;
        if stats.oldest_ms.is_none() {
            stats.oldest_ms = postcard::from_bytes::<Envelope>(value.value())
                .ok()
                .map(|e| e.received_at_ms);
        }
    }
    Ok(stats)
}

fn read_first(
    db: &Database,
    limit: usize,
    metrics: &Metrics,
) -> Result<Vec<(u64, Envelope)>, SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(EVENTS).map_err(storage)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(storage)?.take(limit) {
        let (key, value) = row.map_err(storage)?;
        match postcard::from_bytes::<Envelope>(value.value()) {
            Ok(envelope) => out.push((key.value(), envelope)),
            Err(e) => {
                error!(key = key.value(), error = %e, "undecodable spool record; it stays in the spool file");
                metrics.spool_errors.inc();
            }
        }
    }
    Ok(out)
}

/// The single writer: commits every queued write in one transaction.
fn writer(db: Arc<Database>, mut queue: mpsc::Receiver<Write>, stats: Arc<Mutex<SpoolStats>>) {
    let mut next_key = match last_key(&db) {
        Ok(k) => k.map_or(0, |k| k + 1),
        Err(e) => {
            error!(error = %e, "spool unreadable; refusing writes");
            while let Some(w) = queue.blocking_recv() {
                reply(w, Err(SpoolError::Storage("spool unreadable".into())));
            }
            return;
        }
    };
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let result = commit(&db, &batch, &mut next_key);
        match result {
            Ok(snapshot) => {
                if let Some((removed_bytes, removed, oldest)) = snapshot {
                    let mut s = stats.lock().unwrap_or_else(PoisonError::into_inner);
                    s.messages = s.messages.saturating_sub(removed);
                    s.bytes = s.bytes.saturating_sub(removed_bytes);
                    s.oldest_ms = oldest;
                }
                for w in batch {
                    reply(w, Ok(()));
                }
            }
            Err(e) => {
                error!(error = %e, "spool commit failed");
                for w in batch {
                    reply(w, Err(SpoolError::Storage(e.clone())));
                }
            }
        }
    }
}

type Removed = Option<(u64, u64, Option<i64>)>;

fn commit(db: &Database, batch: &[Write], next_key: &mut u64) -> Result<Removed, String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let mut removed_bytes = 0;
    let mut removed = 0;
    let mut any_removed = false;
    let key_before = *next_key;
    let oldest = {
        let mut table = txn.open_table(EVENTS).map_err(|e| e.to_string())?;
        for w in batch {
            match w {
                Write::Append(record, _) => {
                    table
                        .insert(*next_key, record.as_slice())
                        .map_err(|e| e.to_string())?;
                    *next_key += 1;
                }
                Write::Remove(keys, _) => {
                    any_removed = true;
                    for key in keys {
                        if let Some(old) = table.remove(key).map_err(|e| e.to_string())? {
                            removed_bytes += old.value().len() as u64;
                            removed += 1;
                        }
                    }
                }
            }
        }
        let first = table.first().map_err(|e| e.to_string())?;
        first.and_then(|(_, v)| {
            postcard::from_bytes::<Envelope>(v.value())
                .ok()
                .map(|e| e.received_at_ms)
        })
    };
    if let Err(e) = txn.commit() {
        *next_key = key_before;
        return Err(e.to_string());
    }
    Ok(any_removed.then_some((removed_bytes, removed, oldest)))
}

fn last_key(db: &Database) -> Result<Option<u64>, SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(EVENTS).map_err(storage)?;
    Ok(table.last().map_err(storage)?.map(|(k, _)| k.value()))
}

fn reply(w: Write, result: Result<(), SpoolError>) {
    let done = match w {
        Write::Append(_, done) | Write::Remove(_, done) => done,
    };
    let _ = done.send(result);
}

/// Read-only access for the `spool` subcommand.
pub struct SpoolFile {
    db: Database,
}

impl SpoolFile {
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        Ok(Self { db: open_db(dir)? })
    }

    pub fn stats(&self) -> Result<SpoolStats, SpoolError> {
        scan(&self.db)
    }

    pub fn list(&self, limit: usize) -> Result<Vec<(u64, Envelope)>, SpoolError> {
        read_first(&self.db, limit, &Metrics::new())
    }

    pub fn remove(&self, keys: &[u64]) -> Result<(), SpoolError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(EVENTS).map_err(storage)?;
            for key in keys {
                table.remove(key).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)
    }
}

#[cfg(test)]
mod tests;
