//! The admin listener's view of the spool, for an operator while the relay
//! runs (the relay holds the file lock, so nothing else can open it):
//!
//! - `GET /spool`: counts, bytes, age of the oldest event, quarantine, the
//!   bounds and the drain counter, all from the counts the spool keeps in
//!   memory (no disk read).
//! - `GET /spool/events?limit=N[&quarantine=1]`: the oldest `N` events (at
//!   most [`MAX_LIMIT`]) as JSON lines, read through the spool's store
//!   thread like the drainer's reads, so the cost is bounded by `N`.
//! - `POST /spool/drain`: wakes the drainer for a round now and says what
//!   it is doing.
//! - `POST /spool/quarantine/requeue?limit=N`: moves up to `N` readable
//!   quarantined records back into the spool, under their own keys (so in
//!   arrival order), for the drainer to deliver; unreadable ones stay.
//!
//! Event bodies are customer data and the admin listener has no
//! authentication (it is loopback by default, but often opened for
//! Prometheus), so this view never shows a body or raw record: it shows
//! its size and SHA-256, which match a message found elsewhere without
//! revealing it. The bodies stay readable with `spool list` on a stopped
//! relay, by someone who can read the file anyway.

use std::path::Path;

use http::StatusCode;
use serde_json::{Value, json};
use sha2::Digest;

use crate::event::Envelope;
use crate::outbox::spool::{Quarantined, SpoolStats};
use crate::state::AppState;

/// Events listed when no `limit` is given.
pub const DEFAULT_LIMIT: usize = 100;
/// Most events one request may list: a bound on the read and the answer.
pub const MAX_LIMIT: usize = 1000;

/// Whether an event line carries the body (file access) or only its size
/// and digest (the admin listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bodies {
    Shown,
    Hidden,
}

/// The fields `spool stats` prints, from the file or from a running relay.
pub fn stats_json(dir: &Path, s: &SpoolStats) -> Value {
    let age = s.oldest_ms.map(|ms| (crate::now_ms() - ms).max(0) / 1000);
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    json!({
        "dir": dir.display().to_string(),
        "messages": s.messages, "bytes": s.bytes, "oldest_age_seconds": age,
        "quarantined": s.quarantined, "quarantined_bytes": s.quarantined_bytes,
    })
}

/// One spooled event as a `spool list` line.
pub fn event_line(seq: u64, e: &Envelope, bodies: Bodies) -> Value {
    let mut line = json!({
        "seq": seq, "id": e.id, "routing_key": e.routing_key, "event": e.event_name,
        "client_ip": e.client_ip, "received_at_ms": e.received_at_ms,
        "source": &*e.source, "exchange": e.exchange.as_deref(),
        "body_bytes": e.body.len(), "body_sha256": hex::encode(sha2::Sha256::digest(&e.body)),
    });
    if bodies == Bodies::Shown {
        line["body"] = String::from_utf8_lossy(&e.body).into();
    }
    line
}

/// One quarantined record as a `spool list --quarantine` line.
pub fn quarantine_line(q: &Quarantined, bodies: Bodies) -> Value {
    let mut line = json!({
        "seq": q.seq, "reason": q.reason, "quarantined_at_ms": q.quarantined_at_ms,
        "readable": q.envelope.is_some(),
        "event": q.envelope.as_ref().map(|e| event_line(q.seq, e, bodies)),
        "record_bytes": q.record.len(),
    });
    if bodies == Bodies::Shown {
        use base64::Engine;
        line["raw_base64"] = base64::engine::general_purpose::STANDARD
            .encode(&q.record)
            .into();
    }
    line
}

/// `GET /spool`.
pub fn stats(state: &AppState) -> Value {
    let spool = &state.outbox.spool;
    let config = spool.config();
    let mut view = stats_json(&config.dir, &spool.stats());
    view["max_messages"] = config.max_events.into();
    view["max_bytes"] = config.max_bytes.into();
    view["broker_up"] = state.outbox.broker.is_up().into();
    view["drained_total"] = state.metrics.spool_drained.get().into();
    view
}

/// `GET /spool/events`: JSON lines, or an error and its status.
pub async fn events(state: &AppState, query: Option<&str>) -> Result<String, (StatusCode, Value)> {
    let mut limit = DEFAULT_LIMIT;
    let mut quarantine = false;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad_request(format!("limit must be a number from 1 to {MAX_LIMIT}"))
                    })?;
            }
            "quarantine" => {
                quarantine = match value {
                    "" | "1" | "true" | "yes" => true,
                    "0" | "false" | "no" => false,
                    _ => return Err(bad_request("quarantine must be 1 or 0".into())),
                };
            }
            other => return Err(bad_request(format!("unknown parameter {other:?}"))),
        }
    }
    let spool = &state.outbox.spool;
    let lines: Vec<Value> = if quarantine {
        spool.quarantined(limit).await.map(|records| {
            records
                .iter()
                .map(|q| quarantine_line(q, Bodies::Hidden))
                .collect()
        })
    } else {
        spool.peek(limit).await.map(|events| {
            events
                .iter()
                .map(|(seq, e)| event_line(*seq, e, Bodies::Hidden))
                .collect()
        })
    }
    .map_err(|e| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": format!("spool read failed: {e}") }),
        )
    })?;
    Ok(lines.iter().map(|l| format!("{l}\n")).collect())
}

/// `POST /spool/quarantine/requeue?limit=N`: moves up to `N` readable
/// quarantined records back into the spool and wakes the drainer.
pub async fn requeue(state: &AppState, query: Option<&str>) -> (StatusCode, Value) {
    let mut limit = MAX_LIMIT;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("limit", value)) => match value.parse() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => limit = n,
                _ => return bad_request(format!("limit must be a number from 1 to {MAX_LIMIT}")),
            },
            _ => return bad_request(format!("unknown parameter {pair:?}")),
        }
    }
    match state.outbox.spool.requeue_quarantined(limit).await {
        Ok(moved) => (
            StatusCode::OK,
            json!({ "requeued": moved, "spool": stats(state) }),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": format!("spool write failed: {e}") }),
        ),
    }
}

/// `POST /spool/drain`: 202 while the drainer works on a non-empty spool,
/// 200 when it is empty, 503 when there is no broker to drain to (the
/// drainer starts by itself once the link is back).
pub fn drain(state: &AppState) -> (StatusCode, Value) {
    let spool = &state.outbox.spool;
    let broker = &state.outbox.broker;
    if !broker.is_up() {
        let reason = broker.rejected().unwrap_or_else(|| {
            "no broker connection (the relay keeps reconnecting; see its log)".into()
        });
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "broker_down", "reason": reason, "spool": stats(state) }),
        );
    }
    spool.request_drain();
    let (status, word) = if spool.stats().messages == 0 {
        (StatusCode::OK, "empty")
    } else {
        (StatusCode::ACCEPTED, "draining")
    };
    (status, json!({ "status": word, "spool": stats(state) }))
}

fn bad_request(error: String) -> (StatusCode, Value) {
    (StatusCode::BAD_REQUEST, json!({ "error": error }))
}
