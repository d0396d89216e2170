#!/usr/bin/env python3
"""Generate docs/asyncapi.yaml (AsyncAPI 3.0.0) for ocrolus-relay.

The document has one channel, message and operation per known routing key,
so it is generated rather than written by hand.  Edit the tables below (or
the example files in docs/examples/) and run:

    python3 docs/gen_asyncapi.py            # rewrite docs/asyncapi.yaml
    python3 docs/gen_asyncapi.py --check    # exit 1 if the file is stale

docs/validate_asyncapi.py runs the --check comparison too.

Sources: the routing contract in docs/subscribers.md ("Routing keys", "The
message"), implemented in src/event.rs and src/broker.rs, and Ocrolus'
published examples in docs/examples/.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "asyncapi.yaml"
EXAMPLES_DIR = HERE / "examples"

EXCHANGE = "ocrolus.events"
UNROUTED = "ocrolus.events.unrouted"
UNCLASSIFIED = "ocrolus.unclassified"
# The x-relay-unclassified reasons (src/metrics/labels.rs, Unclassified).
UNCLASSIFIED_REASONS: dict[str, str] = {
    "not_an_object": "The body is JSON but not an object.",
    "no_event": "An object with no string event_name/event and no string status.",
    "unknown_status": "No event name, and a status that is not a known legacy status.",
    "bad_event_name": "event_name/event has characters outside [A-Za-z0-9._-], is empty, longer than "
                      "255 bytes, or starts with the relay's own prefix 'ocrolus.'.",
    "number_out_of_range": "A number beyond the range of an IEEE 754 double (e.g. 1e400).",
    "lone_surrogate": "A \\u escape that is an unpaired UTF-16 surrogate (e.g. \\ud800).",
    "unreadable_fields": "A repeated event_name/event/status member, or nesting 127 levels or deeper.",
}
NAME_PATTERN = "^[A-Za-z0-9._-]{1,255}$"
FAILED_STATUS_PATTERN = "^(REJECTED|.*_FAILED)$"

# The 27 known organization-level event names (docs/subscribers.md,
# "Routing keys"), with a one-line summary each.  Summaries stay
# close to Ocrolus' own wording where there is any; the rest is kept generic.
ROUTING_KEYS: dict[str, str] = {
    "book.analytics_completed": "Analytics for a book have been computed (account-level twin: ANALYTICS_COMPLETED).",
    "book.analytics_v2.generated": "Version-2 analytics for a book have been generated.",
    "book.classified": "The documents of a book have been classified.",
    "book.completed": "All requested processing of a book has finished (status BOOK_COMPLETE; notification_reason names the completed tasks).",
    "book.detect.signal_found": "Detect (fraud-signal analysis) found signals in a book.",
    "book.detect.signal_not_found": "Detect (fraud-signal analysis) found no signals in a book.",
    "book.income.generated": "Income calculations for a book have been generated.",
    "book.income.updated": "Income calculations for a book have been updated.",
    "book.verified": "All documents within a book have completed verification or were rejected (account-level twin: BOOK_VERIFIED; legacy status BOOK_COMPLETE).",
    "document.classification_failed": "A document could not be classified.",
    "document.classification_succeeded": "A document has been classified.",
    "document.detect.signal_found": "Detect found signals in a document.",
    "document.detect.signal_not_found": "Detect found no signals in a document.",
    "document.detect.unable_to_process": "Detect could not process a document.",
    "document.upload_failed": "A document upload failed.",
    "document.upload_succeeded": "A document upload succeeded.",
    "document.verification_failed": "A document was rejected or failed verification (account-level DOC_VERIFIED with status REJECTED or *_FAILED; legacy status REJECTED).",
    "document.verification_succeeded": "A document completed verification (account-level DOC_VERIFIED; legacy status VERIFICATION_COMPLETE).",
    "image_group.upload_failed": "An image group upload failed.",
    "image_group.upload_succeeded": "An image group upload succeeded.",
    "image_group.verification_failed": "An image group was rejected or failed verification (account-level IMAGE_GROUP_VERIFIED with status REJECTED or *_FAILED).",
    "image_group.verification_succeeded": "An image group completed verification (account-level IMAGE_GROUP_VERIFIED).",
    "mixed_document.rejected": "A mixed (multi-document) upload was rejected.",
    "network.book.created": "A network book was created (BETA at Ocrolus).",
    "network.book.funded": "A network book was funded (BETA at Ocrolus).",
    "plaid.upload_failed": "A Plaid data import failed.",
    "plaid.upload_succeeded": "A Plaid data import succeeded.",
}

# Account-level (legacy webhook) event names and their org-level twins.  A
# value that is a dict is decided by the `status` field: REJECTED or any
# *_FAILED status -> "failed", anything else (or no status) -> "succeeded".
ACCOUNT_LEVEL_MAP: dict[str, object] = {
    "ANALYTICS_COMPLETED": "book.analytics_completed",
    "BOOK_VERIFIED": "book.verified",
    "DOC_VERIFIED": {
        "succeeded": "document.verification_succeeded",
        "failed": "document.verification_failed",
    },
    "IMAGE_GROUP_VERIFIED": {
        "succeeded": "image_group.verification_succeeded",
        "failed": "image_group.verification_failed",
    },
}

# Legacy status-only payloads (no event name at all).
LEGACY_STATUS_MAP: dict[str, str] = {
    "VERIFICATION_COMPLETE": "document.verification_succeeded",
    "REJECTED": "document.verification_failed",
    "BOOK_COMPLETE": "book.verified",
}

# Example headers for the examples (what the relay would add).
EXAMPLE_HEADER_COMMON = {
    "x-ocrolus-source": "production",
    "x-ocrolus-timestamp": "1767225600",
    "x-relay-client-ip": "18.205.30.63",
    "x-relay-received-at": "2026-01-01T00:00:01.250Z",
}


def camel(name: str) -> str:
    parts = [p for p in re.split(r"[._-]", name) if p]
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def ref(path: str) -> dict:
    return {"$ref": path}


def name_is(field_value: str) -> dict:
    """Schema: the event name (event_name, or event) equals field_value."""
    return {
        "anyOf": [
            {"required": ["event_name"], "properties": {"event_name": {"const": field_value}}},
            {"required": ["event"], "properties": {"event": {"const": field_value}}},
        ]
    }


FAILED_STATUS = {"required": ["status"], "properties": {"status": {"type": "string", "pattern": FAILED_STATUS_PATTERN}}}


def sources_for(key: str) -> list[dict]:
    """Every kind of delivery that is published under routing key `key`."""
    out = [{"kind": "organization-level", "event_name": key}]
    for name, target in ACCOUNT_LEVEL_MAP.items():
        if isinstance(target, str):
            if target == key:
                out.append({"kind": "account-level", "event_name": name})
        else:
            for outcome, tgt in target.items():
                if tgt == key:
                    cond = ("status is REJECTED or ends in _FAILED" if outcome == "failed"
                            else "status is anything else, or absent")
                    out.append({"kind": "account-level", "event_name": name, "when": cond})
    for status, tgt in LEGACY_STATUS_MAP.items():
        if tgt == key:
            out.append({"kind": "legacy-status", "status": status})
    return out


def payload_for(key: str) -> dict:
    variants: list[dict] = [
        {"allOf": [ref("#/components/schemas/OrgEvent"),
                   {"properties": {"event_name": {"const": key}}}]}
    ]
    for src in sources_for(key)[1:]:
        if src["kind"] == "account-level":
            parts = [ref("#/components/schemas/AccountLevelEvent"), name_is(src["event_name"])]
            target = ACCOUNT_LEVEL_MAP[src["event_name"]]
            if isinstance(target, dict):
                parts.append(FAILED_STATUS if target["failed"] == key else {"not": FAILED_STATUS})
            variants.append({"allOf": parts})
        else:
            variants.append({"allOf": [ref("#/components/schemas/LegacyStatusEvent"),
                                       {"properties": {"status": {"const": src["status"]}}}]})
    if len(variants) == 1:
        return variants[0]
    return {"anyOf": variants}


def load_examples() -> dict[str, list[dict]]:
    manifest = json.loads((EXAMPLES_DIR / "manifest.json").read_text())
    by_key: dict[str, list[dict]] = {}
    for entry in manifest:
        body = json.loads((EXAMPLES_DIR / entry["file"]).read_text())
        headers = {"x-ocrolus-event": entry["x-ocrolus-event"], **EXAMPLE_HEADER_COMMON}
        by_key.setdefault(entry["routing_key"], []).append({
            "name": Path(entry["file"]).stem,
            "summary": f"{entry['source']} [{entry['provenance']}]",
            "headers": headers,
            "payload": body,
        })
    return by_key


INFO_DESCRIPTION = """\
ocrolus-relay receives Ocrolus webhook deliveries over HTTPS, verifies them
(source-IP allowlist, HMAC signature and/or HTTP Basic, timestamp window,
size and rate limits) and republishes every verified event onto the durable
RabbitMQ topic exchange `ocrolus.events`, with the event type as routing key.
It answers Ocrolus 200 only once the broker has confirmed the publish or the
event is fsynced in the relay's local spool.

## Routing key resolution (first match wins)

1. `event_name` (or `event`) is an organization-level name: published under
   that name.
2. An account-level name: published under its org-level twin
   (`x-ocrolus-account-level-map`). `DOC_VERIFIED` and `IMAGE_GROUP_VERIFIED`
   are split by `status`: `REJECTED` or any `*_FAILED` status gives the
   `..._failed` key, anything else the `..._succeeded` key. The other
   account-level names (`book.classified`, `document.upload_succeeded`, ...)
   are already dotted and equal to the org-level names.
3. No name, only a legacy `status` (`x-ocrolus-legacy-status-map`):
   `VERIFICATION_COMPLETE` -> `document.verification_succeeded`, `REJECTED` ->
   `document.verification_failed`, `BOOK_COMPLETE` -> `book.verified`.
4. Any other well-formed name (`^[A-Za-z0-9._-]{1,255}$`) is published under
   its own name, unchanged (Ocrolus adds events over time; an unknown event
   must not be lost). Other legacy account-level names such as
   `MIDDESK_VERIFIED` or `SUSPICIOUS_ACTIVITY` take this path.
5. Nothing usable: the relay answers 400 and publishes nothing.

Operators can add account-level names to the built-in table with
`--event-alias NAME=routing.key`; this document describes the built-in table.

The name as sent (or, for rule 3, the status it came from) is kept in the
`x-ocrolus-event` header, so one binding such as `document.#` catches
organization-level, account-level and legacy deliveries alike.

## The AMQP message

* body: the raw Ocrolus request bytes, unchanged (never re-serialised);
* properties: `delivery_mode` 2 (persistent), `content_type`
  `application/json`, `message_id` = the `Webhook-Request-Id` of the delivery
  (a fresh UUIDv7 when an unsigned delivery carries none),
  `timestamp` = receive time (Unix seconds), `app_id` `ocrolus-relay`, `type` =
  the routing key (see `x-ocrolus-amqp-properties`);
* headers: `x-ocrolus-event`, `x-ocrolus-source`, `x-ocrolus-timestamp`,
  `x-relay-client-ip`, `x-relay-received-at` (schema `RelayHeaders`);
* published with `mandatory` set and publisher confirms.

## Topology

`ocrolus.events` is a durable topic exchange declared with the argument
`alternate-exchange: ocrolus.events.unrouted`. `ocrolus.events.unrouted` is a
durable fanout exchange with a durable queue of the same name bound to it: an
event that matches no binding (for example a new Ocrolus event type nobody
subscribed to yet) is kept there instead of being dropped. See
docs/subscribers.md for binding patterns, delivery guarantees and replay.

One relay can serve several Ocrolus webhooks ("sources"). Each message names
its source in `x-ocrolus-source`. A source may have an exchange of its own
(a durable topic exchange declared the same way, with the same alternate
exchange; sources may share one): its messages, with the same routing keys,
properties and headers, go there instead of `ocrolus.events`.

Topic bindings match whole dot-separated words: `*` is exactly one word and
`#` zero or more words. `book.analytics_*` is NOT a wildcard (it matches only
the literal key `book.analytics_*`); bind `book.analytics_completed` and
`book.analytics_v2.generated` explicitly.
"""


ORG_EVENT = {
    "type": "object",
    "title": "OrgEvent",
    "description": (
        "Organization-level Ocrolus webhook body, modelled on Ocrolus' published "
        "examples (docs/examples/). Ocrolus documents few of these fields, so every "
        "field but event_name is optional and unknown fields are allowed. UUID-like "
        "fields are plain strings: published examples carry malformed placeholder "
        "UUIDs. The relay also accepts the event name in a field named `event`; no "
        "Ocrolus example uses it."
    ),
    "required": ["event_name"],
    "additionalProperties": True,
    "properties": {
        "event_name": {"type": "string", "pattern": NAME_PATTERN,
                       "description": "Organization-level event name, e.g. document.verification_succeeded."},
        "book_uuid": {"type": "string", "description": "UUID of the book (plain string, not validated as a UUID)."},
        "book_pk": {"type": "integer", "description": "Numeric primary key of the book."},
        "book_name": {"type": "string"},
        "doc_uuid": {"type": "string"},
        "uploaded_doc_uuid": {"type": "string"},
        "uploaded_doc_pk": {"type": "integer"},
        "uploaded_doc_name": {"type": "string"},
        "mixed_uploaded_doc_uuid": {"type": "string"},
        "status": {"type": "string",
                   "description": "Book or document status, e.g. VERIFICATION_COMPLETE, REJECTED, BOOK_COMPLETE."},
        "notification_reason": {"type": "string", "description": "Human-readable reason, e.g. 'Document verified'."},
        "notification_type": {"type": "string", "enum": ["STATUS", "ISSUE"]},
        "severity": {"type": "string", "enum": ["LOW", "MODERATE", "HIGH"]},
        "uploaded_docs": {"type": "array", "items": ref("#/components/schemas/UploadedDoc")},
        "tasks": {"type": "array", "items": {"type": "string"},
                  "description": "Completed tasks, e.g. [ANALYTICS, CAPTURE, DETECT] (book.completed)."},
        "is_cloud_compliant": {"description": "Seen on document.detect.* bodies; type not documented by Ocrolus."},
    },
}

UPLOADED_DOC = {
    "type": "object",
    "title": "UploadedDoc",
    "additionalProperties": True,
    "properties": {
        "uuid": {"type": "string"},
        "status": {"type": "string", "description": "e.g. COMPLETED, VERIFICATION_COMPLETE."},
    },
}

ACCOUNT_LEVEL_EVENT = {
    "type": "object",
    "title": "AccountLevelEvent",
    "description": (
        "Account-level (legacy) delivery that names its event with an account-level "
        "name (ANALYTICS_COMPLETED, BOOK_VERIFIED, DOC_VERIFIED, IMAGE_GROUP_VERIFIED). "
        "No real body of this kind has been published by Ocrolus; the relay reads the "
        "name from event_name or event and, for DOC_VERIFIED / IMAGE_GROUP_VERIFIED, "
        "the outcome from status."
    ),
    "anyOf": [{"required": ["event_name"]}, {"required": ["event"]}],
    "additionalProperties": True,
    "properties": {
        "event_name": {"type": "string", "pattern": NAME_PATTERN},
        "event": {"type": "string", "pattern": NAME_PATTERN},
        "status": {"type": "string",
                   "description": "VERIFICATION_COMPLETE, REJECTED, BOOK_COMPLETE, or another status; "
                                  "REJECTED or *_FAILED selects the ..._failed routing key."},
        "book_pk": {"type": "integer"},
        "uploaded_doc_pk": {"type": "integer"},
        "book_uuid": {"type": "string"},
        "doc_uuid": {"type": "string"},
    },
}

LEGACY_STATUS_EVENT = {
    "type": "object",
    "title": "LegacyStatusEvent",
    "description": (
        "Legacy account-level body that carries only a status and no event name. "
        "Ocrolus' own account-level test payload is of this kind: "
        '{"status": "VERIFICATION_COMPLETE", "uploaded_doc_pk": 0, "book_pk": 0}.'
    ),
    "required": ["status"],
    "not": {"anyOf": [{"required": ["event_name"]}, {"required": ["event"]}]},
    "additionalProperties": True,
    "properties": {
        "status": {"type": "string",
                   "description": "VERIFICATION_COMPLETE, REJECTED or BOOK_COMPLETE are mapped; "
                                  "any other status alone is rejected with 400."},
        "uploaded_doc_pk": {"type": "integer"},
        "book_pk": {"type": "integer"},
    },
}

RELAY_HEADERS = {
    "type": "object",
    "title": "RelayHeaders",
    "description": "AMQP message headers (application headers table) set by the relay.",
    "required": ["x-ocrolus-source", "x-relay-client-ip", "x-relay-received-at"],
    "additionalProperties": True,
    "properties": {
        "x-ocrolus-event": {
            "type": "string",
            "description": "The event name as Ocrolus sent it (e.g. DOC_VERIFIED, book.verified), or, "
                           "for a legacy status-only body, the status it came from (e.g. VERIFICATION_COMPLETE). "
                           "Absent on ocrolus.unclassified messages.",
        },
        "x-relay-unclassified": {
            "type": "string",
            "enum": list(UNCLASSIFIED_REASONS),
            "description": "Only on ocrolus.unclassified messages: why the authentic JSON body could not be "
                           "given an event routing key. " + " ".join(
                               f"{k}: {v}" for k, v in UNCLASSIFIED_REASONS.items()),
        },
        "x-relay-dedup-conflict": {
            "type": "string",
            "description": "Only when no signature covered the Webhook-Request-Id (Basic-only setups) and "
                           "that id was already delivered with a different body: the original id. This "
                           "message has its own message_id ('<id> conflict:<16 hex digits of the body's "
                           "SHA-256>') so that consumers de-duplicating on message_id keep it.",
        },
        "x-ocrolus-source": {
            "type": "string",
            "pattern": "^[a-z0-9_-]{1,32}$",
            "description": "The configured source (Ocrolus webhook) whose path the delivery came to: a name "
                           "from the relay's `sources:` list, or `default` when the relay serves one webhook. "
                           "Kept through the spool: a spooled event keeps its source.",
        },
        "x-ocrolus-timestamp": {
            "type": "string",
            "description": "The Webhook-Timestamp request header exactly as sent (Unix seconds, as a string). "
                           "Absent when the delivery was not signed.",
        },
        "x-relay-client-ip": {
            "type": "string",
            "description": "Client address the relay attributed the delivery to (TCP peer, or the "
                           "X-Forwarded-For / PROXY-protocol address behind a trusted proxy).",
        },
        "x-relay-received-at": {
            "type": "string",
            "format": "date-time",
            "description": "Receive time, RFC 3339 in UTC with milliseconds (e.g. 2026-01-01T00:00:01.250Z).",
        },
    },
}

AMQP_PROPERTIES = {
    "delivery_mode": {"value": 2, "description": "Persistent."},
    "content_type": {"value": "application/json", "description": "The body is the raw Ocrolus JSON."},
    "message_id": {"description": "The Webhook-Request-Id header of the delivery (unique per Ocrolus "
                                  "delivery); de-duplicate on it. A delivery without one (unsigned, "
                                  "Basic-auth-only setups) gets a fresh UUIDv7 from the relay."},
    "timestamp": {"description": "Time the relay received the delivery, Unix seconds."},
    "app_id": {"value": "ocrolus-relay"},
    "type": {"description": "The routing key (same as the message's routing key)."},
}


def build() -> dict:
    examples = load_examples()
    unknown = set(examples) - set(ROUTING_KEYS)
    if unknown:
        raise SystemExit(f"examples for unknown routing keys: {sorted(unknown)}")

    channels: dict = {}
    operations: dict = {}
    messages: dict = {}

    for key, summary in ROUTING_KEYS.items():
        cid = camel(key)
        srcs = sources_for(key)
        msg: dict = {
            "name": key,
            "title": key,
            "summary": summary,
            "contentType": "application/json",
            "headers": ref("#/components/schemas/RelayHeaders"),
            "payload": payload_for(key),
            "bindings": {"amqp": {"messageType": key, "bindingVersion": "0.3.0"}},
            "tags": [{"name": key.split(".")[0]}],
            "x-ocrolus-sources": srcs,
        }
        if key in examples:
            msg["examples"] = examples[key]
        messages[cid] = msg
        channels[cid] = {
            "address": key,
            "title": key,
            "summary": summary,
            "servers": [ref("#/servers/local")],
            "messages": {cid: ref(f"#/components/messages/{cid}")},
            "bindings": ref("#/components/channelBindings/ocrolusEvents"),
        }
        operations["publish" + cid[:1].upper() + cid[1:]] = {
            "action": "send",
            "channel": ref(f"#/channels/{cid}"),
            "title": f"Publish {key}",
            "summary": f"The relay publishes {key} to {EXCHANGE} with routing key {key}.",
            "bindings": ref("#/components/operationBindings/relayPublish"),
            "messages": [ref(f"#/channels/{cid}/messages/{cid}")],
        }

    # Rule 4: any other well-formed name.
    messages["otherEvent"] = {
        "name": "other",
        "title": "Any other event",
        "summary": "An event name that is not in the built-in table, published under its own name.",
        "description": "Ocrolus adds events over time. Any well-formed name (^[A-Za-z0-9._-]{1,255}$) "
                       "that is neither a known organization-level name, nor an account-level name, nor a "
                       "legacy status is published unchanged under that name, e.g. MIDDESK_VERIFIED.",
        "contentType": "application/json",
        "headers": ref("#/components/schemas/RelayHeaders"),
        "payload": {"anyOf": [ref("#/components/schemas/OrgEvent"),
                              ref("#/components/schemas/AccountLevelEvent")]},
    }
    channels["otherEvent"] = {
        "address": "{eventName}",
        "title": "Any other event name",
        "summary": "Unknown but well-formed event names are published under their own name.",
        "servers": [ref("#/servers/local")],
        "parameters": {"eventName": {"description": "The event name as sent; matches ^[A-Za-z0-9._-]{1,255}$ "
                                                    "and is not in the known tables."}},
        "messages": {"otherEvent": ref("#/components/messages/otherEvent")},
        "bindings": ref("#/components/channelBindings/ocrolusEvents"),
    }
    operations["publishOtherEvent"] = {
        "action": "send",
        "channel": ref("#/channels/otherEvent"),
        "title": "Publish an unknown event",
        "bindings": ref("#/components/operationBindings/relayPublish"),
        "messages": [ref("#/channels/otherEvent/messages/otherEvent")],
    }

    # Authentic JSON the relay could not classify.
    messages["unclassifiedEvent"] = {
        "name": "unclassified",
        "title": "Unclassified event",
        "summary": "An authentic delivery whose JSON body names no event the relay can route.",
        "description": "Once authentication has passed, every body that is JSON is published; only a body "
                       "that is not JSON (not UTF-8, or not the JSON grammar) is refused with 400. A body "
                       "that cannot be classified goes out under this fixed routing key with its exact "
                       "bytes and the reason in x-relay-unclassified. Bodies with a lone-surrogate escape "
                       "or a number beyond a double are JSON that strict parsers refuse: they come here "
                       "too, never under an event's routing key.",
        "contentType": "application/json",
        "headers": ref("#/components/schemas/RelayHeaders"),
        "payload": {"description": "The request body exactly as received: JSON, possibly not an object, "
                                   "possibly not readable by strict parsers (see x-relay-unclassified)."},
    }
    channels["unclassifiedEvent"] = {
        "address": UNCLASSIFIED,
        "title": UNCLASSIFIED,
        "summary": "Authentic JSON bodies the relay could not classify; the reason is in x-relay-unclassified.",
        "servers": [ref("#/servers/local")],
        "messages": {"unclassifiedEvent": ref("#/components/messages/unclassifiedEvent")},
        "bindings": ref("#/components/channelBindings/ocrolusEvents"),
    }
    operations["publishUnclassifiedEvent"] = {
        "action": "send",
        "channel": ref("#/channels/unclassifiedEvent"),
        "title": "Publish an unclassified event",
        "bindings": ref("#/components/operationBindings/relayPublish"),
        "messages": [ref("#/channels/unclassifiedEvent/messages/unclassifiedEvent")],
    }

    # The alternate exchange and its queue.
    messages["unroutedEvent"] = {
        "name": "unrouted",
        "title": "Unrouted event",
        "summary": "Any event that matched no binding on ocrolus.events, as published by the relay.",
        "description": "Routing key, properties, headers and body are exactly as the relay published "
                       "them; republish with the original routing key to replay (docs/subscribers.md).",
        "contentType": "application/json",
        "headers": ref("#/components/schemas/RelayHeaders"),
        "payload": {"anyOf": [ref("#/components/schemas/OrgEvent"),
                              ref("#/components/schemas/AccountLevelEvent"),
                              ref("#/components/schemas/LegacyStatusEvent")]},
    }
    channels["unrouted"] = {
        "address": UNROUTED,
        "title": UNROUTED,
        "summary": "Durable queue behind the alternate exchange: events no consumer has bound yet.",
        "description": f"`{UNROUTED}` is also the name of a durable fanout exchange, configured as the "
                       f"`alternate-exchange` of `{EXCHANGE}`; the queue of the same name is bound to it. "
                       "The relay declares exchange and queue at start (plain durable, no queue "
                       "arguments); limits are set by policy (deploy/rabbitmq/definitions.json): "
                       "max-length 100000, message-ttl 14 days, overflow reject-publish.",
        "servers": [ref("#/servers/local")],
        "messages": {"unroutedEvent": ref("#/components/messages/unroutedEvent")},
        "bindings": {"amqp": {
            "is": "queue",
            "queue": {"name": UNROUTED, "durable": True, "exclusive": False,
                      "autoDelete": False, "vhost": "/"},
            "bindingVersion": "0.3.0",
            "x-bound-to-exchange": {"name": UNROUTED, "type": "fanout", "durable": True,
                                    "autoDelete": False, "vhost": "/"},
        }},
    }
    operations["consumeUnrouted"] = {
        "action": "receive",
        "channel": ref("#/channels/unrouted"),
        "title": "Inspect or replay unrouted events",
        "summary": "Operators consume this queue to inspect events nobody subscribed to, or to replay them.",
        "bindings": {"amqp": {"ack": True, "bindingVersion": "0.3.0"}},
        "messages": [ref("#/channels/unrouted/messages/unroutedEvent")],
    }

    doc = {
        "asyncapi": "3.0.0",
        "id": "urn:ocrolus-relay:events",
        "info": {
            "title": "ocrolus-relay events",
            "version": "0.1.0",
            "description": INFO_DESCRIPTION,
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
            "tags": [{"name": t} for t in sorted({k.split(".")[0] for k in ROUTING_KEYS})],
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "title": "Local RabbitMQ",
                "description": "RabbitMQ as in the docker-compose stack and the tests (vhost /).",
                "security": [ref("#/components/securitySchemes/amqpUser")],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": {
                "OrgEvent": ORG_EVENT,
                "UploadedDoc": UPLOADED_DOC,
                "AccountLevelEvent": ACCOUNT_LEVEL_EVENT,
                "LegacyStatusEvent": LEGACY_STATUS_EVENT,
                "RelayHeaders": RELAY_HEADERS,
            },
            "messages": messages,
            "securitySchemes": {
                "amqpUser": {"type": "userPassword",
                             "description": "AMQP PLAIN user and password (guest/guest on a local broker)."}
            },
            "channelBindings": {
                "ocrolusEvents": {"amqp": {
                    "is": "routingKey",
                    "exchange": {"name": EXCHANGE, "type": "topic", "durable": True,
                                 "autoDelete": False, "vhost": "/"},
                    "bindingVersion": "0.3.0",
                    "x-exchange-arguments": {"alternate-exchange": UNROUTED},
                }}
            },
            "operationBindings": {
                "relayPublish": {"amqp": {
                    "deliveryMode": 2,
                    "mandatory": True,
                    "timestamp": True,
                    "bindingVersion": "0.3.0",
                }}
            },
        },
        "x-ocrolus-routing-keys": list(ROUTING_KEYS),
        "x-ocrolus-account-level-map": ACCOUNT_LEVEL_MAP,
        "x-ocrolus-legacy-status-map": LEGACY_STATUS_MAP,
        "x-ocrolus-failed-status-pattern": FAILED_STATUS_PATTERN,
        "x-ocrolus-event-name-pattern": NAME_PATTERN,
        "x-ocrolus-amqp-properties": AMQP_PROPERTIES,
        "x-ocrolus-amqp-topology": {
            "exchange": {"name": EXCHANGE, "type": "topic", "durable": True, "autoDelete": False,
                         "arguments": {"alternate-exchange": UNROUTED}},
            "alternateExchange": {"name": UNROUTED, "type": "fanout", "durable": True, "autoDelete": False,
                                  "arguments": {}},
            "unroutedQueue": {"name": UNROUTED, "durable": True, "exclusive": False, "autoDelete": False,
                              "arguments": {}, "boundTo": UNROUTED},
        },
    }
    return doc


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, data: str):
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_representer)
# No anchors/aliases: keep the YAML plain for every consumer (serde-saphyr too).
_Dumper.ignore_aliases = lambda self, data: True  # type: ignore[assignment]

HEADER = """\
# AsyncAPI 3.0.0 description of the events ocrolus-relay publishes.
# GENERATED by docs/gen_asyncapi.py from its tables and docs/examples/*.json:
# edit those and run `python3 docs/gen_asyncapi.py`, do not edit this file.
# Checked by `python3 docs/validate_asyncapi.py`.
"""


def render() -> str:
    return HEADER + yaml.dump(build(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python3 docs/gen_asyncapi.py", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
