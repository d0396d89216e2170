#!/usr/bin/env bash
# The bounded soak: 60 s of a flood of rejected
# requests from a non-allowlisted address (127.0.0.2) over many connections,
# a steady stream of genuine signed deliveries, a poison event (nacked by a
# full reject-publish queue) and a 10 s broker stall, all at once. Prints one
# `SOAK {...}` JSON line: genuine p50/p99/max, lost (must be 0), peak RSS,
# relay CPU, log bytes and lines, where the poison went. Fails if anything
# answered 200 was lost, a genuine delivery never got a 200, or the poison
# did not reach the dead-letter queue.
#
# Not part of CI (60 s plus a release build). Needs RabbitMQ on
# 127.0.0.1:5672 (guest/guest); uses its own exchange and queue names and
# deletes them. The driver is tests/soak.rs (an #[ignore]d test).
#
#   bench/soak.sh                               # release build, 60 s
#   PROFILE=dev SOAK_SECS=20 bench/soak.sh      # quick look, debug build
#
# Knobs: SOAK_SECS (60), SOAK_FLOOD_CONNS (64), SOAK_FLOOD_RATE (1000/s),
# SOAK_GENUINE_RATE (20/s), SOAK_STALL_AT (20 s), SOAK_STALL_SECS (10 s),
# SOAK_RUST_LOG (the relay's RUST_LOG, default info).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${PROFILE:-release}"
RELAY_TEST_REQUIRE_BROKER=1 nice -n 5 cargo test --locked --profile "$PROFILE" \
  --test soak -- --ignored --nocapture --test-threads 1 2>&1 |
  tee /dev/stderr | grep -o 'SOAK {.*' || {
  echo "soak failed (see above)" >&2
  exit 1
}
