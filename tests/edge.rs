//! The connection side of the edge: what happens to a keep-alive connection
//! after each answer (issue 17), and what a client may cost in connections
//! before it is known to be allowed (issue 12). Raw sockets throughout, so
//! the tests see the `Connection` header and the server's close itself.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::future::join_all;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Slack on top of a configured timeout before a test calls it missed.
const MARGIN: Duration = Duration::from_secs(4);
/// How long after its headers the test client sends a body (issue 17).
const BODY_LATER: Duration = Duration::from_millis(50);

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

/// A signed delivery of about 3 KB, as in the report.
fn delivery() -> (Vec<(String, String)>, Vec<u8>) {
    let body = format!(
        r#"{{"event_name":"book.verified","book_pk":1,"padding":"{}"}}"#,
        "x".repeat(3000)
    )
    .into_bytes();
    let mut headers = signed_headers(SECRET, &new_id(), now_secs(), &body);
    headers.push(("content-length".into(), body.len().to_string()));
    (headers, body)
}

/// Writes a request's head, then its body `BODY_LATER` afterwards, and
/// reads the answer.
async fn head_then_body(stream: &mut TcpStream, head: &str, body: &[u8]) -> Raw {
    if let Err(e) = stream.write_all(head.as_bytes()).await {
        return Raw {
            status: None,
            text: format!("writing the head: {e}"),
            closed: true,
            elapsed: Duration::ZERO,
        };
    }
    tokio::time::sleep(BODY_LATER).await;
    // The server may already have answered and closed: that shows in the answer.
    let _ = stream.write_all(body).await;
    read_response(stream, MARGIN).await
}

/// Issue 17's rule after `first` on `stream`: an answer that says
/// `Connection: close` is followed by the close; any other leaves the
/// connection usable, so a genuine delivery sent next gets an answer.
/// Returns that answer's status (`None` after a close).
async fn next_request_after(relay: &TestRelay, stream: &mut TcpStream, first: &Raw) -> Option<u16> {
    if first.says_close() {
        assert!(
            first.closed || closed_within(stream, MARGIN).await.is_some(),
            "said close but kept the connection open: {}",
            first.text
        );
        return None;
    }
    assert!(!first.closed, "closed without saying so: {}", first.text);
    let (headers, body) = delivery();
    let second = head_then_body(stream, &raw_head(relay.addr, &headers), &body).await;
    assert!(
        second.status.is_some(),
        "the next request on a connection kept open got no answer after {:?}: {}",
        first.status,
        second.text
    );
    second.status
}

/// Sends one early-answered request (head first, body later) on a fresh
/// connection; checks its status and whether it closes the connection.
async fn early_answer(
    relay: &TestRelay,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    expect: (u16, Closes),
) {
    let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
    let head = raw_request_head(method, path, relay.addr, headers);
    let first = head_then_body(&mut stream, &head, body).await;
    assert_eq!(first.status, Some(expect.0), "{}", first.text);
    assert_eq!(
        first.says_close(),
        expect.1 == Closes::Yes,
        "{method} {path} → {}: {}",
        expect.0,
        first.text
    );
    next_request_after(relay, &mut stream, &first).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closes {
    Yes,
    No,
}

// ---------------------------------------------------------------- issue 17

/// The report: a 429 answered before the body is read said nothing about
/// the connection, the relay closed it, and the next request on it failed
/// with a broken pipe.
#[tokio::test]
async fn rate_limited_answer_keeps_the_connection_usable() {
    let limit = ["--rate-limit-per-ip", "1", "--rate-limit-burst", "1"];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &limit)).await;
    let (broker, queue) = relay.watch_all().await;
    // Up to a few tries: on a very slow machine the bucket may refill
    // between two requests.
    let mut answered = None;
    for _ in 0..5 {
        let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
        let (headers, body) = delivery();
        let first = head_then_body(&mut stream, &raw_head(relay.addr, &headers), &body).await;
        if first.status == Some(429) {
            assert_eq!(first.header("retry-after").as_deref(), Some("1"));
            assert!(!first.says_close(), "{}", first.text);
            answered = next_request_after(&relay, &mut stream, &first).await;
            break;
        }
        next_request_after(&relay, &mut stream, &first).await;
    }
    assert!(
        matches!(answered, Some(200 | 429)),
        "no 429 kept its connection: {answered:?}"
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn early_answer_whose_body_never_comes_says_close() {
    // The per-IP bucket is empty after one request; the next one's body
    // never comes, so the relay cannot keep the connection and says so.
    let limit = ["--rate-limit-per-ip", "1", "--rate-limit-burst", "1"];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &limit)).await;
    for _ in 0..5 {
        // Empties the bucket.
        post_signed(&relay, &new_id(), b"{}").await;
        let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
        let (headers, _) = delivery();
        stream
            .write_all(raw_head(relay.addr, &headers).as_bytes())
            .await
            .expect("write head");
        let first = read_response(&mut stream, MARGIN).await;
        if first.status == Some(429) {
            assert!(first.says_close(), "{}", first.text);
            next_request_after(&relay, &mut stream, &first).await;
            let broker = TestBroker::connect().await;
            relay.finish(&broker, &[]).await;
            return;
        }
    }
    panic!("never rate-limited");
}

#[tokio::test]
async fn in_flight_cap_answer_keeps_the_connection_usable() {
    // One slot, held by a delivery whose body is only half sent.
    let extra = ["--max-in-flight", "1", "--body-timeout", "60"];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &extra)).await;
    let (broker, queue) = relay.watch_all().await;
    let (held_headers, held_body) = delivery();
    let mut held = TcpStream::connect(relay.addr).await.expect("connect");
    let mut start = raw_head(relay.addr, &held_headers).into_bytes();
    start.extend(&held_body[..10]);
    held.write_all(&start).await.expect("write");
    let in_flight = "ocrolus_relay_requests_in_flight";
    let deadline = tokio::time::Instant::now() + MARGIN;
    while relay.metric(in_flight).await < 1.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The gauge rises a moment before the slot is taken, in the same step.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
    let (headers, body) = delivery();
    let first = head_then_body(&mut stream, &raw_head(relay.addr, &headers), &body).await;
    assert_eq!(first.status, Some(503), "{}", first.text);
    assert!(!first.says_close(), "{}", first.text);
    assert_eq!(
        next_request_after(&relay, &mut stream, &first).await,
        Some(503)
    );

    held.write_all(&held_body[10..]).await.expect("write rest");
    let raw = read_response(&mut held, Duration::from_secs(10)).await;
    assert_eq!(raw.status, Some(200), "{}", raw.text);
    assert!(!raw.says_close());
    assert_eq!(next_request_after(&relay, &mut held, &raw).await, Some(200));
    assert_eq!(
        broker.drain(&queue, 2, Duration::from_secs(5)).await.len(),
        2
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn refusals_that_close_say_connection_close() {
    // 203.0.113.0/24 may deliver through the trusted proxy 127.0.0.1.
    let relay = TestRelay::start(opts(
        &["203.0.113.0/24", "127.0.0.1/32"],
        &["127.0.0.1/32"],
        &["--max-body", "4096"],
    ))
    .await;
    let (broker, queue) = relay.watch_all().await;
    let (headers, body) = delivery();
    let forwarded = |client: &str| {
        let mut h = headers.clone();
        h.push(("x-forwarded-for".into(), client.into()));
        h
    };
    // 403: a client outside the allowlist, and a malformed forwarded chain.
    let h = forwarded("198.51.100.9");
    early_answer(
        &relay,
        "POST",
        "/webhooks/ocrolus",
        &h,
        &body,
        (403, Closes::Yes),
    )
    .await;
    let h = forwarded("not-an-address");
    early_answer(
        &relay,
        "POST",
        "/webhooks/ocrolus",
        &h,
        &body,
        (403, Closes::Yes),
    )
    .await;
    // 404 and 405: not retry-able, so not worth a connection.
    early_answer(&relay, "POST", "/nope", &headers, &body, (404, Closes::Yes)).await;
    early_answer(
        &relay,
        "PUT",
        "/webhooks/ocrolus",
        &headers,
        &body,
        (405, Closes::Yes),
    )
    .await;
    // 413: the declared body is never read.
    let mut big = headers.clone();
    big.retain(|(n, _)| n != "content-length");
    big.push(("content-length".into(), "10485760".into()));
    early_answer(
        &relay,
        "POST",
        "/webhooks/ocrolus",
        &big,
        b"",
        (413, Closes::Yes),
    )
    .await;
    // 401 and 400, after the body was read.
    let mut unsigned = headers.clone();
    unsigned.retain(|(n, _)| n != "webhook-signature");
    early_answer(
        &relay,
        "POST",
        "/webhooks/ocrolus",
        &unsigned,
        &body,
        (401, Closes::Yes),
    )
    .await;
    let not_json = b"not json at all";
    let mut bad = signed_headers(SECRET, &new_id(), now_secs(), not_json);
    bad.push(("content-length".into(), not_json.len().to_string()));
    early_answer(
        &relay,
        "POST",
        "/webhooks/ocrolus",
        &bad,
        not_json,
        (400, Closes::Yes),
    )
    .await;
    // A 200 keeps the connection: the next delivery on it gets 200 too.
    early_answer(
        &relay,
        "POST",
        "/webhooks/ocrolus",
        &headers,
        &body,
        (200, Closes::No),
    )
    .await;
    assert_eq!(
        broker.drain(&queue, 2, Duration::from_secs(5)).await.len(),
        2
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn h2_refusal_answers_the_stream_and_keeps_the_connection() {
    let limit = ["--rate-limit-per-ip", "1", "--rate-limit-burst", "1"];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &limit)).await;
    let (broker, queue) = relay.watch_all().await;
    let stream = TcpStream::connect(relay.addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    let conn = tokio::spawn(conn);
    let uri = format!("http://{}/webhooks/ocrolus", relay.addr);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (headers, body) = delivery();
        let mut req = Request::builder().method("POST").uri(&uri);
        for (k, v) in headers.iter().filter(|(n, _)| n != "content-length") {
            req = req.header(k, v);
        }
        let req = req.body(Full::new(Bytes::from(body))).expect("request");
        let response = sender.send_request(req).await.expect("h2 answer");
        assert!(response.headers().get("connection").is_none());
        statuses.push(response.status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(!conn.is_finished(), "the connection stays usable");
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        broker.drain(&queue, ok, Duration::from_secs(5)).await.len(),
        ok
    );
    relay.finish(&broker, &[&queue]).await;
}

/// One keep-alive client: `n` deliveries, each head first and body later,
/// on one connection as long as the relay keeps it. A request that gets no
/// answer on a connection not announced as closing is a transport error.
async fn keep_alive_client(addr: SocketAddr, n: usize) -> (Vec<(u16, String)>, usize, usize) {
    let mut answers = Vec::new();
    let mut transport_errors = 0;
    let mut connections = 1;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    for _ in 0..n {
        let (headers, body) = delivery();
        let raw = head_then_body(&mut stream, &raw_head(addr, &headers), &body).await;
        let Some(status) = raw.status else {
            transport_errors += 1;
            stream = TcpStream::connect(addr).await.expect("reconnect");
            connections += 1;
            continue;
        };
        let id = raw
            .text
            .split("\r\n\r\n")
            .nth(1)
            .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
            .and_then(|v| v["id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        answers.push((status, id));
        if raw.says_close() || raw.closed {
            stream = TcpStream::connect(addr).await.expect("reconnect");
            connections += 1;
        }
    }
    (answers, transport_errors, connections)
}

#[tokio::test]
async fn keep_alive_clients_under_rate_limiting_see_no_transport_errors() {
    const CLIENTS: usize = 32;
    const REQUESTS: usize = 2000;
    let limit = ["--rate-limit-per-ip", "20", "--rate-limit-burst", "1"];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &limit)).await;
    let (broker, queue) = relay.watch_all().await;
    let clients = (0..CLIENTS).map(|_| {
        let addr = relay.addr;
        tokio::spawn(keep_alive_client(addr, REQUESTS / CLIENTS))
    });
    let mut answers = Vec::new();
    let (mut errors, mut connections) = (0, 0);
    for result in join_all(clients).await {
        let (a, e, c) = result.expect("client task");
        answers.extend(a);
        errors += e;
        connections += c;
    }
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for (status, _) in &answers {
        *by_status.entry(*status).or_default() += 1;
    }
    eprintln!("statuses {by_status:?}, {connections} connections, {errors} transport errors");
    assert_eq!(errors, 0, "transport errors; statuses {by_status:?}");
    assert_eq!(answers.len(), REQUESTS / CLIENTS * CLIENTS);
    assert!(
        by_status.get(&429).copied().unwrap_or(0) > 0,
        "{by_status:?}"
    );
    assert_eq!(
        by_status.get(&200).copied().unwrap_or(0) + by_status.get(&429).copied().unwrap_or(0),
        answers.len(),
        "only 200 or 429: {by_status:?}"
    );
    // Every 200 is in the queue exactly once.
    let ok: Vec<&String> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, id)| id)
        .collect();
    let got = broker
        .drain(&queue, ok.len(), Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), ok.len());
    let ids: std::collections::HashSet<String> = got
        .iter()
        .filter_map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(std::string::ToString::to_string)
        })
        .collect();
    for id in ok {
        assert!(ids.contains(id), "200 for {id} but not in the queue");
    }
    relay.finish(&broker, &[&queue]).await;
}
