//! The spool's store thread: the only owner of the redb database. It commits
//! whatever writes have queued up in one transaction, so concurrent requests
//! share an fsync (group commit), and serves the reads. Because it alone
//! holds the database it can close and reopen it after an I/O error (disk
//! full, say): redb refuses all work after one (`PreviousIo`), and without a
//! reopen a moment of full disk would turn every later event into a 503
//! until restart. Records are postcard-encoded [`Envelope`]s keyed by
//! arrival order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::{SpoolError, SpoolStats, storage};
use crate::event::Envelope;
use crate::metrics::Metrics;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const FILE_NAME: &str = "spool.redb";
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;

pub(super) type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// Work for the store thread.
pub(super) enum Op {
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

/// Opens (or creates) the database in `dir` and starts the store thread.
/// Returns the queue to it and the counts it keeps in step.
pub(super) fn start(
    dir: &Path,
    metrics: Arc<Metrics>,
) -> Result<(mpsc::Sender<Op>, Arc<Mutex<SpoolStats>>), SpoolError> {
    let db = open_db(dir)?;
    let stats = Arc::new(Mutex::new(scan(&db)?));
    let next_key = last_key(&db).map_err(storage)?.map_or(0, |k| k + 1);
    let store = Store {
        path: dir.join(FILE_NAME),
        db: Some(db),
        next_key,
        metrics,
    };
    let (ops, queue) = mpsc::channel(MAX_BATCH * 4);
    let counts = stats.clone();
    std::thread::Builder::new()
        .name("spool-store".into())
        .spawn(move || store.run(queue, counts))
        .map_err(storage)?;
    Ok((ops, stats))
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
pub(super) struct RecordHead {
    pub(super) id: String,
    _routing_key: String,
    _event_name: String,
    _ocrolus_timestamp: Option<String>,
    _client_ip: String,
    pub(super) received_at_ms: i64,
}

impl RecordHead {
    pub(super) fn decode(record: &[u8]) -> Option<Self> {
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
