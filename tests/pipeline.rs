//! A signed Ocrolus delivery becomes exactly one confirmed message
//! with the exact bytes, routing key, properties and headers; everything
//! else is rejected with its status and nothing is published.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use lapin::types::{AMQPValue, ShortString};
use ocrolus_relay::KNOWN_EVENTS;

fn header(m: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    let headers = m.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test]
async fn every_known_event_is_published_once_with_exact_bytes() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let (broker, queue) = relay.watch_all().await;

    let mut sent = Vec::new();
    for (i, name) in KNOWN_EVENTS.iter().enumerate() {
        // Unusual whitespace and key order: the bytes must survive untouched.
        let body = format!(
            "{{\n  \"book_pk\" :{i},\t\"event_name\":   \"{name}\" , \"severity\":\"LOW\"}}  \n"
        );
        let id = new_id();
        let (status, _, answer) = post_signed(&relay, &id, body.as_bytes()).await;
        assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&answer));
        let answer: serde_json::Value = serde_json::from_slice(&answer).expect("json answer");
        assert_eq!(answer["status"], "published");
        assert_eq!(answer["id"], id.as_str());
        sent.push((id, name.to_string(), body));
    }
    let got = broker
        .drain(&queue, sent.len(), Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), sent.len(), "exactly one message per delivery");
    for (m, (id, name, body)) in got.iter().zip(&sent) {
        let p = &m.delivery.properties;
        assert_eq!(m.delivery.routing_key.as_str(), name);
        assert_eq!(m.delivery.data, body.as_bytes(), "exact bytes");
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.message_id().as_ref().map(ShortString::as_str),
            Some(id.as_str())
        );
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        assert_eq!(
            p.app_id().as_ref().map(ShortString::as_str),
            Some("ocrolus-relay")
        );
        assert_eq!(
            p.kind().as_ref().map(ShortString::as_str),
            Some(name.as_str())
        );
        assert!(p.timestamp().is_some());
        assert_eq!(header(m, "x-ocrolus-event").as_deref(), Some(name.as_str()));
        assert_eq!(header(m, "x-relay-client-ip").as_deref(), Some("127.0.0.1"));
        assert_eq!(header(m, "x-ocrolus-source").as_deref(), Some("default"));
        assert!(header(m, "x-ocrolus-timestamp").is_some());
        assert!(header(m, "x-relay-received-at").is_some_and(|t| t.ends_with('Z')));
    }
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn account_level_and_legacy_forms_route_to_org_names() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let (broker, queue) = relay.watch_all().await;
    let cases = [
        (
            r#"{"event_name":"ANALYTICS_COMPLETED","book_pk":1}"#,
            "book.analytics_completed",
            "ANALYTICS_COMPLETED",
        ),
        (
            r#"{"event_name":"BOOK_VERIFIED","status":"BOOK_COMPLETE"}"#,
            "book.verified",
            "BOOK_VERIFIED",
        ),
        (
            r#"{"event_name":"DOC_VERIFIED","status":"VERIFICATION_COMPLETE"}"#,
            "document.verification_succeeded",
            "DOC_VERIFIED",
        ),
        (
            r#"{"event_name":"DOC_VERIFIED","status":"REJECTED"}"#,
            "document.verification_failed",
            "DOC_VERIFIED",
        ),
        (
            r#"{"event_name":"IMAGE_GROUP_VERIFIED","status":"VERIFICATION_FAILED"}"#,
            "image_group.verification_failed",
            "IMAGE_GROUP_VERIFIED",
        ),
        (
            r#"{"status": "VERIFICATION_COMPLETE", "uploaded_doc_pk": 0, "book_pk": 0}"#,
            "document.verification_succeeded",
            "VERIFICATION_COMPLETE",
        ),
        (
            r#"{"status":"REJECTED"}"#,
            "document.verification_failed",
            "REJECTED",
        ),
        (
            r#"{"status":"BOOK_COMPLETE"}"#,
            "book.verified",
            "BOOK_COMPLETE",
        ),
        (
            r#"{"event_name":"book.brand_new_event"}"#,
            "book.brand_new_event",
            "book.brand_new_event",
        ),
    ];
    for (body, _, _) in &cases {
        let (status, _, _) = post_signed(&relay, &new_id(), body.as_bytes()).await;
        assert_eq!(status, 200, "{body}");
    }
    let got = broker
        .drain(&queue, cases.len(), Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), cases.len());
    for (m, (body, key, sent_as)) in got.iter().zip(&cases) {
        assert_eq!(m.delivery.routing_key.as_str(), *key, "{body}");
        assert_eq!(m.delivery.data, body.as_bytes());
        assert_eq!(header(m, "x-ocrolus-event").as_deref(), Some(*sent_as));
    }
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn second_secret_is_accepted_wrong_ones_are_not() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let (broker, queue) = relay.watch_all().await;
    let body = br#"{"event_name":"book.verified"}"#;

    let id = new_id();
    let headers = signed_headers(SECOND_SECRET, &id, now_secs(), body);
    let (status, _, _) = request("POST", &relay.url, &headers, Bytes::from_static(body)).await;
    assert_eq!(status, 200, "rotated secret");

    let bad: Vec<(&str, Headers, Bytes)> = vec![
        (
            "wrong secret",
            signed_headers("some-other-secret-000000", &new_id(), now_secs(), body),
            Bytes::from_static(body),
        ),
        (
            "altered body",
            signed_headers(SECRET, &new_id(), now_secs(), body),
            Bytes::from_static(br#"{"event_name":"book.verifies"}"#),
        ),
        (
            "stale",
            signed_headers(SECRET, &new_id(), now_secs() - 301, body),
            Bytes::from_static(body),
        ),
        (
            "future",
            // Well past the window: the clock moving on during the request
            // must not bring it back inside (the exact edge is a unit test).
            signed_headers(SECRET, &new_id(), now_secs() + 305, body),
            Bytes::from_static(body),
        ),
        (
            "no signature",
            without(
                signed_headers(SECRET, &new_id(), now_secs(), body),
                "webhook-signature",
            ),
            Bytes::from_static(body),
        ),
        (
            "no timestamp",
            without(
                signed_headers(SECRET, &new_id(), now_secs(), body),
                "webhook-timestamp",
            ),
            Bytes::from_static(body),
        ),
        (
            "no request id",
            without(
                signed_headers(SECRET, &new_id(), now_secs(), body),
                "webhook-request-id",
            ),
            Bytes::from_static(body),
        ),
        (
            "non-hex signature",
            replace(
                signed_headers(SECRET, &new_id(), now_secs(), body),
                "webhook-signature",
                "not-hex-at-all",
            ),
            Bytes::from_static(body),
        ),
    ];
    for (what, headers, body) in bad {
        let (status, _, answer) = request("POST", &relay.url, &headers, body).await;
        assert_eq!(status, 401, "{what}");
        assert_eq!(
            &answer[..],
            br#"{"error":"unauthorized"}"#,
            "{what}: no detail leaks"
        );
    }
    let got = broker.drain(&queue, 1, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1, "only the good delivery was published");
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_requests_total{outcome="unauthorized",source="default"}"#)
            .await,
        8.0
    );
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="stale_timestamp"}"#)
            .await,
        2.0
    );
    relay.finish(&broker, &[&queue]).await;
}

type Headers = Vec<(String, String)>;

fn without(mut headers: Headers, name: &str) -> Headers {
    headers.retain(|(k, _)| k != name);
    headers
}

fn replace(headers: Headers, name: &str, value: &str) -> Headers {
    let mut headers = without(headers, name);
    headers.push((name.into(), value.into()));
    headers
}

#[tokio::test]
async fn bad_requests_get_their_status_and_publish_nothing() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let (broker, queue) = relay.watch_all().await;
    // Only bodies that are not JSON: other content is published
    // unclassified (tests/content.rs).
    for (body, expect) in [
        (&b"{not json"[..], "invalid JSON"),
        (b"{\"event_name\":\"book.verified\"", "truncated"),
        (b"[1,2,]", "trailing comma"),
    ] {
        let (status, _, answer) = post_signed(&relay, &new_id(), body).await;
        assert_eq!(status, 400, "{expect}");
        assert_eq!(&answer[..], br#"{"error":"bad_request"}"#);
    }
    let body = br#"{"event_name":"book.verified"}"#;
    let headers = signed_headers(SECRET, &new_id(), now_secs(), body);
    let (status, answer_headers, _) = request("GET", &relay.url, &headers, Bytes::new()).await;
    assert_eq!(status, 405);
    assert_eq!(
        answer_headers.get("allow").map(http::HeaderValue::as_bytes),
        Some(&b"POST"[..])
    );
    let wrong_path = relay.url.replace("/webhooks/ocrolus", "/webhooks/other");
    let (status, _, _) = request("POST", &wrong_path, &headers, Bytes::from_static(body)).await;
    assert_eq!(status, 404);
    for path in ["/metrics", "/readyz", "/livez"] {
        let url = relay.url.replace("/webhooks/ocrolus", path);
        assert_eq!(
            get(&url).await.0,
            404,
            "admin surface {path} is not on the public port"
        );
    }
    assert!(
        broker
            .drain(&queue, 1, Duration::from_millis(300))
            .await
            .is_empty()
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn address_outside_the_allowlist_is_forbidden() {
    require_broker!();
    // Behind the trusted proxy 127.0.0.1: a peer that is neither allowed
    // nor a trusted proxy never gets this far (closed at accept,
    // tests/edge.rs).
    let relay = TestRelay::start(RelayOptions {
        allow: vec!["203.0.113.7/32".into()],
        trusted_proxies: vec!["127.0.0.1/32".into()],
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let body = br#"{"event_name":"book.verified"}"#;
    // No forwarded header: the proxy itself is the client, and not allowed.
    let (status, _, answer) = post_signed(&relay, &new_id(), body).await;
    assert_eq!(status, 403);
    assert_eq!(&answer[..], br#"{"error":"forbidden"}"#);
    // A forwarded client outside the allowlist.
    let mut headers = signed_headers(SECRET, &new_id(), now_secs(), body);
    headers.push(("x-forwarded-for".into(), "198.51.100.1".into()));
    assert_eq!(
        request("POST", &relay.url, &headers, Bytes::from_static(body))
            .await
            .0,
        403
    );
    assert!(
        broker
            .drain(&queue, 1, Duration::from_millis(300))
            .await
            .is_empty()
    );
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="not_allowlisted"}"#)
            .await,
        2.0
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn unroutable_event_without_alternate_exchange_is_not_200() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions {
        extra: vec![
            "--alternate-exchange".into(),
            String::new(),
            "--spool-max-messages".into(),
            "0".into(),
        ],
        ..RelayOptions::default()
    })
    .await;
    // No queue is bound: the mandatory publish comes back; with the spool
    // unable to take it, the answer must be 503, never 200.
    let (status, headers, _) =
        post_signed(&relay, &new_id(), br#"{"event_name":"book.verified"}"#).await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_publish_failures_total{reason="returned",source="default"}"#)
            .await,
        1.0
    );
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn unbound_event_lands_in_the_alternate_queue() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let broker = TestBroker::connect().await;
    let body = br#"{"event_name":"plaid.upload_succeeded"}"#;
    let (status, _, answer) = post_signed(&relay, &new_id(), body).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&answer).contains("published"));
    let got = broker
        .drain(&relay.alternate, 1, Duration::from_secs(5))
        .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].delivery.data, body);
    assert_eq!(
        got[0].delivery.routing_key.as_str(),
        "plaid.upload_succeeded"
    );
    relay.finish(&broker, &[]).await;
}
