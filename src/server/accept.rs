//! The public listener: accepts connections (step 1) and runs each webhook
//! request through the pipeline of DESIGN.md, top to bottom, in
//! [`pipeline`]. Failures are typed ([`Reject`]) and turned into an answer,
//! a metric and one log line in exactly one place ([`handle`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::auth::{AuthError, DeliveryId, REQUEST_ID_HEADER};
use crate::client::{ClientIp, NetReject};
use crate::dedup::Claim;
use crate::event::{Envelope, EventError};
use crate::limits::{self, LimitReject};
use crate::outbox::Safe;
use crate::outbox::spool::SpoolError;
use crate::proxy_protocol;
use crate::state::AppState;

/// HTTP/2 streams per connection: Ocrolus sends one delivery at a time.
const H2_MAX_STREAMS: u32 = 64;
/// Header bytes per request (both protocols).
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Accepts connections until `shutdown`, then lets the open ones finish
/// within the deadline.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: CancellationToken) {
    let limits = &state.config.limits;
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            state.metrics.connections_rejected.inc();
            debug!(%peer, "connection limit reached; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let watcher = graceful.watcher();
        tokio::spawn(connection(stream, peer, state, permit, watcher));
    }
    drop(listener);
    let deadline = state.config.shutdown.deadline;
    tokio::select! {
        _ = graceful.shutdown() => info!("all connections finished"),
        _ = tokio::time::sleep(deadline) => warn!(?deadline, "shutdown deadline passed; closing remaining connections"),
    }
}

/// Counts an open connection for as long as it lives.
struct OpenConnection {
    state: Arc<AppState>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.state.metrics.connections_open.dec();
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    permit: OwnedSemaphorePermit,
    watcher: Watcher,
) {
    state.metrics.connections_open.inc();
    let _open = OpenConnection {
        state: state.clone(),
        _permit: permit,
    };
    let header_timeout = state.config.limits.header_timeout;
    let mut peer_ip = peer.ip();
    if state.config.proxy_protocol {
        // A PROXY header names any address it likes: believe it only from
        // the load balancers listed as trusted proxies.
        if !state.policy().net.is_trusted_proxy(peer_ip.to_canonical()) {
            state
                .metrics
                .rejections
                .with_label_values(&["untrusted_proxy_peer"])
                .inc();
            info!(%peer, "PROXY protocol from a peer outside trusted_proxies; closing");
            return;
        }
        match tokio::time::timeout(header_timeout, proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok(Some(source))) => peer_ip = source,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                state
                    .metrics
                    .rejections
                    .with_label_values(&["bad_proxy_header"])
                    .inc();
                info!(%peer, error = %e, "PROXY protocol header rejected; closing");
                return;
            }
            Err(_) => {
                state
                    .metrics
                    .rejections
                    .with_label_values(&["proxy_header_timeout"])
                    .inc();
                return;
            }
        }
    }
    match state.tls() {
        Some(tls) => {
            match tokio::time::timeout(header_timeout, tls.acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => http(tls_stream, peer_ip, state, watcher).await,
                Ok(Err(e)) => {
                    state.metrics.tls_handshake_failures.inc();
                    debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    state.metrics.tls_handshake_failures.inc();
                    debug!(%peer, "TLS handshake timed out");
                }
            }
        }
        None => http(stream, peer_ip, state, watcher).await,
    }
}

async fn http<S>(stream: S, peer: IpAddr, state: Arc<AppState>, watcher: Watcher)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &state.config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let service_state = state.clone();
    let (activity, requests) = watch::channel(0usize);
    let activity = Arc::new(activity);
    let service = service_fn(move |req: Request<Incoming>| {
        let active = ActiveRequest::start(&activity);
        let state = service_state.clone();
        async move {
            let _active = active;
            Ok::<_, Infallible>(handle(&state, peer, req).await)
        }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let conn = watcher.watch(conn.into_owned());
    // hyper's header timer starts only once HTTP/1 is chosen and never
    // covers HTTP/2: without this, a client sending nothing, a trickled h2
    // preface or an idle h2 connection would hold its slot forever.
    let result = tokio::select! {
        result = conn => result,
        never_served = idle(requests, limits.header_timeout) => {
            if never_served {
                state
                    .metrics
                    .rejections
                    .with_label_values(&["header_timeout"])
                    .inc();
            }
            debug!(%peer, never_served, "connection idle past the header timeout; closing");
            return;
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Counts a request being handled on its connection while it lives.
struct ActiveRequest(Arc<watch::Sender<usize>>);

impl ActiveRequest {
    fn start(activity: &Arc<watch::Sender<usize>>) -> Self {
        activity.send_modify(|n| *n += 1);
        Self(activity.clone())
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Resolves once the connection has had no request under way for `limit`
/// (from its start, or from the end of its last request); `true` if it
/// never carried one. Nothing is in flight then, so closing loses nothing.
async fn idle(mut requests: watch::Receiver<usize>, limit: Duration) -> bool {
    let mut served = false;
    loop {
        let active = *requests.borrow_and_update();
        let changed = if active == 0 {
            match tokio::time::timeout(limit, requests.changed()).await {
                Ok(changed) => changed,
                Err(_) => return !served,
            }
        } else {
            requests.changed().await
        };
        if changed.is_err() {
            // The connection itself is gone; its own future ends the select.
            std::future::pending::<()>().await;
        }
        served = true;
    }
}

/// Why a request was not accepted. [`Reject::answer`] is the one place that
/// maps it to a status, an outcome label and a reason.
#[derive(Debug)]
pub enum Reject {
    Net(NetReject),
    NotFound,
    MethodNotAllowed,
    Limit(LimitReject),
    Auth(AuthError),
    Event(EventError),
    Unavailable(SpoolError),
    Deadline,
}

struct Answer {
    status: StatusCode,
    outcome: &'static str,
    reason: &'static str,
    retry_after: Option<u64>,
}

impl Reject {
    fn answer(&self) -> Answer {
        let plain = |status, outcome, reason| Answer {
            status,
            outcome,
            reason,
            retry_after: None,
        };
        match self {
            Self::Net(NetReject::NotAllowed) => {
                plain(StatusCode::FORBIDDEN, "forbidden", "not_allowlisted")
            }
            Self::Net(NetReject::BadForwarded) => {
                plain(StatusCode::FORBIDDEN, "forbidden", "bad_forwarded_for")
            }
            Self::NotFound => plain(StatusCode::NOT_FOUND, "not_found", "not_found"),
            Self::MethodNotAllowed => plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method_not_allowed",
            ),
            Self::Limit(limit) => match *limit {
                LimitReject::DeclaredTooLarge => plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "declared_too_large",
                ),
                LimitReject::BodyTooLarge => plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "body_too_large",
                ),
                LimitReject::BadContentLength => {
                    plain(StatusCode::BAD_REQUEST, "bad_request", "bad_content_length")
                }
                LimitReject::BodyAborted => {
                    plain(StatusCode::BAD_REQUEST, "bad_request", "body_aborted")
                }
                LimitReject::BodyTimeout => {
                    plain(StatusCode::REQUEST_TIMEOUT, "timeout", "body_timeout")
                }
                LimitReject::RateLimitedClient { retry_after_secs } => Answer {
                    retry_after: Some(retry_after_secs),
                    ..plain(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limited",
                        "rate_limited_ip",
                    )
                },
                LimitReject::RateLimitedGlobal { retry_after_secs } => Answer {
                    retry_after: Some(retry_after_secs),
                    ..plain(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limited",
                        "rate_limited_global",
                    )
                },
                LimitReject::TooManyInFlight => Answer {
                    retry_after: Some(1),
                    ..plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "too_many_in_flight",
                    )
                },
            },
            Self::Auth(e) => plain(StatusCode::UNAUTHORIZED, "unauthorized", e.reason()),
            Self::Event(e) => plain(StatusCode::BAD_REQUEST, "bad_request", e.reason()),
            Self::Unavailable(e) => Answer {
                retry_after: Some(30),
                ..plain(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.reason())
            },
            Self::Deadline => Answer {
                retry_after: Some(1),
                ..plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    "request_deadline",
                )
            },
        }
    }
}

impl From<NetReject> for Reject {
    fn from(e: NetReject) -> Self {
        Self::Net(e)
    }
}
impl From<LimitReject> for Reject {
    fn from(e: LimitReject) -> Self {
        Self::Limit(e)
    }
}
impl From<AuthError> for Reject {
    fn from(e: AuthError) -> Self {
        Self::Auth(e)
    }
}
impl From<EventError> for Reject {
    fn from(e: EventError) -> Self {
        Self::Event(e)
    }
}
impl From<SpoolError> for Reject {
    fn from(e: SpoolError) -> Self {
        Self::Unavailable(e)
    }
}

/// A request the relay said yes to.
struct Accepted {
    id: String,
    client: ClientIp,
    status: &'static str,
}

/// One request: the pipeline, then its answer, metrics and log line.
async fn handle(state: &AppState, peer: IpAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    // An unverified id, logged only if it is well-formed (never raw input).
    let claimed_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(DeliveryId::parse);
    state.metrics.requests_in_flight.inc();
    // The whole-request deadline. Dropping the pipeline mid-delivery is
    // safe: the answer is not 200, so Ocrolus retries; at worst the event
    // was spooled meanwhile and is delivered twice (at least once).
    let result = tokio::time::timeout(
        state.config.limits.request_timeout,
        pipeline(state, peer, req),
    )
    .await
    .unwrap_or_else(|_| Err((ClientIp::new(peer), Reject::Deadline)));
    state.metrics.requests_in_flight.dec();
    let latency = started.elapsed();
    let metrics = &state.metrics;
    match result {
        Ok(accepted) => {
            metrics.requests.with_label_values(&[accepted.status]).inc();
            metrics
                .request_duration
                .with_label_values(&[accepted.status])
                .observe(latency.as_secs_f64());
            info!(
                client_ip = %accepted.client,
                outcome = accepted.status,
                status = 200,
                latency_ms = latency.as_secs_f64() * 1000.0,
                delivery_id = %accepted.id,
                "webhook accepted"
            );
            let body = serde_json::json!({ "id": accepted.id, "status": accepted.status });
            json_response(StatusCode::OK, body.to_string(), None)
        }
        Err((client, reject)) => {
            let answer = reject.answer();
            metrics.requests.with_label_values(&[answer.outcome]).inc();
            metrics.rejections.with_label_values(&[answer.reason]).inc();
            metrics
                .request_duration
                .with_label_values(&[answer.outcome])
                .observe(latency.as_secs_f64());
            info!(
                client_ip = %client,
                outcome = answer.outcome,
                reason = answer.reason,
                status = answer.status.as_u16(),
                latency_ms = latency.as_secs_f64() * 1000.0,
                delivery_id = claimed_id.as_ref().map(DeliveryId::as_str).unwrap_or("-"),
                "webhook rejected"
            );
            let body = format!(r#"{{"error":"{}"}}"#, answer.outcome);
            let mut response = json_response(answer.status, body, answer.retry_after);
            if matches!(reject, Reject::MethodNotAllowed) {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            response
        }
    }
}

/// The request pipeline of DESIGN.md, steps 2-13, in order.
async fn pipeline(
    state: &AppState,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Result<Accepted, (ClientIp, Reject)> {
    let policy = state.policy();
    let peer_ip = ClientIp::new(peer);

    // 2. Client address; 3. allowlist.
    let client = policy
        .net
        .client_ip(peer, req.headers())
        .map_err(|e| (peer_ip, e.into()))?;
    policy.net.check(client).map_err(|e| (client, e.into()))?;

    // 4. Route.
    if req.uri().path() != state.config.webhook_path {
        return Err((client, Reject::NotFound));
    }
    if req.method() != Method::POST {
        return Err((client, Reject::MethodNotAllowed));
    }

    // 5. Declared size; 6. rate limits and in-flight cap.
    let limits = &state.config.limits;
    limits::check_declared_len(req.headers(), limits.max_body).map_err(|e| (client, e.into()))?;
    let _in_flight = state
        .admission
        .admit(client)
        .map_err(|e| (client, e.into()))?;

    // 7. Body, capped in size and time.
    let (parts, body) = req.into_parts();
    let body = limits::read_body(body, limits.max_body, limits.body_timeout)
        .await
        .map_err(|e| (client, e.into()))?;
    let received_at_ms = crate::now_ms();

    // 8. Authenticate over the raw bytes.
    let verified = policy
        .auth
        .verify(&parts.headers, body, received_at_ms / 1000)
        .map_err(|e| (client, e.into()))?;

    // 9. Event and routing key.
    let event = state
        .config
        .events
        .resolve(&verified.get().body)
        .map_err(|e| (client, e.into()))?;
    let envelope = Envelope::new(verified, event, client, received_at_ms);

    // 10. De-duplicate: a twin in flight waits for this one's outcome.
    let claim = match state.dedup.claim(&envelope.id).await {
        Claim::Duplicate => {
            return Ok(Accepted {
                id: envelope.id,
                client,
                status: "duplicate",
            });
        }
        Claim::Fresh(claim) => claim,
    };

    // 11-12. Publish with confirm, or spool (fsync).
    let safe = state
        .outbox
        .deliver(&envelope)
        .await
        .map_err(|e| (client, e.into()))?;
    claim.commit();

    // 13. Exactly 200.
    Ok(Accepted {
        id: envelope.id,
        client,
        status: match safe {
            Safe::Published => "published",
            Safe::Spooled => "spooled",
        },
    })
}

fn json_response(
    status: StatusCode,
    body: String,
    retry_after: Option<u64>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(secs) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
