//! HTTP clients, from polite to adversarial: signed requests over hyper
//! (HTTP/1.1), raw bytes over TCP for slow or malformed clients, and TLS
//! with a chosen ALPN and protocol version (HTTP/1.1 or HTTP/2).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ProtocolVersion;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{SECRET, TestRelay, now_secs};

/// Headers of a correctly signed delivery.
pub fn signed_headers(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(String, String)> {
    let ts = timestamp.to_string();
    let sig = hex::encode(ocrolus_relay::sign(secret.as_bytes(), &ts, id, body));
    vec![
        ("content-type".into(), "application/json".into()),
        ("webhook-request-id".into(), id.into()),
        ("webhook-timestamp".into(), ts),
        ("webhook-signature".into(), sig),
    ]
}

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Response status, headers and body.
pub type Answer = (u16, HeaderMap, Bytes);

/// One request on a fresh HTTP/1.1 connection.
pub async fn request(method: &str, url: &str, headers: &[(String, String)], body: Bytes) -> Answer {
    let uri: http::Uri = url.parse().expect("url");
    let authority = uri.authority().expect("authority").clone();
    let stream = TcpStream::connect(authority.as_str())
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(
            uri.path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str),
        )
        .header("host", authority.as_str());
    for (k, v) in headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let response = sender
        .send_request(builder.body(Full::new(body)).expect("request"))
        .await
        .expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, body)
}

/// One signed POST on a fresh HTTP/1.1 connection that never panics: `None`
/// when the connection failed (refused, reset, closed without an answer) or
/// no answer came `within`. For tests that cut, stall or kill the relay.
pub async fn try_post(url: &str, id: &str, body: &[u8], within: Duration) -> Option<Answer> {
    let headers = signed_headers(SECRET, id, now_secs(), body);
    let body = Bytes::copy_from_slice(body);
    let attempt = async {
        let uri: http::Uri = url.parse().ok()?;
        let authority = uri.authority()?.clone();
        let stream = TcpStream::connect(authority.as_str()).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let mut builder = Request::builder()
            .method("POST")
            .uri(uri.path())
            .header("host", authority.as_str());
        for (k, v) in &headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let response = sender
            .send_request(builder.body(Full::new(body)).ok()?)
            .await
            .ok()?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, headers, body))
    };
    tokio::time::timeout(within, attempt).await.ok().flatten()
}

/// A signed POST of `body` to the relay.
pub async fn post_signed(relay: &TestRelay, id: &str, body: &[u8]) -> Answer {
    let headers = signed_headers(SECRET, id, now_secs(), body);
    request("POST", &relay.url, &headers, Bytes::copy_from_slice(body)).await
}

pub async fn get(url: &str) -> Answer {
    request("GET", url, &[], Bytes::new()).await
}

// ---------------------------------------------------------------- raw TCP

/// The head of a raw HTTP/1.1 POST to the webhook path.
pub fn raw_head(addr: SocketAddr, headers: &[(String, String)]) -> String {
    raw_request_head("POST", "/webhooks/ocrolus", addr, headers)
}

/// The head of any raw HTTP/1.1 request.
pub fn raw_request_head(
    method: &str,
    path: &str,
    addr: SocketAddr,
    headers: &[(String, String)],
) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// What a raw client saw: the status line's code (if any answer came), the
/// whole text, and whether the server closed the connection.
pub struct Raw {
    pub status: Option<u16>,
    pub text: String,
    pub closed: bool,
    pub elapsed: Duration,
}

impl Raw {
    /// A response header's value (the first one), lower-cased.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.text.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    }

    /// The answer said the server closes the connection after it.
    pub fn says_close(&self) -> bool {
        self.header("connection").as_deref() == Some("close")
    }
}

/// Reads one HTTP/1.1 answer (complete by Content-Length) or until the
/// server closes, at most `within`.
pub async fn read_response<R: AsyncRead + Unpin>(reader: &mut R, within: Duration) -> Raw {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut closed = false;
    while !response_complete(&buf) {
        match tokio::time::timeout_at(deadline, reader.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Ok(0) | Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    Raw {
        status,
        text,
        closed,
        elapsed: started.elapsed(),
    }
}

fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    buf.len() >= end + 4 + len
}

/// Reads and discards until the server closes; the time it took, or `None`
/// if it stayed open for `within`.
pub async fn closed_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    let result = tokio::time::timeout(within, async {
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    result.ok().map(|()| started.elapsed())
}

/// Writes `bytes` one at a time with `pause` between them until done or the
/// server closes: a slowloris client.
pub async fn trickle<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8], pause: Duration) {
    for byte in bytes {
        if writer.write_all(std::slice::from_ref(byte)).await.is_err()
            || writer.flush().await.is_err()
        {
            return;
        }
        tokio::time::sleep(pause).await;
    }
}

// ---------------------------------------------------------------- TLS

/// A TLS client trusting only `roots`, offering `alpn`, limited to
/// `versions` (rustls cannot even speak TLS 1.1 or older).
pub fn connector(
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).expect("root certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

pub async fn tls_connect(addr: SocketAddr, connector: &TlsConnector) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    connector.connect(name, tcp).await.expect("TLS handshake")
}

/// What the client learned from the handshake.
pub struct Negotiated {
    pub version: Option<ProtocolVersion>,
    pub alpn: Option<Vec<u8>>,
    pub leaf: Option<CertificateDer<'static>>,
}

pub fn negotiated(stream: &TlsStream<TcpStream>) -> Negotiated {
    let conn = stream.get_ref().1;
    Negotiated {
        version: conn.protocol_version(),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        leaf: conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|c| c.clone().into_owned()),
    }
}

/// One POST over a TLS connection, HTTP/2 when ALPN chose it.
pub async fn tls_post(
    relay: &TestRelay,
    connector: &TlsConnector,
    headers: &[(String, String)],
    body: &[u8],
) -> (Answer, Negotiated) {
    let stream = tls_connect(relay.addr, connector).await;
    let info = negotiated(&stream);
    let io = TokioIo::new(stream);
    let uri = format!("https://localhost:{}/webhooks/ocrolus", relay.addr.port());
    let mut builder = Request::builder().method("POST").uri(uri);
    for (k, v) in headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let req = builder
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    let response = if info.alpn.as_deref() == Some(b"h2") {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        sender.send_request(req).await.expect("h2 response")
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = "/webhooks/ocrolus".parse().expect("path");
        req.headers_mut()
            .insert("host", http::HeaderValue::from_static("localhost"));
        sender.send_request(req).await.expect("h1 response")
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    ((status, headers, body), info)
}
