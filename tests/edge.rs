//! The connection side of the edge: what happens to a keep-alive connection
//! after each answer, and what a client may cost in connections
//! before it is known to be allowed. Raw sockets throughout, so
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
/// How long after its headers the test client sends a body.
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

/// The keep-or-close rule after `first` on `stream`: an answer that says
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

// ---------------------------------------------------------------- keep or close after an answer

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
    // 401 and 400, after the body was read: 401 keeps the connection (a
    // forged flood must not cost a TCP connection per request), 400 closes.
    let mut unsigned = headers.clone();
    unsigned.retain(|(n, _)| n != "webhook-signature");
    early_answer(
        &relay,
        "POST",
        "/webhooks/ocrolus",
        &unsigned,
        &body,
        (401, Closes::No),
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
    // The deliveries sent on the connections kept after the 401 and the
    // 200, and the 200 itself.
    assert_eq!(
        broker.drain(&queue, 3, Duration::from_secs(5)).await.len(),
        3
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

// ---------------------------------------------------------------- connection hogs

/// A plain socket to the relay from a given local address (127.0.0.0/8 is
/// all loopback on Linux, so each address is a different client).
async fn connect_from(local: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local.parse().expect("ip"), 0))?;
    socket.connect(to).await
}

/// One delivery on a fresh plain connection: its status, or what went wrong.
async fn deliver_plain(addr: SocketAddr, id: &str) -> Result<u16, String> {
    let mut headers = signed_headers(SECRET, id, now_secs(), BODY);
    headers.push(("content-length".into(), BODY.len().to_string()));
    let mut bytes = raw_head(addr, &headers).into_bytes();
    bytes.extend(BODY);
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
    let raw = read_response(&mut stream, MARGIN).await;
    raw.status
        .ok_or_else(|| format!("no answer: {:?}", raw.text))
}

/// One delivery on a fresh TLS connection: its status, or what went wrong.
async fn deliver_tls(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    id: &str,
) -> Result<u16, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
    let mut stream = tokio::time::timeout(MARGIN, connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    let mut headers = signed_headers(SECRET, id, now_secs(), BODY);
    headers.push(("content-length".into(), BODY.len().to_string()));
    let mut bytes = raw_head(addr, &headers).into_bytes();
    bytes.extend(BODY);
    stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
    let raw = read_response(&mut stream, MARGIN).await;
    raw.status
        .ok_or_else(|| format!("no answer: {:?}", raw.text))
}

const BODY: &[u8] = br#"{"event_name":"book.verified","book_pk":1}"#;

/// The connection hog: `n` connections from `from` that each send
/// `GET / HTTP/1.1` every `period` (inside the header timeout, so an idle
/// timer never fires) and reconnect at once whenever the relay closes one
/// (or refuses it: then after a pause). Runs
/// until `stop`; returns how many connections it opened.
fn flood(
    from: &'static str,
    to: SocketAddr,
    n: usize,
    period: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let hogs = (0..n).map(|_| {
            let stop = stop.clone();
            async move {
                let mut opened = 0usize;
                while !stop.is_cancelled() {
                    let Ok(mut stream) = connect_from(from, to).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    opened += 1;
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return opened,
                            _ = tokio::time::sleep(period) => {}
                        }
                        let sent = stream
                            .write_all(format!("GET / HTTP/1.1\r\nhost: {to}\r\n\r\n").as_bytes())
                            .await;
                        if sent.is_err() || read_response(&mut stream, period).await.closed {
                            break;
                        }
                    }
                    // Closed: come back at once, as an attacker would.
                }
                opened
            }
        });
        join_all(hogs).await.into_iter().sum()
    })
}

/// Sends deliveries one after another for `span`; every one must get 200.
async fn steady_sender<F, Fut>(span: Duration, deliver: F) -> Vec<String>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<u16, String>>,
{
    let mut ids = Vec::new();
    let end = tokio::time::Instant::now() + span;
    while tokio::time::Instant::now() < end {
        let id = new_id();
        match deliver(id.clone()).await {
            Ok(200) => ids.push(id),
            other => panic!("allowlisted delivery {} failed: {other:?}", ids.len() + 1),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ids
}

/// Every id arrived, exactly once.
async fn assert_all_arrived(broker: &TestBroker, queue: &str, ids: &[String]) {
    let got = broker
        .drain(queue, ids.len(), Duration::from_secs(10))
        .await;
    let seen: Vec<String> = got
        .iter()
        .filter_map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string)
        })
        .collect();
    assert_eq!(seen.len(), ids.len(), "messages in the queue");
    for id in ids {
        assert!(seen.contains(id), "{id} did not arrive");
    }
}

/// The report: 50 sockets from a non-allowlisted address took every slot
/// of `--max-connections 50`, and allowlisted deliveries were closed at
/// once. The period (8 s against a 10 s header timeout) is scaled down to
/// 1.5 s against 2 s.
#[tokio::test]
async fn non_allowlisted_flood_cannot_take_the_connection_slots() {
    let extra = ["--max-connections", "50", "--header-timeout", "2"];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &extra)).await;
    let (broker, queue) = relay.watch_all().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let hogs = flood(
        "127.0.0.2",
        relay.addr,
        50,
        Duration::from_millis(1500),
        stop.clone(),
    );
    // Let the flood take what it can.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let addr = relay.addr;
    let ids = steady_sender(Duration::from_secs(6), |id| async move {
        deliver_plain(addr, &id).await
    })
    .await;
    stop.cancel();
    let opened = hogs.await.expect("flood");
    assert!(opened >= 50, "the flood ran ({opened} connections)");
    assert_all_arrived(&broker, &queue, &ids).await;
    assert!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="peer_not_allowed"}"#)
            .await
            >= 50.0
    );
    relay.finish(&broker, &[&queue]).await;
}

/// The same with TLS: handshakes from outside the allowlist that never
/// finish must not hold slots either.
#[tokio::test]
async fn hanging_tls_handshakes_from_outside_cannot_take_the_connection_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = write_cert(dir.path());
    let relay = TestRelay::start(tls_relay_options(
        dir.path(),
        &["--max-connections", "50", "--header-timeout", "10"],
    ))
    .await;
    let (broker, queue) = relay.watch_all().await;
    // 50 handshakes begun (a TLS record header) and left hanging.
    let mut hanging = Vec::new();
    for _ in 0..50 {
        let mut stream = connect_from("127.0.0.2", relay.addr)
            .await
            .expect("connect");
        let _ = stream.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
        hanging.push(stream);
    }
    let connector = connector(&[cert], &[b"http/1.1"], rustls::DEFAULT_VERSIONS);
    let addr = relay.addr;
    let connector = &connector;
    let ids = steady_sender(Duration::from_secs(4), |id| async move {
        deliver_tls(addr, connector, &id).await
    })
    .await;
    assert_all_arrived(&broker, &queue, &ids).await;
    drop(hanging);
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn connections_per_client_address_are_capped() {
    let extra = ["--max-connections-per-ip", "3", "--header-timeout", "30"];
    let relay = TestRelay::start(opts(&["127.0.0.0/24"], &[], &extra)).await;
    let (broker, queue) = relay.watch_all().await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            connect_from("127.0.0.4", relay.addr)
                .await
                .expect("connect"),
        );
    }
    let open = "ocrolus_relay_connections_open";
    let deadline = tokio::time::Instant::now() + MARGIN;
    while relay.metric(open).await < 3.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut fourth = connect_from("127.0.0.4", relay.addr)
        .await
        .expect("connect");
    assert!(
        closed_within(&mut fourth, MARGIN).await.is_some(),
        "a fourth connection from one address stays open"
    );
    // Another address is not affected.
    let id = new_id();
    assert_eq!(deliver_plain(relay.addr, &id).await, Ok(200));
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="too_many_connections_from_client"}"#)
            .await,
        1.0
    );
    drop(held);
    assert_all_arrived(&broker, &queue, &[id]).await;
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn allowlisted_peers_get_reserved_room_when_the_cap_is_reached() {
    // The trusted proxy 127.0.0.2 (its clients named in X-Forwarded-For)
    // fills --max-connections; a direct allowlisted sender still gets in.
    let extra = [
        "--max-connections",
        "5",
        "--reserved-connections",
        "2",
        "--header-timeout",
        "30",
    ];
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &["127.0.0.2/32"], &extra)).await;
    let (broker, queue) = relay.watch_all().await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(
            connect_from("127.0.0.2", relay.addr)
                .await
                .expect("connect"),
        );
    }
    let open = "ocrolus_relay_connections_open";
    let deadline = tokio::time::Instant::now() + MARGIN;
    while relay.metric(open).await < 5.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sixth = connect_from("127.0.0.2", relay.addr)
        .await
        .expect("connect");
    assert!(
        closed_within(&mut sixth, MARGIN).await.is_some(),
        "the proxy got past --max-connections"
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = new_id();
        assert_eq!(deliver_plain(relay.addr, &id).await, Ok(200));
        ids.push(id);
    }
    drop(held);
    assert_all_arrived(&broker, &queue, &ids).await;
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn admin_listener_connections_are_capped() {
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &[])).await;
    // Half-open admin connections, never sending a byte, up to the cap.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(TcpStream::connect(relay.admin).await.expect("connect"));
    }
    let mut over = Vec::new();
    for _ in 0..8 {
        over.push(TcpStream::connect(relay.admin).await.expect("connect"));
    }
    for (i, stream) in over.iter_mut().enumerate() {
        assert!(
            closed_within(stream, MARGIN).await.is_some(),
            "admin connection {} over the cap stays open",
            i + 1
        );
    }
    // The public listener is unaffected, and the admin one serves again
    // once the held connections are gone.
    let id = new_id();
    assert_eq!(deliver_plain(relay.addr, &id).await, Ok(200));
    drop(held);
    let deadline = tokio::time::Instant::now() + MARGIN;
    let mut live = None;
    while live != Some(200) && tokio::time::Instant::now() < deadline {
        let mut stream = TcpStream::connect(relay.admin).await.expect("connect");
        let head = raw_request_head("GET", "/livez", relay.admin, &[]);
        stream.write_all(head.as_bytes()).await.expect("write");
        live = read_response(&mut stream, Duration::from_secs(1))
            .await
            .status;
    }
    assert_eq!(live, Some(200), "admin listener serves again");
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

// ---------------------------------------------------------------- PROXY protocol, transfer codings

/// One delivery, claiming `forwarded` in X-Forwarded-For, on a connection
/// that starts with `preamble`: the status, 0 if closed without an answer.
async fn post_after(relay: &TestRelay, preamble: &[u8], forwarded: &str, id: &str) -> u16 {
    let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
    let _ = stream.write_all(preamble).await;
    let mut headers = signed_headers(SECRET, id, now_secs(), BODY);
    headers.push(("content-length".into(), BODY.len().to_string()));
    headers.push(("x-forwarded-for".into(), forwarded.into()));
    let mut bytes = raw_head(relay.addr, &headers).into_bytes();
    bytes.extend(BODY);
    let _ = stream.write_all(&bytes).await;
    read_response(&mut stream, Duration::from_secs(10))
        .await
        .status
        .unwrap_or(0)
}

/// A v2 header: signature, version/command, family/protocol, payload.
fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend([command, family]);
    header.extend(u16::try_from(payload.len()).expect("len").to_be_bytes());
    header.extend(payload);
    header
}

/// The report: `PROXY UNKNOWN` (or a v2 LOCAL/UNSPEC/AF_UNIX header) from
/// the trusted load balancer, then `X-Forwarded-For: <allowed address>`,
/// got 200. With PROXY protocol the client is the header's source or the
/// TCP peer, never a forwarded header.
#[tokio::test]
async fn with_proxy_protocol_forwarded_for_is_never_believed() {
    let relay = TestRelay::start(opts(
        &["203.0.113.7/32"],
        &["127.0.0.1/32", "203.0.113.0/24"],
        &["--proxy-protocol"],
    ))
    .await;
    let (broker, queue) = relay.watch_all().await;
    let unix_addresses = [0u8; 216];
    let cases: [(&str, Vec<u8>); 4] = [
        ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec()),
        ("v2 LOCAL", v2(0x20, 0x00, &[])),
        ("v2 PROXY UNSPEC", v2(0x21, 0x00, &[])),
        ("v2 PROXY AF_UNIX", v2(0x21, 0x31, &unix_addresses)),
    ];
    for (what, preamble) in cases {
        let status = post_after(&relay, &preamble, "203.0.113.7", &new_id()).await;
        assert_ne!(status, 200, "{what} + X-Forwarded-For was believed");
        assert_eq!(
            status, 0,
            "{what}: the TCP peer is not allowed: closed at once"
        );
    }
    assert_nothing_published(&broker, &queue).await;
    // A named source that is itself a trusted proxy: its forwarded header
    // is still not walked.
    let id = new_id();
    let status = post_after(
        &relay,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 443\r\n",
        "198.51.100.9",
        &id,
    )
    .await;
    assert_eq!(status, 200);
    assert_all_arrived(&broker, &queue, &[id]).await;
    relay.finish(&broker, &[&queue]).await;
}

async fn assert_nothing_published(broker: &TestBroker, queue: &str) {
    let got = broker.drain(queue, 1, Duration::from_millis(300)).await;
    assert!(got.is_empty(), "{} unexpected message(s)", got.len());
}

/// Found in the review: `gzip, chunked` and `identity, chunked` were
/// accepted and the body passed on undecoded; a proxy in front may read
/// such a body differently.
#[tokio::test]
async fn transfer_codings_other_than_a_single_chunked_get_400_and_close() {
    let relay = TestRelay::start(opts(&["127.0.0.1/32"], &[], &[])).await;
    let (broker, queue) = relay.watch_all().await;
    let mut chunked_body = format!("{:x}\r\n", BODY.len()).into_bytes();
    chunked_body.extend(BODY);
    chunked_body.extend(b"\r\n0\r\n\r\n");
    let cases: [(&[&str], u16); 5] = [
        (&["gzip, chunked"], 400),
        (&["identity, chunked"], 400),
        (&["chunked, chunked"], 400),
        (&["gzip", "chunked"], 400),
        (&["chunked"], 200),
    ];
    let mut ok = Vec::new();
    for (codings, expect) in cases {
        let id = new_id();
        let mut headers = signed_headers(SECRET, &id, now_secs(), BODY);
        for coding in codings {
            headers.push(("transfer-encoding".into(), coding.to_string()));
        }
        let mut stream = TcpStream::connect(relay.addr).await.expect("connect");
        let mut bytes = raw_head(relay.addr, &headers).into_bytes();
        bytes.extend(&chunked_body);
        stream.write_all(&bytes).await.expect("write");
        let raw = read_response(&mut stream, MARGIN).await;
        assert_eq!(raw.status, Some(expect), "{codings:?}: {}", raw.text);
        if expect == 200 {
            ok.push(id);
        } else {
            assert!(raw.says_close(), "{codings:?}: {}", raw.text);
        }
    }
    assert_all_arrived(&broker, &queue, &ok).await;
    assert_eq!(
        relay
            .metric(r#"ocrolus_relay_rejections_total{reason="bad_transfer_encoding"}"#)
            .await,
        4.0
    );
    relay.finish(&broker, &[&queue]).await;
}

/// A client that gives up on a request (h2 RST_STREAM) while the relay
/// waits for the broker's confirm makes hyper drop the request's future.
/// Nothing was answered, so nothing was promised; but the request must not
/// stay counted in `requests_in_flight` forever.
#[tokio::test]
async fn a_request_the_client_cancels_is_not_left_in_flight() {
    require_broker!();
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: ["--confirm-timeout", "30", "--request-timeout", "40"]
            .map(String::from)
            .to_vec(),
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let in_flight = "ocrolus_relay_requests_in_flight";
    proxy.stall();
    let stream = TcpStream::connect(relay.addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let (headers, body) = delivery();
    let mut req = Request::builder()
        .method("POST")
        .uri(format!("http://{}/webhooks/ocrolus", relay.addr));
    for (k, v) in headers.iter().filter(|(n, _)| n != "content-length") {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let pending = tokio::spawn(sender.send_request(req));
    let started = std::time::Instant::now();
    while relay.metric(in_flight).await < 1.0 && started.elapsed() < MARGIN {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        relay.metric(in_flight).await,
        1.0,
        "waiting for the confirm"
    );
    // Dropping the response future resets the stream.
    pending.abort();
    let started = std::time::Instant::now();
    while relay.metric(in_flight).await > 0.0 && started.elapsed() < MARGIN {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(relay.metric(in_flight).await, 0.0, "the cancelled request");
    proxy.restore();
    relay.finish(&broker, &[&queue]).await;
}
