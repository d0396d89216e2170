//! Pipeline step 9: which Ocrolus event is this, and under which routing key
//! does it go out? Also the outgoing message itself ([`Envelope`]).
//!
//! The routing key is always the canonical organization-level name, so one
//! binding catches both org-level and legacy account-level deliveries. A
//! well-formed name we do not know is still published under its own name:
//! Ocrolus adds events over time, and an unknown event must not be lost.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::auth::{Delivery, Verified};
use crate::client::ClientIp;
use crate::config_error::ConfigError;
use crate::metrics::Unclassified;

mod json;

/// Routing key of authentic JSON bodies that name no routable event.
pub const UNCLASSIFIED_KEY: &str = "ocrolus.unclassified";

/// Event names and alias keys may not start with this: the relay's own keys.
const RESERVED_PREFIX: &str = "ocrolus.";

/// Organization-level event names Ocrolus documents, sorted.
pub const KNOWN_EVENTS: [&str; 27] = [
    "book.analytics_completed",
    "book.analytics_v2.generated",
    "book.classified",
    "book.completed",
    "book.detect.signal_found",
    "book.detect.signal_not_found",
    "book.income.generated",
    "book.income.updated",
    "book.verified",
    "document.classification_failed",
    "document.classification_succeeded",
    "document.detect.signal_found",
    "document.detect.signal_not_found",
    "document.detect.unable_to_process",
    "document.upload_failed",
    "document.upload_succeeded",
    "document.verification_failed",
    "document.verification_succeeded",
    "image_group.upload_failed",
    "image_group.upload_succeeded",
    "image_group.verification_failed",
    "image_group.verification_succeeded",
    "mixed_document.rejected",
    "network.book.created",
    "network.book.funded",
    "plaid.upload_failed",
    "plaid.upload_succeeded",
];

/// What an account-level event name maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountLevel {
    /// Always the same org-level name.
    Fixed(String),
    /// Succeeded or failed, decided by the payload's `status`.
    ByStatus { succeeded: String, failed: String },
}

/// Account-level (legacy) names and their org-level twins.
pub fn account_level_map() -> Vec<(&'static str, AccountLevel)> {
    let by_status = |base: &str| AccountLevel::ByStatus {
        succeeded: format!("{base}.verification_succeeded"),
        failed: format!("{base}.verification_failed"),
    };
    vec![
        (
            "ANALYTICS_COMPLETED",
            AccountLevel::Fixed("book.analytics_completed".into()),
        ),
        ("BOOK_VERIFIED", AccountLevel::Fixed("book.verified".into())),
        ("DOC_VERIFIED", by_status("document")),
        ("IMAGE_GROUP_VERIFIED", by_status("image_group")),
    ]
}

/// Legacy status-only payloads (Ocrolus' own account-level test payload).
pub const LEGACY_STATUS_MAP: [(&str, &str); 3] = [
    ("VERIFICATION_COMPLETE", "document.verification_succeeded"),
    ("REJECTED", "document.verification_failed"),
    ("BOOK_COMPLETE", "book.verified"),
];

/// The resolution table: built in, extensible with `--event-alias`.
#[derive(Debug, Clone)]
pub struct EventTable {
    account_level: HashMap<String, AccountLevel>,
}

impl Default for EventTable {
    fn default() -> Self {
        Self {
            account_level: account_level_map()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }
}

impl EventTable {
    /// Adds `NAME=routing.key` aliases; an alias may override a built-in one.
    pub fn with_aliases(aliases: &[String]) -> Result<Self, ConfigError> {
        let mut table = Self::default();
        for alias in aliases {
            let (name, key) = alias.split_once('=').ok_or_else(|| {
                ConfigError::new(format!(
                    "--event-alias {alias:?}: expected NAME=routing.key"
                ))
            })?;
            if !is_well_formed(name) || !is_well_formed(key) {
                return Err(ConfigError::new(format!(
                    "--event-alias {alias:?}: names are [A-Za-z0-9._-], at most 255 bytes"
                )));
            }
            if key.starts_with(RESERVED_PREFIX) {
                return Err(ConfigError::new(format!(
                    "--event-alias {alias:?}: routing keys starting with {RESERVED_PREFIX:?} are the relay's own"
                )));
            }
            table
                .account_level
                .insert(name.to_owned(), AccountLevel::Fixed(key.to_owned()));
        }
        Ok(table)
    }

    /// Step 9: resolve a verified body to its event. Only a body that is
    /// not JSON at all is an error; JSON that cannot be classified goes out
    /// under [`UNCLASSIFIED_KEY`] with its reason, never refused.
    pub fn resolve(&self, body: &[u8]) -> Result<Event, EventError> {
        let json = Json::read(body)?;
        let fields = match json.classify() {
            Ok(fields) => fields,
            Err(reason) => {
                return Ok(Event {
                    routing_key: UNCLASSIFIED_KEY.to_owned(),
                    name_as_sent: String::new(),
                    unclassified: Some(reason),
                });
            }
        };
        let routing_key = match &fields {
            Fields::Name(name) if is_known(name) => name.clone(),
            Fields::Name(name) => match self.account_level.get(name.as_str()) {
                Some(AccountLevel::Fixed(key)) => key.clone(),
                Some(AccountLevel::ByStatus { succeeded, failed }) => {
                    if json.status().as_deref().is_some_and(is_failed_status) {
                        failed.clone()
                    } else {
                        succeeded.clone()
                    }
                }
                None => name.clone(),
            },
            Fields::LegacyStatus(key, _) => (*key).to_owned(),
        };
        let name_as_sent = match fields {
            Fields::Name(name) => name,
            Fields::LegacyStatus(_, status) => status.to_owned(),
        };
        Ok(Event {
            routing_key,
            name_as_sent,
            unclassified: None,
        })
    }
}

/// Why an authentic JSON body goes out unclassified, worked out again from
/// the body alone (the publisher sets the header from it, so a spooled
/// event needs nothing extra stored).
pub fn unclassified_reason(body: &[u8]) -> Option<Unclassified> {
    Json::read(body).ok()?.classify().err()
}

/// What names the event: an event name, or a known legacy status (its
/// routing key and the status as sent).
enum Fields {
    Name(String),
    LegacyStatus(&'static str, &'static str),
}

/// A body that is JSON, with what its one grammar pass found.
struct Json<'a> {
    text: &'a str,
    found: json::Findings,
}

impl<'a> Json<'a> {
    /// Step 9's reading of a body: `Err` if it is not JSON.
    fn read(body: &'a [u8]) -> Result<Self, EventError> {
        let text = std::str::from_utf8(body).map_err(|_| EventError::InvalidJson)?;
        let found = json::scan(text).ok_or(EventError::InvalidJson)?;
        Ok(Self { text, found })
    }

    /// What names the event; `Err` for JSON that names none the relay can
    /// route.
    fn classify(&self) -> Result<Fields, Unclassified> {
        let Self { text, found } = self;
        // Strict parsers refuse these; subscribers of the event keys never get them.
        if found.lone_surrogate {
            return Err(Unclassified::LoneSurrogate);
        }
        if found.number_out_of_range {
            return Err(Unclassified::NumberOutOfRange);
        }
        if found.too_deep {
            return Err(Unclassified::UnreadableFields);
        }
        // serde would also accept a JSON array for a struct; Ocrolus sends objects.
        if text.trim_start().as_bytes().first() != Some(&b'{') {
            return Err(Unclassified::NotAnObject);
        }
        // A repeated member is what serde's derive refuses beyond the grammar
        // and depth, which are checked.
        let members = &found.members;
        if members.repeated {
            return Err(Unclassified::UnreadableFields);
        }
        let event_name = string_member(text, members.event_name)?;
        if let Some(name) = event_name.or(string_member(text, members.event)?) {
            if !is_well_formed(&name) || name.starts_with(RESERVED_PREFIX) {
                return Err(Unclassified::BadEventName);
            }
            return Ok(Fields::Name(name.into_owned()));
        }
        let status = string_member(text, members.status)?.ok_or(Unclassified::NoEvent)?;
        LEGACY_STATUS_MAP
            .iter()
            .find(|(legacy, _)| *legacy == status)
            .map(|(legacy, key)| Fields::LegacyStatus(key, legacy))
            .ok_or(Unclassified::UnknownStatus)
    }

    /// The top-level `status`, when it is a string.
    fn status(&self) -> Option<Cow<'a, str>> {
        string_member(self.text, self.found.members.status)
            .ok()
            .flatten()
    }
}

/// A member's value when it is a string (anything else counts as absent):
/// its bytes between the quotes, or decoded by serde_json when it holds an
/// escape. The grammar check has already read it as a string.
fn string_member(text: &str, at: Option<json::Span>) -> Result<Option<Cow<'_, str>>, Unclassified> {
    let Some(span) = at else { return Ok(None) };
    let value = text
        .get(span.start..span.end)
        .ok_or(Unclassified::UnreadableFields)?;
    let Some(inner) = value.strip_prefix('"') else {
        return Ok(None);
    };
    if !inner.contains('\\') {
        let plain = inner
            .strip_suffix('"')
            .ok_or(Unclassified::UnreadableFields)?;
        return Ok(Some(Cow::Borrowed(plain)));
    }
    serde_json::from_str::<String>(value)
        .map(|decoded| Some(Cow::Owned(decoded)))
        .map_err(|_| Unclassified::UnreadableFields)
}

/// `REJECTED` or any `*_FAILED` status means the failed twin.
fn is_failed_status(status: &str) -> bool {
    status == "REJECTED" || status.ends_with("_FAILED")
}

pub fn is_known(name: &str) -> bool {
    KNOWN_EVENTS.binary_search(&name).is_ok()
}

/// Metric label for a routing key: the known name itself, or `other`, so
/// the label set stays bounded whatever Ocrolus (or an attacker) sends.
pub fn metric_label(routing_key: &str) -> &'static str {
    match KNOWN_EVENTS.binary_search(&routing_key) {
        Ok(i) => KNOWN_EVENTS[i],
        Err(_) => "other",
    }
}

/// `[A-Za-z0-9._-]`, 1 to 255 bytes: safe as an AMQP routing key and in logs.
pub fn is_well_formed(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Why a body is refused (400): it is not JSON (not UTF-8, or not the
/// grammar). Everything else that is JSON is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("body is not JSON")]
    InvalidJson,
}

/// A resolved event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub routing_key: String,
    /// The name as sent, or the legacy status it was derived from; empty
    /// when unclassified.
    pub name_as_sent: String,
    /// Set when the routing key is [`UNCLASSIFIED_KEY`].
    pub unclassified: Option<Unclassified>,
}

/// One outgoing message: exactly what is published, and what the spool keeps
/// when publishing fails (its on-disk layout is frozen apart, in
/// `outbox/spool/record.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: String,
    pub routing_key: String,
    pub event_name: String,
    pub ocrolus_timestamp: Option<String>,
    pub client_ip: String,
    /// Unix milliseconds.
    pub received_at_ms: i64,
    pub body: Bytes,
    /// The configured source whose path the delivery came to
    /// (`x-ocrolus-source`).
    pub source: Arc<str>,
    /// The source's own exchange; `None` is the relay's `--exchange`. Kept
    /// with the event, so that a spooled event drains to where it was bound.
    pub exchange: Option<Arc<str>>,
}

impl Envelope {
    pub fn new(
        delivery: Verified<Delivery>,
        event: Event,
        client: ClientIp,
        received_at_ms: i64,
        destination: Destination,
    ) -> Self {
        let delivery = delivery.into_inner();
        Self {
            id: delivery.id.as_str().to_owned(),
            routing_key: event.routing_key,
            event_name: event.name_as_sent,
            ocrolus_timestamp: delivery.timestamp,
            client_ip: client.to_string(),
            received_at_ms,
            body: delivery.body,
            source: destination.source,
            exchange: destination.exchange,
        }
    }

    /// Makes this the message for a body whose unsigned id was already
    /// delivered with another body: its own `message_id` (subscribers
    /// de-duplicating on it keep both), `{id} conflict:{digest}`. Ids never
    /// contain a space, so no sender can forge the form; the original id
    /// goes into `x-relay-dedup-conflict` ([`Envelope::dedup_conflict_of`]).
    pub fn mark_dedup_conflict(&mut self, body_digest: &[u8; 32]) {
        let suffix = format!("{CONFLICT_MARK}{}", hex::encode(&body_digest[..8]));
        // An AMQP message_id is at most 255 bytes; ids are ASCII.
        let keep = self.id.len().min(255 - suffix.len());
        self.id = format!("{}{suffix}", &self.id[..keep]);
    }

    /// The original id when this is a de-duplication conflict.
    pub fn dedup_conflict_of(&self) -> Option<&str> {
        self.id.split_once(CONFLICT_MARK).map(|(id, _)| id)
    }
}

/// Where a source's events go: its name (the `x-ocrolus-source` header)
/// and its own exchange, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub source: Arc<str>,
    pub exchange: Option<Arc<str>>,
}

/// Separates the original id from the digest in a conflict's message id.
const CONFLICT_MARK: &str = " conflict:";

#[cfg(test)]
mod tests;
