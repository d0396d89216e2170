//! Pipeline step 9: which Ocrolus event is this, and under which routing key
//! does it go out? Also the outgoing message itself ([`Envelope`]).
//!
//! The routing key is always the canonical organization-level name, so one
//! binding catches both org-level and legacy account-level deliveries. A
//! well-formed name we do not know is still published under its own name:
//! Ocrolus adds events over time, and an unknown event must not be lost.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::auth::{Delivery, Verified};
use crate::client::ClientIp;
use crate::config_error::ConfigError;

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
            table
                .account_level
                .insert(name.to_owned(), AccountLevel::Fixed(key.to_owned()));
        }
        Ok(table)
    }

    /// Step 9: resolve a verified body to its event.
    pub fn resolve(&self, body: &[u8]) -> Result<Event, EventError> {
        let probe = Probe::parse(body)?;
        let status = probe.status.as_deref();
        if let Some(name) = probe.event_name.or(probe.event) {
            if !is_well_formed(&name) {
                return Err(EventError::BadName);
            }
            let routing_key = if is_known(&name) {
                name.to_string()
            } else {
                match self.account_level.get(name.as_ref()) {
                    Some(AccountLevel::Fixed(key)) => key.clone(),
                    Some(AccountLevel::ByStatus { succeeded, failed }) => {
                        if status.is_some_and(is_failed_status) {
                            failed.clone()
                        } else {
                            succeeded.clone()
                        }
                    }
                    None => name.to_string(),
                }
            };
            return Ok(Event {
                routing_key,
                name_as_sent: name.into_owned(),
            });
        }
        let status = status.ok_or(EventError::NoEvent)?;
        LEGACY_STATUS_MAP
            .iter()
            .find(|(legacy, _)| *legacy == status)
            .map(|(legacy, key)| Event {
                routing_key: (*key).to_owned(),
                name_as_sent: (*legacy).to_owned(),
            })
            .ok_or(EventError::NoEvent)
    }
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

/// The few fields resolution looks at; everything else is skipped unparsed
/// (but the whole body must still be valid JSON).
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default, deserialize_with = "string_or_none")]
    event_name: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "string_or_none")]
    event: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "string_or_none")]
    status: Option<Cow<'a, str>>,
}

impl<'a> Probe<'a> {
    fn parse(body: &'a [u8]) -> Result<Self, EventError> {
        // serde would also accept a JSON array for a struct; Ocrolus sends objects.
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(if serde_json::from_slice::<Checked>(body).is_ok() {
                EventError::NotAnObject
            } else {
                EventError::InvalidJson
            });
        }
        // The derived Probe skips other fields with `IgnoredAny`, which does
        // not decode strings: invalid UTF-8 or a lone surrogate escape in an
        // ignored string would pass, and be published as "JSON" that strict
        // consumers cannot parse (found by fuzz/fuzz_event, docs/fuzzing.md).
        serde_json::from_slice::<Checked>(body).map_err(|_| EventError::InvalidJson)?;
        serde_json::from_slice(body).map_err(|_| EventError::InvalidJson)
    }
}

/// Any JSON value, walked to the end with every string (keys too) decoded,
/// so invalid UTF-8 and lone surrogates are errors; nothing is kept.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> serde::de::Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

/// Non-string values (numbers, null, objects) count as absent.
fn string_or_none<'de, D>(d: D) -> Result<Option<Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StrOrOther<'a> {
        Str(#[serde(borrow)] Cow<'a, str>),
        Other(serde::de::IgnoredAny),
    }
    Ok(match StrOrOther::deserialize(d)? {
        StrOrOther::Str(s) => Some(s),
        StrOrOther::Other(_) => None,
    })
}

/// Why a body is not a usable event (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("body is not valid JSON")]
    InvalidJson,
    #[error("body is not a JSON object")]
    NotAnObject,
    #[error("no event_name/event and no known legacy status")]
    NoEvent,
    #[error("event name has characters outside [A-Za-z0-9._-] or is too long")]
    BadName,
}

/// A resolved event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub routing_key: String,
    /// The name as sent, or the legacy status it was derived from.
    pub name_as_sent: String,
}

/// One outgoing message: exactly what is published, and what the spool keeps
/// when publishing fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    pub routing_key: String,
    pub event_name: String,
    pub ocrolus_timestamp: Option<String>,
    pub client_ip: String,
    /// Unix milliseconds.
    pub received_at_ms: i64,
    pub body: Bytes,
}

impl Envelope {
    pub fn new(
        delivery: Verified<Delivery>,
        event: Event,
        client: ClientIp,
        received_at_ms: i64,
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
        }
    }
}

#[cfg(test)]
mod tests;
