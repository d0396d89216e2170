#!/usr/bin/env bash
# Runs the README's quick start as a new user would: a fresh `git clone` of
# this repository's HEAD into a temporary directory, then every command of
# the README's "Quick start" ```sh blocks, read from README.md and run
# literally, as typed, in the clone (the relay and `tail` in the background,
# the others in order). It asserts that the relay comes up, `send-test` gets
# 200 "published", `tail` prints that event and /metrics counts the request.
#
# Needs RabbitMQ on 127.0.0.1:5672 with rabbitmqctl, and 127.0.0.1:8080 and
# 127.0.0.1:9090 free: the README's commands use the --dev ports. Run from
# scripts/test.sh. What differs from a new user's shell, and why:
# - RELAY_AMQP_URL names a throwaway virtual host (deleted at exit), so the
#   relay's exchanges and the test event never touch the shared broker's "/".
#   The commands themselves are unchanged: the env twin of --amqp-url.
# - CARGO_TARGET_DIR is this checkout's target directory, so the clone does
#   not build every dependency from scratch. Only when this checkout has
#   local changes does the clone build in target/quickstart instead: the
#   clone builds HEAD, and its newer artifacts would otherwise pass for
#   builds of the changed files.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

# A new user's shell has none of the relay's environment twins.
while IFS= read -r name; do unset "$name"; done < <(compgen -e | grep '^RELAY_' || true)

fail() { echo "quickstart-test: FAIL: $*" >&2; exit 1; }
say() { echo "quickstart-test: $*"; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 8080 9090; do
  if listening "$port"; then
    fail "127.0.0.1:$port is in use (see \`ss -ltnp 'sport = :$port'\`); the README's quick start serves on 127.0.0.1:8080 and 127.0.0.1:9090, stop what holds the port and run again"
  fi
done
command -v rabbitmqctl >/dev/null || fail "rabbitmqctl not found (the test runs in a throwaway virtual host)"

# The commands: every non-empty line of the ```sh blocks of "## Quick start".
mapfile -t COMMANDS < <(awk '
  /^## / { in_section = ($0 ~ /^## Quick start/); next }
  in_section && /^```sh/ { in_block = 1; next }
  in_section && /^```/ { in_block = 0; next }
  in_section && in_block && NF { print }
' README.md)
[[ ${#COMMANDS[@]} -gt 0 ]] || fail "no \`\`\`sh commands under \"## Quick start\" in README.md"

WORK="$(mktemp -d)"
CLONE="$WORK/ocrolus-relay"
VHOST="ocrolus-relay-quickstart-$(date +%s)-$$"
VHOST_CREATED=0
PGIDS=()

cleanup() {
  local rc=$?
  set +e
  for pgid in "${PGIDS[@]}"; do
    kill -TERM -- "-$pgid" 2>/dev/null
  done
  for pgid in "${PGIDS[@]}"; do
    for _ in $(seq 50); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pgid" 2>/dev/null
  done
  if [[ $VHOST_CREATED == 1 ]]; then
    rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || echo "WARNING: could not delete vhost $VHOST" >&2
  fi
  if [[ $rc != 0 && -d $WORK/logs ]]; then
    for log in "$WORK"/logs/*; do
      echo "---- $(basename "$log") (last 30 lines)" >&2
      tail -n 30 "$log" >&2
    done
  fi
  rm -rf "$WORK" # the clone, its dev spool (./spool) and the logs
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ -z ${CARGO_TARGET_DIR:-} ]]; then
  if [[ -z "$(git status --porcelain)" ]]; then
    export CARGO_TARGET_DIR="$ROOT/target"
  else
    say "this checkout has local changes: building the clone in target/quickstart"
    export CARGO_TARGET_DIR="$ROOT/target/quickstart"
  fi
fi

rabbitmqctl -q add_vhost "$VHOST" >/dev/null
VHOST_CREATED=1
rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null
export RELAY_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$VHOST"

git clone -q "$ROOT" "$CLONE"
cd "$CLONE"
mkdir "$WORK/logs"

# Starts a README command in the background, in its own process group.
background() { # name command
  setsid bash -c "$2" >"$WORK/logs/$1.out" 2>"$WORK/logs/$1.err" </dev/null &
  PGIDS+=("$!")
}

# Waits until `check` succeeds while the process group of the last
# background command lives; the first `cargo run` compiles, hence the
# generous bound.
wait_for() { # what seconds check...
  local what=$1 seconds=$2 pgid=${PGIDS[-1]}
  shift 2
  for _ in $(seq $((seconds * 5))); do
    if "$@"; then return 0; fi
    kill -0 -- "-$pgid" 2>/dev/null || fail "$what: the command exited"
    sleep 0.2
  done
  fail "$what: not within ${seconds}s"
}

relay_connected() {
  curl -fsS http://127.0.0.1:9090/metrics 2>/dev/null | grep -q '^ocrolus_relay_broker_up 1$'
}
tail_bound() { grep -q 'tailing exchange' "$WORK/logs/tail.err"; }

seen=""
send_out=""
metrics_out=""
for cmd in "${COMMANDS[@]}"; do
  say "\$ $cmd"
  case "$cmd" in
    *" -- serve "*)
      background relay "$cmd"
      wait_for "relay up and connected to RabbitMQ (cargo run builds first)" 900 relay_connected
      seen+=" serve"
      ;;
    *" -- tail "*)
      background tail "$cmd"
      wait_for "tail bound its queue" 120 tail_bound
      seen+=" tail"
      ;;
    *)
      out="$(bash -c "$cmd" 2>&1)" || fail "exit $? from: $cmd"$'\n'"$out"
      printf '%s\n' "$out"
      case "$cmd" in
        *" -- send-test "*) send_out=$out; seen+=" send-test" ;;
        *"/metrics"*) metrics_out=$out; seen+=" metrics" ;;
      esac
      ;;
  esac
done

for step in serve tail send-test metrics; do
  [[ " $seen " == *" $step "* ]] || fail "the README's quick start has no $step command"
done

# The relay came up with the banner whose command is the README's.
banner_cmd="$(sed -n 's/^try: //p' "$WORK/logs/relay.err" | head -n1)"
printf '%s\n' "${COMMANDS[@]}" | sed 's/[[:space:]]*#.*$//' | grep -qxF -- "$banner_cmd" \
  || fail "the --dev banner suggests \`$banner_cmd\`, which is not a README quick-start command"

# send-test: 200 published.
grep -q '^-> 200 .*"status":"published"' <<<"$send_out" || fail "send-test did not get 200 published"
id="$(sed -n 's/^Webhook-Request-Id: //p' <<<"$send_out")"
[[ -n $id ]] || fail "send-test printed no Webhook-Request-Id"

# tail printed that very event.
tail_printed() { grep -q "\"message_id\":\"$id\"" "$WORK/logs/tail.out"; }
wait_for "tail prints event $id" 30 tail_printed
grep "\"message_id\":\"$id\"" "$WORK/logs/tail.out" | grep -q '"routing_key":"book.verified"' \
  || fail "tail printed $id without routing key book.verified"

# /metrics counted the request.
grep -q '^ocrolus_relay_requests_total{outcome="published",source="default"} 1$' <<<"$metrics_out" \
  || fail "/metrics does not show the published request"

say "ok: README quick start works in a fresh clone (relay, tail, send-test, /metrics)"
