//! Several sources through the binary: each source's messages carry its
//! name in `x-ocrolus-source` and go to its own exchange (sources may share
//! one), also when they were spooled while the broker was away; records an
//! older relay spooled drain as the `default` source; a source exchange
//! that does not exist is reported by `/readyz`, never a silent loss.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::{FaultProxy, RelayBinary, TestBroker, unique};
use lapin::message::BasicGetMessage;
use lapin::types::AMQPValue;

const PRODUCTION_SECRET: &str = "production-secret-0123456789abcdef";
const SANDBOX_SECRET: &str = "sandbox-secret-0123456789abcdef";
const STAGING_SECRET: &str = "staging-secret-0123456789abcdef";

/// The exchanges of one test: `--exchange` (production's) and the one
/// sandbox and staging share.
struct Exchanges {
    main: String,
    shared: String,
}

impl Exchanges {
    fn new() -> Self {
        let main = unique("test.sources");
        Self {
            shared: format!("{main}.sandbox"),
            main,
        }
    }

    fn alternate(&self) -> String {
        format!("{}.unrouted", self.main)
    }

    async fn delete(&self, broker: &TestBroker) {
        for exchange in [&self.main, &self.shared, &self.alternate()] {
            broker.delete_exchange(exchange).await;
        }
        broker.delete_queue(&self.alternate()).await;
    }
}

fn write_secret_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("secret file");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
}

/// Three sources: production on `--exchange`, sandbox and staging on an
/// exchange of their own, which they share.
fn three_sources(dir: &Path, exchanges: &Exchanges) -> String {
    std::fs::write(dir.join("allowlist.yaml"), "allow: [127.0.0.1/32]\n").expect("allowlist");
    for (name, secret) in [
        ("production", PRODUCTION_SECRET),
        ("sandbox", SANDBOX_SECRET),
        ("staging", STAGING_SECRET),
    ] {
        write_secret_file(&dir.join(format!("{name}.secrets")), &format!("{secret}\n"));
    }
    let path = dir.join("relay.yaml");
    std::fs::write(
        &path,
        format!(
            "plaintext: true
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
allowlist: {dir}/allowlist.yaml
spool_dir: {dir}/spool
exchange: {main}
alternate_exchange: {alternate}
sources:
  - name: production
    path: /webhooks/ocrolus
    secret_file: {dir}/production.secrets
  - name: sandbox
    path: /webhooks/ocrolus-sandbox
    secret_file: {dir}/sandbox.secrets
    exchange: {shared}
  - name: staging
    path: /webhooks/ocrolus-staging
    secret_file: {dir}/staging.secrets
    exchange: {shared}
",
            dir = dir.display(),
            main = exchanges.main,
            alternate = exchanges.alternate(),
            shared = exchanges.shared,
        ),
    )
    .expect("relay.yaml");
    path.display().to_string()
}

/// One delivery per source: (source, path, secret, body).
fn deliveries(run: &str) -> Vec<(&'static str, &'static str, &'static str, Vec<u8>)> {
    [
        ("production", "/webhooks/ocrolus", PRODUCTION_SECRET),
        ("sandbox", "/webhooks/ocrolus-sandbox", SANDBOX_SECRET),
        ("staging", "/webhooks/ocrolus-staging", STAGING_SECRET),
    ]
    .into_iter()
    .map(|(source, path, secret)| {
        // Odd spacing: the bytes must arrive exactly as sent.
        let body =
            format!("{{ \"event_name\" :\"book.verified\", \"book_uuid\": \"{source}-{run}\" }}");
        (source, path, secret, body.into_bytes())
    })
    .collect()
}

/// POSTs a signed delivery; returns the status and the `status` of the
/// answer's body.
async fn post(relay: &RelayBinary, path: &str, secret: &str, body: &[u8]) -> (u16, String) {
    let id = common::new_id();
    let headers = common::signed_headers(secret, &id, common::now_secs(), body);
    let (status, _, answer) = common::request(
        "POST",
        &format!("http://{}{path}", relay.listen),
        &headers,
        Bytes::copy_from_slice(body),
    )
    .await;
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
    (status, answer["status"].as_str().unwrap_or("-").to_owned())
}

fn header(message: &BasicGetMessage, name: &str) -> Option<String> {
    let headers = message.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// (source header, exchange, routing key, body) of one message.
type Seen = (String, String, String, Vec<u8>);

/// What each message was, sorted.
fn seen(messages: &[BasicGetMessage]) -> Vec<Seen> {
    let mut out: Vec<_> = messages
        .iter()
        .map(|m| {
            (
                header(m, "x-ocrolus-source").unwrap_or_default(),
                m.delivery.exchange.to_string(),
                m.delivery.routing_key.to_string(),
                m.delivery.data.clone(),
            )
        })
        .collect();
    out.sort();
    out
}

async fn wait_broker_up(relay: &RelayBinary) {
    for _ in 0..300 {
        if relay.metric("ocrolus_relay_broker_up").await == Some(1.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "relay never connected:\n{}",
        relay.logs.lock().expect("logs").join("\n")
    );
}

/// What each source's queue must hold: production's message on the main
/// exchange, sandbox's and staging's on the shared one, each with its name.
fn expected(exchanges: &Exchanges, sent: &[(&str, &str, &str, Vec<u8>)]) -> (Vec<Seen>, Vec<Seen>) {
    let row = |source: &str, exchange: &str, body: &[u8]| {
        (
            source.to_owned(),
            exchange.to_owned(),
            "book.verified".to_owned(),
            body.to_vec(),
        )
    };
    let main = vec![row("production", &exchanges.main, &sent[0].3)];
    let mut shared = vec![
        row("sandbox", &exchanges.shared, &sent[1].3),
        row("staging", &exchanges.shared, &sent[2].3),
    ];
    shared.sort();
    (main, shared)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_source_publishes_to_its_exchange_with_its_name() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let exchanges = Exchanges::new();
    let config = three_sources(dir.path(), &exchanges);
    let relay = RelayBinary::start(&[
        "--config".into(),
        config,
        "--amqp-url".into(),
        common::AMQP_URL.into(),
    ])
    .await;
    wait_broker_up(&relay).await;
    let broker = TestBroker::connect().await;
    let main_queue = broker.bind_queue(&exchanges.main, "#").await;
    let shared_queue = broker.bind_queue(&exchanges.shared, "#").await;

    let sent = deliveries(&unique("run"));
    for (source, path, secret, body) in &sent {
        assert_eq!(
            post(&relay, path, secret, body).await,
            (200, "published".to_owned()),
            "{source}"
        );
    }
    // Signed for sandbox, sent to staging (which shares its exchange): 401.
    assert_eq!(
        post(
            &relay,
            "/webhooks/ocrolus-staging",
            SANDBOX_SECRET,
            &sent[1].3
        )
        .await
        .0,
        401
    );

    let (want_main, want_shared) = expected(&exchanges, &sent);
    let got_main = broker.drain(&main_queue, 1, Duration::from_secs(10)).await;
    let got_shared = broker
        .drain(&shared_queue, 2, Duration::from_secs(10))
        .await;
    assert_eq!(seen(&got_main), want_main);
    assert_eq!(seen(&got_shared), want_shared);
    // Nothing more arrives: each message went to one exchange only.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        broker
            .drain(&main_queue, 0, Duration::ZERO)
            .await
            .is_empty()
    );
    assert!(
        broker
            .drain(&shared_queue, 0, Duration::ZERO)
            .await
            .is_empty()
    );

    // A path no source has: 404, counted under no source.
    assert_eq!(
        post(&relay, "/webhooks/nobody", SANDBOX_SECRET, &sent[1].3)
            .await
            .0,
        404
    );
    assert_metrics_per_source(&relay).await;

    drop(relay);
    broker.delete_queue(&main_queue).await;
    broker.delete_queue(&shared_queue).await;
    exchanges.delete(&broker).await;
}

/// Each source's requests and publishes count under its name; the `source`
/// label holds configured names only (empty, which Prometheus drops, for
/// requests refused before routing); every source's series exist from the
/// start.
async fn assert_metrics_per_source(relay: &RelayBinary) {
    let (status, _, text) = common::get(&format!("http://{}/metrics", relay.admin)).await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&text).into_owned();
    let value = |series: &str| common::metric_value(&text, series);
    for source in ["production", "sandbox", "staging"] {
        assert_eq!(
            value(&format!(
                r#"ocrolus_relay_requests_total{{outcome="published",source="{source}"}}"#
            )),
            1.0,
            "{source}\n{text}"
        );
        assert_eq!(
            value(&format!(
                r#"ocrolus_relay_events_published_total{{event="book.verified",source="{source}"}}"#
            )),
            1.0,
            "{source}"
        );
        for series in [
            format!(r#"ocrolus_relay_requests_total{{outcome="unavailable",source="{source}"}} 0"#),
            format!(r#"ocrolus_relay_publish_failures_total{{reason="nack",source="{source}"}} 0"#),
        ] {
            assert!(
                text.lines().any(|l| l == series),
                "created at start: {series}"
            );
        }
    }
    assert_eq!(
        value(r#"ocrolus_relay_requests_total{outcome="unauthorized",source="staging"}"#),
        1.0
    );
    assert_eq!(
        value(r#"ocrolus_relay_requests_total{outcome="unauthorized",source="sandbox"}"#),
        0.0
    );
    assert_eq!(
        value(r#"ocrolus_relay_requests_total{outcome="not_found",source=""}"#),
        1.0
    );
    let mut labels: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once("source=\"")?.1.split_once('"'))
        .map(|(value, _)| value)
        .collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels, ["", "production", "sandbox", "staging"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spooled_events_drain_to_their_sources_exchange_with_the_header() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let exchanges = Exchanges::new();
    let config = three_sources(dir.path(), &exchanges);
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = RelayBinary::start(&[
        "--config".into(),
        config,
        "--amqp-url".into(),
        proxy.url(),
        "--confirm-timeout".into(),
        "0.5".into(),
    ])
    .await;
    wait_broker_up(&relay).await;
    let broker = TestBroker::connect().await;
    let main_queue = broker.bind_queue(&exchanges.main, "#").await;
    let shared_queue = broker.bind_queue(&exchanges.shared, "#").await;

    proxy.cut();
    let sent = deliveries(&unique("spooled"));
    for (source, path, secret, body) in &sent {
        assert_eq!(
            post(&relay, path, secret, body).await,
            (200, "spooled".to_owned()),
            "{source}"
        );
    }
    assert_eq!(
        relay.metric("ocrolus_relay_spool_messages").await,
        Some(3.0)
    );
    proxy.restore();
    relay.wait_drained(Duration::from_secs(30)).await;

    let (want_main, want_shared) = expected(&exchanges, &sent);
    let got_main = broker.drain(&main_queue, 1, Duration::from_secs(10)).await;
    let got_shared = broker
        .drain(&shared_queue, 2, Duration::from_secs(10))
        .await;
    assert_eq!(seen(&got_main), want_main);
    assert_eq!(seen(&got_shared), want_shared);

    drop(relay);
    broker.delete_queue(&main_queue).await;
    broker.delete_queue(&shared_queue).await;
    exchanges.delete(&broker).await;
}

/// The layout of spool records before sources existed (formats 1 and 2).
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

fn write_table(path: &Path, table: &str, rows: &[(u64, Vec<u8>)]) {
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

/// An upgraded relay drains the spool an older one left: format-1 and
/// format-2 records are published with their exact bytes, as the `default`
/// source, to `--exchange`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_spool_drains_as_the_default_source() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).expect("spool dir");
    let exchange = unique("test.oldspool");
    let run = unique("old");
    let bodies: Vec<Vec<u8>> = (0..2)
        .map(|n| format!("{{\"event_name\":\"book.verified\",\"n\":{n},\"run\":\"{run}\"}}").into())
        .collect();
    let ids = [common::new_id(), common::new_id()];
    let record = |n: usize| {
        postcard::to_stdvec(&LegacyRecord {
            id: &ids[n],
            routing_key: "book.verified",
            event_name: "book.verified",
            ocrolus_timestamp: Some("1767225600"),
            client_ip: "18.205.30.63",
            received_at_ms: ocrolus_relay::now_ms(),
            body: &bodies[n],
        })
        .expect("encode")
    };
    let file = spool.join("spool.redb");
    write_table(&file, "events", &[(1, record(0))]);
    write_table(&file, "records", &[(2, [&[2u8][..], &record(1)].concat())]);

    let broker = TestBroker::connect().await;
    ocrolus_relay::declare_topology(&broker.channel, &exchange, None, None)
        .await
        .expect("declare");
    let queue = broker.bind_queue(&exchange, "#").await;
    std::fs::write(dir.path().join("allowlist.yaml"), "allow: [127.0.0.1/32]\n")
        .expect("allowlist");
    write_secret_file(
        &dir.path().join("secrets"),
        &format!("{PRODUCTION_SECRET}\n"),
    );
    let relay = RelayBinary::start(&[
        "--secret-file".into(),
        dir.path().join("secrets").display().to_string(),
        "--plaintext".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--allowlist".into(),
        dir.path().join("allowlist.yaml").display().to_string(),
        "--spool-dir".into(),
        spool.display().to_string(),
        "--exchange".into(),
        exchange.clone(),
        "--alternate-exchange".into(),
        String::new(),
        "--dead-letter-exchange".into(),
        String::new(),
        "--amqp-url".into(),
        common::AMQP_URL.into(),
    ])
    .await;
    relay.wait_drained(Duration::from_secs(30)).await;
    let got = broker.drain(&queue, 2, Duration::from_secs(10)).await;
    let mut seen: Vec<(String, String, Vec<u8>)> = got
        .iter()
        .map(|m| {
            (
                header(m, "x-ocrolus-source").unwrap_or_default(),
                m.delivery.exchange.to_string(),
                m.delivery.data.clone(),
            )
        })
        .collect();
    seen.sort();
    let want: Vec<(String, String, Vec<u8>)> = bodies
        .iter()
        .map(|b| ("default".to_owned(), exchange.clone(), b.clone()))
        .collect();
    assert_eq!(seen, want);

    drop(relay);
    broker.delete_queue(&queue).await;
    broker.delete_exchange(&exchange).await;
}

/// With `--no-declare`, a source exchange that does not exist keeps the
/// relay off the broker and says so in `/readyz`; deliveries are spooled
/// (200 only once fsynced) and reach the exchange once it exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_source_exchange_is_reported_and_loses_nothing() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let exchanges = Exchanges::new();
    let config = three_sources(dir.path(), &exchanges);
    let broker = TestBroker::connect().await;
    ocrolus_relay::declare_topology(
        &broker.channel,
        &exchanges.main,
        Some(&exchanges.alternate()),
        None,
    )
    .await
    .expect("declare");
    let main_queue = broker.bind_queue(&exchanges.main, "#").await;
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = RelayBinary::start(&[
        "--config".into(),
        config,
        "--amqp-url".into(),
        proxy.url(),
        "--no-declare".into(),
    ])
    .await;
    let readyz = format!("http://{}/readyz", relay.admin);
    let mut reason = String::new();
    for _ in 0..200 {
        let (status, _, body) = common::get(&readyz).await;
        reason = String::from_utf8_lossy(&body).into_owned();
        if status == 503 && reason.contains(&exchanges.shared) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reason.contains(&exchanges.shared) && reason.contains("source sandbox, staging"),
        "{reason}"
    );
    assert_eq!(relay.metric("ocrolus_relay_broker_up").await, Some(0.0));

    let sent = deliveries(&unique("missing"));
    for (source, path, secret, body) in &sent {
        assert_eq!(
            post(&relay, path, secret, body).await,
            (200, "spooled".to_owned()),
            "{source}"
        );
    }
    // The relay is kept off the broker while the exchange appears, so that
    // nothing drains before the test's queue is bound.
    proxy.cut();
    ocrolus_relay::declare_topology(
        &broker.channel,
        &exchanges.shared,
        Some(&exchanges.alternate()),
        None,
    )
    .await
    .expect("declare");
    let shared_queue = broker.bind_queue(&exchanges.shared, "#").await;
    proxy.restore();
    relay.wait_drained(Duration::from_secs(30)).await;
    let (want_main, want_shared) = expected(&exchanges, &sent);
    let got_main = broker.drain(&main_queue, 1, Duration::from_secs(10)).await;
    let got_shared = broker
        .drain(&shared_queue, 2, Duration::from_secs(10))
        .await;
    assert_eq!(seen(&got_main), want_main);
    assert_eq!(seen(&got_shared), want_shared);
    let (status, _, _) = common::get(&readyz).await;
    assert_eq!(status, 200);

    drop(relay);
    broker.delete_queue(&main_queue).await;
    broker.delete_queue(&shared_queue).await;
    exchanges.delete(&broker).await;
}
