//! Nothing in the spool stops delivery. An event the
//! broker keeps refusing (unroutable, nacked by a full `reject-publish`
//! queue) never holds back the events spooled behind it and ends up in the
//! dead-letter exchange; unreadable records and unreadable spool files are
//! quarantined or moved aside without spinning the drainer.
//!
//! Every scenario spools its victims behind the poison during a broker stall
//! ([`FaultProxy`]), then restores the broker and watches where everything
//! goes. Bounds are generous: on the old code the victims never arrive.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

/// Upper bound for anything that "eventually" happens on a busy 2-core box.
const EVENTUALLY: Duration = Duration::from_secs(90);
/// "Within seconds of the broker's return": generous for a busy machine;
/// before the fix the victims never arrived at all.
const PROMPTLY: Duration = Duration::from_secs(30);
const VICTIMS: usize = 10;

fn flags(extra: &[&str]) -> Vec<String> {
    [
        "--rate-limit-per-ip",
        "1000000",
        "--rate-limit-global",
        "1000000",
        "--confirm-timeout",
        "0.5",
        "--poison-attempts",
        "3",
    ]
    .iter()
    .chain(extra)
    .map(ToString::to_string)
    .collect()
}

fn victim_body(n: usize, run: &str) -> Vec<u8> {
    format!(r#"{{"event_name":"BOOK_VERIFIED","book_pk":{n},"run":"{run}"}}"#).into_bytes()
}

/// An event routed as `plaid.upload_failed`, which the tests make
/// unpublishable.
fn poison_body(run: &str) -> Vec<u8> {
    format!(r#"{{"event_name":"plaid.upload_failed","run":"{run}"}}"#).into_bytes()
}

fn status_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn post_expect(relay: &TestRelay, id: &str, body: &[u8], status: &str) {
    let (code, _, answer) = post_signed(relay, id, body).await;
    assert_eq!(code, 200, "{id}: {}", String::from_utf8_lossy(&answer));
    assert_eq!(status_of(&answer), status, "{id}");
}

fn message_id(m: &lapin::message::BasicGetMessage) -> String {
    m.delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default()
}

fn header(m: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    let headers = m.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Collects messages from `queue` until every id in `want` arrived or
/// `within` passed; returns id → (body, message).
async fn collect(
    broker: &TestBroker,
    queue: &str,
    want: &HashMap<String, Vec<u8>>,
    within: Duration,
) -> HashMap<String, lapin::message::BasicGetMessage> {
    let deadline = Instant::now() + within;
    let mut got = HashMap::new();
    while Instant::now() < deadline && !want.keys().all(|id| got.contains_key(id)) {
        for m in broker.drain(queue, 0, Duration::ZERO).await {
            got.insert(message_id(&m), m);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got
}

fn assert_exact(
    got: &HashMap<String, lapin::message::BasicGetMessage>,
    want: &HashMap<String, Vec<u8>>,
) {
    let missing: Vec<&String> = want.keys().filter(|id| !got.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "answered 200 but not delivered: {missing:?}"
    );
    for (id, body) in want {
        assert_eq!(&got[id].delivery.data, body, "{id}: bytes changed");
    }
}

/// Stalls the broker, spools the poison and then the victims behind it,
/// restores the broker; returns the victims and when the broker came back.
async fn spool_poison_then_victims(
    relay: &TestRelay,
    proxy: &FaultProxy,
    poison: (&str, &[u8]),
    run: &str,
) -> (HashMap<String, Vec<u8>>, Instant) {
    proxy.stall();
    post_expect(relay, poison.0, poison.1, "spooled").await;
    let mut victims = HashMap::new();
    for n in 0..VICTIMS {
        let (id, body) = (new_id(), victim_body(n, run));
        post_expect(relay, &id, &body, "spooled").await;
        victims.insert(id, body);
    }
    proxy.restore();
    (victims, Instant::now())
}

/// The poison in the dead-letter queue, with its exact bytes and reason.
async fn assert_dead_lettered(
    relay: &TestRelay,
    broker: &TestBroker,
    poison: (&str, &[u8]),
    reason: &str,
) {
    let want = HashMap::from([(poison.0.to_owned(), poison.1.to_vec())]);
    let got = collect(broker, &relay.dead_letter, &want, EVENTUALLY).await;
    assert_exact(&got, &want);
    let m = &got[poison.0];
    assert_eq!(
        header(m, "x-relay-dead-letter-reason").as_deref(),
        Some(reason)
    );
    assert_eq!(
        header(m, "x-relay-original-exchange").as_deref(),
        Some(relay.exchange.as_str())
    );
    let outbox = &relay.relay().state().outbox;
    let started = Instant::now();
    while outbox.spool.stats().messages > 0 && started.elapsed() < EVENTUALLY {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(outbox.spool.stats().messages, 0, "the spool is empty");
    assert_eq!(outbox.spool.stats().quarantined, 0, "nothing quarantined");
    let dead = relay
        .metric(&format!(
            "ocrolus_relay_spool_dead_lettered_total{{reason=\"{reason}\"}}"
        ))
        .await;
    assert_eq!(dead, 1.0, "dead-lettering is counted");
}

/// Unroutable with no alternate exchange: every publish of the poison comes
/// back `Returned`. Before the fix the drainer stopped at it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unroutable_poison_does_not_hold_back_the_events_behind_it() {
    require_broker!();
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: flags(&["--alternate-exchange", ""]),
        ..RelayOptions::default()
    })
    .await;
    let broker = TestBroker::connect().await;
    let queue = broker.bind_queue(&relay.exchange, "book.verified").await;
    let run = unique("unroutable");
    let poison = (new_id(), poison_body(&run));

    let (victims, restored) =
        spool_poison_then_victims(&relay, &proxy, (&poison.0, &poison.1), &run).await;
    let got = collect(&broker, &queue, &victims, PROMPTLY).await;
    let took = restored.elapsed();
    eprintln!(
        "unroutable poison: victims {}/{VICTIMS} after {took:?}",
        got.len()
    );
    assert_exact(&got, &victims);
    assert_dead_lettered(&relay, &broker, (&poison.0, &poison.1), "returned").await;

    relay.finish(&broker, &[&queue]).await;
}

/// Nacked: the poison's only queue is full with `x-overflow: reject-publish`
/// (as the shipped `ocrolus.events.unrouted` policy makes that queue once it
/// holds 100,000 messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nacked_poison_from_a_full_reject_publish_queue_does_not_hold_back_the_events_behind_it() {
    require_broker!();
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: flags(&[]),
        ..RelayOptions::default()
    })
    .await;
    let broker = TestBroker::connect().await;
    let queue = broker.bind_queue(&relay.exchange, "book.verified").await;
    let full = unique("test.full");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    broker
        .channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declare the full queue");
    broker
        .channel
        .queue_bind(
            full.as_str().into(),
            relay.exchange.as_str().into(),
            "plaid.upload_failed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the full queue");
    // The first one fills the queue (max-length 1).
    let run = unique("nacked");
    post_expect(&relay, &new_id(), &poison_body(&run), "published").await;
    let poison = (new_id(), poison_body(&run));

    let (victims, restored) =
        spool_poison_then_victims(&relay, &proxy, (&poison.0, &poison.1), &run).await;
    let got = collect(&broker, &queue, &victims, PROMPTLY).await;
    let took = restored.elapsed();
    eprintln!(
        "nacked poison: victims {}/{VICTIMS} after {took:?}",
        got.len()
    );
    assert_exact(&got, &victims);
    assert_dead_lettered(&relay, &broker, (&poison.0, &poison.1), "nack").await;

    broker.delete_queue(&full).await;
    relay.finish(&broker, &[&queue]).await;
}

/// A relay whose poison event could not be dead-lettered either, so that
/// it waits in the quarantine table: its victims are delivered first
/// (never blocked), exactly. The dead-letter queue is deleted once the
/// relay is back up (it declares it again when it reconnects; without it,
/// publishing there is unroutable as well); the poison gets there only
/// after its attempts, seconds later.
struct Quarantined {
    relay: TestRelay,
    broker: TestBroker,
    queue: String,
    poison: (String, Vec<u8>),
    /// Between the relay and the broker: dropping it cuts the relay off.
    _proxy: FaultProxy,
}

async fn quarantine_a_poison(run: &str) -> Quarantined {
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: flags(&["--alternate-exchange", ""]),
        ..RelayOptions::default()
    })
    .await;
    let broker = TestBroker::connect().await;
    let queue = broker.bind_queue(&relay.exchange, "book.verified").await;
    let run = unique(run);
    let poison = (new_id(), poison_body(&run));
    let (victims, _) =
        spool_poison_then_victims(&relay, &proxy, (&poison.0, &poison.1), &run).await;
    assert!(relay.wait_broker_up(EVENTUALLY).await);
    broker.delete_queue(&relay.dead_letter).await;
    assert_exact(
        &collect(&broker, &queue, &victims, PROMPTLY).await,
        &victims,
    );
    let spool = &relay.relay().state().outbox.spool;
    let started = Instant::now();
    while spool.stats().quarantined == 0 && started.elapsed() < EVENTUALLY {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Quarantined {
        relay,
        broker,
        queue,
        poison,
        _proxy: proxy,
    }
}

/// With the dead-letter exchange refusing too (its queue full), the poison
/// is kept in the quarantine table: never dropped, never blocking.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_that_cannot_be_dead_lettered_is_quarantined() {
    require_broker!();
    let Quarantined {
        relay,
        broker,
        queue,
        poison,
        _proxy,
    } = quarantine_a_poison("quarantine").await;
    let spool = &relay.relay().state().outbox.spool;
    let stats = spool.stats();
    assert_eq!((stats.messages, stats.quarantined), (0, 1), "{stats:?}");
    let quarantined = spool.quarantined(10).await.expect("list quarantine");
    assert_eq!(quarantined.len(), 1);
    let envelope = quarantined[0].envelope.as_ref().expect("readable");
    assert_eq!(envelope.id, poison.0);
    assert_eq!(envelope.body.as_ref(), poison.1.as_slice());
    assert!(
        quarantined[0].reason.contains("returned"),
        "{}",
        quarantined[0].reason
    );
    assert_eq!(
        relay
            .metric("ocrolus_relay_spool_quarantined_messages")
            .await,
        1.0
    );

    relay.finish(&broker, &[&queue]).await;
}

/// The operator's way back for a quarantined event, while the relay runs:
/// `spool list --quarantine` shows it (no body), the missing binding is
/// added, `spool replay --quarantine` has the relay deliver it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quarantined_event_is_replayed_through_the_running_relay() {
    require_broker!();
    let Quarantined {
        relay,
        broker,
        queue,
        poison,
        _proxy,
    } = quarantine_a_poison("requeue").await;
    let spool = &relay.relay().state().outbox.spool;
    let admin = relay.admin.to_string();

    let listed = run_binary(
        &["spool", "list", "--quarantine", "--admin-listen", &admin],
        &[],
    )
    .await;
    assert_eq!(listed.status.code(), Some(0));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["event"]["id"], poison.0.as_str());
    assert_eq!(lines[0]["readable"], true);
    assert!(
        lines[0]["reason"]
            .as_str()
            .expect("reason")
            .contains("returned")
    );
    assert!(lines[0].get("raw_base64").is_none() && lines[0]["event"].get("body").is_none());

    let everything = broker.bind_queue(&relay.exchange, "#").await;
    let replay = run_binary(
        &["spool", "replay", "--quarantine", "--admin-listen", &admin],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert_eq!(replay.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("spool: 1 quarantined events moved back into the spool"),
        "{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&replay.stdout).expect("summary");
    assert_eq!(
        (
            &summary["requeued"],
            &summary["left"],
            &summary["quarantined"]
        ),
        (&1.into(), &0.into(), &0.into()),
        "{summary}"
    );
    let want = HashMap::from([(poison.0.clone(), poison.1.clone())]);
    assert_exact(&collect(&broker, &everything, &want, PROMPTLY).await, &want);
    let stats = spool.stats();
    assert_eq!((stats.messages, stats.quarantined), (0, 0), "{stats:?}");

    broker.delete_queue(&everything).await;
    relay.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------------------
// Unreadable records and files, with the real binary (its logs and
// CPU time are what the defect was about).

/// The previous release's record layout (format 1): a postcard-encoded
/// envelope, no format byte, in the table `events`.
#[derive(serde::Serialize)]
struct LegacyRecord<'a> {
    id: &'a str,
    routing_key: &'a str,
    event_name: &'a str,
    ocrolus_timestamp: Option<&'a str>,
    client_ip: &'a str,
    received_at_ms: i64,
    body: &'a [u8],
}

fn write_table(path: &std::path::Path, table: &str, rows: &[(u64, Vec<u8>)]) {
    let db = redb::Database::create(path).expect("create spool file");
    let txn = db.begin_write().expect("txn");
    {
        let def: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new(table);
        let mut t = txn.open_table(def).expect("table");
        for (k, v) in rows {
            t.insert(*k, v.as_slice()).expect("insert");
        }
    }
    txn.commit().expect("commit");
}

/// The reported case: garbage written into the spool (300 records at the
/// head, more than one read batch, and more in the middle), as a small
/// redb program would. Before the fix the drainer spun at ~97 % of a core
/// writing ~50,000 error lines a second, and with 256 or more bad records
/// at the head no good one was ever delivered. Now the bad ones are
/// quarantined once, the good ones delivered, and the relay goes quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_records_at_the_head_and_in_the_middle_do_not_spin_the_drainer() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).expect("spool dir");
    let exchange = unique("test.events");
    let run = unique("corrupt");
    let mut rows: Vec<(u64, Vec<u8>)> = (0..300).map(|k| (k, vec![0xff, 0x13, k as u8])).collect();
    let mut want = HashMap::new();
    for n in 0..10u64 {
        let (id, body) = (new_id(), victim_body(n as usize, &run));
        let record = LegacyRecord {
            id: &id,
            routing_key: "book.verified",
            event_name: "BOOK_VERIFIED",
            ocrolus_timestamp: None,
            client_ip: "127.0.0.1",
            received_at_ms: ocrolus_relay::now_ms(),
            body: &body,
        };
        // Good records at 300..=304 and 310..=314, garbage between.
        let key = 300 + n + if n >= 5 { 5 } else { 0 };
        rows.push((key, postcard::to_stdvec(&record).expect("encode")));
        want.insert(id, body);
    }
    rows.extend((305..310).map(|k| (k, b"\x05short".to_vec())));
    write_table(&spool.join("spool.redb"), "events", &rows);
    // And in the current format (format byte 2): a record of an unknown
    // format and a damaged one, between good ones.
    let mut current = Vec::new();
    for (k, n) in [(1000u64, 10usize), (1003, 11)] {
        let (id, body) = (new_id(), victim_body(n, &run));
        let record = LegacyRecord {
            id: &id,
            routing_key: "book.verified",
            event_name: "BOOK_VERIFIED",
            ocrolus_timestamp: None,
            client_ip: "127.0.0.1",
            received_at_ms: ocrolus_relay::now_ms(),
            body: &body,
        };
        let mut bytes = vec![2u8];
        bytes.extend(postcard::to_stdvec(&record).expect("encode"));
        current.push((k, bytes));
        want.insert(id, body);
    }
    current.push((1001, b"\x09from a future release".to_vec()));
    current.push((1002, b"\x02\xff\xff".to_vec()));
    write_table(&spool.join("spool.redb"), "records", &current);

    let broker = TestBroker::connect().await;
    let opts = RelayOptions {
        extra: flags(&[]),
        ..RelayOptions::default()
    };
    let args = serve_args(
        &opts,
        dir.path(),
        &exchange,
        &format!("{exchange}.unrouted"),
        &spool,
    );
    let (alternate, dead_letter) = (format!("{exchange}.unrouted"), format!("{exchange}.dead"));
    ocrolus_relay::declare_topology(
        &broker.channel,
        &exchange,
        Some(&alternate),
        Some(&dead_letter),
    )
    .await
    .expect("declare");
    let queue = broker.bind_queue(&exchange, "#").await;
    let relay = RelayBinary::start(&args).await;

    let got = collect(&broker, &queue, &want, EVENTUALLY).await;
    assert_exact(&got, &want);
    let started = Instant::now();
    while relay
        .metric("ocrolus_relay_spool_quarantined_messages")
        .await
        < Some(307.0)
        && started.elapsed() < EVENTUALLY
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        relay
            .metric("ocrolus_relay_spool_quarantined_messages")
            .await,
        Some(307.0)
    );
    assert_eq!(
        relay.metric("ocrolus_relay_spool_messages").await,
        Some(0.0)
    );

    // Quiet from here on: a few seconds of nothing to do.
    let (lines_before, _, _) = relay.log_counts();
    let cpu_before = relay.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = relay.cpu_ticks() - cpu_before;
    let (lines, loud, bytes) = relay.log_counts();
    eprintln!(
        "corrupt records: delivered {}/12, log lines {lines} ({loud} warn/error, {bytes} bytes), \
         {} lines and {cpu} CPU ticks in 3 s once drained",
        got.len(),
        lines - lines_before
    );
    assert!(
        loud <= 5,
        "{loud} warning/error lines:\n{}",
        relay.logs.lock().expect("logs").join("\n")
    );
    assert!(lines <= 30, "{lines} log lines");
    assert!(
        lines - lines_before <= 1,
        "the relay keeps logging with nothing to do"
    );
    // A spinning drainer burns ~300 ticks in 3 s; an idle one next to none.
    assert!(cpu < 100, "{cpu} CPU ticks in 3 s with nothing to do");

    drop(relay);
    for name in [
        format!("{exchange}.unrouted"),
        format!("{exchange}.dead"),
        queue,
    ] {
        broker.delete_queue(&name).await;
    }
    for name in [
        exchange.clone(),
        format!("{exchange}.unrouted"),
        format!("{exchange}.dead"),
    ] {
        broker.delete_exchange(&name).await;
    }
}

/// A spool file that is not a database at all (as reported: truncated, not a
/// redb file): the relay says so once, moves it aside, starts with a fresh
/// spool and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_spool_file_is_moved_aside_and_the_relay_still_delivers() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).expect("spool dir");
    std::fs::write(
        spool.join("spool.redb"),
        b"this is not a redb file\n".repeat(100),
    )
    .expect("garbage");
    let exchange = unique("test.events");
    let opts = RelayOptions {
        extra: flags(&[]),
        ..RelayOptions::default()
    };
    let args = serve_args(
        &opts,
        dir.path(),
        &exchange,
        &format!("{exchange}.unrouted"),
        &spool,
    );
    let relay = RelayBinary::start(&args).await;
    let broker = TestBroker::connect().await;
    let started = Instant::now();
    while relay.metric("ocrolus_relay_broker_up").await < Some(1.0)
        && started.elapsed() < EVENTUALLY
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queue = broker.bind_queue(&exchange, "#").await;
    let (id, body) = (new_id(), victim_body(0, "moved-aside"));
    let headers = signed_headers(SECRET, &id, now_secs(), &body);
    let (status, _, _) = request(
        "POST",
        &relay.url,
        &headers,
        bytes::Bytes::from(body.clone()),
    )
    .await;
    assert_eq!(status, 200);
    let want = HashMap::from([(id, body)]);
    assert_exact(&collect(&broker, &queue, &want, EVENTUALLY).await, &want);
    assert_eq!(
        relay.metric("ocrolus_relay_spool_files_moved_aside").await,
        Some(1.0)
    );
    let moved = std::fs::read_dir(&spool)
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("spool.redb.corrupt-")
        })
        .count();
    assert_eq!(moved, 1);
    let logs = relay.logs.lock().expect("logs").join("\n");
    assert_eq!(logs.matches("moved aside").count(), 1, "{logs}");

    drop(relay);
    for name in [
        format!("{exchange}.unrouted"),
        format!("{exchange}.dead"),
        queue,
    ] {
        broker.delete_queue(&name).await;
    }
    for name in [
        exchange.clone(),
        format!("{exchange}.unrouted"),
        format!("{exchange}.dead"),
    ] {
        broker.delete_exchange(&name).await;
    }
}

/// `--max-body` above what the broker accepts is refused at start and by
/// `check-config`: such an event would be answered 200, then refused.
#[tokio::test]
async fn max_body_above_the_broker_limit_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exchange = unique("test.check");
    let opts = RelayOptions {
        extra: vec![
            "--max-body".into(),
            "2000000".into(),
            "--broker-max-message-size".into(),
            "1000000".into(),
        ],
        ..RelayOptions::default()
    };
    let args = serve_args(
        &opts,
        dir.path(),
        &exchange,
        &format!("{exchange}.unrouted"),
        &dir.path().join("spool"),
    );
    for command in ["check-config", "serve"] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ocrolus-relay"))
            .arg(command)
            .args(&args)
            .output()
            .await
            .expect("run");
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{command}: {err}");
        assert!(
            err.contains("--max-body 2000000 is larger than --broker-max-message-size 1000000"),
            "{command}: {err}"
        );
    }
}
