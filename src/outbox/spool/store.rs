//! The spool's store thread: the only owner of the redb database. It commits
//! whatever writes have queued up in one transaction, so concurrent requests
//! share an fsync (group commit), and serves the reads. Because it alone
//! holds the database it can close and reopen it after an I/O error (disk
//! full, say): redb refuses all work after one (`PreviousIo`), and without a
//! reopen a moment of full disk would turn every later event into a 503
//! until restart. Record layout and tables: [`super::record`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use redb::{Database, ReadableDatabase, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::record::{
    self, EVENTS_V1, QUARANTINE, Quarantined, RECORDS, RecordHead, decode_quarantine,
    encode_quarantine,
};
use super::{Reservation, SpoolError, SpoolStats, storage};
use crate::event::Envelope;
use crate::metrics::Metrics;

pub const FILE_NAME: &str = "spool.redb";
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;

pub(super) type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// Work for the store thread.
pub(super) enum Op {
    /// A record and the room it holds in the counts: kept once committed,
    /// given back however else the op ends (dropped unsent, commit failed).
    Append(Vec<u8>, Reservation, Reply<()>),
    Remove(Vec<u64>, Reply<()>),
    /// Moves records to the quarantine table, with a reason each.
    Quarantine(Vec<(u64, String)>, Reply<()>),
    /// Up to `limit` readable records with a key above `after`, oldest
    /// first. Unreadable ones met on the way are quarantined, so that no
    /// later read meets them again. Reads go through the store thread too,
    /// so that nothing else holds the database when it has to be reopened.
    Read {
        after: Option<u64>,
        limit: usize,
        done: Reply<Vec<(u64, Envelope)>>,
    },
    /// The oldest `n` quarantined records.
    ReadQuarantine(usize, Reply<Vec<Quarantined>>),
    /// Moves up to `n` readable quarantined records back into the spool,
    /// under their own keys, so the drainer tries them again in arrival
    /// order. Answers how many moved. Its own transaction.
    Requeue(usize, Reply<u64>),
    /// Every spooled delivery id with its source, decoded without the bodies.
    Ids(Reply<Vec<(String, String)>>),
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
    let next_key = next_key(&db).map_err(storage)?;
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

/// Opens (or creates) the database and converts a format-1 spool.
pub(super) fn open_db(dir: &Path) -> Result<Database, SpoolError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| SpoolError::Storage(format!("spool dir {}: {e}", dir.display())))?;
    let path: PathBuf = dir.join(FILE_NAME);
    let db = Database::create(&path).map_err(|e| {
        if matches!(e, redb::DatabaseError::DatabaseAlreadyOpen) {
            return SpoolError::Locked(path.display().to_string());
        }
        let e = redb::Error::from(e);
        if is_corruption(&e) {
            SpoolError::Corrupt(format!("{}: {e}", path.display()))
        } else {
            SpoolError::Storage(format!("spool {}: {e}", path.display()))
        }
    })?;
    let upgraded = upgrade(&db).map_err(|e| {
        if is_corruption(&e) {
            SpoolError::Corrupt(format!("{}: {e}", path.display()))
        } else {
            storage(e)
        }
    })?;
    if upgraded.converted > 0 {
        info!(
            records = upgraded.converted,
            "spool converted from record format 1 to format 2"
        );
    }
    if let Some((key, reason)) = upgraded.first_unreadable {
        error!(
            records = upgraded.unreadable,
            first_key = key,
            %reason,
            "unreadable format-1 spool records moved to quarantine (raw bytes kept; `ocrolus-relay spool list --quarantine`)"
        );
    }
    Ok(db)
}

/// Errors that mean the file is not a readable redb database (as opposed
/// to locked, unreachable or out of space).
fn is_corruption(e: &redb::Error) -> bool {
    match e {
        redb::Error::Corrupted(_) => true,
        redb::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// What converting a format-1 spool did.
#[derive(Default)]
struct Upgraded {
    converted: u64,
    unreadable: u64,
    first_unreadable: Option<(u64, String)>,
}

/// Creates the tables and moves format-1 records into `records` (or, when
/// unreadable, into `quarantine`) in one transaction.
fn upgrade(db: &Database) -> Result<Upgraded, redb::Error> {
    let txn = db.begin_write()?;
    let mut done = Upgraded::default();
    {
        let mut legacy = txn.open_table(EVENTS_V1)?;
        let mut records = txn.open_table(RECORDS)?;
        let mut quarantine = txn.open_table(QUARANTINE)?;
        let now = crate::now_ms();
        while let Some((key, value)) = legacy.pop_first()? {
            let (key, value) = (key.value(), value.value());
            match record::decode_v1(value) {
                Ok(_) => {
                    records.insert(key, record::upgrade_v1(value).as_slice())?;
                    done.converted += 1;
                }
                Err(e) => {
                    let reason = format!("unreadable (format 1): {e}");
                    let entry = encode_quarantine(&reason, now, value)
                        .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
                    quarantine.insert(key, entry.as_slice())?;
                    done.unreadable += 1;
                    done.first_unreadable.get_or_insert((key, reason));
                }
            }
        }
    }
    txn.commit()?;
    Ok(done)
}

fn scan(db: &Database) -> Result<SpoolStats, SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(RECORDS).map_err(storage)?;
    let mut stats = SpoolStats::default();
    for row in table.iter().map_err(storage)? {
        let (_, value) = row.map_err(storage)?;
        stats.messages += 1;
        stats.bytes += value.value().len() as u64;
        if stats.oldest_ms.is_none() {
            stats.oldest_ms = RecordHead::decode(value.value()).map(|h| h.received_at_ms);
        }
    }
    let quarantine = txn.open_table(QUARANTINE).map_err(storage)?;
    for row in quarantine.iter().map_err(storage)? {
        let (_, value) = row.map_err(storage)?;
        stats.quarantined += 1;
        stats.quarantined_bytes += record::quarantined_len(value.value());
    }
    Ok(stats)
}

/// Readable records after `after`, and the unreadable ones met on the way.
type Read = (Vec<(u64, Envelope)>, Vec<(u64, String)>);

fn read_after(db: &Database, after: Option<u64>, limit: usize) -> Result<Read, redb::Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(RECORDS)?;
    let rows = match after {
        Some(key) if key == u64::MAX => return Ok((Vec::new(), Vec::new())),
        Some(key) => table.range(key + 1..)?,
        None => table.range(0..)?,
    };
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for row in rows {
        if good.len() >= limit {
            break;
        }
        let (key, value) = row?;
        match record::decode(value.value()) {
            Ok(envelope) => good.push((key.value(), envelope)),
            Err(e) => bad.push((key.value(), format!("unreadable: {e}"))),
        }
    }
    Ok((good, bad))
}

fn read_quarantine(db: &Database, limit: usize) -> Result<Vec<Quarantined>, redb::Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(QUARANTINE)?;
    let mut out = Vec::new();
    for row in table.iter()?.take(limit) {
        let (key, value) = row?;
        out.push(decode_quarantine(key.value(), value.value()));
    }
    Ok(out)
}

/// What [`requeue`] moved back into the spool.
struct Requeued {
    events: u64,
    bytes: u64,
    /// The oldest spooled event afterwards.
    oldest_ms: Option<i64>,
}

/// Moves up to `limit` readable quarantined records back into `records`
/// under the keys they had (quarantine keeps them), so they rejoin the
/// spool in arrival order. Unreadable ones stay. The spool's bounds are
/// not applied: the records are on disk already.
fn requeue(db: &Database, limit: usize) -> Result<Requeued, redb::Error> {
    let txn = db.begin_write()?;
    let mut moved = Requeued {
        events: 0,
        bytes: 0,
        oldest_ms: None,
    };
    {
        let mut records = txn.open_table(RECORDS)?;
        let mut quarantine = txn.open_table(QUARANTINE)?;
        let mut back = Vec::new();
        for row in quarantine.iter()? {
            if back.len() >= limit {
                break;
            }
            let (key, value) = row?;
            let entry = decode_quarantine(key.value(), value.value());
            if entry.envelope.is_some() {
                back.push((entry.seq, entry.record));
            }
        }
        for (key, record) in back {
            records.insert(key, record.as_slice())?;
            quarantine.remove(key)?;
            moved.events += 1;
            moved.bytes += record.len() as u64;
        }
        moved.oldest_ms = records
            .first()?
            .and_then(|(_, v)| RecordHead::decode(v.value()).map(|h| h.received_at_ms));
    }
    txn.commit()?;
    Ok(moved)
}

fn read_ids(db: &Database) -> Result<Vec<(String, String)>, redb::Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(RECORDS)?;
    let mut ids = Vec::new();
    for row in table.iter()? {
        let (_, value) = row?;
        if let Some(head) = RecordHead::decode(value.value()) {
            ids.push((head.source, head.id));
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
    /// Serves operations until every [`super::Spool`] handle is gone: all
    /// queued writes in one transaction, then the reads.
    fn run(mut self, mut queue: mpsc::Receiver<Op>, stats: Arc<Mutex<SpoolStats>>) {
        while let Some(first) = queue.blocking_recv() {
            let mut writes = Vec::new();
            let mut reads = Vec::new();
            let mut close = None;
            let mut next = Some(first);
            while let Some(op) = next.take() {
                match op {
                    Op::Close(done) => {
                        close = Some(done);
                        break;
                    }
                    op @ (Op::Read { .. }
                    | Op::ReadQuarantine(..)
                    | Op::Ids(_)
                    | Op::Requeue(..)) => {
                        reads.push(op);
                    }
                    write => writes.push(write),
                }
                if writes.len() < MAX_BATCH {
                    next = queue.try_recv().ok();
                }
            }
            if !writes.is_empty() {
                self.write(writes, &stats);
            }
            for read in reads {
                self.read(read, &stats);
            }
            if let Some(done) = close {
                // Dropping the database releases its file lock before the
                // answer; dropping the queue fails whatever comes later
                // (and gives back the room of appends still queued).
                self.db = None;
                drop(queue);
                let _ = done.send(Ok(()));
                return;
            }
        }
    }

    fn read(&mut self, op: Op, stats: &Mutex<SpoolStats>) {
        match op {
            Op::Read { after, limit, done } => {
                let result = self.open().and_then(|db| read_after(db, after, limit));
                let result = match result {
                    Ok((good, bad)) => {
                        if !bad.is_empty() {
                            self.quarantine_unreadable(bad, stats);
                        }
                        Ok(good)
                    }
                    Err(e) => Err(self.failed(e)),
                };
                let _ = done.send(result);
            }
            Op::ReadQuarantine(limit, done) => {
                let result = self.open().and_then(|db| read_quarantine(db, limit));
                let _ = done.send(result.map_err(|e| self.failed(e)));
            }
            Op::Ids(done) => {
                let result = self.open().and_then(read_ids);
                let _ = done.send(result.map_err(|e| self.failed(e)));
            }
            Op::Requeue(limit, done) => {
                let result = self.open().and_then(|db| requeue(db, limit));
                let result = match result {
                    Ok(moved) => {
                        let mut s = stats.lock().unwrap_or_else(PoisonError::into_inner);
                        s.messages += moved.events;
                        s.bytes += moved.bytes;
                        s.quarantined = s.quarantined.saturating_sub(moved.events);
                        s.quarantined_bytes = s.quarantined_bytes.saturating_sub(moved.bytes);
                        if moved.events > 0 {
                            s.oldest_ms = moved.oldest_ms;
                        }
                        Ok(moved.events)
                    }
                    Err(e) => {
                        error!(error = %e, "moving quarantined records back into the spool failed");
                        self.metrics.spool_errors.inc();
                        Err(self.failed(e))
                    }
                };
                let _ = done.send(result);
            }
            Op::Append(..) | Op::Remove(..) | Op::Quarantine(..) | Op::Close(_) => {}
        }
    }

    /// Moves unreadable records out of the way. One log line per read,
    /// whatever the count: the records are gone from the drain afterwards.
    fn quarantine_unreadable(&mut self, bad: Vec<(u64, String)>, stats: &Mutex<SpoolStats>) {
        let count = bad.len() as u64;
        let first = bad.first().map(|(k, e)| (*k, e.clone()));
        let (done, answer) = oneshot::channel();
        self.write(vec![Op::Quarantine(bad, done)], stats);
        match answer.blocking_recv() {
            Ok(Ok(())) => {
                self.metrics
                    .spool_quarantined
                    .with_label_values(&["unreadable"])
                    .inc_by(count);
                if let Some((key, reason)) = first {
                    error!(
                        records = count,
                        first_key = key,
                        %reason,
                        "unreadable spool records moved to quarantine (raw bytes kept; `ocrolus-relay spool list --quarantine`)"
                    );
                }
            }
            Ok(Err(e)) => error!(error = %e, "unreadable spool records could not be quarantined"),
            Err(_) => {}
        }
    }

    /// Commits `writes` in one transaction, keeps the counts in step and
    /// answers each.
    fn write(&mut self, writes: Vec<Op>, stats: &Mutex<SpoolStats>) {
        let result = match self.open() {
            Ok(_) => match &self.db {
                Some(db) => commit(db, &writes, &mut self.next_key),
                None => Err(redb::Error::DatabaseClosed),
            },
            Err(e) => Err(e),
        };
        let result = match result {
            Ok(delta) => {
                let mut s = stats.lock().unwrap_or_else(PoisonError::into_inner);
                delta.apply(&mut s);
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "spool commit failed");
                self.metrics.spool_errors.inc();
                Err(self.failed(e))
            }
        };
        for w in writes {
            match w {
                Op::Append(_, mut reservation, done) => {
                    if result.is_ok() {
                        reservation.keep();
                    }
                    // Released (if not kept) before the answer, so that a
                    // caller who sees the error also sees the counts.
                    drop(reservation);
                    let _ = done.send(result.clone());
                }
                Op::Remove(_, done) | Op::Quarantine(_, done) => {
                    let _ = done.send(result.clone());
                }
                Op::Read { .. }
                | Op::ReadQuarantine(..)
                | Op::Ids(_)
                | Op::Requeue(..)
                | Op::Close(_) => {}
            }
        }
    }

    /// The database, reopened first if an I/O error closed it.
    fn open(&mut self) -> Result<&Database, redb::Error> {
        if self.db.is_none() {
            let db = Database::create(&self.path)?;
            // Never reuse a key: arrival order is key order.
            self.next_key = self.next_key.max(next_key(&db)?);
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

/// What a committed batch changed in the counts (appends were counted when
/// reserved).
#[derive(Default)]
struct Delta {
    removed: u64,
    removed_bytes: u64,
    quarantined: u64,
    quarantined_bytes: u64,
    /// The oldest event after the batch, when anything left `records`.
    oldest: Option<Option<i64>>,
}

impl Delta {
    fn apply(self, s: &mut SpoolStats) {
        s.messages = s.messages.saturating_sub(self.removed + self.quarantined);
        s.bytes = s
            .bytes
            .saturating_sub(self.removed_bytes + self.quarantined_bytes);
        s.quarantined += self.quarantined;
        s.quarantined_bytes += self.quarantined_bytes;
        if let Some(oldest) = self.oldest {
            s.oldest_ms = oldest;
        }
    }
}

fn commit(db: &Database, batch: &[Op], next_key: &mut u64) -> Result<Delta, redb::Error> {
    let txn = db.begin_write()?;
    let key_before = *next_key;
    let written = apply(&txn, batch, next_key);
    let committed = written.and_then(|delta| {
        txn.commit()?;
        Ok(delta)
    });
    if committed.is_err() {
        *next_key = key_before;
    }
    committed
}

fn apply(txn: &WriteTransaction, batch: &[Op], next_key: &mut u64) -> Result<Delta, redb::Error> {
    let mut delta = Delta::default();
    let mut records = txn.open_table(RECORDS)?;
    let mut quarantine = txn.open_table(QUARANTINE)?;
    let mut any_left = false;
    let now = crate::now_ms();
    for w in batch {
        match w {
            Op::Append(record, _, _) => {
                records.insert(*next_key, record.as_slice())?;
                *next_key += 1;
            }
            Op::Remove(keys, _) => {
                any_left = true;
                for key in keys {
                    if let Some(old) = records.remove(key)? {
                        delta.removed_bytes += old.value().len() as u64;
                        delta.removed += 1;
                    }
                }
            }
            Op::Quarantine(moves, _) => {
                any_left = true;
                for (key, reason) in moves {
                    let Some(old) = records.remove(key)? else {
                        continue;
                    };
                    let raw = old.value().to_vec();
                    drop(old);
                    let entry = encode_quarantine(reason, now, &raw)
                        .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
                    quarantine.insert(*key, entry.as_slice())?;
                    delta.quarantined += 1;
                    delta.quarantined_bytes += raw.len() as u64;
                }
            }
            Op::Read { .. }
            | Op::ReadQuarantine(..)
            | Op::Ids(_)
            | Op::Requeue(..)
            | Op::Close(_) => {}
        }
    }
    if any_left {
        let oldest = records
            .first()?
            .and_then(|(_, v)| RecordHead::decode(v.value()).map(|h| h.received_at_ms));
        delta.oldest = Some(oldest);
    }
    Ok(delta)
}

/// The first key never used: past both live and quarantined records, since
/// quarantine keeps the key a record had.
fn next_key(db: &Database) -> Result<u64, redb::Error> {
    let txn = db.begin_read()?;
    let last = |k: Option<u64>| k.map_or(0, |k| k.saturating_add(1));
    let records = last(txn.open_table(RECORDS)?.last()?.map(|(k, _)| k.value()));
    let quarantined = last(txn.open_table(QUARANTINE)?.last()?.map(|(k, _)| k.value()));
    Ok(records.max(quarantined))
}

/// Direct access for the `spool` subcommand and `check-config` (on a
/// stopped relay: a running one holds the file lock, and is asked through
/// its admin listener instead).
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

    /// The oldest `limit` readable events (unreadable ones are skipped here
    /// and quarantined by the next relay that reads them).
    pub fn list(&self, limit: usize) -> Result<Vec<(u64, Envelope)>, SpoolError> {
        read_after(&self.db, None, limit)
            .map(|(good, _)| good)
            .map_err(storage)
    }

    /// The oldest `limit` quarantined records.
    pub fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, SpoolError> {
        read_quarantine(&self.db, limit).map_err(storage)
    }

    pub fn remove(&self, keys: &[u64]) -> Result<(), SpoolError> {
        self.remove_from(RECORDS, keys)
    }

    pub fn remove_quarantined(&self, keys: &[u64]) -> Result<(), SpoolError> {
        self.remove_from(QUARANTINE, keys)
    }

    fn remove_from(
        &self,
        table: redb::TableDefinition<u64, &[u8]>,
        keys: &[u64],
    ) -> Result<(), SpoolError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(table).map_err(storage)?;
            for key in keys {
                table.remove(key).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)
    }
}
