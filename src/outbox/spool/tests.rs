use std::path::Path;
use std::time::Duration;

use super::store::RecordHead;
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
    }
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
    let record = postcard::to_stdvec(&envelope(7)).expect("encode");
    let head = RecordHead::decode(&record).expect("decode head");
    assert_eq!(head.id, "id-7");
    assert_eq!(head.received_at_ms, envelope(7).received_at_ms);

    let dir = tempfile::tempdir().expect("tempdir");
    let spool =
        Spool::open(config(dir.path(), 100, 1 << 20), Arc::new(Metrics::new())).expect("open");
    for i in 0..3 {
        spool.append(&envelope(i)).await.expect("append");
    }
    assert_eq!(spool.ids().await.expect("ids"), ["id-0", "id-1", "id-2"]);
}
