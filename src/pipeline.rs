//! The request pipeline, steps 2-13, top to bottom in [`process`]; see
//! docs/architecture.md, "The pipeline". The client address is resolved
//! first, so that every later step fails with a plain `?` into a [`Reject`],
//! and [`handle`] turns the result into the answer, the metrics and one log
//! line, in exactly one place.

use std::net::IpAddr;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tracing::info;

use crate::auth::{DeliveryId, REQUEST_ID_HEADER};
use crate::client::ClientIp;
use crate::config::Policy;
use crate::dedup::Claim;
use crate::event::Envelope;
use crate::limits;
use crate::metrics::Outcome;
use crate::outbox::Safe;
use crate::reject::Reject;
use crate::state::AppState;

/// A request the relay said yes to.
struct Accepted {
    id: String,
    outcome: Outcome,
}

/// One request: the pipeline, then its answer, metrics and log line.
pub async fn handle(
    state: &AppState,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    // An unverified id, logged only if it is well-formed (never raw input).
    let claimed_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(DeliveryId::parse);
    state.metrics.requests_in_flight.inc();
    let policy = state.policy();
    // 2. Client address: the TCP peer stands in when the forwarded chain is
    // malformed, so that even that rejection is logged against an address.
    let result = match policy.net.client_ip(peer, req.headers()) {
        Ok(client) => {
            // The whole-request deadline. Dropping the pipeline mid-delivery
            // is safe: the answer is not 200, so Ocrolus retries; at worst
            // the event was spooled meanwhile and is delivered twice (at
            // least once).
            let deadline = state.config.limits.request_timeout;
            let result = tokio::time::timeout(deadline, process(state, &policy, client, req))
                .await
                .unwrap_or(Err(Reject::Deadline));
            (client, result)
        }
        Err(e) => (ClientIp::new(peer), Err(e.into())),
    };
    state.metrics.requests_in_flight.dec();
    let latency = started.elapsed();
    let metrics = &state.metrics;
    match result {
        (client, Ok(accepted)) => {
            let outcome = accepted.outcome.as_str();
            metrics.requests.with_label_values(&[outcome]).inc();
            metrics
                .request_duration
                .with_label_values(&[outcome])
                .observe(latency.as_secs_f64());
            info!(
                client_ip = %client,
                outcome,
                status = 200,
                latency_ms = latency.as_secs_f64() * 1000.0,
                delivery_id = %accepted.id,
                "webhook accepted"
            );
            let body = serde_json::json!({ "id": accepted.id, "status": outcome });
            json_response(StatusCode::OK, body.to_string(), None)
        }
        (client, Err(reject)) => {
            let answer = reject.answer();
            let outcome = answer.outcome.as_str();
            metrics.requests.with_label_values(&[outcome]).inc();
            metrics.reject(answer.reason);
            metrics
                .request_duration
                .with_label_values(&[outcome])
                .observe(latency.as_secs_f64());
            info!(
                client_ip = %client,
                outcome,
                reason = answer.reason.as_str(),
                status = answer.status.as_u16(),
                latency_ms = latency.as_secs_f64() * 1000.0,
                delivery_id = claimed_id.as_ref().map(DeliveryId::as_str).unwrap_or("-"),
                "webhook rejected"
            );
            let body = format!(r#"{{"error":"{outcome}"}}"#);
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

/// Steps 3-13, in order, for a client whose address is known.
async fn process(
    state: &AppState,
    policy: &Policy,
    client: ClientIp,
    req: Request<Incoming>,
) -> Result<Accepted, Reject> {
    // 3. Allowlist.
    policy.net.check(client)?;

    // 4. Route.
    if req.uri().path() != state.config.webhook_path {
        return Err(Reject::NotFound);
    }
    if req.method() != Method::POST {
        return Err(Reject::MethodNotAllowed);
    }

    // 5. Declared size; 6. rate limits and in-flight cap.
    let limits = &state.config.limits;
    limits::check_declared_len(req.headers(), limits.max_body)?;
    let _in_flight = state.admission.admit(client)?;

    // 7. Body, capped in size and time.
    let (parts, body) = req.into_parts();
    let body = limits::read_body(body, limits.max_body, limits.body_timeout).await?;
    let received_at_ms = crate::now_ms();

    // 8. Authenticate over the raw bytes.
    let verified = policy
        .auth
        .verify(&parts.headers, body, received_at_ms / 1000)?;

    // 9. Event and routing key.
    let event = state.config.events.resolve(&verified.get().body)?;
    let envelope = Envelope::new(verified, event, client, received_at_ms);

    // 10. De-duplicate: a twin in flight waits for this one's outcome.
    let claim = match state.dedup.claim(&envelope.id).await {
        Claim::Duplicate => {
            return Ok(Accepted {
                id: envelope.id,
                outcome: Outcome::Duplicate,
            });
        }
        Claim::Fresh(claim) => claim,
    };

    // 11-12. Publish with confirm, or spool (fsync).
    let safe = state.outbox.deliver(&envelope).await?;
    claim.commit();

    // 13. Exactly 200.
    Ok(Accepted {
        id: envelope.id,
        outcome: match safe {
            Safe::Published => Outcome::Published,
            Safe::Spooled => Outcome::Spooled,
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
