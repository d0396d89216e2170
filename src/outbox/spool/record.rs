//! The on-disk layout of the spool: which tables exist and how a record is
//! encoded. Every record starts with a format byte, so that a later layout
//! is either read as what it is or quarantined, never misread as another.
//!
//! - Format 1 (before records were versioned): the postcard-encoded [`Envelope`] with no
//!   format byte, in the table `events`. A spool in this format is
//!   converted at open ([`super::store`]), one transaction: each record
//!   moves to `records` under the same key (arrival order is kept), and one
//!   that does not decode moves to `quarantine` with its bytes. An older
//!   relay opening a converted spool sees an empty `events` table and
//!   delivers nothing from it, rather than misreading it.
//! - Format 2: one byte `2`, then the same postcard layout, in `records`.
//!   Read as an event of the `default` source bound for `--exchange`: what
//!   it was when it was written, before sources existed.
//! - Format 3 (written today): one byte `3`, then the format-2 fields up to
//!   `received_at_ms`, the source name, the source's own exchange (an
//!   option; none means `--exchange`), and the body last. A relay that
//!   only knows format 2 quarantines these records rather than misreading
//!   them (`spool replay --quarantine` brings them back after an upgrade).
//!
//! Quarantine entries carry their own format byte and keep the record's
//! bytes exactly as they were stored.

use std::sync::Arc;

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::config::DEFAULT_SOURCE;
use crate::event::Envelope;

/// Format 1 records (no format byte); emptied at open.
pub(super) const EVENTS_V1: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Spooled events by arrival order, each `[format, payload...]`.
pub(super) const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// Records taken out of the drain: unreadable ones, and events the broker
/// refused that could not be dead-lettered. Same key as in `records`.
pub(super) const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");

const FORMAT_2: u8 = 2;
const FORMAT_3: u8 = 3;
const QUARANTINE_FORMAT_1: u8 = 1;

/// The record payload of formats 1 and 2, frozen here rather than derived
/// from [`Envelope`]: a field added to the envelope must not silently change
/// what is on disk. A new layout gets a new format byte and its own struct.
#[derive(Deserialize)]
struct PayloadV2 {
    id: String,
    routing_key: String,
    event_name: String,
    ocrolus_timestamp: Option<String>,
    client_ip: String,
    received_at_ms: i64,
    body: bytes::Bytes,
}

impl From<PayloadV2> for Envelope {
    fn from(p: PayloadV2) -> Self {
        Self {
            id: p.id,
            routing_key: p.routing_key,
            event_name: p.event_name,
            ocrolus_timestamp: p.ocrolus_timestamp,
            client_ip: p.client_ip,
            received_at_ms: p.received_at_ms,
            body: p.body,
            source: Arc::from(DEFAULT_SOURCE),
            exchange: None,
        }
    }
}

/// The record payload of format 3. The body stays last, so that
/// [`RecordHead`] decodes everything before it without copying it.
#[derive(Serialize)]
struct PayloadV3Ref<'a> {
    id: &'a str,
    routing_key: &'a str,
    event_name: &'a str,
    ocrolus_timestamp: Option<&'a str>,
    client_ip: &'a str,
    received_at_ms: i64,
    source: &'a str,
    exchange: Option<&'a str>,
    body: &'a bytes::Bytes,
}

#[derive(Deserialize)]
struct PayloadV3 {
    id: String,
    routing_key: String,
    event_name: String,
    ocrolus_timestamp: Option<String>,
    client_ip: String,
    received_at_ms: i64,
    source: String,
    exchange: Option<String>,
    body: bytes::Bytes,
}

impl From<PayloadV3> for Envelope {
    fn from(p: PayloadV3) -> Self {
        Self {
            id: p.id,
            routing_key: p.routing_key,
            event_name: p.event_name,
            ocrolus_timestamp: p.ocrolus_timestamp,
            client_ip: p.client_ip,
            received_at_ms: p.received_at_ms,
            body: p.body,
            source: Arc::from(p.source),
            exchange: p.exchange.map(Arc::from),
        }
    }
}

/// Room reserved for a record's fields before its body.
const FIELDS_ROOM: usize = 1024;

/// Encodes an event as the current format.
pub(super) fn encode(envelope: &Envelope) -> Result<Vec<u8>, postcard::Error> {
    let payload = PayloadV3Ref {
        id: &envelope.id,
        routing_key: &envelope.routing_key,
        event_name: &envelope.event_name,
        ocrolus_timestamp: envelope.ocrolus_timestamp.as_deref(),
        client_ip: &envelope.client_ip,
        received_at_ms: envelope.received_at_ms,
        source: &envelope.source,
        exchange: envelope.exchange.as_deref(),
        body: &envelope.body,
    };
    // Sized for the whole record at once, so that the body is copied into
    // it once: a vector grown by doubling would copy a large body again at
    // every step. The fields before the body (ids, keys, names, addresses)
    // take well under FIELDS_ROOM bytes.
    let mut record = Vec::with_capacity(1 + FIELDS_ROOM + envelope.body.len());
    record.push(FORMAT_3);
    postcard::to_extend(&payload, record)
}

/// Decodes a record of `records`; anything but a complete record of a
/// known format is an error that names what is wrong.
pub(super) fn decode(record: &[u8]) -> Result<Envelope, String> {
    match record.split_first() {
        Some((&FORMAT_3, payload)) => decode_payload::<PayloadV3>(payload),
        Some((&FORMAT_2, payload)) => decode_payload::<PayloadV2>(payload),
        Some((format, _)) => Err(format!("unknown record format {format}")),
        None => Err("empty record".into()),
    }
}

/// Decodes a format-1 record (the `events` table): the payload alone.
pub(super) fn decode_v1(record: &[u8]) -> Result<Envelope, String> {
    decode_payload::<PayloadV2>(record)
}

/// The payload must be exactly one envelope: trailing bytes mean the
/// record is not what it claims to be.
fn decode_payload<P>(payload: &[u8]) -> Result<Envelope, String>
where
    P: for<'de> Deserialize<'de> + Into<Envelope>,
{
    match postcard::take_from_bytes::<P>(payload) {
        Ok((payload, [])) => Ok(payload.into()),
        Ok((_, rest)) => Err(format!("{} trailing bytes", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// The converted form of a format-1 record.
pub(super) fn upgrade_v1(record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.len() + 1);
    out.push(FORMAT_2);
    out.extend_from_slice(record);
    out
}

/// The fields of a record payload before its body. postcard encodes
/// fields in order, so these decode without copying the body (up to the
/// body limit) on every commit or id scan.
#[derive(Deserialize)]
struct HeadV2 {
    id: String,
    _routing_key: String,
    _event_name: String,
    _ocrolus_timestamp: Option<String>,
    _client_ip: String,
    received_at_ms: i64,
}

#[derive(Deserialize)]
struct HeadV3 {
    id: String,
    _routing_key: String,
    _event_name: String,
    _ocrolus_timestamp: Option<String>,
    _client_ip: String,
    received_at_ms: i64,
    source: String,
}

/// What the spool needs of a record without its body.
pub(super) struct RecordHead {
    pub(super) id: String,
    pub(super) received_at_ms: i64,
    pub(super) source: String,
}

impl RecordHead {
    /// The head of a format-2 or format-3 record; `None` for anything else.
    pub(super) fn decode(record: &[u8]) -> Option<Self> {
        match record.split_first() {
            Some((&FORMAT_3, payload)) => {
                postcard::take_from_bytes::<HeadV3>(payload)
                    .ok()
                    .map(|(h, _)| Self {
                        id: h.id,
                        received_at_ms: h.received_at_ms,
                        source: h.source,
                    })
            }
            Some((&FORMAT_2, payload)) => {
                postcard::take_from_bytes::<HeadV2>(payload)
                    .ok()
                    .map(|(h, _)| Self {
                        id: h.id,
                        received_at_ms: h.received_at_ms,
                        source: DEFAULT_SOURCE.to_owned(),
                    })
            }
            _ => None,
        }
    }
}

/// A quarantined record as stored.
#[derive(Serialize, Deserialize)]
struct QuarantineEntry {
    reason: String,
    quarantined_at_ms: i64,
    record: Vec<u8>,
}

/// A quarantined record, for `spool list` and replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Its key in the spool (arrival order).
    pub seq: u64,
    pub reason: String,
    pub quarantined_at_ms: i64,
    /// The record's bytes as they were stored.
    pub record: Vec<u8>,
    /// The event, when the record is readable.
    pub envelope: Option<Envelope>,
}

pub(super) fn encode_quarantine(
    reason: &str,
    quarantined_at_ms: i64,
    record: &[u8],
) -> Result<Vec<u8>, postcard::Error> {
    let entry = QuarantineEntry {
        reason: reason.to_owned(),
        quarantined_at_ms,
        record: record.to_vec(),
    };
    postcard::to_extend(&entry, vec![QUARANTINE_FORMAT_1])
}

/// Reads a quarantine entry. One that is itself unreadable is shown with
/// its raw bytes, so that nothing in the table is ever hidden.
pub(super) fn decode_quarantine(seq: u64, value: &[u8]) -> Quarantined {
    let entry = match value.split_first() {
        Some((&QUARANTINE_FORMAT_1, payload)) => {
            postcard::from_bytes::<QuarantineEntry>(payload).ok()
        }
        _ => None,
    };
    match entry {
        Some(e) => Quarantined {
            seq,
            envelope: decode(&e.record).ok(),
            reason: e.reason,
            quarantined_at_ms: e.quarantined_at_ms,
            record: e.record,
        },
        None => Quarantined {
            seq,
            reason: "unreadable quarantine entry".into(),
            quarantined_at_ms: 0,
            record: value.to_vec(),
            envelope: None,
        },
    }
}

/// Bytes of the record kept in a quarantine entry (for the counts).
pub(super) fn quarantined_len(value: &[u8]) -> u64 {
    decode_quarantine(0, value).record.len() as u64
}
