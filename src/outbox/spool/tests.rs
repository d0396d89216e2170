use std::path::Path;
use std::time::Duration;

use super::record::{self, EVENTS_V1, RECORDS, RecordHead};
use super::*;

fn config(dir: &Path, max_events: u64, max_bytes: u64) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes,
        max_events,
    }
}

fn envelope(i: u32) -> Envelope {
    Envelope {
        id: format!("id-{i}"),
        routing_key: "book.verified".into(),
        event_name: "book.verified".into(),
        ocrolus_timestamp: Some("1767225600".into()),
        client_ip: "18.205.30.63".into(),
        received_at_ms: 1_767_225_600_000 + i64::from(i),
        body: bytes::Bytes::from(format!(
            "{{ \"event_name\" : \"book.verified\", \"n\": {i} }}"
        )),
        source: "sandbox".into(),
        exchange: Some("sandbox.events".into()),
    }
}

/// What an event written before sources existed reads as: the `default`
/// source, bound for `--exchange`.
fn before_sources(mut envelope: Envelope) -> Envelope {
    envelope.source = "default".into();
    envelope.exchange = None;
    envelope
}

/// The payload of formats 1 and 2 (no source, no exchange), as older
/// relays wrote it.
fn legacy_payload(e: &Envelope) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Legacy<'a> {
        id: &'a str,
        routing_key: &'a str,
        event_name: &'a str,
        ocrolus_timestamp: Option<&'a str>,
        client_ip: &'a str,
        received_at_ms: i64,
        body: &'a bytes::Bytes,
    }
    postcard::to_stdvec(&Legacy {
        id: &e.id,
        routing_key: &e.routing_key,
        event_name: &e.event_name,
        ocrolus_timestamp: e.ocrolus_timestamp.as_deref(),
        client_ip: &e.client_ip,
        received_at_ms: e.received_at_ms,
        body: &e.body,
    })
    .expect("encode")
}

#[tokio::test]
async fn appended_events_come_back_in_order_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let spool =
            Spool::open(config(dir.path(), 100, 1 << 20), Arc::new(Metrics::new())).expect("open");
        for i in 0..5 {
            spool.append(&envelope(i)).await.expect("append");
        }
        assert_eq!(spool.stats().messages, 5);
        assert_eq!(spool.stats().oldest_ms, Some(1_767_225_600_000));
    }
    // The writer thread exits when its queue closes; wait for the file lock.
    let spool = reopen(dir.path()).await;
    let events = spool.peek(10).await.expect("peek");
    assert_eq!(events.len(), 5);
    for (i, (_, e)) in events.iter().enumerate() {
        assert_eq!(e, &envelope(i as u32), "exact bytes and metadata");
    }
    let keys: Vec<u64> = events.iter().take(2).map(|(k, _)| *k).collect();
    spool.remove(keys).await.expect("remove");
    let s = spool.stats();
    assert_eq!(s.messages, 3);
    assert_eq!(s.oldest_ms, Some(1_767_225_600_002));
    assert_eq!(spool.peek(10).await.expect("peek")[0].1.id, "id-2");
}

async fn reopen(dir: &Path) -> Arc<Spool> {
    for _ in 0..100 {
        if let Ok(s) = Spool::open(config(dir, 100, 1 << 20), Arc::new(Metrics::new())) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("spool could not be reopened");
}

#[tokio::test]
async fn full_spool_refuses_instead_of_dropping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool =
        Spool::open(config(dir.path(), 3, 1 << 20), Arc::new(Metrics::new())).expect("open");
    for i in 0..3 {
        spool.append(&envelope(i)).await.expect("append");
    }
    assert!(!spool.has_room());
    assert!(matches!(
        spool.append(&envelope(3)).await,
        Err(SpoolError::Full)
    ));
    assert_eq!(spool.stats().messages, 3);

    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(config(dir.path(), 100, 150), Arc::new(Metrics::new())).expect("open");
    spool.append(&envelope(0)).await.expect("first fits");
    assert!(matches!(
        spool.append(&envelope(1)).await,
        Err(SpoolError::Full)
    ));
}

#[tokio::test]
async fn concurrent_appends_share_commits_and_all_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(
        config(dir.path(), 10_000, 1 << 30),
        Arc::new(Metrics::new()),
    )
    .expect("open");
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move { spool.append(&envelope(i)).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("append");
    }
    let events = spool.peek(usize::MAX).await.expect("peek");
    assert_eq!(events.len(), 200);
    let mut ids: Vec<String> = events.into_iter().map(|(_, e)| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200);
}

/// Regression: after `Relay::shutdown` the spool file stayed locked until
/// every handle was dropped, so a restart in the same process raced it and
/// failed with "Database already open".
#[tokio::test]
async fn close_releases_the_file_at_once_and_refuses_later_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool =
        Spool::open(config(dir.path(), 100, 1 << 20), Arc::new(Metrics::new())).expect("open");
    spool.append(&envelope(0)).await.expect("append");
    spool.close().await;
    assert!(matches!(
        spool.append(&envelope(1)).await,
        Err(SpoolError::Closed)
    ));
    // Still holding `spool`: the file must nevertheless be free.
    let again =
        Spool::open(config(dir.path(), 100, 1 << 20), Arc::new(Metrics::new())).expect("reopen");
    assert_eq!(again.peek(10).await.expect("peek").len(), 1);
}

#[tokio::test]
async fn ids_are_read_without_decoding_bodies() {
    // RecordHead relies on Envelope's field order up to the body.
    let record = record::encode(&envelope(7)).expect("encode");
    let head = RecordHead::decode(&record).expect("decode head");
    assert_eq!(head.id, "id-7");
    assert_eq!(head.received_at_ms, envelope(7).received_at_ms);
    assert_eq!(head.source, "sandbox");
    let v2 = [&[2u8][..], &legacy_payload(&envelope(8))].concat();
    let head = RecordHead::decode(&v2).expect("decode format-2 head");
    assert_eq!(
        (head.id.as_str(), head.source.as_str()),
        ("id-8", "default")
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let spool =
        Spool::open(config(dir.path(), 100, 1 << 20), Arc::new(Metrics::new())).expect("open");
    for i in 0..3 {
        spool.append(&envelope(i)).await.expect("append");
    }
    let ids = spool.ids().await.expect("ids");
    let want: Vec<(String, String)> = (0..3)
        .map(|i| ("sandbox".to_owned(), format!("id-{i}")))
        .collect();
    assert_eq!(ids, want);
}

/// Writes raw values into `table` of the spool file in `dir`, as a small
/// redb program (or a damaged disk) would.
fn write_raw(dir: &Path, table: redb::TableDefinition<u64, &[u8]>, rows: &[(u64, Vec<u8>)]) {
    std::fs::create_dir_all(dir).expect("dir");
    let db = redb::Database::create(dir.join("spool.redb")).expect("create");
    let txn = db.begin_write().expect("txn");
    {
        let mut t = txn.open_table(table).expect("table");
        for (k, v) in rows {
            t.insert(*k, v.as_slice()).expect("insert");
        }
    }
    txn.commit().expect("commit");
}

fn quarantine_keys(spool_quarantine: &[Quarantined]) -> Vec<u64> {
    spool_quarantine.iter().map(|q| q.seq).collect()
}

/// Regression: unreadable records at the head and in the middle go to
/// quarantine with their bytes; the good ones are read, in order, and the
/// next read does not meet the bad ones again. Before, they were skipped,
/// left in place and met (and logged) again on every read.
#[tokio::test]
async fn unreadable_records_are_quarantined_with_their_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = vec![0xde, 0xad, 0xbe, 0xef];
    let future = [
        &[9u8][..],
        &record::encode(&envelope(9)).expect("encode")[1..],
    ]
    .concat();
    let mut rows = vec![(0, garbage.clone()), (1, future.clone())];
    for i in 2..5 {
        rows.push((u64::from(i), record::encode(&envelope(i)).expect("encode")));
    }
    rows.push((5, b"\x02not postcard".to_vec()));
    rows.push((6, record::encode(&envelope(6)).expect("encode")));
    write_raw(dir.path(), RECORDS, &rows);

    let metrics = Arc::new(Metrics::new());
    let spool = Spool::open(config(dir.path(), 100, 1 << 20), metrics.clone()).expect("open");
    assert_eq!(spool.stats().messages, 7);
    let read = spool.peek(10).await.expect("peek");
    let ids: Vec<&str> = read.iter().map(|(_, e)| e.id.as_str()).collect();
    assert_eq!(ids, ["id-2", "id-3", "id-4", "id-6"]);
    let s = spool.stats();
    assert_eq!((s.messages, s.quarantined), (4, 3), "{s:?}");
    assert_eq!(
        metrics
            .spool_quarantined
            .with_label_values(&["unreadable"])
            .get(),
        3
    );
    let q = spool.quarantined(10).await.expect("quarantine");
    assert_eq!(quarantine_keys(&q), [0, 1, 5]);
    assert_eq!(q[0].record, garbage, "raw bytes kept");
    assert_eq!(q[1].record, future, "raw bytes kept");
    assert!(
        q[1].reason.contains("unknown record format 9"),
        "{}",
        q[1].reason
    );
    assert!(q.iter().all(|q| q.envelope.is_none()), "never misread");
    // The second read meets only good records and quarantines nothing more.
    assert_eq!(spool.peek(10).await.expect("peek").len(), 4);
    assert_eq!(spool.stats().quarantined, 3);
    // New keys never reuse a quarantined one.
    spool.append(&envelope(7)).await.expect("append");
    let keys: Vec<u64> = spool
        .peek(10)
        .await
        .expect("peek")
        .iter()
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(keys, [2, 3, 4, 6, 7]);
}

/// A spool written by the previous release (format 1: no format byte, in
/// the `events` table) is converted at open, keys and order kept; an
/// unreadable format-1 record is quarantined with its bytes.
#[tokio::test]
async fn format_1_spool_is_converted_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let legacy = |i: u32| legacy_payload(&envelope(i));
    write_raw(
        dir.path(),
        EVENTS_V1,
        &[(10, legacy(0)), (11, vec![0xff; 3]), (12, legacy(2))],
    );
    let spool = reopen(dir.path()).await;
    let s = spool.stats();
    assert_eq!((s.messages, s.quarantined), (2, 1), "{s:?}");
    assert_eq!(s.oldest_ms, Some(envelope(0).received_at_ms));
    let read = spool.peek(10).await.expect("peek");
    assert_eq!(
        read,
        [
            (10, before_sources(envelope(0))),
            (12, before_sources(envelope(2)))
        ]
    );
    let q = spool.quarantined(10).await.expect("quarantine");
    assert_eq!((q[0].seq, q[0].record.clone()), (11, vec![0xff; 3]));
    let ids = spool.ids().await.expect("ids");
    assert_eq!(
        ids,
        [
            ("default".to_owned(), "id-0".to_owned()),
            ("default".to_owned(), "id-2".to_owned())
        ]
    );
    spool.close().await;
    // Nothing is left in the old table for an older relay to misread.
    let db = redb::Database::create(dir.path().join("spool.redb")).expect("open");
    let txn = redb::ReadableDatabase::begin_read(&db).expect("read");
    let legacy_rows = txn
        .open_table(EVENTS_V1)
        .map_or(0, |t| redb::ReadableTableMetadata::len(&t).expect("len"));
    assert_eq!(legacy_rows, 0);
}

/// A spool file that is not a database at all is moved aside (and counted)
/// and the relay gets a fresh, working spool.
#[tokio::test]
async fn corrupt_spool_file_is_moved_aside_and_a_fresh_spool_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("spool.redb"), vec![0x5a; 8192]).expect("garbage file");
    let metrics = Arc::new(Metrics::new());
    let spool = Spool::open(config(dir.path(), 100, 1 << 20), metrics.clone()).expect("starts");
    spool.append(&envelope(0)).await.expect("fresh spool works");
    assert_eq!(spool.peek(10).await.expect("peek").len(), 1);
    let moved: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("spool.redb.corrupt-"))
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    let kept = std::fs::read(dir.path().join(&moved[0])).expect("moved file");
    assert_eq!(kept, vec![0x5a; 8192], "moved, not altered");
    assert_eq!(metrics.spool_files_moved_aside.get(), 1);
    spool.close().await;

    // A truncated database file is treated the same way.
    let bytes = std::fs::read(dir.path().join("spool.redb")).expect("read");
    std::fs::write(dir.path().join("spool.redb"), &bytes[..bytes.len() / 3]).expect("truncate");
    // `spool` and `check-config` report it instead of moving anything.
    assert!(matches!(
        SpoolFile::open(dir.path()),
        Err(SpoolError::Corrupt(_))
    ));
    let metrics = Arc::new(Metrics::new());
    let spool = Spool::open(config(dir.path(), 100, 1 << 20), metrics.clone()).expect("starts");
    assert_eq!(spool.stats().messages, 0);
    assert_eq!(metrics.spool_files_moved_aside.get(), 2);
}

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct TinyDisk(tempfile::TempDir);

impl TinyDisk {
    /// `None` (test skipped) when mounting is not permitted here.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Self(dir))
    }

    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.0.path().join("filler")).expect("filler");
        while file.write_all(&[0xA5; 4096]).is_ok() {}
        let _ = file.sync_all();
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Regression: `append` reserved room in the counts before its
/// commit and gave it back only if it was still running when the commit
/// failed. A request cancelled in between (its future dropped) leaked the
/// reservation: the spool looked fuller, for good. Failed before the fix
/// (1 message, ~200 KiB counted for nothing).
#[tokio::test]
async fn a_cancelled_append_whose_commit_fails_gives_its_room_back() {
    use futures_util::FutureExt;
    let Some(disk) = TinyDisk::mount("2m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let spool = Spool::open(
        config(&disk.0.path().join("spool"), 100, 1 << 30),
        Arc::new(Metrics::new()),
    )
    .expect("open");
    disk.fill();
    let mut big = envelope(1);
    big.body = bytes::Bytes::from(vec![b'x'; 200 * 1024]);
    // One poll reserves the room and queues the commit; then the request
    // is cancelled. On a busy machine the store thread may have answered
    // (the commit failed) before that one poll ends: then the append is not
    // cancelled but refused, and the counts must come out the same.
    if let Some(result) = spool.append(&big).now_or_never() {
        assert!(result.is_err(), "the disk is full: {result:?}");
    }
    // Served after the failed commit (the store thread works in order).
    let _ = spool.peek(1).await;
    let s = spool.stats();
    assert_eq!((s.messages, s.bytes), (0, 0), "{s:?}");
    assert!(spool.has_room());
}

/// The format-2 layout is pinned byte for byte, and still reads (as the
/// `default` source, bound for `--exchange`) after format 3 came.
#[test]
fn format_2_layout_is_pinned() {
    let e = Envelope {
        id: "a".into(),
        routing_key: "b".into(),
        event_name: "c".into(),
        ocrolus_timestamp: None,
        client_ip: "d".into(),
        received_at_ms: 5,
        body: bytes::Bytes::from_static(b"{}"),
        source: "default".into(),
        exchange: None,
    };
    let golden = [2, 1, b'a', 1, b'b', 1, b'c', 0, 1, b'd', 10, 2, b'{', b'}'];
    assert_eq!([&[2u8][..], &legacy_payload(&e)].concat(), golden);
    assert_eq!(record::decode(&golden).expect("decode"), e);
    assert_eq!(record::decode_v1(&golden[1..]).expect("format 1"), e);
    assert!(
        record::decode(&[&golden[..], &[0]].concat()).is_err(),
        "trailing byte"
    );
}

/// The format-3 layout is pinned byte for byte: a change to `Envelope`
/// must not change what is written (or how old records read) unnoticed.
#[test]
fn format_3_layout_is_pinned() {
    let mut e = Envelope {
        id: "a".into(),
        routing_key: "b".into(),
        event_name: "c".into(),
        ocrolus_timestamp: None,
        client_ip: "d".into(),
        received_at_ms: 5,
        body: bytes::Bytes::from_static(b"{}"),
        source: "s".into(),
        exchange: Some("x".into()),
    };
    let golden = [
        3, 1, b'a', 1, b'b', 1, b'c', 0, 1, b'd', 10, 1, b's', 1, 1, b'x', 2, b'{', b'}',
    ];
    assert_eq!(record::encode(&e).expect("encode"), golden);
    assert_eq!(record::decode(&golden).expect("decode"), e);
    e.exchange = None;
    let golden = [
        3, 1, b'a', 1, b'b', 1, b'c', 0, 1, b'd', 10, 1, b's', 0, 2, b'{', b'}',
    ];
    assert_eq!(record::encode(&e).expect("encode"), golden);
    assert_eq!(record::decode(&golden).expect("decode"), e);
    assert!(
        record::decode(&[&golden[..], &[0]].concat()).is_err(),
        "trailing byte"
    );
}

#[tokio::test]
async fn quarantined_records_requeue_in_arrival_order_with_exact_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool =
        Spool::open(config(dir.path(), 100, 1 << 20), Arc::new(Metrics::new())).expect("open");
    for i in 0..4 {
        spool.append(&envelope(i)).await.expect("append");
    }
    let all = spool.stats();
    let keys: Vec<u64> = spool
        .peek(10)
        .await
        .expect("peek")
        .iter()
        .map(|(k, _)| *k)
        .collect();
    spool
        .quarantine(vec![
            (keys[0], "refused".into()),
            (keys[2], "refused".into()),
        ])
        .await
        .expect("quarantine");
    let split = spool.stats();
    assert_eq!((split.messages, split.quarantined), (2, 2));
    assert_eq!(split.oldest_ms, Some(1_767_225_600_001));

    assert_eq!(spool.requeue_quarantined(1).await.expect("requeue"), 1);
    let one = spool.stats();
    assert_eq!((one.messages, one.quarantined), (3, 1));
    assert_eq!(
        one.oldest_ms,
        Some(1_767_225_600_000),
        "the oldest is back first"
    );
    assert_eq!(spool.requeue_quarantined(10).await.expect("requeue"), 1);
    assert_eq!(spool.requeue_quarantined(10).await.expect("requeue"), 0);
    assert_eq!(spool.stats(), all, "counts as before the quarantine");
    let events = spool.peek(10).await.expect("peek");
    let back: Vec<Envelope> = events.into_iter().map(|(_, e)| e).collect();
    assert_eq!(
        back,
        (0..4).map(envelope).collect::<Vec<_>>(),
        "arrival order, exact"
    );
    drop(spool);
    let reopened = reopen(dir.path()).await;
    assert_eq!(reopened.stats(), all, "the counts match the file");
}
