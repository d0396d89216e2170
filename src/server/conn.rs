//! One connection's HTTP. The protocol comes from ALPN or, without it, from
//! the first bytes. An HTTP/1 connection holds hyper, with its buffers, only
//! while it carries requests: after a quiet second hyper hands the socket
//! back, and the connection waits for the peer's next bytes holding nothing
//! but the socket. An h2 connection keeps hyper for its life. Both are
//! closed when idle past the header timeout ([`super::idle`]).

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Request;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::idle::{ActiveRequest, Activity, Deadlines, Verdict};
use super::transport::{Rewind, Transport};
use crate::metrics::{GaugeHold, Reason};
use crate::pipeline;
use crate::state::AppState;

/// HTTP/2 streams per connection: Ocrolus sends one delivery at a time.
const H2_MAX_STREAMS: u32 = 64;
/// Header bytes per request (both protocols).
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// What an h2 client sends first; anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The first read of a connection without ALPN: a delivery's head and a
/// small body.
const FIRST_READ: usize = 4096;

/// What a connection's tasks share.
struct Conn {
    peer: IpAddr,
    state: Arc<AppState>,
    activity: Arc<Activity>,
    deadlines: Deadlines,
    shutdown: CancellationToken,
}

pub(super) async fn http<S: Transport>(
    stream: S,
    peer: IpAddr,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let deadlines = Deadlines::new(state.config.limits.header_timeout);
    let conn = Conn {
        peer,
        state,
        activity: Activity::new(),
        deadlines,
        shutdown,
    };
    let (h2, stream) = match stream.alpn_h2() {
        Some(h2) => (h2, Rewind::new(stream, Bytes::new())),
        None => {
            let close_at = deadlines.close_at(conn.activity.marks());
            tokio::select! {
                () = conn.shutdown.cancelled() => return,
                () = sleep_until(close_at) => return conn.closed_idle(true),
                sniffed = sniff(stream) => match sniffed {
                    Some(sniffed) => sniffed,
                    None => return,
                },
            }
        }
    };
    if h2 {
        // Boxed: hyper's h2 state is large, and only h2 connections need it.
        Box::pin(conn.serve_h2(stream)).await;
    } else {
        conn.serve_h1(stream).await;
    }
}

/// Reads until the bytes either are the h2 preface or cannot be; `None` if
/// the peer closed or failed first. It waits for the first bytes holding no
/// buffer (a silent connection costs its socket only), then reads up to
/// [`FIRST_READ`] at once: with the whole head in hand, hyper usually needs
/// no read of its own, so a connection's first request costs one `read(2)`.
async fn sniff<S: Transport>(mut stream: S) -> Option<(bool, Rewind<S>)> {
    if !stream.has_buffered() {
        stream.readable().await.ok()?;
    }
    let mut seen = BytesMut::with_capacity(FIRST_READ);
    loop {
        match stream.read_buf(&mut seen).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let len = seen.len().min(H2_PREFACE.len());
        let h2 = seen[..len] == H2_PREFACE[..len];
        if !h2 || len == H2_PREFACE.len() {
            return Some((h2, Rewind::new(stream, seen.freeze())));
        }
    }
}

impl Conn {
    /// The pipeline as a hyper service; every request is marked on the
    /// connection's [`Activity`]. Its future is boxed: hyper's HTTP/1
    /// dispatcher keeps one slot of that future's size (~4.5 KiB) while it
    /// holds the connection, and boxed the slot is a pointer.
    fn service(
        &self,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = http::Response<Full<Bytes>>,
        Error = Infallible,
        Future: Unpin + Send,
    > + Clone
    + Unpin
    + Send
    + 'static {
        let (state, activity, peer) = (self.state.clone(), self.activity.clone(), self.peer);
        service_fn(move |req: Request<Incoming>| {
            let active = ActiveRequest::start(&activity);
            let state = state.clone();
            Box::pin(async move {
                let _active = active;
                Ok::<_, Infallible>(pipeline::handle(&state, peer, req).await)
            })
        })
    }

    async fn serve_h1<S: Transport>(&self, mut stream: Rewind<S>) {
        let limits = &self.state.config.limits;
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_HEADER_BYTES.max(8192));
        let service = self.service();
        loop {
            // Parked: only the socket, until the peer sends something.
            let (mut socket, prefix) = stream.into_parts();
            if prefix.is_empty() && !socket.has_buffered() && !self.await_bytes(&socket).await {
                return;
            }
            // Held: hyper serves requests until the connection is quiet
            // (released), idle past the header timeout, closed or stopped.
            let ended_before = self.activity.marks().ended;
            let mut hyper = Box::new(
                builder
                    .serve_connection(TokioIo::new(Rewind::new(socket, prefix)), service.clone()),
            );
            let mut look_at = Instant::now() + self.deadlines.release_after;
            let (mut releasing, mut stopping) = (false, false);
            let served = loop {
                tokio::select! {
                    served = std::future::poll_fn(|cx| hyper.poll_without_shutdown(cx)) => break served,
                    () = self.shutdown.cancelled(), if !stopping => {
                        stopping = true;
                        std::pin::Pin::new(&mut *hyper).graceful_shutdown();
                    }
                    () = sleep_until(look_at), if !releasing && !stopping => {
                        match self.deadlines.verdict(self.activity.marks(), Some(ended_before), Instant::now()) {
                            Verdict::Close { never_served } => return self.closed_idle(never_served),
                            Verdict::Release => {
                                releasing = true;
                                // hyper is idle: it closes its side of the
                                // protocol and hands back what it buffered.
                                std::pin::Pin::new(&mut *hyper).graceful_shutdown();
                            }
                            Verdict::LookAt(at) => look_at = at,
                        }
                    }
                }
            };
            if let Err(e) = served {
                debug!(peer = %self.peer, error = %e, "connection ended with an error");
                return;
            }
            let parts = hyper.into_parts();
            if !releasing || stopping {
                // What hyper would have done had it kept the socket: TLS
                // close_notify, then FIN; a peer that reads nothing gets
                // the header timeout to take them.
                let mut io = parts.io.into_inner();
                let _ = tokio::time::timeout(self.deadlines.close_after, io.shutdown()).await;
                return;
            }
            // Released: what hyper had read goes back in front of the socket.
            let (socket, rewound) = parts.io.into_inner().into_parts();
            stream = Rewind::new(socket, unread(&rewound, &parts.read_buf));
        }
    }

    /// Waits, holding only the socket, until the peer sends something;
    /// `false` if the connection is to be closed instead. No request can
    /// start or end meanwhile, so the one deadline is the idle close: a
    /// parked connection costs no timer wake-up before it.
    async fn await_bytes<S: Transport>(&self, socket: &S) -> bool {
        let _parked = GaugeHold::new(&self.state.metrics.connections_parked);
        let marks = self.activity.marks();
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            ready = socket.readable() => ready.is_ok(),
            () = sleep_until(self.deadlines.close_at(marks)) => {
                self.closed_idle(marks.started == 0);
                false
            }
        }
    }

    async fn serve_h2<S: Transport>(&self, stream: Rewind<S>) {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        let hyper = builder.serve_connection(TokioIo::new(stream), self.service());
        tokio::pin!(hyper);
        let mut look_at = Instant::now() + self.deadlines.release_after;
        let mut stopping = false;
        loop {
            tokio::select! {
                served = hyper.as_mut() => {
                    if let Err(e) = served {
                        debug!(peer = %self.peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = self.shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    hyper.as_mut().graceful_shutdown();
                }
                () = sleep_until(look_at) => {
                    match self.deadlines.verdict(self.activity.marks(), None, Instant::now()) {
                        Verdict::Close { never_served } => return self.closed_idle(never_served),
                        Verdict::LookAt(at) => look_at = at,
                        Verdict::Release => look_at = Instant::now() + self.deadlines.release_after,
                    }
                }
            }
        }
    }

    /// Nothing is in flight when a connection idles out, so closing it
    /// loses nothing; one that never carried a request counts as a slow
    /// client.
    fn closed_idle(&self, never_served: bool) {
        if never_served {
            self.state.metrics.reject(Reason::HeaderTimeout);
        }
        debug!(peer = %self.peer, never_served, "connection idle past the header timeout; closing");
    }
}

/// The bytes read ahead, in their own small allocation: hyper's `read_buf`
/// is a view into its whole read buffer (~16 KiB), which it would keep
/// alive, even when empty, for as long as the connection is parked.
fn unread(first: &[u8], then: &[u8]) -> Bytes {
    let mut both = BytesMut::with_capacity(first.len() + then.len());
    both.extend_from_slice(first);
    both.extend_from_slice(then);
    both.freeze()
}
