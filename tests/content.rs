//! An authentic delivery is never lost for its content.
//! - Any JSON body that passed authentication is published, exact bytes; one
//!   the relay cannot classify goes to `ocrolus.unclassified` with an
//!   `x-relay-unclassified` reason. Only bodies that are not JSON get 400.
//! - Item 6: where no signature covers `Webhook-Request-Id` (Basic only),
//!   de-duplication is on id and body digest; a known id with another body
//!   is published as its own message, marked `x-relay-dedup-conflict`.

mod common;

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::*;
use lapin::types::AMQPValue;

fn header(message: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    let headers = message.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => panic!("{name}: {other:?}"),
    }
}

fn message_id(message: &lapin::message::BasicGetMessage) -> String {
    message
        .properties
        .message_id()
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default()
}

#[tokio::test]
async fn unclassifiable_json_is_published_with_a_reason() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let (broker, queue) = relay.watch_all().await;
    let cases: [(&str, &[u8]); 8] = [
        (
            "unknown_status",
            br#"{"status":"SOMETHING_NEW","book_pk":1}"#,
        ),
        ("bad_event_name", br#"{"event_name":"book verified!"}"#),
        (
            "bad_event_name",
            br#"{"event_name":"ocrolus.unclassified"}"#,
        ),
        (
            "number_out_of_range",
            br#"{"event_name":"book.verified","n":1e400}"#,
        ),
        ("not_an_object", br#"["book.verified"]"#),
        ("no_event", br#"{"book_uuid":"x"}"#),
        (
            "lone_surrogate",
            br#"{"event_name":"book.verified","note":"\ud800"}"#,
        ),
        (
            "unreadable_fields",
            br#"{"event_name":"book.verified","event_name":"book.completed"}"#,
        ),
    ];
    for (reason, body) in cases {
        let (status, _, answer) = post_signed(&relay, &new_id(), body).await;
        assert_eq!(
            status,
            200,
            "{reason}: {}",
            String::from_utf8_lossy(&answer)
        );
        let got = broker.drain(&queue, 1, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1, "{reason}: exactly one message");
        assert_eq!(got[0].delivery.data, body, "{reason}: exact bytes");
        assert_eq!(
            got[0].delivery.routing_key.as_str(),
            "ocrolus.unclassified",
            "{reason}"
        );
        assert_eq!(
            header(&got[0], "x-relay-unclassified").as_deref(),
            Some(reason)
        );
    }
    let text = relay.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            r#"ocrolus_relay_unclassified_total{reason="bad_event_name"}"#
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"ocrolus_relay_unclassified_total{reason="no_event"}"#
        ),
        1.0
    );
    // A classified event carries no reason header.
    let body = br#"{"event_name":"book.verified"}"#;
    assert_eq!(post_signed(&relay, &new_id(), body).await.0, 200);
    let got = broker.drain(&queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].delivery.routing_key.as_str(), "book.verified");
    assert_eq!(header(&got[0], "x-relay-unclassified"), None);
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn only_bodies_that_are_not_json_get_400() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let (broker, queue) = relay.watch_all().await;
    let mut invalid_utf8 = br#"{"event_name":"book.verified","x":""#.to_vec();
    invalid_utf8.extend([0xd0, 0xd0, b'"', b'}']);
    let cases: Vec<Vec<u8>> = vec![
        b"{not json".to_vec(),
        b"".to_vec(),
        br#"{"event_name":"book.verified"} trailing"#.to_vec(),
        br#"{"a":01}"#.to_vec(),
        invalid_utf8,
    ];
    for body in cases {
        let (status, _, answer) = post_signed(&relay, &new_id(), &body).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
        assert_eq!(&answer[..], br#"{"error":"bad_request"}"#);
    }
    let got = broker.drain(&queue, 0, Duration::from_millis(300)).await;
    assert!(got.is_empty(), "nothing published for non-JSON bodies");
    relay.finish(&broker, &[&queue]).await;
}

fn basic_only_relay_options(dir: &std::path::Path) -> RelayOptions {
    let path = dir.join("basic-auth");
    std::fs::write(&path, "ocrolus:first-password\n").expect("write basic auth file");
    RelayOptions {
        secrets: vec![],
        extra: vec!["--basic-auth-file".into(), path.display().to_string()],
        ..RelayOptions::default()
    }
}

fn basic_headers(id: &str) -> Vec<(String, String)> {
    let encoded = base64::engine::general_purpose::STANDARD.encode("ocrolus:first-password");
    vec![
        ("content-type".into(), "application/json".into()),
        ("authorization".into(), format!("Basic {encoded}")),
        ("webhook-request-id".into(), id.into()),
    ]
}

async fn post_basic(relay: &TestRelay, id: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let (status, _, answer) = request(
        "POST",
        &relay.url,
        &basic_headers(id),
        Bytes::copy_from_slice(body),
    )
    .await;
    let json = serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// The defect as reported: with Basic only, a claimed id suppressed the
/// real delivery that came later with another body.
#[tokio::test]
async fn basic_only_dedup_never_drops_a_different_body() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = TestRelay::start(basic_only_relay_options(dir.path())).await;
    let (broker, queue) = relay.watch_all().await;
    let id = new_id();
    let claimed = br#"{"event_name":"book.verified","book_uuid":"attacker"}"#;
    let real = br#"{"event_name":"book.verified","book_uuid":"real"}"#;

    let (status, answer) = post_basic(&relay, &id, claimed).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("published"))
    );
    let (status, answer) = post_basic(&relay, &id, real).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("published")),
        "{answer}"
    );
    // The same body again is a duplicate, whichever it was.
    for body in [&claimed[..], &real[..]] {
        let (status, answer) = post_basic(&relay, &id, body).await;
        assert_eq!(
            (status, answer["status"].as_str()),
            (200, Some("duplicate"))
        );
    }

    let got = broker.drain(&queue, 2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2, "both bodies published, once each");
    assert_eq!(got[0].delivery.data, claimed);
    assert_eq!(message_id(&got[0]), id);
    assert_eq!(header(&got[0], "x-relay-dedup-conflict"), None);
    assert_eq!(got[1].delivery.data, real);
    assert_eq!(
        header(&got[1], "x-relay-dedup-conflict").as_deref(),
        Some(id.as_str())
    );
    assert_ne!(
        message_id(&got[1]),
        id,
        "its own message: subscribers de-duplicating on message_id keep it"
    );
    assert_eq!(
        relay.metric("ocrolus_relay_dedup_conflicts_total").await,
        1.0
    );
    relay.finish(&broker, &[&queue]).await;
}

/// With HMAC the id is signed (`{timestamp}.{id}.{body}`): id-only
/// de-duplication stays.
#[tokio::test]
async fn signed_ids_keep_id_only_dedup() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let (broker, queue) = relay.watch_all().await;
    let id = new_id();
    let first = br#"{"event_name":"book.verified","n":1}"#;
    let second = br#"{"event_name":"book.verified","n":2}"#;
    let (status, _, answer) = post_signed(&relay, &id, first).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&answer).contains("published"));
    for body in [&first[..], &second[..]] {
        let (status, _, answer) = post_signed(&relay, &id, body).await;
        assert_eq!(status, 200);
        assert!(
            String::from_utf8_lossy(&answer).contains("duplicate"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    let got = broker.drain(&queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].delivery.data, first);
    let got = broker.drain(&queue, 0, Duration::from_millis(300)).await;
    assert!(got.is_empty());
    assert_eq!(
        relay.metric("ocrolus_relay_dedup_conflicts_total").await,
        0.0
    );
    relay.finish(&broker, &[&queue]).await;
}
