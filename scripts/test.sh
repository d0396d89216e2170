#!/usr/bin/env bash
# Runs every test of the project: Rust unit and integration tests against the
# local RabbitMQ, the deploy-file checks (promtool, systemd, YAML/JSON), the
# RabbitMQ topology import test and the AsyncAPI / Python consumer checks.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-rabbitmq.sh

echo "== cargo test"
# tests/subscribers.rs runs the example consumer's binary: build it first
# (cargo test compiles examples, but not to their plain path).
cargo build --examples --locked
cargo test --all-targets --locked

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
