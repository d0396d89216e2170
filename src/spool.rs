//! Pipeline step 12: the durable local outbox. An event the broker did not
//! confirm is written here and fsynced before the relay answers 200; a
//! drainer republishes spooled events in arrival order once the broker is
//! back, removing each only after its confirm.
//!
//! Storage is redb: an embedded, pure-Rust, ACID store whose commits are
//! fsynced (crash-safe under `kill -9` and power loss, no server to run). One
//! store thread owns the database: it commits whatever writes have queued up
//! in one transaction, so concurrent requests share an fsync (group commit),
//! and it serves the drainer's reads. Because it alone holds the database it
//! can close and reopen it after an I/O error (disk full, say): redb refuses
//! all work after one (`PreviousIo`), and without a reopen a moment of full
//! disk would turn every later event into a 503 until restart. The spool is
//! bounded by bytes and by count; when full, it refuses instead of dropping,
//! and the request gets 503 so Ocrolus retries.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::broker::Broker;
use crate::config::SpoolConfig;
use crate::event::Envelope;
use crate::metrics::Metrics;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const FILE_NAME: &str = "spool.redb";
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Events read per drain round.
const DRAIN_BATCH: usize = 256;

#[derive(Debug, Clone, thiserror::Error)]
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

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// Work for the store thread.
enum Op {
    Append(Vec<u8>, Reply<()>),
    Remove(Vec<u64>, Reply<()>),
    /// The oldest `n` events. Reads go through the store thread too, so that
    /// nothing else holds the database when it has to be reopened.
    Read(usize, Reply<Vec<(u64, Envelope)>>),
    /// Every spooled delivery id, decoded without the bodies.
    Ids(Reply<Vec<String>>),
    /// Close the database and stop: later operations fail with `Closed`.
    Close(Reply<()>),
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
    spooled: Arc<Notify>,
}

impl Spool {
    /// Opens (or creates) the spool and starts its store thread.
    pub fn open(config: SpoolConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, SpoolError> {
        let db = open_db(&config.dir)?;
        let stats = Arc::new(Mutex::new(scan(&db)?));
        let next_key = last_key(&db).map_err(storage)?.map_or(0, |k| k + 1);
        let store = Store {
            path: config.dir.join(FILE_NAME),
            db: Some(db),
            next_key,
            metrics: metrics.clone(),
        };
        let (ops, queue) = mpsc::channel(MAX_BATCH * 4);
        let spool = Arc::new(Self {
            ops,
            stats: stats.clone(),
            config,
            metrics,
            spooled: Arc::new(Notify::new()),
        });
        spool.publish_stats();
        std::thread::Builder::new()
            .name("spool-store".into())
            .spawn(move || store.run(queue, stats))
            .map_err(storage)?;
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
        self.publish_stats();
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
        self.submit(|done| Op::Read(limit, done)).await
    }

    /// Removes confirmed events.
    pub async fn remove(&self, keys: Vec<u64>) -> Result<(), SpoolError> {
        let result = self.submit(|done| Op::Remove(keys, done)).await;
        if result.is_err() {
            self.metrics.spool_errors.inc();
        }
        self.publish_stats();
        result
    }

    /// Delivery ids currently spooled (for de-duplication after a restart).
    pub async fn ids(&self) -> Result<Vec<String>, SpoolError> {
        self.submit(Op::Ids).await
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
    /// Each event leaves the spool only after its confirm. Confirmed events
    /// that could not be removed (storage failing) are removed before
    /// anything else is published: republishing them round after round
    /// would flood subscribers with duplicates.
    pub async fn drain(self: Arc<Self>, broker: Arc<Broker>, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut unremoved: Vec<u64> = Vec::new();
        loop {
            self.publish_stats();
            let idle = self.stats().messages == 0 || !broker.is_up();
            if idle {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.spooled.notified() => {}
                    _ = broker.became_up() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            let result = if unremoved.is_empty() {
                self.drain_batch(&broker, &shutdown, &mut unremoved).await
            } else {
                self.remove_confirmed(&mut unremoved).await
            };
            if shutdown.is_cancelled() {
                if !unremoved.is_empty() {
                    warn!(
                        events = unremoved.len(),
                        "confirmed events still in the spool; they will be published again"
                    );
                }
                return;
            }
            match result {
                Ok(()) => backoff.reset(),
                Err(reason) => {
                    warn!(%reason, "spool drain paused");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// Publishes up to one batch in order, stopping at the first failure.
    async fn drain_batch(
        &self,
        broker: &Broker,
        shutdown: &CancellationToken,
        unremoved: &mut Vec<u64>,
    ) -> Result<(), String> {
        let batch = self.peek(DRAIN_BATCH).await.map_err(|e| {
            self.metrics.spool_errors.inc();
            format!("spool read failed: {e}")
        })?;
        let mut failure = None;
        for (key, envelope) in &batch {
            if shutdown.is_cancelled() {
                break;
            }
            match broker.publish_ordered(envelope).await {
                Ok(()) => unremoved.push(*key),
                Err(e) => {
                    failure = Some(format!("publish failed: {e}"));
                    break;
                }
            }
        }
        if !unremoved.is_empty() {
            self.remove_confirmed(unremoved).await?;
        }
        failure.map_or(Ok(()), Err)
    }

    async fn remove_confirmed(&self, unremoved: &mut Vec<u64>) -> Result<(), String> {
        let drained = unremoved.len() as u64;
        match self.remove(unremoved.clone()).await {
            Ok(()) => {
                unremoved.clear();
                self.metrics.spool_drained.inc_by(drained);
                info!(drained, left = self.stats().messages, "spool drained");
                Ok(())
            }
            Err(e) => {
                error!(error = %e, events = drained, "confirmed events cannot be removed from the spool");
                Err(format!("spool remove failed: {e}"))
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
            stats.oldest_ms = RecordHead::decode(value.value()).map(|h| h.received_at_ms);
        }
    }
    Ok(stats)
}

fn read_first(
    db: &Database,
    limit: usize,
    metrics: &Metrics,
) -> Result<Vec<(u64, Envelope)>, redb::Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(EVENTS)?;
    let mut out = Vec::new();
    for row in table.iter()?.take(limit) {
        let (key, value) = row?;
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

/// The fields of an [`Envelope`] record before its body. postcard encodes
/// fields in order, so these decode without copying the body (up to the
/// body limit) on every commit or id scan.
#[derive(serde::Deserialize)]
struct RecordHead {
    id: String,
    _routing_key: String,
    _event_name: String,
    _ocrolus_timestamp: Option<String>,
    _client_ip: String,
    received_at_ms: i64,
}

impl RecordHead {
    fn decode(record: &[u8]) -> Option<Self> {
        postcard::take_from_bytes::<Self>(record)
            .ok()
            .map(|(head, _)| head)
    }
}

fn read_ids(db: &Database) -> Result<Vec<String>, redb::Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(EVENTS)?;
    let mut ids = Vec::new();
    for row in table.iter()? {
        let (_, value) = row?;
        if let Some(head) = RecordHead::decode(value.value()) {
            ids.push(head.id);
        }
    }
    Ok(ids)
}

/// The store thread's state: the only owner of the database.
struct Store {
    path: PathBuf,
    /// `None` after an I/O error closed it; reopened on the next operation.
    db: Option<Database>,
    next_key: u64,
    metrics: Arc<Metrics>,
}

impl Store {
    /// Serves operations until every [`Spool`] handle is gone: all queued
    /// writes in one transaction, then the reads.
    fn run(mut self, mut queue: mpsc::Receiver<Op>, stats: Arc<Mutex<SpoolStats>>) {
        while let Some(first) = queue.blocking_recv() {
            let mut writes = Vec::new();
            let mut reads = Vec::new();
            let mut id_reads = Vec::new();
            let mut close = None;
            let mut next = Some(first);
            while let Some(op) = next.take() {
                match op {
                    Op::Read(limit, done) => reads.push((limit, done)),
                    Op::Ids(done) => id_reads.push(done),
                    Op::Close(done) => {
                        close = Some(done);
                        break;
                    }
                    write => writes.push(write),
                }
                if writes.len() < MAX_BATCH {
                    next = queue.try_recv().ok();
                }
            }
            if !writes.is_empty() {
                let result = self.write(&writes, &stats);
                for w in writes {
                    reply(w, result.clone());
                }
            }
            for (limit, done) in reads {
                let metrics = self.metrics.clone();
                let result = self.open().and_then(|db| read_first(db, limit, &metrics));
                let _ = done.send(result.map_err(|e| self.failed(e)));
            }
            for done in id_reads {
                let result = self.open().and_then(read_ids);
                let _ = done.send(result.map_err(|e| self.failed(e)));
            }
            if let Some(done) = close {
                // Dropping the database releases its file lock before the
                // answer; dropping the queue fails whatever comes later.
                self.db = None;
                drop(queue);
                let _ = done.send(Ok(()));
                return;
            }
        }
    }

    /// Commits `writes` in one transaction and keeps the counts in step.
    fn write(&mut self, writes: &[Op], stats: &Mutex<SpoolStats>) -> Result<(), SpoolError> {
        let result = match self.open() {
            Ok(_) => match &self.db {
                Some(db) => commit(db, writes, &mut self.next_key),
                None => Err(redb::Error::DatabaseClosed),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(snapshot) => {
                if let Some((removed_bytes, removed, oldest)) = snapshot {
                    let mut s = stats.lock().unwrap_or_else(PoisonError::into_inner);
                    s.messages = s.messages.saturating_sub(removed);
                    s.bytes = s.bytes.saturating_sub(removed_bytes);
                    s.oldest_ms = oldest;
                }
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "spool commit failed");
                Err(self.failed(e))
            }
        }
    }

    /// The database, reopened first if an I/O error closed it.
    fn open(&mut self) -> Result<&Database, redb::Error> {
        if self.db.is_none() {
            let db = Database::create(&self.path)?;
            let last = {
                let txn = db.begin_read()?;
                let table = txn.open_table(EVENTS)?;
                table.last()?.map(|(k, _)| k.value())
            };
            // Never reuse a key: arrival order is key order.
            self.next_key = self.next_key.max(last.map_or(0, |k| k + 1));
            info!(path = %self.path.display(), "spool reopened after an I/O error");
            self.db = Some(db);
        }
        self.db.as_ref().ok_or(redb::Error::DatabaseClosed)
    }

    /// After an I/O error redb refuses all further work (`PreviousIo`)
    /// until the database is closed and reopened: close it now, reopen on
    /// the next operation.
    fn failed(&mut self, e: redb::Error) -> SpoolError {
        if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) && self.db.take().is_some() {
            warn!(error = %e, "spool closed after an I/O error; reopening on next use");
        }
        SpoolError::Storage(e.to_string())
    }
}

type Removed = Option<(u64, u64, Option<i64>)>;

fn commit(db: &Database, batch: &[Op], next_key: &mut u64) -> Result<Removed, redb::Error> {
    let txn = db.begin_write()?;
    let mut removed_bytes = 0;
    let mut removed = 0;
    let mut any_removed = false;
    let key_before = *next_key;
    let written = (|| {
        let mut table = txn.open_table(EVENTS)?;
        for w in batch {
            match w {
                Op::Append(record, _) => {
                    table.insert(*next_key, record.as_slice())?;
                    *next_key += 1;
                }
                Op::Remove(keys, _) => {
                    any_removed = true;
                    for key in keys {
                        if let Some(old) = table.remove(key)? {
                            removed_bytes += old.value().len() as u64;
                            removed += 1;
                        }
                    }
                }
                Op::Read(..) | Op::Ids(_) | Op::Close(_) => {}
            }
        }
        let first = table.first()?;
        Ok::<_, redb::Error>(
            first.and_then(|(_, v)| RecordHead::decode(v.value()).map(|h| h.received_at_ms)),
        )
    })();
    let committed = written.and_then(|oldest| {
        txn.commit()?;
        Ok(oldest)
    });
    match committed {
        Ok(oldest) => Ok(any_removed.then_some((removed_bytes, removed, oldest))),
        Err(e) => {
            *next_key = key_before;
            Err(e)
        }
    }
}

fn last_key(db: &Database) -> Result<Option<u64>, redb::Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(EVENTS)?;
    Ok(table.last()?.map(|(k, _)| k.value()))
}

/// Answers a write (a read never reaches here).
fn reply(w: Op, result: Result<(), SpoolError>) {
    if let Op::Append(_, done) | Op::Remove(_, done) = w {
        let _ = done.send(result);
    }
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
        read_first(&self.db, limit, &Metrics::new()).map_err(storage)
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
