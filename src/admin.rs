//! The admin listener (separate port, loopback by default): `/metrics`,
//! `/livez`, `/readyz`, and for `ocrolus rotate-secret`: `POST /reload`
//! (same as SIGHUP, but answers whether it worked) and `GET /secrets` (per
//! source, the count and fingerprints of the loaded secrets, never their
//! values). `/spool`, `/spool/events`, `POST /spool/drain` and
//! `POST /spool/quarantine/requeue` let an operator see and drain the spool
//! while the relay runs ([`spool`]).
//! Nothing of it is reachable on the public port.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Reason;
use crate::state::AppState;

pub mod spool;

/// Open admin connections at most: a scraper and an operator need a few;
/// without a cap, half-open connections could take every file descriptor
/// and starve the public listener.
const MAX_CONNECTIONS: usize = 64;

pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over the cap: dropping the stream closes it at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            state.metrics.reject(Reason::AdminConnectionLimit);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "admin connection error");
            }
        });
    }
}

async fn route(state: &AppState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/spool" => json(StatusCode::OK, spool::stats(state)),
        "/spool/events" => match spool::events(state, req.uri().query()).await {
            Ok(lines) => respond(StatusCode::OK, "application/x-ndjson", lines.into_bytes()),
            Err((status, body)) => json(status, body),
        },
        "/spool/drain" if req.method() == Method::POST => {
            let (status, body) = spool::drain(state);
            json(status, body)
        }
        "/spool/quarantine/requeue" if req.method() == Method::POST => {
            let (status, body) = spool::requeue(state, req.uri().query()).await;
            json(status, body)
        }
        "/spool/drain" | "/spool/quarantine/requeue" => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "use POST" }),
        ),
        "/reload" if req.method() == Method::POST => match state.reload() {
            Ok(()) => json(
                StatusCode::OK,
                serde_json::json!({ "status": "reloaded", "sources": state.secrets_status() }),
            ),
            Err(e) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({ "status": "failed", "error": e.to_string() }),
            ),
        },
        "/reload" => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "use POST" }),
        ),
        "/secrets" => json(
            StatusCode::OK,
            serde_json::json!({ "sources": state.secrets_status() }),
        ),
        "/metrics" => {
            // The one gauge that is computed, not counted.
            state
                .metrics
                .ready
                .set(i64::from(state.readiness().is_ok()));
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                state.metrics.render(),
            )
        }
        "/livez" => respond(
            StatusCode::OK,
            "application/json",
            br#"{"status":"ok"}"#.to_vec(),
        ),
        "/readyz" => match state.readiness() {
            Ok(()) => respond(
                StatusCode::OK,
                "application/json",
                br#"{"status":"ready"}"#.to_vec(),
            ),
            Err(reason) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                serde_json::json!({ "status": "not_ready", "reason": reason })
                    .to_string()
                    .into_bytes(),
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "application/json",
            br#"{"error":"not_found"}"#.to_vec(),
        ),
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", body.to_string().into_bytes())
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
