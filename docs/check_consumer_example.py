#!/usr/bin/env python3
"""Run examples/consumer.py against the local RabbitMQ and check what it does.

    pip install -q -r examples/requirements.txt
    python3 docs/check_consumer_example.py [--amqp-url URL]

Everything happens on a throwaway exchange, queue and dead-letter exchange
with unique names, deleted at the end. Checks: bindings, JSON-line output,
de-duplication on message_id, poison message dead-lettered (not requeued),
reconnection after the broker closes the consumer's connection, exit after
--max-messages. The consumer gets its broker as the relay does, from
RELAY_AMQP_URL, as a node list whose first node is down (nothing listens on
port 1): it must move on to the next node at start and at the reconnect. Ends with a 'N passed, N failed' line; exit status 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pika
import pika.exceptions

ROOT = Path(__file__).resolve().parent.parent
CONSUMER = ROOT / "examples" / "consumer.py"
EXAMPLES = ROOT / "docs" / "examples"

passed = failed = 0


def check(ok: bool, what: str, detail: str = "") -> bool:
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}" + (f": {detail}" if detail else ""))
    return ok


def reader(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line.rstrip("\n"))
    q.put(None)


def wait_for(q: queue.Queue, pred, timeout: float, sink: list) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            return False
        sink.append(line)
        if pred(line):
            return True
    return False


def close_connection(name: str) -> bool:
    """Have the broker close the connection whose connection_name is `name`."""
    out = subprocess.run(["rabbitmqctl", "-q", "-s", "list_connections", "pid", "client_properties"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if f'{{"connection_name","{name}"}}' in line:
            pid = line.split("\t", 1)[0]
            subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "check_consumer_example"],
                           check=True, stdout=subprocess.DEVNULL)
            return True
    return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    a = ap.parse_args()

    tag = uuid.uuid4().hex[:10]
    exchange, q, dlx = f"test.consumer.{tag}", f"test-consumer-{tag}", f"test.consumer.dlx.{tag}"
    conn_name = f"check-consumer-example-{tag}"
    proc = None
    env = {**os.environ, "RELAY_AMQP_URL": f"amqp://guest:guest@127.0.0.1:1/%2f,{a.amqp_url}"}
    env.pop("AMQP_URL", None)
    conn = pika.BlockingConnection(pika.URLParameters(a.amqp_url))
    ch = conn.channel()
    try:
        proc = subprocess.Popen(
            [sys.executable, str(CONSUMER), "--exchange", exchange, "--queue", q,
             "--declare-exchange", "--alternate-exchange", "", "--dead-letter-exchange", dlx,
             "--binding", "document.#", "--binding", "book.verified", "--max-messages", "3",
             "--connection-name", conn_name, "--max-backoff", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        out_q: queue.Queue = queue.Queue()
        err_q: queue.Queue = queue.Queue()
        threading.Thread(target=reader, args=(proc.stdout, out_q), daemon=True).start()
        threading.Thread(target=reader, args=(proc.stderr, err_q), daemon=True).start()
        errs: list[str] = []
        outs: list[str] = []
        if not check(wait_for(err_q, lambda l: "consuming" in l, 20, errs), "consumer starts", "\n".join(errs)):
            return 1

        ch.confirm_delivery()

        def publish(key: str, body: bytes, message_id: str, event: str) -> None:
            ch.basic_publish(exchange, key, body, pika.BasicProperties(
                delivery_mode=2, content_type="application/json", message_id=message_id,
                timestamp=int(time.time()), app_id="ocrolus-relay", type=key,
                headers={"x-ocrolus-event": event, "x-ocrolus-source": "default",
                         "x-relay-client-ip": "127.0.0.1",
                         "x-relay-received-at": "2026-01-01T00:00:00Z"}), mandatory=True)

        widget = (EXAMPLES / "widget-quickstart-document-verification-succeeded.json").read_bytes()
        legacy = (EXAMPLES / "account-level-test-webhook.json").read_bytes()
        book = (EXAMPLES / "org-test-webhook-book-verified.json").read_bytes()
        id1, id2, id3, id4 = (str(uuid.uuid4()) for _ in range(4))

        publish("document.verification_succeeded", widget, id1, "document.verification_succeeded")
        publish("document.verification_succeeded", widget, id1, "document.verification_succeeded")  # duplicate
        publish("document.upload_failed", b"this is {not json", id2, "document.upload_failed")        # poison
        try:
            publish("book.completed", book, str(uuid.uuid4()), "book.completed")
            check(False, "book.completed is not bound (returned as unroutable)")
        except pika.exceptions.UnroutableError:
            check(True, "")
        publish("book.verified", book, id3, "book.verified")
        check(wait_for(out_q, lambda l: id3 in l, 10, outs), "first events printed", "\n".join(outs))
        wait_for(err_q, lambda l: "poison" in l, 5, errs)
        time.sleep(0.5)
        wait_for(err_q, lambda l: False, 0.2, errs)
        check(any("duplicate" in l and id1 in l for l in errs), "duplicate logged", "\n".join(errs))

        # Reconnect: the broker closes the consumer's connection.
        check(close_connection(conn_name), "found the consumer's connection to close")
        check(wait_for(err_q, lambda l: "consuming" in l, 15, errs), "consumer reconnects", "\n".join(errs[-5:]))
        publish("document.verification_succeeded", widget, id1, "document.verification_succeeded")  # dup again
        publish("document.verification_succeeded", legacy, id4, "VERIFICATION_COMPLETE")  # 3rd event: exit

        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            rc = None
        wait_for(out_q, lambda l: False, 1, outs)
        check(rc == 0, "consumer exits 0 after --max-messages 3", f"rc={rc}")
        publish("document.upload_succeeded", widget, str(uuid.uuid4()), "document.upload_succeeded")
        lines = [json.loads(l) for l in outs if l.strip()]
        got = [(l["routing_key"], l["message_id"], l["event"]) for l in lines]
        want = [
            ("document.verification_succeeded", id1, "document.verification_succeeded"),
            ("book.verified", id3, "book.verified"),
            ("document.verification_succeeded", id4, "VERIFICATION_COMPLETE"),
        ]
        # One line per distinct event in publish order: duplicates (also the one
        # after the reconnect) and the poison message are not printed and do
        # not count towards --max-messages.
        check(got == want, "printed lines: one per distinct event, header x-ocrolus-event kept", str(got))
        check(all(set(l) == {"routing_key", "message_id", "event", "body"} for l in lines), "line fields")
        if lines:
            check(lines[0]["body"] == json.loads(widget), "body printed as the parsed JSON")
            check(lines[-1]["body"] == json.loads(legacy), "legacy body printed unchanged")
        method, _p, body = ch.basic_get(f"{q}.dead-letter", auto_ack=True)
        check(method is not None and body == b"this is {not json", "poison message dead-lettered",
              str(body))
        m2 = ch.queue_declare(q, passive=True).method.message_count
        check(m2 == 1, "a message published after the consumer left stays in its durable queue", f"{m2} left")
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        if not ch.is_open:
            ch = conn.channel()
        for name in (q, f"{q}.dead-letter"):
            ch.queue_delete(name)
        for name in (exchange, dlx):
            ch.exchange_delete(name)
        conn.close()

    print(f"consumer example: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
