//! The request pipeline, steps 2-13, top to bottom in [`process`]; see
//! docs/architecture.md, "The pipeline". The client address is resolved
//! first, so that every later step fails with a plain `?` into a [`Reject`],
//! and [`handle`] turns the result into the answer, the metrics and one log
//! line, in exactly one place.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::Full;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use tracing::info;

use crate::auth::{DeliveryId, REQUEST_ID_HEADER};
use crate::client::ClientIp;
use crate::config::{Policy, SourcePolicy};
use crate::dedup::{self, Claim};
use crate::event::Envelope;
use crate::limits::{self, InFlight};
use crate::log_throttle::LogThrottle;
use crate::metrics::{GaugeHold, NO_SOURCE, Outcome, Reason};
use crate::outbox::Safe;
use crate::reject::{AfterAnswer, Reject};
use crate::state::AppState;

/// How long a refused request's remaining body may take to arrive before
/// the connection is closed instead of kept: long enough for a client that
/// sends its headers first, short enough that a refused client cannot hold
/// the slot.
const DRAIN_DEADLINE: Duration = Duration::from_secs(1);

/// "webhook rejected" lines: per reason, 5 a second, then one that says
/// how many were left out.
static REJECTED_LOG: LazyLock<LogThrottle> =
    LazyLock::new(|| LogThrottle::new(Reason::ALL.len(), 5, Duration::from_secs(1)));

/// A request the relay said yes to.
struct Accepted {
    id: String,
    outcome: Outcome,
    /// The source whose path it came to (the `source` label).
    source: Arc<str>,
}

/// A request the relay said no to, and whether its body was read: an
/// unread body is drained before a kept connection can carry the next
/// request; one cut off mid-way leaves the connection unusable.
struct Refused {
    reject: Reject,
    body: Body,
    /// `None` when it was refused before its path named a source.
    source: Option<Arc<str>>,
}

enum Body {
    Unread(Incoming),
    Read,
    CutOff,
}

/// One request: the pipeline, then its answer, metrics and log line.
pub async fn handle(
    state: &AppState,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    // An unverified id, logged only if it is well-formed (never raw input).
    let claimed_id = parts
        .headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(DeliveryId::parse);
    let http1 = parts.version < Version::HTTP_2;
    let _in_flight = GaugeHold::new(&state.metrics.requests_in_flight);
    let policy = state.policy();
    // 2. Client address: the TCP peer stands in when the forwarded chain is
    // malformed, so that even that rejection is logged against an address.
    // Behind PROXY protocol the header named the client (or the TCP peer
    // stands for itself): a forwarded header is never believed then.
    let resolved = if state.config.proxy_protocol {
        Ok(ClientIp::new(peer))
    } else {
        policy.net.client_ip(peer, &parts.headers)
    };
    let (client, result) = match resolved {
        Ok(client) => (client, process(state, &policy, client, parts, body).await),
        Err(e) => {
            let refused = Refused {
                reject: e.into(),
                body: Body::Unread(body),
                source: None,
            };
            (ClientIp::new(peer), Err(refused))
        }
    };
    let metrics = &state.metrics;
    match result {
        Ok(accepted) => {
            let latency = started.elapsed();
            let outcome = accepted.outcome.as_str();
            metrics
                .requests
                .with_label_values(&[outcome, &accepted.source])
                .inc();
            metrics
                .request_duration
                .with_label_values(&[outcome])
                .observe(latency.as_secs_f64());
            info!(
                client_ip = %client,
                source = &*accepted.source,
                outcome,
                status = 200,
                latency_ms = latency.as_secs_f64() * 1000.0,
                delivery_id = %accepted.id,
                "webhook accepted"
            );
            json_response(StatusCode::OK, answer_body(&accepted.id, outcome), None)
        }
        Err(Refused {
            reject,
            body,
            source,
        }) => {
            let answer = reject.answer();
            let keep = http1 && answer.after == AfterAnswer::Keep && {
                let limits = &state.config.limits;
                match body {
                    Body::Read => true,
                    Body::CutOff => false,
                    Body::Unread(body) => {
                        let deadline = limits.body_timeout.min(DRAIN_DEADLINE);
                        limits::drain_body(body, limits.max_body, deadline).await
                    }
                }
            };
            let latency = started.elapsed();
            let outcome = answer.outcome.as_str();
            metrics
                .requests
                .with_label_values(&[outcome, source.as_deref().unwrap_or(NO_SOURCE)])
                .inc();
            metrics.reject(answer.reason);
            metrics
                .request_duration
                .with_label_values(&[outcome])
                .observe(latency.as_secs_f64());
            // A flood of refusals (a scanner behind the load balancer) must
            // not become a flood of log lines; the metric counts them all.
            if let Some(suppressed) = REJECTED_LOG.admit(answer.reason as usize) {
                info!(
                    client_ip = %client,
                    source = source.as_deref().unwrap_or("-"),
                    outcome,
                    reason = answer.reason.as_str(),
                    status = answer.status.as_u16(),
                    latency_ms = latency.as_secs_f64() * 1000.0,
                    delivery_id = claimed_id.as_ref().map_or("-", DeliveryId::as_str),
                    suppressed,
                    "webhook rejected"
                );
            }
            let body = format!(r#"{{"error":"{outcome}"}}"#);
            let mut response = json_response(answer.status, body, answer.retry_after);
            let headers = response.headers_mut();
            if matches!(reject, Reject::MethodNotAllowed) {
                headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            // hyper closes a connection whose body was left unread without
            // saying so; the client would send its next request into a
            // closed socket.
            if http1 && !keep {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

/// Steps 3-13, in order, for a client whose address is known.
async fn process(
    state: &AppState,
    policy: &Policy,
    client: ClientIp,
    parts: Parts,
    body: Incoming,
) -> Result<Accepted, Refused> {
    // 3-6, before any of the body is read.
    let source = match route(policy, client, &parts) {
        Ok(source) => source,
        Err(reject) => {
            return Err(Refused {
                reject,
                body: Body::Unread(body),
                source: None,
            });
        }
    };
    let name = &source.destination.source;
    let in_flight = match admit(state, client, &parts) {
        Ok(in_flight) => in_flight,
        Err(reject) => {
            return Err(Refused {
                reject,
                body: Body::Unread(body),
                source: Some(name.clone()),
            });
        }
    };
    // The whole-request deadline. Dropping the pipeline mid-delivery is
    // safe: the answer is not 200, so Ocrolus retries; at worst the event
    // was spooled meanwhile and is delivered twice (at least once).
    let mut body_read = false;
    let deadline = state.config.limits.request_timeout;
    let delivered = tokio::time::timeout(
        deadline,
        deliver(state, source, client, parts, body, &mut body_read),
    )
    .await
    .unwrap_or(Err(Reject::Deadline));
    drop(in_flight);
    delivered.map_err(|reject| Refused {
        reject,
        body: if body_read { Body::Read } else { Body::CutOff },
        source: Some(name.clone()),
    })
}

/// Steps 3-4: allowlist, then the path's source. Refusals here count under
/// no source.
fn route<'p>(
    policy: &'p Policy,
    client: ClientIp,
    parts: &Parts,
) -> Result<&'p SourcePolicy, Reject> {
    // 3. Allowlist.
    policy.net.check(client)?;

    // 4. Route: the path names the source, and only its credentials count.
    policy.source(parts.uri.path()).ok_or(Reject::NotFound)
}

/// Steps 4-6 for a routed request: method, declared size, rate limits and
/// in-flight cap.
fn admit(state: &AppState, client: ClientIp, parts: &Parts) -> Result<InFlight, Reject> {
    if parts.method != Method::POST {
        return Err(Reject::MethodNotAllowed);
    }

    // 5. Framing and declared size; 6. rate limits and in-flight cap.
    let limits = &state.config.limits;
    limits::check_transfer_encoding(&parts.headers)?;
    limits::check_declared_len(&parts.headers, limits.max_body)?;
    Ok(state.admission.admit(client)?)
}

/// Steps 7-13 for an admitted request; `body_read` is set once the body
/// has been read whole.
async fn deliver(
    state: &AppState,
    source: &SourcePolicy,
    client: ClientIp,
    parts: Parts,
    body: Incoming,
    body_read: &mut bool,
) -> Result<Accepted, Reject> {
    // 7. Body, capped in size and time.
    let limits = &state.config.limits;
    let body = limits::read_body(body, limits.max_body, limits.body_timeout).await?;
    *body_read = true;
    let received_at_ms = crate::now_ms();

    // 8. Authenticate over the raw bytes.
    let verified = source
        .auth
        .verify(&parts.headers, body, received_at_ms / 1000)?;

    // 9. Event and routing key (under the source's prefix, if it has one);
    // JSON that names no routable event goes out unclassified, never refused.
    let mut event = state.config.events.resolve(&verified.get().body)?;
    if let Some(reason) = event.unclassified {
        state
            .metrics
            .unclassified
            .with_label_values(&[reason.as_str()])
            .inc();
    }
    if let Some(prefix) = &source.routing_key_prefix {
        event.routing_key = format!("{prefix}.{}", event.routing_key);
    }
    // An id no signature covers is trusted only together with its body.
    let digest: Option<[u8; 32]> =
        (!verified.get().id_signed).then(|| Sha256::digest(&verified.get().body).into());
    let mut envelope = Envelope::new(
        verified,
        event,
        client,
        received_at_ms,
        source.destination.clone(),
    );

    // 10. De-duplicate: a twin in flight waits for this one's outcome. Ids
    // are per source.
    let key = dedup::key(&source.name, &envelope.id);
    let claim = match state.dedup.claim(&key, digest.as_ref()).await {
        Claim::Duplicate => {
            return Ok(Accepted {
                id: envelope.id,
                outcome: Outcome::Duplicate,
                source: envelope.source,
            });
        }
        Claim::Fresh(claim) => claim,
        Claim::Conflict(claim) => {
            state.metrics.dedup_conflicts.inc();
            if let Some(digest) = &digest {
                envelope.mark_dedup_conflict(digest);
            }
            claim
        }
    };

    // 11-12. Publish with confirm, or spool (fsync).
    let safe = state.outbox.deliver(&envelope).await?;
    claim.commit();

    // 13. Exactly 200.
    let outcome = match safe {
        Safe::Published => Outcome::Published,
        Safe::Spooled => Outcome::Spooled,
    };
    Ok(Accepted {
        id: envelope.id,
        outcome,
        source: envelope.source,
    })
}

/// `{"id":…,"status":…}`, serialised straight into its one buffer (no
/// intermediate JSON map); the id is escaped like any JSON string.
fn answer_body(id: &str, status: &str) -> String {
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        id: &'a str,
        status: &'a str,
    }
    serde_json::to_string(&Answer { id, status }).unwrap_or_default()
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
