//! Why a request was not accepted, and the one table that turns each cause
//! into its answer: status, `outcome` (the `{"error":…}` body and the
//! `requests_total` label), `reason` (the `rejections_total` label and the
//! log), `Retry-After`, and whether the connection is kept after it (see
//! docs/architecture.md, "Connections: close or keep").

use http::StatusCode;

use crate::auth::AuthError;
use crate::client::NetReject;
use crate::event::EventError;
use crate::limits::LimitReject;
use crate::metrics::{Outcome, Reason};
use crate::outbox::spool::SpoolError;

/// Every way a request can fail, one variant per pipeline step.
#[derive(Debug, thiserror::Error)]
pub enum Reject {
    #[error(transparent)]
    Net(#[from] NetReject),
    #[error("no such path")]
    NotFound,
    #[error("method is not POST")]
    MethodNotAllowed,
    #[error(transparent)]
    Limit(#[from] LimitReject),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Unavailable(#[from] SpoolError),
    #[error("request deadline passed")]
    Deadline,
}

/// How a rejection is answered and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub outcome: Outcome,
    pub reason: Reason,
    pub retry_after: Option<u64>,
    pub after: AfterAnswer,
}

/// What becomes of an HTTP/1.1 connection after an answer. HTTP/2 answers
/// the stream and keeps the connection either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAnswer {
    /// A retry-able answer: the connection carries the client's next
    /// request, once the rest of this one's body is read and discarded.
    Keep,
    /// The client is not allowed, its request cannot be framed or read, or
    /// retrying the same request cannot succeed: `Connection: close`.
    Close,
}

impl AfterAnswer {
    /// The rule: every 4xx that a retry cannot fix closes, except 401; 429
    /// and the 5xx answers (the relay's own trouble) keep the connection.
    /// A 401 comes after the whole body was read (the signature covers
    /// it), so keeping its connection is as cheap and safe as after a 200;
    /// closing it made every forged request cost a new TCP connection
    /// (3.5 times the CPU of the refusal itself, BENCHMARKS.md).
    fn of(status: StatusCode) -> Self {
        let keeps = [StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS];
        if status.is_client_error() && !keeps.contains(&status) {
            Self::Close
        } else {
            Self::Keep
        }
    }
}

impl Reject {
    pub fn answer(&self) -> Answer {
        use Outcome as O;
        use Reason as R;
        use StatusCode as S;
        let (status, outcome, reason, retry_after) = match self {
            Self::Net(NetReject::NotAllowed) => {
                (S::FORBIDDEN, O::Forbidden, R::NotAllowlisted, None)
            }
            Self::Net(NetReject::BadForwarded) => {
                (S::FORBIDDEN, O::Forbidden, R::BadForwardedFor, None)
            }
            Self::NotFound => (S::NOT_FOUND, O::NotFound, R::NotFound, None),
            Self::MethodNotAllowed => (
                S::METHOD_NOT_ALLOWED,
                O::MethodNotAllowed,
                R::MethodNotAllowed,
                None,
            ),
            Self::Limit(limit) => limit_answer(*limit),
            Self::Auth(e) => (S::UNAUTHORIZED, O::Unauthorized, auth_reason(*e), None),
            Self::Event(e) => (S::BAD_REQUEST, O::BadRequest, event_reason(*e), None),
            Self::Unavailable(SpoolError::Full) => (
                S::SERVICE_UNAVAILABLE,
                O::Unavailable,
                R::SpoolFull,
                Some(30),
            ),
            Self::Unavailable(
                SpoolError::Storage(_)
                | SpoolError::Corrupt(_)
                | SpoolError::Closed
                | SpoolError::Locked(_),
            ) => (
                S::SERVICE_UNAVAILABLE,
                O::Unavailable,
                R::SpoolFailed,
                Some(30),
            ),
            Self::Deadline => (
                S::SERVICE_UNAVAILABLE,
                O::Deadline,
                R::RequestDeadline,
                Some(1),
            ),
        };
        Answer {
            status,
            outcome,
            reason,
            retry_after,
            after: AfterAnswer::of(status),
        }
    }
}

fn limit_answer(limit: LimitReject) -> (StatusCode, Outcome, Reason, Option<u64>) {
    use Outcome as O;
    use Reason as R;
    use StatusCode as S;
    match limit {
        LimitReject::DeclaredTooLarge => (
            S::PAYLOAD_TOO_LARGE,
            O::PayloadTooLarge,
            R::DeclaredTooLarge,
            None,
        ),
        LimitReject::BodyTooLarge => (
            S::PAYLOAD_TOO_LARGE,
            O::PayloadTooLarge,
            R::BodyTooLarge,
            None,
        ),
        LimitReject::BadContentLength => (S::BAD_REQUEST, O::BadRequest, R::BadContentLength, None),
        LimitReject::BodyAborted => (S::BAD_REQUEST, O::BadRequest, R::BodyAborted, None),
        LimitReject::BadTransferEncoding => {
            (S::BAD_REQUEST, O::BadRequest, R::BadTransferEncoding, None)
        }
        LimitReject::BodyTimeout => (S::REQUEST_TIMEOUT, O::Timeout, R::BodyTimeout, None),
        LimitReject::RateLimitedClient { retry_after_secs } => (
            S::TOO_MANY_REQUESTS,
            O::RateLimited,
            R::RateLimitedIp,
            Some(retry_after_secs),
        ),
        LimitReject::RateLimitedGlobal { retry_after_secs } => (
            S::TOO_MANY_REQUESTS,
            O::RateLimited,
            R::RateLimitedGlobal,
            Some(retry_after_secs),
        ),
        LimitReject::TooManyInFlight => (
            S::SERVICE_UNAVAILABLE,
            O::Unavailable,
            R::TooManyInFlight,
            Some(1),
        ),
    }
}

fn auth_reason(e: AuthError) -> Reason {
    match e {
        AuthError::MissingSignature => Reason::MissingSignature,
        AuthError::MalformedSignature => Reason::MalformedSignature,
        AuthError::BadSignature => Reason::BadSignature,
        AuthError::MissingTimestamp => Reason::MissingTimestamp,
        AuthError::MalformedTimestamp => Reason::MalformedTimestamp,
        AuthError::StaleTimestamp => Reason::StaleTimestamp,
        AuthError::MissingRequestId => Reason::MissingRequestId,
        AuthError::MalformedRequestId => Reason::MalformedRequestId,
        AuthError::DuplicateHeader => Reason::BadAuthHeader,
        AuthError::MissingCredentials => Reason::MissingCredentials,
        AuthError::BadCredentials => Reason::BadCredentials,
    }
}

fn event_reason(e: EventError) -> Reason {
    match e {
        EventError::InvalidJson => Reason::InvalidJson,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table as it was when it was hand-written at the call sites: the
    /// answers Ocrolus and the dashboards see must not move.
    #[test]
    fn answers_keep_their_status_outcome_and_reason() {
        let cases: Vec<(Reject, u16, &str, &str, Option<u64>)> = vec![
            (
                NetReject::NotAllowed.into(),
                403,
                "forbidden",
                "not_allowlisted",
                None,
            ),
            (
                NetReject::BadForwarded.into(),
                403,
                "forbidden",
                "bad_forwarded_for",
                None,
            ),
            (Reject::NotFound, 404, "not_found", "not_found", None),
            (
                Reject::MethodNotAllowed,
                405,
                "method_not_allowed",
                "method_not_allowed",
                None,
            ),
            (
                LimitReject::DeclaredTooLarge.into(),
                413,
                "payload_too_large",
                "declared_too_large",
                None,
            ),
            (
                LimitReject::BodyTooLarge.into(),
                413,
                "payload_too_large",
                "body_too_large",
                None,
            ),
            (
                LimitReject::BadContentLength.into(),
                400,
                "bad_request",
                "bad_content_length",
                None,
            ),
            (
                LimitReject::BodyAborted.into(),
                400,
                "bad_request",
                "body_aborted",
                None,
            ),
            (
                LimitReject::BadTransferEncoding.into(),
                400,
                "bad_request",
                "bad_transfer_encoding",
                None,
            ),
            (
                LimitReject::BodyTimeout.into(),
                408,
                "timeout",
                "body_timeout",
                None,
            ),
            (
                LimitReject::RateLimitedClient {
                    retry_after_secs: 2,
                }
                .into(),
                429,
                "rate_limited",
                "rate_limited_ip",
                Some(2),
            ),
            (
                LimitReject::RateLimitedGlobal {
                    retry_after_secs: 3,
                }
                .into(),
                429,
                "rate_limited",
                "rate_limited_global",
                Some(3),
            ),
            (
                LimitReject::TooManyInFlight.into(),
                503,
                "unavailable",
                "too_many_in_flight",
                Some(1),
            ),
            (
                AuthError::DuplicateHeader.into(),
                401,
                "unauthorized",
                "bad_auth_header",
                None,
            ),
            (
                AuthError::StaleTimestamp.into(),
                401,
                "unauthorized",
                "stale_timestamp",
                None,
            ),
            (
                EventError::InvalidJson.into(),
                400,
                "bad_request",
                "invalid_json",
                None,
            ),
            (
                SpoolError::Full.into(),
                503,
                "unavailable",
                "spool_full",
                Some(30),
            ),
            (
                SpoolError::Closed.into(),
                503,
                "unavailable",
                "spool_failed",
                Some(30),
            ),
            (
                Reject::Deadline,
                503,
                "deadline",
                "request_deadline",
                Some(1),
            ),
        ];
        let mut server_errors = std::collections::BTreeSet::new();
        for (reject, status, outcome, reason, retry_after) in cases {
            if status >= 500 {
                server_errors.insert(outcome);
            }
            let answer = reject.answer();
            assert_eq!(answer.status.as_u16(), status, "{reject:?}");
            assert_eq!(answer.outcome.as_str(), outcome, "{reject:?}");
            assert_eq!(answer.reason.as_str(), reason, "{reject:?}");
            assert_eq!(answer.retry_after, retry_after, "{reject:?}");
            let closes = status / 100 == 4 && status != 429 && status != 401;
            assert_eq!(
                answer.after == AfterAnswer::Close,
                closes,
                "{reject:?}: a 4xx other than 401 and 429 closes"
            );
        }
        // The High5xxRatio alert counts every outcome answered with a 5xx.
        let alerts = include_str!("../deploy/prometheus/alerts.yml");
        let rule = &alerts[alerts.find("alert: High5xxRatio").expect("High5xxRatio")..];
        let start = rule.find("outcome=~\"").expect("outcome matcher") + "outcome=~\"".len();
        let matcher = &rule[start..start + rule[start..].find('"').expect("closing quote")];
        let counted: std::collections::BTreeSet<&str> = matcher.split('|').collect();
        assert_eq!(counted, server_errors, "High5xxRatio's outcome matcher");
    }
}
