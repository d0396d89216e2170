#!/usr/bin/env python3
"""Example consumer for events published by ocrolus-relay.

    pip install -r examples/requirements.txt
    python3 examples/consumer.py --binding 'document.#' --binding book.verified

It shows what a correct consumer does:

* declares its own durable queue (quorum by default) with a dead-letter
  exchange and a delivery limit, plus a dead-letter queue `<queue>.dead-letter`,
  and binds the given patterns on the relay's topic exchange;
* limits unacknowledged messages with basic.qos (prefetch);
* acknowledges a message only after its work is done (here: the JSON line is
  written and flushed); a crash before that means redelivery, not loss;
* de-duplicates on the AMQP message_id (the Ocrolus Webhook-Request-Id): the
  relay delivers at least once, so the same event can arrive twice. The LRU
  here is in memory and bounded; a real service should record processed ids
  where it records the work (e.g. a unique key in its database);
* rejects poison messages (body that is not a JSON object) without requeue,
  so the broker dead-letters them instead of redelivering forever;
* a handler error requeues the message; after x-delivery-limit attempts the
  quorum queue dead-letters it;
* reconnects with capped exponential backoff and jitter, to the first node
  of the comma-separated --amqp-url list that answers (a RabbitMQ cluster;
  the same list the relay takes in RELAY_AMQP_URL);
* speaks TLS to amqps:// nodes, with the relay's flag names: --amqp-ca-file
  for a private CA, --amqp-client-cert and --amqp-client-key for mutual TLS.

Each event is printed on stdout as one JSON line:
    {"routing_key": ..., "message_id": ..., "event": <x-ocrolus-event header>, "body": <the JSON body>}
Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import ssl
import sys
import time
from collections import OrderedDict

import pika
import pika.exceptions

# The relay's variable first, so that one environment serves both.
DEFAULT_URL = os.environ.get("RELAY_AMQP_URL") or os.environ.get(
    "AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")


def log(msg: str) -> None:
    print(f"consumer: {msg}", file=sys.stderr, flush=True)


class Fatal(Exception):
    """A configuration problem that retrying will not fix."""


class Done(Exception):
    """--max-messages reached."""


class SeenIds:
    """Bounded LRU set of processed message ids."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        if key in self._ids:
            self._ids.move_to_end(key)
            return True
        return False

    def add(self, key: str) -> None:
        self._ids[key] = None
        self._ids.move_to_end(key)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)


def text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class Consumer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seen = SeenIds(args.dedup_size)
        self.processed = 0

    # -- topology -----------------------------------------------------------
    def declare(self, ch) -> None:
        a = self.args
        if a.declare_exchange:
            # Same declaration as the relay's, or RabbitMQ refuses it.
            arguments = {}
            if a.alternate_exchange:
                ch.exchange_declare(a.alternate_exchange, "fanout", durable=True)
                ch.queue_declare(a.alternate_exchange, durable=True)
                ch.queue_bind(a.alternate_exchange, a.alternate_exchange, "")
                arguments["alternate-exchange"] = a.alternate_exchange
            ch.exchange_declare(a.exchange, "topic", durable=True, arguments=arguments)

        dlq = f"{a.queue}.dead-letter"
        ch.exchange_declare(a.dead_letter_exchange, "topic", durable=True)
        ch.queue_declare(dlq, durable=True)
        # Dead letters of this queue carry its name as routing key (the
        # original key stays in the x-death header).
        ch.queue_bind(dlq, a.dead_letter_exchange, a.queue)

        qargs = {
            "x-dead-letter-exchange": a.dead_letter_exchange,
            "x-dead-letter-routing-key": a.queue,
        }
        if a.queue_type == "quorum":
            qargs.update({
                "x-queue-type": "quorum",
                "x-delivery-limit": a.delivery_limit,
                # Dead-letter at least once (needs overflow reject-publish).
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            })
        ch.queue_declare(a.queue, durable=True, arguments=qargs)
        for pattern in a.binding:
            ch.queue_bind(a.queue, a.exchange, pattern)
        ch.basic_qos(prefetch_count=a.prefetch)

    # -- messages -----------------------------------------------------------
    def on_message(self, ch, method, props, body: bytes) -> None:
        message_id = text(props.message_id)
        headers = props.headers or {}
        try:
            event = json.loads(body)
            if not isinstance(event, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            log(f"poison message {message_id} ({method.routing_key}): {e}; dead-lettering it")
            ch.basic_reject(method.delivery_tag, requeue=False)
            return

        if message_id is not None and message_id in self.seen:
            log(f"duplicate {message_id} ({method.routing_key}), acknowledged without processing")
            ch.basic_ack(method.delivery_tag)
            return

        try:
            self.handle(method.routing_key, message_id, text(headers.get("x-ocrolus-event")), event)
        except Exception as e:  # noqa: BLE001 - any failure of the work: try again later
            log(f"handler failed for {message_id}: {e!r}; requeueing")
            ch.basic_nack(method.delivery_tag, requeue=True)
            return

        # The work is done: now, and only now, acknowledge.
        ch.basic_ack(method.delivery_tag)
        if message_id is not None:
            self.seen.add(message_id)
        self.processed += 1
        if self.args.max_messages and self.processed >= self.args.max_messages:
            raise Done

    def handle(self, routing_key: str, message_id: str | None, event_header: str | None, body: dict) -> None:
        """The work. Replace with your own; raise to have the message retried."""
        line = json.dumps({"routing_key": routing_key, "message_id": message_id,
                           "event": event_header, "body": body}, separators=(",", ":"))
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    # -- connection loop ----------------------------------------------------
    def run(self) -> int:
        a = self.args
        # One URL per node of a cluster: pika tries them in order on every
        # (re)connect and uses the first that answers.
        params = [pika.URLParameters(url.strip()) for url in a.amqp_url.split(",") if url.strip()]
        for p in params:
            p.client_properties = {"connection_name": a.connection_name}
            if p.ssl_options is not None:
                p.ssl_options = pika.SSLOptions(self.tls_context(), server_hostname=p.host)
        backoff = 0.0
        while True:
            conn = None
            try:
                conn = pika.BlockingConnection(params)
                ch = conn.channel()
                self.declare(ch)
                ch.basic_consume(a.queue, self.on_message, auto_ack=False)
                log(f"consuming {a.queue} (bindings {', '.join(a.binding)} on {a.exchange})")
                backoff = 0.0
                ch.start_consuming()
                return 0  # start_consuming returns only if cancelled
            except Done:
                self._close(conn)
                return 0
            except KeyboardInterrupt:
                self._close(conn)
                return 130
            except pika.exceptions.ProbableAuthenticationError as e:
                raise Fatal(f"authentication failed: {e}") from e
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code == 404:
                    log(f"{e.reply_text}: is the relay running? (or pass --declare-exchange)")
                elif e.reply_code in (403, 406):
                    # ACCESS_REFUSED or PRECONDITION_FAILED (e.g. the queue exists
                    # with other arguments): retrying cannot help.
                    raise Fatal(f"broker refused: {e.reply_code} {e.reply_text}") from e
                else:
                    log(f"channel closed: {e}")
            except pika.exceptions.AMQPError as e:
                log(f"connection lost: {e!r}")
            self._close(conn)
            backoff = min(a.max_backoff, max(0.5, backoff * 2))
            delay = backoff * random.uniform(0.5, 1.0)
            log(f"reconnecting in {delay:.1f}s")
            time.sleep(delay)

    def tls_context(self) -> ssl.SSLContext:
        """For amqps:// nodes: the system's CAs plus --amqp-ca-file, the
        broker's name checked, and a client certificate for mutual TLS."""
        a = self.args
        try:
            ctx = ssl.create_default_context(cafile=a.amqp_ca_file)
            if a.amqp_client_cert:
                ctx.load_cert_chain(a.amqp_client_cert, a.amqp_client_key)
        except (OSError, ssl.SSLError) as e:
            raise Fatal(f"TLS files: {e}") from e
        return ctx

    @staticmethod
    def _close(conn) -> None:
        try:
            if conn is not None and conn.is_open:
                conn.close()
        except pika.exceptions.AMQPError:
            pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Example consumer for ocrolus-relay events (prints JSON lines).")
    ap.add_argument("--amqp-url", default=DEFAULT_URL,
                    help="broker URL, or comma-separated URLs of a cluster's nodes, tried in order; "
                         "default $RELAY_AMQP_URL, $AMQP_URL or amqp://guest:guest@127.0.0.1:5672/%%2f")
    ap.add_argument("--amqp-ca-file", default=os.environ.get("RELAY_AMQP_CA_FILE"),
                    help="amqps://: PEM CA certificate(s) that sign the broker's certificate, "
                         "trusted on top of the system's (default $RELAY_AMQP_CA_FILE)")
    ap.add_argument("--amqp-client-cert", default=os.environ.get("RELAY_AMQP_CLIENT_CERT"),
                    help="amqps://: PEM client certificate chain for mutual TLS (default $RELAY_AMQP_CLIENT_CERT)")
    ap.add_argument("--amqp-client-key", default=os.environ.get("RELAY_AMQP_CLIENT_KEY"),
                    help="PEM private key of --amqp-client-cert (default $RELAY_AMQP_CLIENT_KEY)")
    ap.add_argument("--exchange", default="ocrolus.events", help="the relay's topic exchange (default %(default)s)")
    ap.add_argument("--queue", default="ocrolus-example-consumer", help="durable queue to declare (default %(default)s)")
    ap.add_argument("--binding", action="append", default=None,
                    help="binding pattern, repeatable (default document.#); topic words: * = one word, # = any")
    ap.add_argument("--max-messages", type=int, default=0, metavar="N",
                    help="exit after N events have been processed (0 = run forever)")
    ap.add_argument("--declare-exchange", action="store_true",
                    help="declare the exchange (as the relay does) instead of expecting the relay to have done it")
    ap.add_argument("--alternate-exchange", default="ocrolus.events.unrouted",
                    help="with --declare-exchange: the relay's alternate exchange ('' = none; default %(default)s)")
    ap.add_argument("--dead-letter-exchange", default="ocrolus.dlx", help="default %(default)s")
    ap.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    ap.add_argument("--delivery-limit", type=int, default=5,
                    help="quorum queues: dead-letter after this many redeliveries (default %(default)s)")
    ap.add_argument("--prefetch", type=int, default=10, help="basic.qos prefetch count (default %(default)s)")
    ap.add_argument("--dedup-size", type=int, default=10000, help="message ids remembered (default %(default)s)")
    ap.add_argument("--max-backoff", type=float, default=30.0, help="seconds (default %(default)s)")
    ap.add_argument("--connection-name", default=f"ocrolus-relay-example-consumer pid={os.getpid()}")
    args = ap.parse_args(argv)
    if not args.binding:
        args.binding = ["document.#"]
    if args.max_messages < 0 or args.prefetch < 1 or args.dedup_size < 1:
        ap.error("--max-messages must be >= 0, --prefetch and --dedup-size >= 1")
    if bool(args.amqp_client_cert) != bool(args.amqp_client_key):
        ap.error("--amqp-client-cert and --amqp-client-key go together")
    return args


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM: leave like Ctrl-C, closing the connection so unacked messages
    # go back to the queue at once.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return Consumer(args).run()
    except Fatal as e:
        log(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
