//! What subscribers rely on. The AsyncAPI document agrees with the
//! relay's own tables, every documented example payload routes where the
//! manifest says, and both example consumers (Rust and Python) receive
//! events published through a real relay, once each.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ExchangeDeleteOptions};
use ocrolus_relay::{AccountLevel, EventTable, KNOWN_EVENTS, LEGACY_STATUS_MAP, account_level_map};
use serde_json::{Value, json};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn asyncapi() -> Value {
    let text = std::fs::read_to_string(repo("docs/asyncapi.yaml")).expect("docs/asyncapi.yaml");
    serde_saphyr::from_str(&text).expect("docs/asyncapi.yaml parses as YAML")
}

/// Every header the relay can set (on a message that has them all: signed,
/// unclassified, a de-duplication conflict) is documented in `RelayHeaders`,
/// and the ones on every message are required there.
#[test]
fn asyncapi_lists_every_header_the_relay_sets() {
    let doc = asyncapi();
    let schema = &doc["components"]["schemas"]["RelayHeaders"];
    let documented: Vec<&str> = schema["properties"]
        .as_object()
        .expect("RelayHeaders.properties")
        .keys()
        .map(String::as_str)
        .collect();
    let required: Vec<&str> = schema["required"]
        .as_array()
        .expect("RelayHeaders.required")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut envelope = ocrolus_relay::Envelope {
        id: "01a21806-29ba-7590-a62f-a3807c176be2".into(),
        routing_key: "ocrolus.unclassified".into(),
        event_name: String::new(),
        ocrolus_timestamp: Some("1767225600".into()),
        client_ip: "18.205.30.63".into(),
        received_at_ms: 1_767_225_600_500,
        body: bytes::Bytes::from_static(b"[]"),
        source: "sandbox".into(),
        exchange: None,
    };
    envelope.mark_dedup_conflict(&[7; 32]);
    let full = ocrolus_relay::properties(&envelope);
    let set: Vec<String> = full
        .headers()
        .as_ref()
        .expect("headers")
        .inner()
        .keys()
        .map(|k| k.as_str().to_owned())
        .collect();
    assert_eq!(set.len(), 6, "{set:?}");
    for name in &set {
        assert!(
            documented.contains(&name.as_str()),
            "{name} is not in RelayHeaders"
        );
    }
    assert!(required.contains(&"x-ocrolus-source"), "{required:?}");
    // The plainest message (unsigned, classified) still has every required one.
    envelope.ocrolus_timestamp = None;
    envelope.id = "plain".into();
    envelope.routing_key = "book.verified".into();
    envelope.event_name = "book.verified".into();
    let plain = ocrolus_relay::properties(&envelope);
    let plain = plain.headers().as_ref().expect("headers").inner();
    for name in &required {
        assert!(
            plain.contains_key(*name),
            "{name} missing from a plain message"
        );
    }
}

#[test]
fn asyncapi_routing_tables_match_the_relay() {
    let doc = asyncapi();
    assert_eq!(
        doc["asyncapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );

    let keys: Vec<&str> = doc["x-ocrolus-routing-keys"]
        .as_array()
        .expect("x-ocrolus-routing-keys is a list")
        .iter()
        .map(|k| k.as_str().expect("routing key is a string"))
        .collect();
    assert_eq!(keys, KNOWN_EVENTS.to_vec());

    let expected: BTreeMap<String, Value> = account_level_map()
        .into_iter()
        .map(|(name, target)| {
            let value = match target {
                AccountLevel::Fixed(key) => json!(key),
                AccountLevel::ByStatus { succeeded, failed } => {
                    json!({ "succeeded": succeeded, "failed": failed })
                }
            };
            (name.to_owned(), value)
        })
        .collect();
    let documented: BTreeMap<String, Value> = doc["x-ocrolus-account-level-map"]
        .as_object()
        .expect("x-ocrolus-account-level-map is a mapping")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(documented, expected);

    let expected: BTreeMap<String, Value> = LEGACY_STATUS_MAP
        .iter()
        .map(|(status, key)| ((*status).to_owned(), json!(key)))
        .collect();
    let documented: BTreeMap<String, Value> = doc["x-ocrolus-legacy-status-map"]
        .as_object()
        .expect("x-ocrolus-legacy-status-map is a mapping")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(documented, expected);

    // Every known routing key has a channel.
    let addresses: Vec<&str> = doc["channels"]
        .as_object()
        .expect("channels")
        .values()
        .filter_map(|c| c["address"].as_str())
        .collect();
    for key in KNOWN_EVENTS {
        assert!(addresses.contains(&key), "no channel with address {key}");
    }
}

#[test]
fn documented_examples_route_as_the_manifest_says() {
    let manifest_text =
        std::fs::read_to_string(repo("docs/examples/manifest.json")).expect("manifest.json");
    let manifest: Vec<Value> =
        serde_json::from_str(&manifest_text).expect("manifest is a JSON list");
    let table = EventTable::default();
    let mut listed = Vec::new();
    for entry in &manifest {
        let file = entry["file"].as_str().expect("file");
        let body = std::fs::read(repo(&format!("docs/examples/{file}")))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let event = table
            .resolve(&body)
            .unwrap_or_else(|e| panic!("{file} does not resolve: {e}"));
        assert_eq!(
            Some(event.routing_key.as_str()),
            entry["routing_key"].as_str(),
            "{file}"
        );
        if let Some(sent_as) = entry["x-ocrolus-event"].as_str() {
            assert_eq!(event.name_as_sent, sent_as, "{file}: x-ocrolus-event");
        }
        listed.push(file.to_owned());
    }
    for dir_entry in std::fs::read_dir(repo("docs/examples")).expect("docs/examples") {
        let name = dir_entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let is_json = std::path::Path::new(&name)
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
        if is_json && name != "manifest.json" {
            assert!(listed.contains(&name), "{name} is not in manifest.json");
        }
    }
}

/// The consumer's own topology, deleted at the end.
struct ConsumerNames {
    queue: String,
    dead_letter_exchange: String,
}

impl ConsumerNames {
    fn new() -> Self {
        Self {
            queue: unique("test.consumer"),
            dead_letter_exchange: unique("test.dlx"),
        }
    }

    fn dead_letters(&self) -> String {
        format!("{}.dead-letter", self.queue)
    }

    async fn cleanup(&self, broker: &TestBroker) {
        broker.delete_queue(&self.queue).await;
        broker.delete_queue(&self.dead_letters()).await;
        let _ = broker
            .channel
            .exchange_delete(
                self.dead_letter_exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

/// The compiled `examples/consumer.rs`, next to the relay binary.
fn rust_consumer() -> PathBuf {
    let relay = Path::new(env!("CARGO_BIN_EXE_ocrolus-relay"));
    let dir = relay.parent().expect("binary directory");
    let path = dir
        .join("examples")
        .join(format!("consumer{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: build the example first (`cargo build --example consumer`, \
         or run `cargo test --all-targets`, which builds it)",
        path.display()
    );
    let source = repo("examples/consumer.rs");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(src), Some(bin)) = (modified(&source), modified(&path))
        && src > bin
    {
        eprintln!(
            "warning: {} is older than examples/consumer.rs; testing a stale build",
            path.display()
        );
    }
    path
}

async fn publish_raw(broker: &TestBroker, exchange: &str, key: &str, id: &str, body: &[u8]) {
    broker
        .channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_message_id(id.into())
                .with_content_type("application/json".into()),
        )
        .await
        .expect("publish")
        .await
        .expect("publish confirm");
}

/// Parses the consumer's JSON lines: (message_id, routing_key, event, body).
fn parse_lines(lines: &[String]) -> Vec<(String, String, String, Value)> {
    lines
        .iter()
        .map(|line| {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            (
                v["message_id"].as_str().unwrap_or_default().to_owned(),
                v["routing_key"].as_str().unwrap_or_default().to_owned(),
                v["event"].as_str().unwrap_or_default().to_owned(),
                v["body"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn rust_example_consumer_receives_each_event_once() {
    require_broker!();
    let consumer_bin = rust_consumer();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let broker = TestBroker::connect().await;
    let names = ConsumerNames::new();
    let consumer = spawn_lines(
        tokio::process::Command::new(&consumer_bin)
            .args(["--amqp-url", AMQP_URL, "--exchange", &relay.exchange])
            .args(["--queue", &names.queue])
            .args(["--dead-letter-exchange", &names.dead_letter_exchange])
            .args(["--binding", "book.#", "--binding", "document.*"])
            .args(["--prefetch", "5", "--max-messages", "2"])
            .env_remove("AMQP_URL"),
    );
    assert!(
        wait_for_consumer(&broker.connection, &names.queue, Duration::from_secs(60)).await,
        "the consumer never started consuming {}: {:?}",
        names.queue,
        consumer.stderr_seen
    );

    let first = br#"{"event_name":"book.verified","book_uuid":"b-1"}"#;
    let second =
        br#"{"event_name":"DOC_VERIFIED","status":"VERIFICATION_COMPLETE","doc_uuid":"d-2"}"#;
    let (id1, id2) = (new_id(), new_id());
    let (status, _, _) = post_signed(&relay, &id1, first).await;
    assert_eq!(status, 200);
    // At-least-once delivery: the same message again (as after a consumer
    // crash or a broker failover), then a body no one can decode.
    publish_raw(&broker, &relay.exchange, "book.verified", &id1, first).await;
    publish_raw(
        &broker,
        &relay.exchange,
        "book.verified",
        "poison-1",
        b"\x00not json",
    )
    .await;
    // Ocrolus retrying the same delivery: the relay itself answers duplicate.
    let (status, _, answer) = post_signed(&relay, &id1, first).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&answer).contains("duplicate"));
    let (status, _, _) = post_signed(&relay, &id2, second).await;
    assert_eq!(status, 200);

    let (exit, lines, stderr) = consumer.finish(Duration::from_secs(60)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "consumer exits 0 after --max-messages: {exit:?}\n{stderr:#?}"
    );
    let got = parse_lines(&lines);
    assert_eq!(
        got.len(),
        2,
        "two events, once each: {lines:#?}\n{stderr:#?}"
    );
    assert_eq!(got[0].0, id1);
    assert_eq!(got[0].1, "book.verified");
    assert_eq!(got[0].2, "book.verified");
    assert_eq!(
        got[0].3,
        serde_json::from_slice::<Value>(first).expect("json")
    );
    assert_eq!(got[1].0, id2);
    assert_eq!(got[1].1, "document.verification_succeeded");
    assert_eq!(got[1].2, "DOC_VERIFIED");
    assert_eq!(
        got[1].3,
        serde_json::from_slice::<Value>(second).expect("json")
    );
    assert!(
        stderr.iter().any(|l| l.contains("duplicate")),
        "{stderr:#?}"
    );

    // The poison message was dead-lettered, not requeued.
    let dead = broker
        .drain(&names.dead_letters(), 1, Duration::from_secs(10))
        .await;
    assert_eq!(dead.len(), 1, "poison message in {}", names.dead_letters());
    assert_eq!(dead[0].delivery.data, b"\x00not json");

    names.cleanup(&broker).await;
    relay.finish(&broker, &[]).await;
}

/// `python3` with pika, installing it if needed; None (with the reason
/// printed) when that is not possible here.
async fn python_with_pika() -> Option<()> {
    let has_pika = || async {
        tokio::process::Command::new("python3")
            .args(["-c", "import pika"])
            .output()
            .await
            .map(|o| o.status.success())
    };
    match has_pika().await {
        Ok(true) => return Some(()),
        Ok(false) => {}
        Err(e) => {
            eprintln!("SKIPPED: python3 not available ({e})");
            return None;
        }
    }
    let install = tokio::process::Command::new("python3")
        .args(["-m", "pip", "install", "-q", "pika>=1.3,<2"])
        .output()
        .await;
    match (install, has_pika().await) {
        (_, Ok(true)) => Some(()),
        (Ok(out), _) => {
            eprintln!(
                "SKIPPED: cannot install pika (pip exit {:?}): {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
        (Err(e), _) => {
            eprintln!("SKIPPED: cannot run pip: {e}");
            None
        }
    }
}

#[tokio::test]
async fn python_example_consumer_receives_the_event() {
    require_broker!();
    if python_with_pika().await.is_none() {
        return;
    }
    let relay = TestRelay::start(RelayOptions::default()).await;
    let broker = TestBroker::connect().await;
    let names = ConsumerNames::new();
    let script = repo("examples/consumer.py");
    let consumer = spawn_lines(
        tokio::process::Command::new("python3")
            .arg("-u")
            .arg(&script)
            .args(["--amqp-url", AMQP_URL, "--exchange", &relay.exchange])
            .args(["--queue", &names.queue])
            .args(["--dead-letter-exchange", &names.dead_letter_exchange])
            .args(["--binding", "document.#", "--max-messages", "1"])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("AMQP_URL"),
    );
    assert!(
        wait_for_consumer(&broker.connection, &names.queue, Duration::from_secs(60)).await,
        "the Python consumer never started consuming {}: {:?}",
        names.queue,
        consumer.stderr_seen
    );

    // Ocrolus' own account-level test payload: routed as a document event.
    let body =
        std::fs::read(repo("docs/examples/account-level-test-webhook.json")).expect("example");
    let id = new_id();
    let (status, _, _) = post_signed(&relay, &id, &body).await;
    assert_eq!(status, 200);

    let (exit, lines, stderr) = consumer.finish(Duration::from_secs(60)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "consumer.py exits 0 after --max-messages: {exit:?}\n{stderr:#?}"
    );
    let got = parse_lines(&lines);
    assert_eq!(got.len(), 1, "{lines:#?}\n{stderr:#?}");
    assert_eq!(got[0].0, id);
    assert_eq!(got[0].1, "document.verification_succeeded");
    assert_eq!(got[0].2, "VERIFICATION_COMPLETE");
    assert_eq!(
        got[0].3,
        serde_json::from_slice::<Value>(&body).expect("json")
    );

    names.cleanup(&broker).await;
    relay.finish(&broker, &[]).await;
}
