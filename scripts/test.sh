#!/usr/bin/env bash
# Runs every test of the project: Rust unit and integration tests against the
# local RabbitMQ, the README's quick start in a fresh clone (needs
# 127.0.0.1:8080 and :9090 free), the deploy-file checks (promtool, systemd, YAML/JSON), the
# RabbitMQ topology import test and the AsyncAPI / Python consumer checks.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-rabbitmq.sh

# tests/cluster.rs stops and kills nodes of a three-node cluster on
# 127.0.0.1:5681-5683 (scripts/rabbitmq-cluster.sh), which every checkout on
# this machine shares. So its tests run in a phase of their own, under the
# cluster's lock (flock on $cluster_lock, also taken by a test run by hand):
# another run of this script waits for the lock instead of stopping nodes
# under these tests. The lock is taken and the cluster started in the
# background while Cargo builds and the other tests run; the cluster is
# stopped on every exit, failed or not, unless it was running before.
cluster_dir=${RELAY_CLUSTER_DIR:-/tmp/ocrolus-relay-cluster}
cluster_lock="$cluster_dir.lock"
cluster_log=$(mktemp)
exec 9>"$cluster_lock"
(
  if ! flock -w 3600 9; then
    echo "cluster lock $cluster_lock still held after an hour"
    exit 1
  fi
  if scripts/rabbitmq-cluster.sh status >/dev/null 2>&1 9>&-; then
    echo "== RabbitMQ cluster: already running (left running)"
  else
    touch "$cluster_log.started"
    # 9>&-: the nodes must not inherit the lock (they outlive this script).
    scripts/rabbitmq-cluster.sh start 9>&-
  fi
) >"$cluster_log" 2>&1 &
cluster_pid=$!
stop_cluster() {
  wait "$cluster_pid" 2>/dev/null || true
  if [ -e "$cluster_log.started" ]; then
    scripts/rabbitmq-cluster.sh stop 9>&-
  fi
  rm -f "$cluster_log" "$cluster_log.started"
  flock -u 9 2>/dev/null || true
}
trap stop_cluster EXIT

echo "== cargo test"
# Every broker test runs here: a missing broker fails instead of skipping.
export RELAY_TEST_REQUIRE_BROKER=1
# tests/subscribers.rs runs the example consumer's binary: build it first
# (cargo test compiles examples, but not to their plain path).
cargo build --workspace --examples --locked
cargo test --workspace --all-targets --locked -- --skip cluster_

echo "== cargo test --test cluster (three-node RabbitMQ cluster)"
if ! wait "$cluster_pid"; then
  cat "$cluster_log" >&2
  echo "RabbitMQ cluster did not start" >&2
  exit 1
fi
cat "$cluster_log"
RELAY_CLUSTER_REQUIRED=1 RELAY_CLUSTER_LOCKED=1 cargo test --locked -p ocrolus-relay --test cluster
stop_cluster
trap - EXIT

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
