//! Edge hardening: adversarial clients over real connections.
//! Spoofed forwarding headers, oversized and slow requests, connection
//! floods, bursts over the rate limits, Basic auth, TLS (HTTP/1.1 and h2),
//! reloads while requests are in flight, PROXY protocol, and error bodies
//! that never echo credentials. Every reject also checks nothing was
//! published.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::*;
use futures_util::future::join_all;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lapin::types::AMQPValue;
use rustls::ProtocolVersion;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const BODY: &[u8] = br#"{"event_name":"book.verified","book_pk":1}"#;

/// Slack on top of a configured timeout before a test calls it missed: the
/// machine may be busy, so only "closed within timeout + margin" is checked.
const MARGIN: Duration = Duration::from_secs(4);

fn opts(allow: &[&str], trusted: &[&str], extra: &[&str]) -> RelayOptions {
    RelayOptions {
        allow: allow.iter().map(std::string::ToString::to_string).collect(),
        trusted_proxies: trusted
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
        extra: extra.iter().map(std::string::ToString::to_string).collect(),
        ..RelayOptions::default()
    }
}

fn signed(id: &str, body: &[u8]) -> Vec<(String, String)> {
    signed_headers(SECRET, id, now_secs(), body)
}

fn with(mut headers: Vec<(String, String)>, name: &str, value: &str) -> Vec<(String, String)> {
    headers.push((name.into(), value.into()));
    headers
}

/// A whole signed delivery of `BODY` under `id`, as raw HTTP/1.1 bytes.
fn raw_delivery(addr: SocketAddr, id: &str) -> Vec<u8> {
    let headers = with(signed(id, BODY), "content-length", &BODY.len().to_string());
    let mut bytes = raw_head(addr, &headers).into_bytes();
    bytes.extend(BODY);
    bytes
}

async fn post(relay: &TestRelay, headers: &[(String, String)], body: &[u8]) -> Answer {
    request("POST", &relay.url, headers, Bytes::copy_from_slice(body)).await
}

fn amqp_header(m: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    let headers = m.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

fn message_id(m: &lapin::message::BasicGetMessage) -> String {
    m.delivery
        .properties
        .message_id()
        .as_ref()
        .map(std::string::ToString::to_string)
        .unwrap_or_default()
}

/// Polls a metric until `ok` holds (metrics move a moment after the event).
async fn wait_metric(relay: &TestRelay, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = relay.metric(series).await;
        if ok(value) || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts the queue holds no message (beyond those already drained).
async fn assert_nothing_published(broker: &TestBroker, queue: &str) {
    let got = broker.drain(queue, 1, Duration::from_millis(300)).await;
    assert!(got.is_empty(), "{} unexpected message(s)", got.len());
}

// ---------------------------------------------------------------- X-Forwarded-For

#[tokio::test]
async fn spoofed_forwarded_for_from_untrusted_peer_is_ignored() {
    require_broker!();
    let relay = TestRelay::start(opts(&["203.0.113.7/32"], &[], &[])).await;
    let (broker, queue) = relay.watch_all().await;
    for xff in [
        "203.0.113.7",
        "1.2.3.4, 203.0.113.7",
        "203.0.113.7, 127.0.0.1",
    ] {
        // The peer is neither allowed nor a trusted proxy: closed at
        // accept, before its header could claim anything.
        let headers = with(signed(&new_id(), BODY), "x-forwarded-for", xff);
        let headers = with(headers, "content-length", &BODY.len().to_string());
        let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
        let mut bytes = raw_head(relay.addr, &headers).into_bytes();
        bytes.extend(BODY);
        let _ = stream.write_all(&bytes).await;
        let raw = read_response(&mut stream, MARGIN).await;
        assert_eq!(raw.status, None, "untrusted peer claiming {xff:?}");
        assert!(raw.closed, "untrusted peer claiming {xff:?}");
    }
    assert_nothing_published(&broker, &queue).await;
    relay.finish(&broker, &[&queue]).await;

    // Allowed peer, spoofed header: the peer address is what gets recorded.
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &[])).await;
    let queue = broker.bind_queue(&relay.exchange, "#").await;
    let headers = with(signed(&new_id(), BODY), "x-forwarded-for", "203.0.113.7");
    assert_eq!(post(&relay, &headers, BODY).await.0, 200);
    let got = broker.drain(&queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        amqp_header(&got[0], "x-relay-client-ip").as_deref(),
        Some("127.0.0.1")
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn forwarded_for_from_trusted_proxy_is_walked_right_to_left() {
    require_broker!();
    let relay = TestRelay::start(opts(&["203.0.113.7/32"], &["127.0.0.1/32"], &[])).await;
    let (broker, queue) = relay.watch_all().await;
    let cases: &[(&[&str], u16, &str)] = &[
        (&[], 403, "no header: the proxy itself is the client"),
        (&["203.0.113.7"], 200, "single hop"),
        (&["203.0.113.7, 198.51.100.1"], 403, "untrusted last hop"),
        (
            &["1.2.3.4, 203.0.113.7"],
            200,
            "rightmost untrusted hop wins",
        ),
        (&["203.0.113.7, 127.0.0.1"], 200, "trusted hops are skipped"),
        (&["203.0.113.7:4711"], 200, "hop with a port"),
        (
            &["203.0.113.7, not-an-ip"],
            403,
            "malformed hop fails closed",
        ),
        (&["203.0.113.7,"], 403, "empty hop fails closed"),
        (&["unknown"], 403, "obfuscated hop fails closed"),
        (
            &["203.0.113.7", "198.51.100.1"],
            403,
            "last header line is rightmost",
        ),
        (
            &["198.51.100.1", "203.0.113.7"],
            200,
            "earlier lines are further left",
        ),
    ];
    let mut accepted = 0;
    for (lines, expect, what) in cases {
        let mut headers = signed(&new_id(), BODY);
        for line in *lines {
            headers = with(headers, "x-forwarded-for", line);
        }
        let (status, _, body) = post(&relay, &headers, BODY).await;
        assert_eq!(
            status,
            *expect,
            "{what}: {}",
            String::from_utf8_lossy(&body)
        );
        if status == 200 {
            accepted += 1;
        }
    }
    let got = broker.drain(&queue, accepted, Duration::from_secs(5)).await;
    assert_eq!(got.len(), accepted, "exactly the 200s were published");
    for m in &got {
        assert_eq!(
            amqp_header(m, "x-relay-client-ip").as_deref(),
            Some("203.0.113.7"),
            "the resolved client is recorded, not the proxy"
        );
    }
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="bad_forwarded_for"}"#)
            .await,
        3.0
    );
    relay.finish(&broker, &[&queue]).await;
}

/// A request's headers and body.
type Delivery = (Vec<(String, String)>, Vec<u8>);

/// Answers of `n` requests fired at once; see the rate-limit tests for why.
async fn fire(relay: &TestRelay, requests: Vec<Delivery>) -> Vec<Answer> {
    let calls = requests.into_iter().map(|(headers, body)| {
        let url = relay.url.clone();
        tokio::spawn(async move { request("POST", &url, &headers, Bytes::from(body)).await })
    });
    join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("request task"))
        .collect()
}

fn count(answers: &[Answer], status: u16) -> usize {
    answers.iter().filter(|a| a.0 == status).count()
}

/// Most requests a bucket of `burst` refilled at `rate`/s can pass in `elapsed`.
fn bucket_bound(burst: usize, rate: usize, elapsed: Duration) -> usize {
    burst + rate * elapsed.as_secs_f64().ceil() as usize
}

#[tokio::test]
async fn per_ip_rate_limit_keys_on_the_resolved_client() {
    require_broker!();
    // Untrusted peer: every request names another client in X-Forwarded-For,
    // but all of them draw from the one bucket of the TCP peer. The requests
    // carry a wrong signature: admitted ones get 401, refused ones 429.
    let limit = ["--rate-limit-per-ip", "1", "--rate-limit-burst", "1"];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &limit)).await;
    let requests = (0..10)
        .map(|i| {
            let mut headers =
                signed_headers("wrong-secret-0123456789", &new_id(), now_secs(), BODY);
            headers.push(("x-forwarded-for".into(), format!("198.51.100.{i}")));
            (headers, BODY.to_vec())
        })
        .collect();
    let started = Instant::now();
    let answers = fire(&relay, requests).await;
    let elapsed = started.elapsed();
    let admitted = count(&answers, 401);
    assert!(
        count(&answers, 429) > 0,
        "spoofed addresses bought fresh buckets"
    );
    assert!(admitted >= 1);
    assert!(
        admitted <= bucket_bound(1, 1, elapsed),
        "{admitted} admitted in {elapsed:?}"
    );
    assert_eq!(admitted + count(&answers, 429), answers.len());
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;

    // Trusted proxy: each resolved client has its own bucket, so distinct
    // clients behind the same proxy are all admitted.
    let relay = TestRelay::start(opts(&["203.0.113.0/24"], &["127.0.0.1/32"], &limit)).await;
    for i in 1..=5 {
        let headers = with(
            signed_headers("wrong-secret-0123456789", &new_id(), now_secs(), BODY),
            "x-forwarded-for",
            &format!("203.0.113.{i}"),
        );
        assert_eq!(
            post(&relay, &headers, BODY).await.0,
            401,
            "client {i} has its own bucket"
        );
    }
    relay.finish(&broker, &[]).await;
}

// ---------------------------------------------------------------- sizes

#[tokio::test]
async fn oversized_declared_length_is_refused_without_reading_the_body() {
    require_broker!();
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &["--max-body", "1024"])).await;
    let (broker, queue) = relay.watch_all().await;
    let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
    let headers = with(signed(&new_id(), BODY), "content-length", "10485760");
    stream
        .write_all(raw_head(relay.addr, &headers).as_bytes())
        .await
        .expect("write head");
    // Not a byte of the 10 MiB is sent: the answer comes anyway, long before
    // the body timeout (10 s by default).
    let raw = read_response(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(raw.status, Some(413), "{}", raw.text);
    assert!(
        raw.text.ends_with(r#"{"error":"payload_too_large"}"#),
        "{}",
        raw.text
    );
    assert_nothing_published(&broker, &queue).await;
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="declared_too_large"}"#)
            .await,
        1.0
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn oversized_chunked_body_is_refused() {
    require_broker!();
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &["--max-body", "1024"])).await;
    let (broker, queue) = relay.watch_all().await;
    // A well-formed, correctly signed JSON body that is simply too long.
    let body = format!(
        r#"{{"event_name":"book.verified","padding":"{}"}}"#,
        "x".repeat(2000)
    );
    let headers = with(
        signed(&new_id(), body.as_bytes()),
        "transfer-encoding",
        "chunked",
    );
    let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
    let mut bytes = raw_head(relay.addr, &headers).into_bytes();
    for chunk in body.as_bytes().chunks(700) {
        bytes.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        bytes.extend(chunk);
        bytes.extend(b"\r\n");
    }
    bytes.extend(b"0\r\n\r\n");
    stream.write_all(&bytes).await.expect("write");
    let raw = read_response(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(raw.status, Some(413), "{}", raw.text);
    assert_nothing_published(&broker, &queue).await;
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="body_too_large"}"#)
            .await,
        1.0
    );
    // The same body within the limit goes through: the cap is what refused it.
    let small = with(signed(&new_id(), BODY), "transfer-encoding", "chunked");
    let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
    let mut bytes = raw_head(relay.addr, &small).into_bytes();
    bytes.extend(format!("{:x}\r\n", BODY.len()).as_bytes());
    bytes.extend(BODY);
    bytes.extend(b"\r\n0\r\n\r\n");
    stream.write_all(&bytes).await.expect("write");
    let raw = read_response(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(raw.status, Some(200), "{}", raw.text);
    assert_eq!(
        broker.drain(&queue, 1, Duration::from_secs(5)).await.len(),
        1
    );
    relay.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------- slow clients

#[tokio::test]
async fn slow_headers_are_cut_off_while_others_are_served() {
    require_broker!();
    let header_timeout = Duration::from_secs(1);
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &["--header-timeout", "1"])).await;
    let (broker, queue) = relay.watch_all().await;
    let head = raw_head(relay.addr, &signed(&new_id(), BODY)).into_bytes();
    // At 200 ms a byte these would take far longer than the timeout.
    let h2_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let clients = [
        ("HTTP/1.1 head", head),
        ("h2 preface", h2_preface),
        ("silent", Vec::new()),
    ];
    let slow = clients.into_iter().map(|(what, bytes)| {
        let addr = relay.addr;
        tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let (mut reader, mut writer) = stream.into_split();
            let writer = tokio::spawn(async move {
                trickle(&mut writer, &bytes, Duration::from_millis(200)).await;
                // Keep the write side open: only the server may end this.
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
            let closed = closed_within(&mut reader, header_timeout + MARGIN).await;
            writer.abort();
            (what, closed)
        })
    });
    let slow = join_all(slow);
    tokio::pin!(slow);
    // While they hold their connections, a normal delivery is served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(post_signed(&relay, &new_id(), BODY).await.0, 200);
    for result in slow.await {
        let (what, closed) = result.expect("slow client task");
        assert!(
            closed.is_some(),
            "{what}: still open after {:?}",
            header_timeout + MARGIN
        );
    }
    assert_eq!(
        broker.drain(&queue, 1, Duration::from_secs(5)).await.len(),
        1
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn whole_request_deadline_bounds_a_request_whatever_it_waits_for() {
    require_broker!();
    // The body timeout is generous, the request deadline is not: a body that
    // trickles in is cut at the deadline with 503 "deadline", an outcome of
    // its own (a 5xx), not the 408 body timeout's "timeout".
    let deadline = Duration::from_secs(3);
    let relay = TestRelay::start(opts(
        &["127.0.0.1/32"],
        &[],
        &["--body-timeout", "30", "--request-timeout", "3"],
    ))
    .await;
    let (broker, queue) = relay.watch_all().await;
    let body = format!(
        r#"{{"event_name":"book.verified","padding":"{}"}}"#,
        "x".repeat(100)
    );
    let headers = with(
        signed(&new_id(), body.as_bytes()),
        "content-length",
        &body.len().to_string(),
    );
    let stream = TcpStream::connect(relay.addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(raw_head(relay.addr, &headers).as_bytes())
        .await
        .expect("write head");
    let rest = body.as_bytes().to_vec();
    let trickler = tokio::spawn(async move {
        trickle(&mut writer, &rest, Duration::from_millis(250)).await;
    });
    let raw = read_response(&mut reader, deadline + MARGIN).await;
    trickler.abort();
    assert_eq!(raw.status, Some(503), "{}", raw.text);
    assert!(raw.text.contains(r#"{"error":"deadline"}"#), "{}", raw.text);
    assert!(raw.elapsed < deadline + MARGIN);
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="request_deadline"}"#)
            .await,
        1.0
    );
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_requests_total{outcome="deadline",source="default"}"#)
            .await,
        1.0
    );
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_requests_total{outcome="timeout",source="default"}"#)
            .await,
        0.0
    );
    assert_nothing_published(&broker, &queue).await;
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn slow_body_gets_408_while_others_are_served() {
    require_broker!();
    let body_timeout = Duration::from_secs(1);
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &["--body-timeout", "1"])).await;
    let (broker, queue) = relay.watch_all().await;
    let body = format!(
        r#"{{"event_name":"book.verified","padding":"{}"}}"#,
        "x".repeat(100)
    );
    let headers = with(
        signed(&new_id(), body.as_bytes()),
        "content-length",
        &body.len().to_string(),
    );
    let stream = TcpStream::connect(relay.addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let mut start = raw_head(relay.addr, &headers).into_bytes();
    start.extend(&body.as_bytes()[..10]);
    writer.write_all(&start).await.expect("write head");
    // A byte every 250 ms: never idle for long, but the whole body would
    // take about 30 s. The deadline is for the body, not between bytes.
    let rest = body.as_bytes()[10..].to_vec();
    let trickler = tokio::spawn(async move {
        trickle(&mut writer, &rest, Duration::from_millis(250)).await;
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(post_signed(&relay, &new_id(), BODY).await.0, 200);
    let raw = read_response(&mut reader, body_timeout + MARGIN).await;
    trickler.abort();
    assert!(
        raw.status == Some(408) || (raw.status.is_none() && raw.closed),
        "expected 408 or a close, got {:?} after {:?}: {}",
        raw.status,
        raw.elapsed,
        raw.text
    );
    assert!(raw.elapsed < body_timeout + MARGIN);
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="body_timeout"}"#)
            .await,
        1.0
    );
    let got = broker.drain(&queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "only the normal delivery was published");
    assert_eq!(got[0].delivery.data, BODY);
    relay.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------- connections

#[tokio::test]
async fn connection_flood_beyond_the_limit_is_closed_at_once() {
    require_broker!();
    // A long header timeout, so that the held connections stay open.
    let extra = [
        "--max-connections",
        "5",
        "--reserved-connections",
        "0",
        "--header-timeout",
        "60",
    ];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &extra)).await;
    let open = "ocrolus_relay_connections_open";
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(relay.addr).await.expect("connect"));
    }
    assert_eq!(wait_metric(&relay, open, |v| v == 5.0).await, 5.0);
    for i in 0..3 {
        let mut extra = TcpStream::connect(relay.addr).await.expect("connect");
        assert!(
            closed_within(&mut extra, MARGIN).await.is_some(),
            "connection {} over the limit was not closed",
            i + 1
        );
    }
    assert_eq!(
        relay
            .metric("ocrolus_relay_connections_rejected_total")
            .await,
        3.0
    );
    // The held connections are still served: one of them sends a delivery.
    let mut stream = held.pop().expect("held");
    let id = new_id();
    stream
        .write_all(&raw_delivery(relay.addr, &id))
        .await
        .expect("write");
    assert_eq!(read_response(&mut stream, MARGIN).await.status, Some(200));
    drop(stream);
    drop(held);
    assert_eq!(wait_metric(&relay, open, |v| v == 0.0).await, 0.0);
    assert_eq!(post_signed(&relay, &new_id(), BODY).await.0, 200);
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

// ---------------------------------------------------------------- rate limits

/// Fires `n` correctly signed, distinct deliveries at once. Concurrently on
/// purpose: sent one after another, each would wait for its publish confirm
/// and the bucket would refill in between, so the burst would never be
/// exceeded on a slow machine, and the number passing would depend on timing.
async fn signed_burst(
    relay: &TestRelay,
    n: usize,
    xff: impl Fn(usize) -> Option<String>,
) -> (Vec<Answer>, Duration) {
    let requests = (0..n)
        .map(|i| {
            let body = format!(r#"{{"event_name":"book.verified","n":{i}}}"#).into_bytes();
            let mut headers = signed(&new_id(), &body);
            if let Some(client) = xff(i) {
                headers.push(("x-forwarded-for".into(), client));
            }
            (headers, body)
        })
        .collect();
    let started = Instant::now();
    let answers = fire(relay, requests).await;
    (answers, started.elapsed())
}

/// Every 200's id is in the queue exactly once, and nothing else is.
async fn assert_exactly_the_200s_published(broker: &TestBroker, queue: &str, answers: &[Answer]) {
    let ok: Vec<String> = answers
        .iter()
        .filter(|a| a.0 == 200)
        .map(|a| {
            let body: serde_json::Value = serde_json::from_slice(&a.2).expect("json");
            body["id"].as_str().expect("id").to_owned()
        })
        .collect();
    let got = broker.drain(queue, ok.len(), Duration::from_secs(10)).await;
    assert_eq!(got.len(), ok.len(), "messages in the queue = 200 answers");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &got {
        *seen.entry(message_id(m)).or_default() += 1;
    }
    for id in &ok {
        assert_eq!(seen.get(id), Some(&1), "id {id} published exactly once");
    }
    assert_nothing_published(broker, queue).await;
}

fn assert_429s_say_when(answers: &[Answer]) {
    for (status, headers, body) in answers.iter().filter(|a| a.0 == 429) {
        let retry: u64 = headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{status} without a numeric Retry-After"));
        assert!(retry >= 1);
        assert_eq!(&body[..], br#"{"error":"rate_limited"}"#);
    }
}

#[tokio::test]
async fn burst_over_the_per_ip_limit_gets_429_and_publishes_exactly_the_200s() {
    require_broker!();
    let extra = ["--rate-limit-per-ip", "2", "--rate-limit-burst", "2"];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &extra)).await;
    let (broker, queue) = relay.watch_all().await;
    let (answers, elapsed) = signed_burst(&relay, 30, |_| None).await;
    let ok = count(&answers, 200);
    assert!(ok >= 1, "the burst allowance passes");
    assert!(
        ok <= bucket_bound(4, 2, elapsed),
        "{ok} passed in {elapsed:?}"
    );
    assert!(count(&answers, 429) > 0);
    assert_eq!(ok + count(&answers, 429), answers.len(), "only 200 or 429");
    assert_429s_say_when(&answers);
    assert_exactly_the_200s_published(&broker, &queue, &answers).await;
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="rate_limited_ip"}"#)
            .await,
        count(&answers, 429) as f64
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn global_rate_limit_applies_across_clients() {
    require_broker!();
    // Distinct clients behind a trusted proxy, so no per-client bucket runs dry.
    let extra = [
        "--rate-limit-per-ip",
        "1000",
        "--rate-limit-global",
        "2",
        "--rate-limit-burst",
        "1",
    ];
    let relay = TestRelay::start(opts(&["203.0.113.0/24"], &["127.0.0.1/32"], &extra)).await;
    let (broker, queue) = relay.watch_all().await;
    let (answers, elapsed) =
        signed_burst(&relay, 20, |i| Some(format!("203.0.113.{}", i + 1))).await;
    let ok = count(&answers, 200);
    assert!(ok >= 1);
    assert!(
        ok <= bucket_bound(2, 2, elapsed),
        "{ok} passed in {elapsed:?}"
    );
    assert!(count(&answers, 429) > 0);
    assert_eq!(ok + count(&answers, 429), answers.len());
    assert_429s_say_when(&answers);
    assert_exactly_the_200s_published(&broker, &queue, &answers).await;
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="rate_limited_global"}"#)
            .await,
        count(&answers, 429) as f64
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn requests_beyond_max_in_flight_get_503() {
    require_broker!();
    // One slot, held by a delivery whose body is only half sent.
    let extra = ["--max-in-flight", "1", "--body-timeout", "60"];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &extra)).await;
    let (broker, queue) = relay.watch_all().await;
    let id = new_id();
    let headers = with(signed(&id, BODY), "content-length", &BODY.len().to_string());
    let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
    let mut start = raw_head(relay.addr, &headers).into_bytes();
    start.extend(&BODY[..10]);
    stream.write_all(&start).await.expect("write");
    let in_flight = "ocrolus_relay_requests_in_flight";
    assert_eq!(wait_metric(&relay, in_flight, |v| v == 1.0).await, 1.0);
    // The gauge rises a moment before the slot is taken, in the same step.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (status, headers, body) = post_signed(&relay, &new_id(), BODY).await;
    assert_eq!(status, 503);
    assert_eq!(&body[..], br#"{"error":"unavailable"}"#);
    assert!(headers.contains_key("retry-after"));

    stream.write_all(&BODY[10..]).await.expect("write rest");
    let raw = read_response(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(raw.status, Some(200), "{}", raw.text);
    let got = broker.drain(&queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(message_id(&got[0]), id);
    assert_nothing_published(&broker, &queue).await;
    // The slot is free again.
    assert_eq!(post_signed(&relay, &new_id(), BODY).await.0, 200);
    relay.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------- Basic auth

fn basic(user_pass: &str) -> (String, String) {
    let encoded = base64::engine::general_purpose::STANDARD.encode(user_pass);
    ("authorization".into(), format!("Basic {encoded}"))
}

fn basic_file(dir: &Path) -> String {
    let path = dir.join("basic-auth");
    std::fs::write(
        &path,
        "# Ocrolus, from the registered URL\nocrolus:first-password\nbackup:pass:with:colons\n",
    )
    .expect("write basic auth file");
    path.display().to_string()
}

#[tokio::test]
async fn basic_auth_alone_accepts_listed_credentials_only() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = TestRelay::start(RelayOptions {
        secrets: vec![],
        extra: vec!["--basic-auth-file".into(), basic_file(dir.path())],
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let json = ("content-type".to_string(), "application/json".to_string());
    for good in ["ocrolus:first-password", "backup:pass:with:colons"] {
        let (status, _, body) = post(&relay, &[json.clone(), basic(good)], BODY).await;
        assert_eq!(status, 200, "{good}: {}", String::from_utf8_lossy(&body));
    }
    let bad: Vec<(&str, Vec<(String, String)>)> = vec![
        ("missing", vec![json.clone()]),
        (
            "wrong password",
            vec![json.clone(), basic("ocrolus:second-password")],
        ),
        (
            "other user's password",
            vec![json.clone(), basic("backup:first-password")],
        ),
        (
            "prefix of a password",
            vec![json.clone(), basic("ocrolus:first")],
        ),
        (
            "not base64",
            vec![json.clone(), ("authorization".into(), "Basic !!!".into())],
        ),
        (
            "other scheme",
            vec![
                json.clone(),
                ("authorization".into(), "Bearer first-password".into()),
            ],
        ),
    ];
    for (what, headers) in bad {
        let (status, _, body) = post(&relay, &headers, BODY).await;
        assert_eq!(status, 401, "{what}");
        assert_eq!(&body[..], br#"{"error":"unauthorized"}"#, "{what}");
    }
    assert_eq!(
        broker.drain(&queue, 2, Duration::from_secs(5)).await.len(),
        2
    );
    assert_nothing_published(&broker, &queue).await;
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn hmac_and_basic_together_are_both_required() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = TestRelay::start(RelayOptions {
        extra: vec!["--basic-auth-file".into(), basic_file(dir.path())],
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let right = basic("ocrolus:first-password");
    let cases = [
        ("signature only", signed(&new_id(), BODY), 401),
        (
            "basic only",
            vec![
                ("content-type".into(), "application/json".into()),
                right.clone(),
            ],
            401,
        ),
        (
            "basic and a wrong signature",
            with(
                signed_headers("wrong-secret-0123456789", &new_id(), now_secs(), BODY),
                &right.0,
                &right.1,
            ),
            401,
        ),
        (
            "signature and wrong basic",
            with(
                signed(&new_id(), BODY),
                "authorization",
                &basic("ocrolus:nope").1,
            ),
            401,
        ),
        (
            "both",
            with(signed(&new_id(), BODY), &right.0, &right.1),
            200,
        ),
    ];
    for (what, headers, expect) in cases {
        assert_eq!(post(&relay, &headers, BODY).await.0, expect, "{what}");
    }
    assert_eq!(
        broker.drain(&queue, 1, Duration::from_secs(5)).await.len(),
        1
    );
    assert_nothing_published(&broker, &queue).await;
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn error_bodies_never_echo_credentials() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = TestRelay::start(RelayOptions {
        extra: vec!["--basic-auth-file".into(), basic_file(dir.path())],
        ..RelayOptions::default()
    })
    .await;
    let id = new_id();
    // Signed with a secret the relay does not know, with a password it does
    // not know: neither may come back, nor which check failed.
    let leaked_secret = "some-secret-the-relay-does-not-know";
    let headers = with(
        signed_headers(leaked_secret, &id, now_secs(), BODY),
        "authorization",
        &basic("ocrolus:hunter2-guess").1,
    );
    let signature = headers
        .iter()
        .find(|(k, _)| k == "webhook-signature")
        .map(|(_, v)| v.clone())
        .expect("signature");
    let (status, answer_headers, body) = post(&relay, &headers, BODY).await;
    assert_eq!(status, 401);
    assert_eq!(&body[..], br#"{"error":"unauthorized"}"#);
    let all = format!("{answer_headers:?}{}", String::from_utf8_lossy(&body));
    for secret in [signature.as_str(), "hunter2-guess", leaked_secret, SECRET] {
        assert!(!all.contains(secret), "answer echoes {secret:?}");
    }
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

// ---------------------------------------------------------------- TLS

const TLS_BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

#[tokio::test]
async fn tls_serves_http1_and_h2_and_refuses_plaintext() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = write_cert(dir.path());
    let relay = TestRelay::start(tls_relay_options(dir.path(), &[])).await;
    assert!(relay.url.starts_with("https://"));
    let (broker, queue) = relay.watch_all().await;
    let roots = [cert.clone()];
    let cases: [(&str, TlsConnector, &[u8], ProtocolVersion); 3] = [
        (
            "h2, TLS 1.3",
            connector(&roots, &[b"h2", b"http/1.1"], TLS_BOTH),
            b"h2",
            ProtocolVersion::TLSv1_3,
        ),
        (
            "http/1.1, TLS 1.3",
            connector(&roots, &[b"http/1.1"], TLS_BOTH),
            b"http/1.1",
            ProtocolVersion::TLSv1_3,
        ),
        (
            "h2, TLS 1.2",
            connector(&roots, &[b"h2"], &[&rustls::version::TLS12]),
            b"h2",
            ProtocolVersion::TLSv1_2,
        ),
    ];
    let mut ids = Vec::new();
    for (what, connector, alpn, version) in &cases {
        let id = new_id();
        let ((status, _, body), info) = tls_post(&relay, connector, &signed(&id, BODY), BODY).await;
        assert_eq!(status, 200, "{what}: {}", String::from_utf8_lossy(&body));
        assert_eq!(info.alpn.as_deref(), Some(*alpn), "{what}");
        assert_eq!(info.version, Some(*version), "{what}");
        assert_eq!(info.leaf.as_ref(), Some(&cert), "{what}");
        ids.push(id);
    }
    let got = broker
        .drain(&queue, ids.len(), Duration::from_secs(5))
        .await;
    let got: Vec<String> = got.iter().map(message_id).collect();
    assert_eq!(got, ids, "each delivery published once, in order");

    // Plaintext HTTP on the TLS port: no HTTP answer, a counted failure.
    let before = relay
        .metric("ocrolus_relay_tls_handshake_failures_total")
        .await;
    let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
    stream
        .write_all(&raw_delivery(relay.addr, &new_id()))
        .await
        .expect("write");
    let raw = read_response(&mut stream, Duration::from_secs(10)).await;
    assert!(
        raw.status.is_none() && raw.closed,
        "plaintext got {:?}",
        raw.text
    );
    let after = wait_metric(&relay, "ocrolus_relay_tls_handshake_failures_total", |v| {
        v > before
    })
    .await;
    assert_eq!(after, before + 1.0);
    assert_nothing_published(&broker, &queue).await;
    relay.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------- reload

#[tokio::test]
async fn reload_swaps_the_certificate_and_keeps_requests_in_flight() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let old_cert = write_cert(dir.path());
    let relay = TestRelay::start(tls_relay_options(dir.path(), &["--body-timeout", "60"])).await;
    let (broker, queue) = relay.watch_all().await;
    let expiry = "ocrolus_relay_tls_cert_expiry_timestamp_seconds";
    assert!(
        relay.metric(expiry).await > 0.0,
        "{expiry} missing with TLS"
    );

    // A delivery started before the reload, its body half sent.
    let slow_id = new_id();
    let only_old = connector(std::slice::from_ref(&old_cert), &[b"http/1.1"], TLS_BOTH);
    let mut slow = tls_connect(relay.addr, &only_old).await;
    assert_eq!(negotiated(&slow).leaf.as_ref(), Some(&old_cert));
    let headers = with(
        signed(&slow_id, BODY),
        "content-length",
        &BODY.len().to_string(),
    );
    let mut start = raw_head(relay.addr, &headers).into_bytes();
    start.extend(&BODY[..10]);
    slow.write_all(&start).await.expect("write");
    slow.flush().await.expect("flush");
    let in_flight = "ocrolus_relay_requests_in_flight";
    assert_eq!(wait_metric(&relay, in_flight, |v| v == 1.0).await, 1.0);

    let new_cert = write_cert(dir.path());
    relay
        .relay()
        .state()
        .reload()
        .expect("reload with a good certificate");
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_config_reloads_total{result="success"}"#)
            .await,
        1.0
    );
    let fresh_id = new_id();
    let trust_both = connector(
        &[old_cert.clone(), new_cert.clone()],
        &[b"http/1.1"],
        TLS_BOTH,
    );
    let ((status, _, _), info) =
        tls_post(&relay, &trust_both, &signed(&fresh_id, BODY), BODY).await;
    assert_eq!(status, 200);
    assert_eq!(
        info.leaf.as_ref(),
        Some(&new_cert),
        "new handshakes see the new certificate"
    );

    slow.write_all(&BODY[10..]).await.expect("write rest");
    slow.flush().await.expect("flush");
    let raw = read_response(&mut slow, Duration::from_secs(10)).await;
    assert_eq!(
        raw.status,
        Some(200),
        "in-flight request survives the reload: {}",
        raw.text
    );

    let got = broker.drain(&queue, 2, Duration::from_secs(5)).await;
    let mut got: Vec<String> = got.iter().map(message_id).collect();
    got.sort();
    let mut want = vec![slow_id, fresh_id];
    want.sort();
    assert_eq!(got, want);
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn reload_rejects_a_bad_allowlist_and_applies_a_good_one() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let allowlist = relay.dir.path().join("allowlist.yaml");
    let failures = r#"ocrolus_relay_config_reloads_total{result="failure"}"#;
    let last_ok = "ocrolus_relay_config_last_reload_successful";
    assert_eq!(relay.metric(last_ok).await, 1.0, "the start-up load counts");
    let garbage: [&[u8]; 4] = [
        b"}}} this is not yaml {{{\n",
        b"allow:\n  - not-an-address\n",
        b"allow: []\n",
        b"\xff\xfe\x00binary",
    ];
    for (i, text) in garbage.iter().enumerate() {
        std::fs::write(&allowlist, text).expect("write allowlist");
        assert!(
            relay.relay().state().reload().is_err(),
            "garbage {i} accepted"
        );
        assert_eq!(relay.metric(failures).await, (i + 1) as f64);
        assert_eq!(relay.metric(last_ok).await, 0.0, "after garbage {i}");
        // The old policy (127.0.0.1 allowed) is still in force.
        assert_eq!(
            post_signed(&relay, &new_id(), BODY).await.0,
            200,
            "after garbage {i}"
        );
    }
    std::fs::write(&allowlist, "allow:\n  - 203.0.113.7/32 # someone else\n").expect("write");
    relay.relay().state().reload().expect("good allowlist");
    assert_eq!(relay.metric(last_ok).await, 1.0, "a good reload clears it");
    assert_eq!(
        post_after(&relay, b"", &new_id()).await,
        0,
        "127.0.0.1 no longer allowed: closed at accept"
    );
    std::fs::write(&allowlist, "allow:\n  - 127.0.0.0/8\n").expect("write");
    relay.relay().state().reload().expect("good allowlist");
    assert_eq!(post_signed(&relay, &new_id(), BODY).await.0, 200);
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_config_reloads_total{result="success"}"#)
            .await,
        2.0
    );
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

// ---------------------------------------------------------------- PROXY protocol

/// One signed delivery on a connection that starts with `preamble`.
async fn post_after(relay: &TestRelay, preamble: &[u8], id: &str) -> u16 {
    let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
    // The relay may close before the request is written: no answer then.
    let _ = stream.write_all(preamble).await;
    let _ = stream.write_all(&raw_delivery(relay.addr, id)).await;
    let raw = read_response(&mut stream, Duration::from_secs(10)).await;
    raw.status.unwrap_or(0)
}

#[tokio::test]
async fn proxy_protocol_names_the_client() {
    require_broker!();
    let relay = TestRelay::start(opts(
        &["203.0.113.7/32"],
        &["127.0.0.1/32"],
        &["--proxy-protocol"],
    ))
    .await;
    let (broker, queue) = relay.watch_all().await;

    let id = new_id();
    let status = post_after(
        &relay,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 443\r\n",
        &id,
    )
    .await;
    assert_eq!(status, 200);
    let got = broker.drain(&queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(message_id(&got[0]), id);
    assert_eq!(
        amqp_header(&got[0], "x-relay-client-ip").as_deref(),
        Some("203.0.113.7")
    );

    let status = post_after(
        &relay,
        b"PROXY TCP4 198.51.100.9 127.0.0.1 51000 443\r\n",
        &new_id(),
    )
    .await;
    assert_eq!(
        status, 0,
        "a named client outside the allowlist is closed before HTTP"
    );
    // No header: the connection is closed without an HTTP answer.
    assert_eq!(post_after(&relay, b"", &new_id()).await, 0);
    let status = post_after(&relay, b"PROXY TCP4 not-an-address\r\n", &new_id()).await;
    assert_eq!(status, 0, "a malformed header closes too");
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="bad_proxy_header"}"#)
            .await,
        2.0
    );
    assert_nothing_published(&broker, &queue).await;
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn proxy_protocol_is_believed_only_from_trusted_proxies() {
    require_broker!();
    // The peer (127.0.0.1) is not a trusted proxy: whatever its PROXY header
    // claims, the connection is closed and nothing is published.
    let relay = TestRelay::start(opts(&["203.0.113.7/32"], &[], &["--proxy-protocol"])).await;
    let (broker, queue) = relay.watch_all().await;
    let status = post_after(
        &relay,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 443\r\n",
        &new_id(),
    )
    .await;
    assert_eq!(status, 0, "closed without an HTTP answer");
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="untrusted_proxy_peer"}"#)
            .await,
        1.0
    );
    assert_nothing_published(&broker, &queue).await;
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_header_timeout() {
    require_broker!();
    let header_timeout = Duration::from_secs(1);
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &["--header-timeout", "1"])).await;
    let (broker, queue) = relay.watch_all().await;
    let uri = format!("http://{}/webhooks/ocrolus", relay.addr);
    for (what, send_one) in [
        ("h2 after a delivery", true),
        ("h2 that never sends a request", false),
    ] {
        let stream = TcpStream::connect(relay.addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2c handshake");
        let conn = tokio::spawn(conn);
        if send_one {
            let mut req = Request::builder().method("POST").uri(&uri);
            for (k, v) in signed(&new_id(), BODY) {
                req = req.header(k, v);
            }
            let req = req
                .body(Full::new(Bytes::from_static(BODY)))
                .expect("request");
            let response = sender.send_request(req).await.expect("h2 response");
            assert_eq!(response.status(), 200, "{what}");
        }
        let ended = tokio::time::timeout(header_timeout + MARGIN, conn).await;
        assert!(
            ended.is_ok(),
            "{what}: still open after {:?}",
            header_timeout + MARGIN
        );
    }
    // HTTP/1.1 keep-alive: the same limit, from hyper's own timer.
    let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
    stream
        .write_all(&raw_delivery(relay.addr, &new_id()))
        .await
        .expect("write");
    assert_eq!(read_response(&mut stream, MARGIN).await.status, Some(200));
    assert!(
        closed_within(&mut stream, header_timeout + MARGIN)
            .await
            .is_some(),
        "h1 keep-alive"
    );
    assert_eq!(
        broker.drain(&queue, 2, Duration::from_secs(5)).await.len(),
        2
    );
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="header_timeout"}"#)
            .await,
        1.0,
        "only the connection that never sent a request counts as a rejection"
    );
    relay.finish(&broker, &[&queue]).await;
}

/// Sends one delivery on a kept-alive HTTP/1.1 stream, in two writes
/// `between` apart (the head's first bytes, then the rest), and reads the
/// answer.
async fn deliver_in_two_writes<S>(
    relay: &TestRelay,
    stream: &mut S,
    id: &str,
    between: Duration,
) -> Raw
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let bytes = raw_delivery(relay.addr, id);
    let (first, rest) = bytes.split_at(10);
    stream.write_all(first).await.expect("write");
    tokio::time::sleep(between).await;
    stream.write_all(rest).await.expect("write");
    read_response(stream, MARGIN).await
}

#[tokio::test]
async fn keep_alive_connections_give_hyper_back_when_quiet_and_are_served_again() {
    require_broker!();
    // Released after 1 s of quiet, closed after 6 s.
    let extra = ["--header-timeout", "6"];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &extra)).await;
    let stream = TcpStream::connect(relay.addr).await.expect("connect");
    served_across_releases(relay, stream).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let cert = write_cert(dir.path());
    // With ALPN, and without it (the protocol is then read off the first
    // bytes, which may already wait inside the TLS session).
    for alpn in [&[b"http/1.1".as_slice()][..], &[]] {
        let relay = TestRelay::start(tls_relay_options(dir.path(), &extra)).await;
        let tls = connector(std::slice::from_ref(&cert), alpn, TLS_BOTH);
        let stream = tls_connect(relay.addr, &tls).await;
        served_across_releases(relay, stream).await;
    }
}

/// Three deliveries on one connection: at once; after a quiet spell past
/// the release, in two pieces; and with its first bytes arriving just
/// before a release would be due and the rest well after. Each is answered
/// 200 without a close and published with its exact bytes, and the
/// connection still closes once idle past the header timeout.
async fn served_across_releases<S>(relay: TestRelay, mut stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (broker, queue) = relay.watch_all().await;
    let what = relay.url.clone();
    let parked = "ocrolus_relay_connections_parked";
    let pauses = [
        (Duration::ZERO, Duration::ZERO),
        (Duration::from_millis(1600), Duration::from_millis(300)),
        (Duration::from_millis(900), Duration::from_millis(1500)),
    ];
    let mut ids = Vec::new();
    for (i, (quiet, between)) in pauses.into_iter().enumerate() {
        tokio::time::sleep(quiet).await;
        if i == 1 {
            let now = relay.metric(parked).await;
            assert_eq!(now, 1.0, "{what}: quiet {quiet:?} and still holding hyper");
        }
        let id = new_id();
        let answer = deliver_in_two_writes(&relay, &mut stream, &id, between).await;
        assert_eq!(
            answer.status,
            Some(200),
            "{what}, request {i}: {}",
            answer.text
        );
        assert!(
            !answer.says_close() && !answer.closed,
            "{what}: {}",
            answer.text
        );
        ids.push(id);
    }
    let got = broker
        .drain(&queue, ids.len(), Duration::from_secs(5))
        .await;
    assert_eq!(
        got.iter().map(message_id).collect::<Vec<_>>(),
        ids,
        "{what}"
    );
    assert!(got.iter().all(|m| m.data == BODY), "{what}: bytes changed");
    assert!(
        closed_within(&mut stream, Duration::from_secs(6) + MARGIN)
            .await
            .is_some(),
        "{what}: the parked connection was never closed"
    );
    assert_eq!(relay.metric(parked).await, 0.0, "{what}");
    relay.finish(&broker, &[&queue]).await;
}

/// Shutdown closes idle connections at once, parked or still held by
/// hyper, and lets a request in flight finish: it does not wait for the
/// deadline (25 s) nor for the header timeout (30 s).
#[tokio::test]
async fn shutdown_closes_idle_connections_at_once_and_finishes_requests_in_flight() {
    require_broker!();
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &["--header-timeout", "30"])).await;
    let (broker, queue) = relay.watch_all().await;
    let mut ids = Vec::new();
    let mut parked = TcpStream::connect(relay.addr).await.expect("connect");
    ids.push(new_id());
    parked
        .write_all(&raw_delivery(relay.addr, &ids[0]))
        .await
        .expect("write");
    assert_eq!(read_response(&mut parked, MARGIN).await.status, Some(200));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(relay.metric("ocrolus_relay_connections_parked").await, 1.0);
    let mut held = TcpStream::connect(relay.addr).await.expect("connect");
    ids.push(new_id());
    held.write_all(&raw_delivery(relay.addr, &ids[1]))
        .await
        .expect("write");
    assert_eq!(read_response(&mut held, MARGIN).await.status, Some(200));
    // In flight: the head is in, the body comes after shutdown began.
    let mut in_flight = TcpStream::connect(relay.addr).await.expect("connect");
    ids.push(new_id());
    let bytes = raw_delivery(relay.addr, &ids[2]);
    let (head, body) = bytes.split_at(bytes.len() - BODY.len());
    in_flight.write_all(head).await.expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let names = [
        relay.exchange.clone(),
        relay.dead_letter.clone(),
        relay.alternate.clone(),
    ];
    let started = Instant::now();
    let stopping = tokio::spawn(relay.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    in_flight.write_all(body).await.expect("write the body");
    let answer = read_response(&mut in_flight, MARGIN).await;
    assert_eq!(answer.status, Some(200), "{}", answer.text);
    assert!(answer.says_close(), "{}", answer.text);
    for (what, stream) in [("parked", &mut parked), ("held by hyper", &mut held)] {
        assert!(
            closed_within(stream, MARGIN).await.is_some(),
            "{what}: still open during shutdown"
        );
    }
    stopping.await.expect("shutdown");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    let got = broker
        .drain(&queue, ids.len(), Duration::from_secs(5))
        .await;
    assert_eq!(got.iter().map(message_id).collect::<Vec<_>>(), ids);
    assert!(got.iter().all(|m| m.data == BODY));
    broker.delete_queue(&queue).await;
    for name in names.iter().filter(|n| !n.is_empty()) {
        broker.delete_exchange(name).await;
        broker.delete_queue(name).await;
    }
}

/// A TLS 1.3 client may send its request in the same write as its
/// Finished message: the request's plaintext then waits inside the
/// server's TLS session and the socket never turns readable for it again.
/// The relay must find them, with ALPN (HTTP/1.1 agreed) or without it
/// (the protocol read off those bytes).
#[tokio::test]
async fn a_request_sent_with_the_tls_finished_message_is_served() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = write_cert(dir.path());
    for alpn in [&[][..], &[b"http/1.1".as_slice()]] {
        let relay = TestRelay::start(tls_relay_options(dir.path(), &[])).await;
        served_with_the_finished_message(relay, &cert, alpn).await;
    }
}

async fn served_with_the_finished_message(
    relay: TestRelay,
    cert: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[&[u8]],
) {
    use std::io::{Read, Write};
    let (broker, queue) = relay.watch_all().await;
    let id = new_id();
    let request = raw_delivery(relay.addr, &id);
    let config = connector(std::slice::from_ref(cert), alpn, &[&rustls::version::TLS13])
        .config()
        .clone();
    let addr = relay.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = rustls::ClientConnection::new(config, name).expect("client");
        let mut socket = std::net::TcpStream::connect(addr).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        while tls.is_handshaking() {
            if tls.wants_write() {
                tls.write_tls(&mut socket).expect("write handshake");
            } else {
                tls.read_tls(&mut socket).expect("read handshake");
                tls.process_new_packets().expect("handshake");
            }
        }
        // The client's Finished is still queued: the request joins it.
        tls.writer().write_all(&request).expect("queue request");
        let mut flight = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut flight).expect("encode");
        }
        socket.write_all(&flight).expect("one write");
        let mut answer = Vec::new();
        while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
            if tls.read_tls(&mut socket).expect("read answer") == 0 {
                break;
            }
            tls.process_new_packets().expect("records");
            let mut chunk = [0u8; 4096];
            while let Ok(n) = tls.reader().read(&mut chunk) {
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&chunk[..n]);
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .expect("client");
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "ALPN {alpn:?}: {answer:?}"
    );
    let got = broker.drain(&queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got.iter().map(message_id).collect::<Vec<_>>(), [id]);
    assert_eq!(got[0].data, BODY);
    relay.finish(&broker, &[&queue]).await;
}
