#!/usr/bin/env bash
# Benchmark of ocrolus-relay against the direct-publish baseline, driving the
# relay-bench package next to this script (bench/src).
# Not part of CI. Needs RabbitMQ on 127.0.0.1:5672 (guest/guest).
#
#   bench/run.sh                # everything, < 10 minutes
#   SECTIONS="throughput latency" bench/run.sh
#   CHANNELS="1 4 8 16" SECTIONS=channels bench/run.sh   # --publish-channels sweep
#
#   SECTIONS=flood bench/run.sh                          # forged-signature flood
#   RELAY_BIN=/tmp/relay-before NO_BUILD=1 SECTIONS=throughput bench/run.sh  # A/B builds
#
#   SECTIONS=floor bench/run.sh                          # relay vs hyper+lapin alone
#
# Sections: throughput latency sizes idle tls flood floor, channels (off by
# default). floor: the relay, relay-floor (hyper + lapin publish-and-confirm,
# nothing else) and relay-floor --no-publish (hyper alone) under the same
# load, interleaved, REPS rounds per concurrency: relay - floor is the CPU
# the relay's own code costs per request.
# idle: 10,000 idle connections on a fresh relay each, plaintext and TLS,
# after one delivery and with no request (IDLE_CONNS; the relay gets
# --max-connections IDLE_CONNS+1000 and needs as many descriptors).
# Results: one JSON line per run in $OUT/results.jsonl plus a summary.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

SECTIONS="${SECTIONS:-throughput latency sizes idle tls flood floor}"
AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
PORT="${PORT:-18443}"
ADMIN_PORT="${ADMIN_PORT:-19090}"
REQUESTS="${REQUESTS:-20000}"       # per throughput run
REPS="${REPS:-2}"                   # baseline/relay pairs per concurrency
CONCURRENCY="${CONCURRENCY:-64 256}"
CHANNELS="${CHANNELS:-1 4 8 16}"
IDLE_CONNS="${IDLE_CONNS:-10000}"
FLOOD_CONNS="${FLOOD_CONNS:-64}"            # flood connections at once
RATE_PER_IP=10000000                        # the flood section lowers it for one run
PUBLISH_CHANNELS="${PUBLISH_CHANNELS:-}"   # empty = the relay's default
RELAY_LOG_FILTER="${RELAY_LOG_FILTER:-}"   # e.g. warn, to measure logging cost
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$CARGO_TARGET_DIR/release"
# Another relay binary (a copy of an earlier build) for A/B runs.
RELAY_BIN="${RELAY_BIN:-$BIN/ocrolus-relay}"
RUN_ID="bench.$(date +%s).$$"
EXCHANGE="$RUN_ID"
QUEUE="$RUN_ID.q"
OUT="${OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)}"
TMP="$(mktemp -d)"
RESULTS="$OUT/results.jsonl"
RELAY_PID=""
FLOOR_PIDS=()
mkdir -p "$OUT"

# 10,000 idle connections need 10,000 descriptors on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log() { printf '\n== %s\n' "$*" >&2; }

cleanup() {
  set +e
  stop_relay
  for pid in "${FLOOR_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  if [[ -x "$BIN/relay-bench" ]]; then
    "$BIN/relay-bench" teardown --amqp-url "$AMQP_URL" --exchange "$EXCHANGE" --queue "$QUEUE" 2>/dev/null
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ -z "${NO_BUILD:-}" ]]; then # NO_BUILD=1: use the binaries as they are
  log "build (release, once)"
  nice -n 10 cargo build --release --workspace --bins --quiet
fi

BENCH=(timeout 120 "$BIN/relay-bench")
BROKER_PID="$(pgrep -o beam.smp || true)" # for CPU accounting only
BROKER=()
[[ -n "$BROKER_PID" ]] && BROKER=(--broker-pid "$BROKER_PID")
topo=(--amqp-url "$AMQP_URL" --exchange "$EXCHANGE" --queue "$QUEUE")
"${BENCH[@]}" setup "${topo[@]}"
purge() { "${BENCH[@]}" purge "${topo[@]}" 2>/dev/null || true; }

# 32-character HMAC secret, allowlist of loopback only.
head -c 24 /dev/urandom | base64 | tr -d '\n/+=' | head -c 32 > "$TMP/secret"
echo >> "$TMP/secret"
cat > "$TMP/allowlist.yaml" <<'EOF'
allow:
  - 127.0.0.1/32 # the load generator
  - 127.0.0.2/32 # the flood section's genuine deliveries
trusted_proxies: []
EOF

URL="http://127.0.0.1:$PORT/webhooks/ocrolus"
TLS_URL="https://127.0.0.1:$PORT/webhooks/ocrolus"
TRANSPORT=(--plaintext) # the TLS cases swap in --tls-cert/--tls-key

# A throwaway CA and a leaf for 127.0.0.1 (webpki refuses a CA as leaf), made
# once with the openssl CLI; fails when there is no openssl.
make_tls_files() {
  [[ -f "$TMP/cert.pem" ]] && return 0
  command -v openssl >/dev/null || return 1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=relay-bench-ca -keyout "$TMP/ca-key.pem" -out "$TMP/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$TMP/key.pem" -out "$TMP/leaf.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' \
    > "$TMP/leaf.ext"
  openssl x509 -req -in "$TMP/leaf.csr" -CA "$TMP/ca.pem" -CAkey "$TMP/ca-key.pem" \
    -CAcreateserial -days 1 -extfile "$TMP/leaf.ext" -out "$TMP/cert.pem" 2>/dev/null
}

start_relay() { # extra serve flags...
  stop_relay
  rm -rf "$TMP/spool"
  local filter=()
  [[ -n "$RELAY_LOG_FILTER" ]] && filter=(env "RUST_LOG=$RELAY_LOG_FILTER")
  local channels=()
  [[ -n "$PUBLISH_CHANNELS" ]] && channels=(--publish-channels "$PUBLISH_CHANNELS")
  "${filter[@]}" "$RELAY_BIN" serve "${TRANSPORT[@]}" \
    --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
    --allowlist "$TMP/allowlist.yaml" --secret-file "$TMP/secret" \
    --amqp-url "$AMQP_URL" --exchange "$EXCHANGE" --alternate-exchange '' --dead-letter-exchange '' \
    --spool-dir "$TMP/spool" \
    --rate-limit-per-ip "$RATE_PER_IP" --rate-limit-global 10000000 \
    --max-in-flight 100000 --max-connections $((IDLE_CONNS + 1000)) \
    --max-connections-per-ip $((IDLE_CONNS + 1000)) \
    --header-timeout 120 "${channels[@]}" "$@" \
    >> "$OUT/relay.log" 2>&1 &
  RELAY_PID=$!
  for _ in $(seq 100); do
    if curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$RELAY_PID" 2>/dev/null || { tail -20 "$OUT/relay.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "relay did not become ready" >&2
  exit 1
}

stop_relay() {
  if [[ -n "$RELAY_PID" ]] && kill -0 "$RELAY_PID" 2>/dev/null; then
    kill -TERM "$RELAY_PID"
    for _ in $(seq 50); do kill -0 "$RELAY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$RELAY_PID" 2>/dev/null || true
    wait "$RELAY_PID" 2>/dev/null || true
  fi
  RELAY_PID=""
}

run_relay() { # label url extra-args...
  run_load "$RELAY_PID" "$@"
}

run_load() { # server-pid label url extra-args...
  local pid=$1 label=$2 url=$3; shift 3
  "${BENCH[@]}" relay --url "$url" --secret-file "$TMP/secret" \
    --relay-pid "$pid" "${BROKER[@]}" --label "$label" --json-out "$RESULTS" "$@" >/dev/null
  purge
}

start_floor() { # port extra-flags...; sets FLOOR_PID
  local port=$1; shift
  "$BIN/relay-floor" --listen "127.0.0.1:$port" --amqp-url "$AMQP_URL" \
    --exchange "$EXCHANGE" --channels "${PUBLISH_CHANNELS:-4}" "$@" >> "$OUT/floor.log" 2>&1 &
  FLOOR_PID=$!
  FLOOR_PIDS+=("$FLOOR_PID")
  for _ in $(seq 100); do
    if curl -fsS -o /dev/null -X POST "http://127.0.0.1:$port/" -d '{}' 2>/dev/null; then
      purge
      return 0
    fi
    sleep 0.1
  done
  echo "relay-floor did not start" >&2
  exit 1
}

run_baseline() { # label extra-args...
  local label=$1; shift
  "${BENCH[@]}" baseline --amqp-url "$AMQP_URL" --exchange "$EXCHANGE" \
    --channels "${PUBLISH_CHANNELS:-4}" "${BROKER[@]}" --label "$label" --json-out "$RESULTS" "$@" >/dev/null
  purge
}

has() { [[ " $SECTIONS " == *" $1 "* ]]; }

# Median throughput of the runs with this mode and label.
median_rps() {
  jq -s --arg m "$1" --arg l "$2" \
    '[.[] | select(.mode==$m and .label==$l) | .throughput_rps] | sort | if length==0 then 0 else .[(length/2|floor)] end' \
    "$RESULTS"
}

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
  echo "rabbitmq: $(rabbitmqctl version 2>/dev/null || echo unknown)"
  echo "rustc: $(rustc --version)"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt" >&2

start_relay

if has throughput; then
  for c in $CONCURRENCY; do
    for rep in $(seq "$REPS"); do
      log "throughput c=$c 1 KiB, pair $rep"
      run_baseline "tp-c$c" --concurrency "$c" --requests "$REQUESTS" --duration 30
      run_relay "tp-c$c" "$URL" --concurrency "$c" --requests "$REQUESTS" --duration 30
    done
  done
fi

if has latency; then
  max=$(median_rps relay tp-c64)
  base=$(median_rps baseline tp-c64)
  if [[ "$max" == 0 ]]; then max=2000; fi
  # Half of the slower of the two maxima, so both run at partial load.
  rate=$(jq -n --argjson a "$max" --argjson b "${base:-0}" '[$a, (if $b > 0 then $b else $a end)] | min / 2 | floor')
  n=$((rate * 10))
  log "latency at $rate req/s (half max), 64 connections, 10 s each"
  run_baseline "lat-half" --concurrency 64 --rate "$rate" --requests "$n" --duration 15
  run_relay "lat-half" "$URL" --concurrency 64 --rate "$rate" --requests "$n" --duration 15
fi

if has sizes; then
  for size in 1024:10000 65536:3000 1048576:300; do
    bytes=${size%%:*} n=${size##*:}
    log "body size $bytes B, 16 senders, $n requests"
    run_baseline "size-$bytes" --concurrency 16 --body-size "$bytes" --requests "$n" --warmup 50 --duration 30
    run_relay "size-$bytes" "$URL" --concurrency 16 --body-size "$bytes" --requests "$n" --warmup 50 --duration 30
  done
fi

if has idle; then
  # Each case on a fresh process, so RSS is not inflated by the runs before.
  # KiB per connection = (RSS holding - RSS before) / connections still open.
  idle_case() { # label extra-idle-args...
    local label=$1; shift
    log "idle: $IDLE_CONNS connections, $label"
    start_relay
    "${BENCH[@]}" idle --secret-file "$TMP/secret" --relay-pid "$RELAY_PID" \
      --connections "$IDLE_CONNS" --hold 10 --label "$label" --json-out "$RESULTS" "$@" >/dev/null
    purge
  }
  idle_case "idle-$IDLE_CONNS" --url "$URL"
  idle_case "idle-silent-$IDLE_CONNS" --url "$URL" --no-request
  if make_tls_files; then
    TRANSPORT=(--tls-cert "$TMP/cert.pem" --tls-key "$TMP/key.pem")
    idle_case "idle-tls-$IDLE_CONNS" --url "$TLS_URL" --ca-file "$TMP/ca.pem"
    idle_case "idle-tls-silent-$IDLE_CONNS" --url "$TLS_URL" --ca-file "$TMP/ca.pem" --no-request
    TRANSPORT=(--plaintext)
  fi
  log "steady load after idle test: c=64 1 KiB, fresh relay"
  start_relay
  run_relay "steady-rss" "$URL" --concurrency 64 --requests "$REQUESTS" --duration 30
fi

if has flood; then
  # Forged signatures (64 hex zeros) from 127.0.0.1 on FLOOD_CONNS
  # connections, genuine signed deliveries at 20/s from 127.0.0.2. With the
  # rate limits out of reach every forged request is read, verified and
  # refused 401; with a per-address limit of 100/s almost all are refused
  # 429 before the body is read. Both keep the connection.
  flood() { # label
    "${BENCH[@]}" flood --url "$URL" --secret-file "$TMP/secret" --relay-pid "$RELAY_PID" \
      "${BROKER[@]}" --connections "$FLOOD_CONNS" --duration 10 --genuine-rate 20 \
      --genuine-from 127.0.0.2 --label "$1" --json-out "$RESULTS" >/dev/null
    purge
  }
  log "flood: forged signatures, 401 path, $FLOOD_CONNS connections; genuine 20/s from 127.0.0.2"
  start_relay
  flood flood-401
  log "flood: 429 path (100/s per address), $FLOOD_CONNS connections; genuine 20/s from 127.0.0.2"
  RATE_PER_IP=100 start_relay
  flood flood-429
fi

if has floor; then
  start_relay
  start_floor $((PORT + 1)); FLOOR_FULL=$FLOOR_PID
  start_floor $((PORT + 2)) --no-publish; FLOOR_HYPER=$FLOOR_PID
  for c in $CONCURRENCY; do
    for rep in $(seq "$REPS"); do
      log "floor c=$c 1 KiB, round $rep: relay, hyper+lapin, hyper alone"
      run_relay "floor-relay-c$c" "$URL" --concurrency "$c" --requests "$REQUESTS" --duration 30
      run_load "$FLOOR_FULL" "floor-lapin-c$c" "http://127.0.0.1:$((PORT + 1))/" \
        --concurrency "$c" --requests "$REQUESTS" --duration 30
      run_load "$FLOOR_HYPER" "floor-hyper-c$c" "http://127.0.0.1:$((PORT + 2))/" \
        --concurrency "$c" --requests "$REQUESTS" --duration 30
    done
  done
  kill "$FLOOR_FULL" "$FLOOR_HYPER"
fi

if has channels; then
  for ch in $CHANNELS; do
    log "--publish-channels $ch, c=256 1 KiB"
    start_relay --publish-channels "$ch"
    run_relay "channels-$ch" "$URL" --concurrency 256 --requests "$REQUESTS" --duration 30
  done
fi

if has tls; then
  if make_tls_files; then
    log "TLS: c=64 1 KiB over HTTPS (self-signed, rustls both sides)"
    # Same flags, TLS instead of plaintext.
    TRANSPORT=(--tls-cert "$TMP/cert.pem" --tls-key "$TMP/key.pem")
    start_relay
    run_relay "tls-c64" "$TLS_URL" --ca-file "$TMP/ca.pem" \
      --concurrency 64 --requests "$REQUESTS" --duration 30
    TRANSPORT=(--plaintext)
  else
    log "TLS skipped: no openssl"
  fi
fi

stop_relay

log "summary ($RESULTS)"
jq -r -s '
  def mib: if . == null then "-" else (. / 1024 * 10 | round / 10 | tostring) end;
  .[] | select(.mode != "idle" and .mode != "flood") |
  [.mode, .label, (.concurrency|tostring), (.body_size|tostring),
   (.throughput_rps|round|tostring),
   (.latency_us.p50|tostring), (.latency_us.p99|tostring), (.latency_us.p999|tostring),
   (.relay_rss.vm_hwm_kib|mib),
   ((.cpu_us_per_request // {}) | [.bench, .relay, .broker] | map(if . == null then "-" else tostring end) | join("/")),
   ((.outcomes|to_entries|map("\(.key)=\(.value)")|join(",")))] | @tsv' \
  "$RESULTS" | column -t -N mode,label,conc,body,req/s,p50us,p99us,p999us,rssMiB,cpu_us/req:bench/relay/broker,outcomes >&2 || true
jq -r -s '.[] | select(.mode == "idle") |
  "\(.label): \(.opened) conns (\(.still_open_after_hold) open after hold): relay RSS \(.relay_rss_before_kib/1024|floor) -> \(.relay_rss_holding_kib/1024|floor) MiB, \(.kib_per_connection) KiB/conn, peak \(.relay_rss.vm_hwm_kib/1024|floor) MiB"' \
  "$RESULTS" >&2 || true
jq -r -s '.[] | select(.mode == "flood") |
  "\(.label): \(.throughput_rps|round) rejected req/s \(.outcomes), relay CPU \(.cpu_us_per_request.relay) us/rejected; genuine \(.genuine.ok)/\(.genuine.sent) ok, p99 \(.genuine.latency_us.p99) us"' \
  "$RESULTS" >&2 || true
for c in $CONCURRENCY; do
  r=$(median_rps relay "tp-c$c"); b=$(median_rps baseline "tp-c$c")
  jq -rn --argjson r "$r" --argjson b "$b" --arg c "$c" \
    'if $b > 0 then "ratio c=\($c): relay \($r|round) / baseline \($b|round) = \($r / $b * 1000 | round / 1000) (target >= 0.9)" else empty end' >&2
done
for c in $CONCURRENCY; do
  jq -r -s --arg c "$c" '
    def med: sort | if length == 0 then null else .[(length/2|floor)] end;
    def cpu($l): [.[] | select(.label == $l) | .cpu_us_per_request.relay] | med;
    (cpu("floor-relay-c\($c)")) as $r | (cpu("floor-lapin-c\($c)")) as $f | (cpu("floor-hyper-c\($c)")) as $h |
    if $r == null or $f == null then empty else
      "floor c=\($c): CPU us/req relay \($r), hyper+lapin \($f), hyper alone \($h); the relay'"'"'s own code \($r - $f) us" end' \
    "$RESULTS" >&2 || true
done
jq -r -s '[.[] | select(.label=="lat-half")] |
  if length == 2 then
    (map({(.mode): .latency_us.p99}) | add) as $p |
    "p99 at half max rate: relay \($p.relay) us, baseline \($p.baseline) us, difference \($p.relay - $p.baseline) us (target <= 1000)"
  else empty end' "$RESULTS" >&2 || true
echo "results: $RESULTS" >&2
