#!/usr/bin/env python3
"""Publish through the imported topology and check where messages land.

Run by import_test.sh against its throwaway virtual host (never against a
vhost that holds real data: it purges the queues of definitions.json and
changes a policy there).

Checks:
  * the relay's own declarations (topic exchange with alternate-exchange,
    fanout alternate exchange, plain durable queue) are equivalent to the
    imported ones, so the relay starts against a pre-provisioned broker;
  * routing of known keys to the example queues, and of keys nobody bound
    (including book.analytics_x and MIDDESK_VERIFIED) to ocrolus.events.unrouted;
  * topic matching is word-based: a binding `book.analytics_*` receives
    neither book.analytics_completed nor book.analytics_v2.generated;
  * a rejected message (requeue=False) and a message requeued past
    x-delivery-limit both reach ocrolus.dead-letter via ocrolus.dlx;
  * when ocrolus.events.unrouted is full (overflow reject-publish), a publish
    routed there through the alternate exchange is nacked, which is what
    makes the relay spool instead of answering 200.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.parse
import uuid

import pika
import pika.exceptions

EXCHANGE = "ocrolus.events"
UNROUTED = "ocrolus.events.unrouted"
DEAD = "ocrolus.dead-letter"
UNCLASSIFIED = "ocrolus.unclassified"
QUEUES = ["documents", "book-verified", "book-analytics", UNCLASSIFIED, UNROUTED, DEAD]

passed = failed = 0


def check(ok: bool, what: str, detail: str = "") -> bool:
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}" + (f": {detail}" if detail else ""))
    return ok


def publish(ch, key: str, body: bytes = b'{"event_name": "x"}') -> str:
    """Publish like the relay does; returns 'ack', 'nack' or 'returned'."""
    props = pika.BasicProperties(
        delivery_mode=2, content_type="application/json", message_id=str(uuid.uuid4()),
        timestamp=int(time.time()), app_id="ocrolus-relay", type=key,
        headers={"x-ocrolus-event": key, "x-relay-client-ip": "127.0.0.1",
                 "x-relay-received-at": "2026-01-01T00:00:00Z"})
    try:
        ch.basic_publish(EXCHANGE, key, body, props, mandatory=True)
        return "ack"
    except pika.exceptions.UnroutableError:
        return "returned"
    except pika.exceptions.NackError:
        return "nack"


def drain(ch, queue: str, wait: float = 0.0) -> list[str]:
    """Get and ack everything in `queue`; return the routing keys seen."""
    keys: list[str] = []
    deadline = time.monotonic() + wait
    while True:
        method, _props, _body = ch.basic_get(queue, auto_ack=False)
        if method is None:
            if time.monotonic() >= deadline:
                return keys
            time.sleep(0.1)
            continue
        keys.append(method.routing_key)
        ch.basic_ack(method.delivery_tag)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vhost", required=True)
    ap.add_argument("--amqp-url-base", default="amqp://guest:guest@127.0.0.1:5672")
    a = ap.parse_args()
    if a.vhost == "/":
        print("refusing to run against vhost '/'", file=sys.stderr)
        return 2

    url = f"{a.amqp_url_base}/{urllib.parse.quote(a.vhost, safe='')}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()

    # The relay's declarations must match what the definitions created.
    try:
        ch.exchange_declare(UNROUTED, "fanout", durable=True)
        ch.queue_declare(UNROUTED, durable=True)
        ch.queue_bind(UNROUTED, UNROUTED, "")
        ch.exchange_declare(EXCHANGE, "topic", durable=True, arguments={"alternate-exchange": UNROUTED})
        check(True, "")
    except pika.exceptions.ChannelClosedByBroker as e:
        check(False, "the relay's declarations are equivalent to the imported ones", str(e))
        ch = conn.channel()
        ch.confirm_delivery()

    for q in QUEUES:
        ch.queue_purge(q)

    # Word-based matching probes (exclusive queues vanish with the connection).
    probes = {}
    for pattern in ("book.analytics_*", "book.*", "book.#"):
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, EXCHANGE, pattern)
        probes[pattern] = q

    expect = {
        "document.verification_succeeded": "documents",
        "document.detect.signal_found": "documents",
        "book.verified": "book-verified",
        "book.analytics_completed": "book-analytics",
        "book.analytics_v2.generated": "book-analytics",
        "network.book.created": UNROUTED,
        "MIDDESK_VERIFIED": UNROUTED,
        "ocrolus.unclassified": UNCLASSIFIED,
        "book.analytics_x": None,  # caught only by the book.* / book.# probes
    }
    for key in expect:
        check(publish(ch, key) == "ack", f"publish {key} confirmed")
    got = {q: sorted(drain(ch, q, wait=0.5))
           for q in ["documents", "book-verified", "book-analytics", UNCLASSIFIED, UNROUTED]}
    for q in got:
        want = sorted(k for k, dest in expect.items() if dest == q)
        check(got[q] == want, f"queue {q} got exactly {want}", str(got[q]))
    probe_got = {p: sorted(drain(ch, q, wait=0.2)) for p, q in probes.items()}
    check(probe_got["book.analytics_*"] == [], "binding 'book.analytics_*' is no wildcard: receives nothing",
          str(probe_got["book.analytics_*"]))
    check(probe_got["book.*"] == ["book.analytics_completed", "book.analytics_x", "book.verified"],
          "binding 'book.*' matches exactly one word after book.", str(probe_got["book.*"]))
    check(len(probe_got["book.#"]) == 4 and "book.analytics_v2.generated" in probe_got["book.#"],
          "binding 'book.#' matches any depth", str(probe_got["book.#"]))
    for q in probes.values():
        ch.queue_delete(q)
    # With the probes gone, book.analytics_x is unrouted.
    check(publish(ch, "book.analytics_x") == "ack", "publish book.analytics_x confirmed")
    check(drain(ch, UNROUTED, wait=0.5) == ["book.analytics_x"], "book.analytics_x lands in the unrouted queue")

    # Dead-lettering: reject without requeue.
    publish(ch, "document.upload_failed")
    method = None
    for _ in range(50):
        method, _p, _b = ch.basic_get("documents", auto_ack=False)
        if method:
            break
        time.sleep(0.1)
    if check(method is not None, "message in documents"):
        ch.basic_reject(method.delivery_tag, requeue=False)
    check(drain(ch, DEAD, wait=2.0) == ["document.upload_failed"],
          "rejected message reaches ocrolus.dead-letter with its routing key")

    # Dead-lettering: requeued past x-delivery-limit.
    publish(ch, "book.verified")
    deliveries = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        method, _p, _b = ch.basic_get("book-verified", auto_ack=False)
        if method is None:
            if deliveries:
                break
            time.sleep(0.1)
            continue
        deliveries += 1
        ch.basic_nack(method.delivery_tag, requeue=True)
    dead = drain(ch, DEAD, wait=2.0)
    check(dead == ["book.verified"] and 2 <= deliveries <= 10,
          "message requeued past x-delivery-limit reaches ocrolus.dead-letter",
          f"{deliveries} deliveries, dead-letter got {dead}")

    # Overflow: a full unrouted queue nacks the relay's publish.
    subprocess.run(["rabbitmqctl", "-q", "set_policy", "-p", a.vhost, "--apply-to", "queues",
                    "--priority", "100", "test-unrouted-full", r"^ocrolus\.events\.unrouted$",
                    '{"max-length": 1, "overflow": "reject-publish"}'], check=True, stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    first = publish(ch, "brand.new_event")
    second = publish(ch, "brand.new_event")
    check(first == "ack" and second == "nack",
          "full ocrolus.events.unrouted (reject-publish) nacks the publish through the alternate exchange",
          f"first {first}, second {second}")
    subprocess.run(["rabbitmqctl", "-q", "clear_policy", "-p", a.vhost, "test-unrouted-full"],
                   check=True, stdout=subprocess.DEVNULL)

    conn.close()
    print(f"behaviour: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
