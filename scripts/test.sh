#!/usr/bin/env bash
# Runs every test of the project: Rust unit and integration tests against the
# local RabbitMQ, the README's quick start in a fresh clone (needs
# 127.0.0.1:8080 and :9090 free), the deploy-file checks (promtool, systemd, YAML/JSON), the
# RabbitMQ topology import test and the AsyncAPI / Python consumer checks.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-rabbitmq.sh

# tests/cluster.rs runs against a three-node cluster on 127.0.0.1:5681-5683
# (scripts/rabbitmq-cluster.sh). It starts in the background while Cargo
# builds, and is stopped on every exit, failed or not, unless it was already
# running before this script.
cluster_log=$(mktemp)
if scripts/rabbitmq-cluster.sh status >/dev/null 2>&1; then
  echo "== RabbitMQ cluster: already running (left running)"
  cluster_pid=""
else
  echo "== RabbitMQ cluster: starting in the background"
  scripts/rabbitmq-cluster.sh start >"$cluster_log" 2>&1 &
  cluster_pid=$!
  trap 'wait "$cluster_pid" 2>/dev/null || true; scripts/rabbitmq-cluster.sh stop; rm -f "$cluster_log"' EXIT
fi

echo "== cargo test"
# Every broker test runs here: a missing broker fails instead of skipping.
export RELAY_TEST_REQUIRE_BROKER=1
# tests/subscribers.rs runs the example consumer's binary: build it first
# (cargo test compiles examples, but not to their plain path).
cargo build --workspace --examples --locked
if [ -n "$cluster_pid" ]; then
  if ! wait "$cluster_pid"; then
    cat "$cluster_log" >&2
    echo "RabbitMQ cluster did not start" >&2
    exit 1
  fi
  cat "$cluster_log"
fi
# With the cluster started here, tests/cluster.rs must not skip.
RELAY_CLUSTER_REQUIRED=1 cargo test --workspace --all-targets --locked

echo "== README quick start, as typed, in a fresh clone"
scripts/quickstart-test.sh

echo "== deploy files"
bash deploy/check.sh

echo "== Python tools (PyYAML, jsonschema, pika)"
python3 -m pip install -q --disable-pip-version-check -r docs/requirements.txt -r examples/requirements.txt

echo "== RabbitMQ topology (deploy/rabbitmq/definitions.json)"
REQUIRE_BEHAVIOUR=1 bash deploy/rabbitmq/import_test.sh

echo "== AsyncAPI document and examples"
python3 docs/validate_asyncapi.py

echo "== Python example consumer"
python3 docs/check_consumer_example.py

echo "all checks passed"
