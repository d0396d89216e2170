#!/usr/bin/env python3
"""Check docs/asyncapi.yaml and docs/examples/ (exit status 1 on any failure).

    pip install -q -r docs/requirements.txt
    python3 docs/validate_asyncapi.py [--parser DIR]

Checks:
  * the YAML parses and is an AsyncAPI 3.0.0 document whose every local
    $ref resolves;
  * it is what docs/gen_asyncapi.py generates (compared as data);
  * x-ocrolus-routing-keys is exactly the 27 known organization-level names,
    each with one channel on ocrolus.events, one message (AMQP type = key)
    and one send operation;
  * the account-level and legacy-status maps point at known routing keys;
  * every schema in components/schemas is a valid JSON Schema (draft 7);
  * every docs/examples/*.json is listed in manifest.json, is embedded
    unchanged in the message of its routing key, validates against that
    message's payload schema (and its example headers against RelayHeaders),
    and resolves to that routing key under the documented rules;
  * the documented rules resolve a set of synthetic bodies as docs/subscribers.md says;
  * with --parser DIR (a folder where `npm install @asyncapi/parser` was
    run), the official AsyncAPI parser also accepts the document. Optional:
    CI does not need node.

Ends with a 'N passed, N failed' line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

HERE = Path(__file__).resolve().parent
DOC_PATH = HERE / "asyncapi.yaml"
EXAMPLES = HERE / "examples"
DOC_URI = "urn:ocrolus-relay:asyncapi"

# docs/subscribers.md, "Routing keys" (kept here on purpose: a
# second copy, so that a change to either one is noticed).
KNOWN = [
    "book.analytics_completed", "book.analytics_v2.generated", "book.classified",
    "book.completed", "book.detect.signal_found", "book.detect.signal_not_found",
    "book.income.generated", "book.income.updated", "book.verified",
    "document.classification_failed", "document.classification_succeeded",
    "document.detect.signal_found", "document.detect.signal_not_found",
    "document.detect.unable_to_process", "document.upload_failed",
    "document.upload_succeeded", "document.verification_failed",
    "document.verification_succeeded", "image_group.upload_failed",
    "image_group.upload_succeeded", "image_group.verification_failed",
    "image_group.verification_succeeded", "mixed_document.rejected",
    "network.book.created", "network.book.funded", "plaid.upload_failed",
    "plaid.upload_succeeded",
]
ACCOUNT_LEVEL = {
    "ANALYTICS_COMPLETED": "book.analytics_completed",
    "BOOK_VERIFIED": "book.verified",
    "DOC_VERIFIED": {"succeeded": "document.verification_succeeded",
                     "failed": "document.verification_failed"},
    "IMAGE_GROUP_VERIFIED": {"succeeded": "image_group.verification_succeeded",
                             "failed": "image_group.verification_failed"},
}
LEGACY = {
    "VERIFICATION_COMPLETE": "document.verification_succeeded",
    "REJECTED": "document.verification_failed",
    "BOOK_COMPLETE": "book.verified",
}


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL: {what}" + (f": {detail}" if detail else ""))
        return ok


def pointer(doc: dict, ref: str):
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[part]
    return node


def all_refs(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield path, v
            else:
                yield from all_refs(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from all_refs(v, f"{path}/{i}")


def deref(doc: dict, node):
    while isinstance(node, dict) and "$ref" in node:
        node = pointer(doc, node["$ref"])
    return node


def resolve(body: dict, doc: dict) -> str | None:
    """The relay's routing rules, as documented, driven by the document's maps."""
    known = set(doc["x-ocrolus-routing-keys"])
    acct = doc["x-ocrolus-account-level-map"]
    legacy = doc["x-ocrolus-legacy-status-map"]
    failed_re = re.compile(doc["x-ocrolus-failed-status-pattern"])
    name_re = re.compile(doc["x-ocrolus-event-name-pattern"])
    name = body.get("event_name", body.get("event"))
    if isinstance(name, str) and name in known:
        return name
    if isinstance(name, str) and name in acct:
        target = acct[name]
        if isinstance(target, str):
            return target
        status = body.get("status")
        failed = isinstance(status, str) and bool(failed_re.match(status))
        return target["failed" if failed else "succeeded"]
    if name is None:
        status = body.get("status")
        return legacy.get(status) if isinstance(status, str) else None
    if isinstance(name, str) and name_re.match(name) and len(name.encode()) <= 255:
        return name
    return None


def main(argv: list[str]) -> int:
    c = Checks()
    try:
        doc = yaml.safe_load(DOC_PATH.read_text())
    except Exception as e:  # noqa: BLE001
        print(f"FAIL: {DOC_PATH} does not parse: {e}")
        print("0 passed, 1 failed")
        return 1
    c.check(isinstance(doc, dict) and doc.get("asyncapi") == "3.0.0", "asyncapi: 3.0.0")

    for path, ref in all_refs(doc):
        try:
            pointer(doc, ref)
            c.check(True, "")
        except (KeyError, IndexError, TypeError, AssertionError):
            c.check(False, f"$ref {ref} at {path} resolves")

    # Generated file is current (compared as data, not bytes).
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(HERE))
    try:
        import gen_asyncapi  # noqa: PLC0415

        generated = yaml.safe_load(gen_asyncapi.render())
        c.check(generated == doc, "docs/asyncapi.yaml matches docs/gen_asyncapi.py",
                "run python3 docs/gen_asyncapi.py")
    except Exception as e:  # noqa: BLE001
        c.check(False, "docs/gen_asyncapi.py runs", repr(e))

    # Routing keys and maps.
    keys = doc.get("x-ocrolus-routing-keys")
    c.check(keys == KNOWN, "x-ocrolus-routing-keys is the 27 known names in the documented order", repr(keys))
    c.check(len(set(KNOWN)) == 27, "27 distinct known names")
    c.check(doc.get("x-ocrolus-account-level-map") == ACCOUNT_LEVEL, "x-ocrolus-account-level-map")
    c.check(doc.get("x-ocrolus-legacy-status-map") == LEGACY, "x-ocrolus-legacy-status-map")
    targets = []
    for v in list(doc["x-ocrolus-account-level-map"].values()) + list(doc["x-ocrolus-legacy-status-map"].values()):
        targets += [v] if isinstance(v, str) else [v["succeeded"], v["failed"]]
    for t in targets:
        c.check(t in KNOWN, f"map target {t} is a known routing key")

    channels, operations = doc["channels"], doc["operations"]
    for key in KNOWN:
        chans = [(cid, ch) for cid, ch in channels.items() if ch.get("address") == key]
        if not c.check(len(chans) == 1, f"one channel for {key}", str(len(chans))):
            continue
        cid, ch = chans[0]
        amqp = deref(doc, ch.get("bindings", {})).get("amqp", {})
        c.check(amqp.get("is") == "routingKey" and amqp.get("exchange", {}).get("name") == "ocrolus.events"
                and amqp["exchange"].get("type") == "topic" and amqp["exchange"].get("durable") is True
                and amqp.get("x-exchange-arguments") == {"alternate-exchange": "ocrolus.events.unrouted"},
                f"{key}: channel binding is the durable topic exchange ocrolus.events with its alternate exchange")
        msgs = [deref(doc, m) for m in ch.get("messages", {}).values()]
        if c.check(len(msgs) == 1, f"{key}: one message"):
            m = msgs[0]
            c.check(m.get("name") == key and m.get("contentType") == "application/json"
                    and m.get("bindings", {}).get("amqp", {}).get("messageType") == key,
                    f"{key}: message name, contentType and AMQP type")
            c.check(deref(doc, m.get("headers")) is doc["components"]["schemas"]["RelayHeaders"],
                    f"{key}: headers schema is RelayHeaders")
        ops = [o for o in operations.values() if o["channel"]["$ref"] == f"#/channels/{cid}"]
        if c.check(len(ops) == 1 and ops[0]["action"] == "send", f"{key}: one send operation"):
            b = deref(doc, ops[0].get("bindings", {})).get("amqp", {})
            c.check(b.get("deliveryMode") == 2 and b.get("mandatory") is True,
                    f"{key}: operation binding deliveryMode 2, mandatory")
    unrouted = [ch for ch in channels.values() if ch.get("address") == "ocrolus.events.unrouted"]
    c.check(len(unrouted) == 1 and unrouted[0]["bindings"]["amqp"]["queue"]["durable"] is True,
            "channel for the durable queue ocrolus.events.unrouted")
    props = doc.get("x-ocrolus-amqp-properties", {})
    c.check(props.get("delivery_mode", {}).get("value") == 2
            and props.get("content_type", {}).get("value") == "application/json"
            and props.get("app_id", {}).get("value") == "ocrolus-relay", "x-ocrolus-amqp-properties")
    hdrs = doc["components"]["schemas"]["RelayHeaders"]["properties"]
    c.check(sorted(hdrs) == ["x-ocrolus-event", "x-ocrolus-source", "x-ocrolus-timestamp",
                             "x-relay-client-ip", "x-relay-dedup-conflict", "x-relay-received-at",
                             "x-relay-unclassified"], "RelayHeaders lists the seven headers")
    c.check("x-ocrolus-source" in doc["components"]["schemas"]["RelayHeaders"].get("required", []),
            "every message carries x-ocrolus-source")
    c.check(hdrs.get("x-relay-unclassified", {}).get("enum")
            == ["not_an_object", "no_event", "unknown_status", "bad_event_name",
                "number_out_of_range", "lone_surrogate", "unreadable_fields"],
            "x-relay-unclassified lists the reasons of src/metrics/labels.rs")
    c.check(any(ch.get("address") == "ocrolus.unclassified"
                for ch in doc["channels"].values()), "channel for ocrolus.unclassified")

    # JSON Schemas.
    registry = Registry().with_resource(DOC_URI, DRAFT7.create_resource(doc))

    def validator(json_pointer: str):
        return jsonschema.Draft7Validator({"$ref": f"{DOC_URI}#{json_pointer}"}, registry=registry,
                                          format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)

    for name, schema in doc["components"]["schemas"].items():
        try:
            jsonschema.Draft7Validator.check_schema(schema)
            c.check(True, "")
        except jsonschema.SchemaError as e:
            c.check(False, f"schema {name} is valid draft-07", e.message)
        c.check(_additional_true(schema), f"schema {name}: every object allows additional properties")

    # Examples.
    manifest = json.loads((EXAMPLES / "manifest.json").read_text())
    listed = {e["file"] for e in manifest}
    on_disk = {p.name for p in EXAMPLES.glob("*.json")} - {"manifest.json"}
    c.check(listed == on_disk, "manifest.json lists exactly the example files",
            f"unlisted {sorted(on_disk - listed)}, missing {sorted(listed - on_disk)}")
    messages = doc["components"]["messages"]
    embedded = sum(len(m.get("examples", [])) for m in messages.values())
    c.check(embedded == len(manifest), "every message example comes from docs/examples/",
            f"{embedded} embedded, {len(manifest)} files")
    for entry in manifest:
        f = entry["file"]
        if f not in on_disk:
            continue
        body = json.loads((EXAMPLES / f).read_text())
        key = entry["routing_key"]
        c.check(resolve(body, doc) == key, f"{f}: documented rules resolve it to {key}",
                str(resolve(body, doc)))
        mids = [mid for mid, m in messages.items() if m.get("name") == key]
        if not c.check(len(mids) == 1, f"{f}: message for {key}"):
            continue
        mid = mids[0]
        exs = [x for x in messages[mid].get("examples", []) if x["name"] == Path(f).stem]
        if not c.check(len(exs) == 1, f"{f}: embedded as an example of message {mid}"):
            continue
        ex = exs[0]
        c.check(ex["payload"] == body, f"{f}: embedded payload equals the file")
        c.check(ex["headers"].get("x-ocrolus-event") == entry["x-ocrolus-event"],
                f"{f}: example x-ocrolus-event header")
        errs = list(validator(f"/components/messages/{mid}/payload").iter_errors(body))
        c.check(not errs, f"{f}: validates against message {mid} payload",
                "; ".join(e.message for e in errs[:3]))
        errs = list(validator("/components/schemas/RelayHeaders").iter_errors(ex["headers"]))
        c.check(not errs, f"{f}: example headers validate against RelayHeaders",
                "; ".join(e.message for e in errs[:3]))

    # The rules on synthetic bodies (docs/subscribers.md, "Routing keys"), and
    # that each body validates against the payload of the message it lands in.
    cases = [
        ({"event_name": "document.upload_succeeded"}, "document.upload_succeeded"),
        ({"event": "book.verified"}, "book.verified"),
        ({"event_name": "ANALYTICS_COMPLETED"}, "book.analytics_completed"),
        ({"event_name": "BOOK_VERIFIED", "status": "BOOK_COMPLETE"}, "book.verified"),
        ({"event_name": "DOC_VERIFIED", "status": "VERIFICATION_COMPLETE"}, "document.verification_succeeded"),
        ({"event_name": "DOC_VERIFIED", "status": "REJECTED"}, "document.verification_failed"),
        ({"event_name": "DOC_VERIFIED", "status": "VERIFICATION_FAILED"}, "document.verification_failed"),
        ({"event": "DOC_VERIFIED"}, "document.verification_succeeded"),
        ({"event_name": "IMAGE_GROUP_VERIFIED", "status": "VERIFICATION_COMPLETE"},
         "image_group.verification_succeeded"),
        ({"event_name": "IMAGE_GROUP_VERIFIED", "status": "PROCESSING_FAILED"}, "image_group.verification_failed"),
        ({"status": "VERIFICATION_COMPLETE", "uploaded_doc_pk": 0, "book_pk": 0}, "document.verification_succeeded"),
        ({"status": "REJECTED", "uploaded_doc_pk": 1}, "document.verification_failed"),
        ({"status": "BOOK_COMPLETE", "book_pk": 1}, "book.verified"),
        ({"event_name": "book.completed", "status": "BOOK_COMPLETE"}, "book.completed"),
        ({"event_name": "MIDDESK_VERIFIED"}, "MIDDESK_VERIFIED"),
        ({"event_name": "book.something_new.v3"}, "book.something_new.v3"),
        ({"status": "SOMETHING_ELSE"}, None),
        ({"event_name": "bad name!"}, None),
        ({"event_name": "x" * 256}, None),
        ({"book_pk": 1}, None),
    ]
    by_name = {m.get("name"): mid for mid, m in messages.items()}
    for body, want in cases:
        got = resolve(body, doc)
        c.check(got == want, f"rule: {json.dumps(body)[:60]} -> {want}", f"got {got}")
        if want in KNOWN and "event" not in body:
            mid = by_name[want]
            errs = list(validator(f"/components/messages/{mid}/payload").iter_errors(body))
            c.check(not errs, f"schema: {json.dumps(body)[:60]} fits message {mid}",
                    "; ".join(e.message for e in errs[:3]))
            # ...and no other known message's payload claims it.
            others = [m for k, m in by_name.items() if k in KNOWN and k != want
                      and validator(f"/components/messages/{m}/payload").is_valid(body)]
            c.check(not others, f"schema: {json.dumps(body)[:60]} fits no other message", str(others))

    # Optional: the official parser.
    if "--parser" in argv:
        pdir = Path(argv[argv.index("--parser") + 1]).resolve()
        script = (
            "import {Parser} from '@asyncapi/parser'; import fs from 'node:fs';"
            "const {document, diagnostics} = await new Parser().parse(fs.readFileSync(process.argv[2], 'utf8'));"
            "const bad = diagnostics.filter(d => d.severity <= 1);"
            "for (const d of bad) console.log(d.code, d.path.join('/'), d.message);"
            "process.exit(document && bad.length === 0 ? 0 : 1);"
        )
        tmp = pdir / "_validate_ocrolus_relay.mjs"
        tmp.write_text(script)
        try:
            r = subprocess.run(["node", str(tmp), str(DOC_PATH)], cwd=pdir, capture_output=True, text=True)
        finally:
            tmp.unlink()
        c.check(r.returncode == 0, "@asyncapi/parser accepts the document without errors or warnings",
                (r.stdout + r.stderr).strip())

    print(f"asyncapi: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


def _additional_true(schema) -> bool:
    """Every schema node that is an object type must not forbid extra properties."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and schema.get("additionalProperties", True) is not True:
            return False
        return all(_additional_true(v) for v in schema.values())
    if isinstance(schema, list):
        return all(_additional_true(v) for v in schema)
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
