#!/usr/bin/env bash
# Capacity figures against the three-node test cluster
# (scripts/rabbitmq-cluster.sh): what one broker node takes as direct
# publishes with confirms into a quorum queue, what one relay replica takes,
# and how the total moves from one replica to two. BENCHMARKS.md, "Capacity
# plan", has the figures and the sizing table made from them.
#
#   scripts/rabbitmq-cluster.sh start
#   bench/capacity.sh                 # REPS=2 DURATION=20 CONCURRENCY=64
#
# The cluster's nodes are stopped by the cluster tests: hold the cluster's
# lock (/tmp/ocrolus-relay-cluster.lock) for the run. The script takes it
# unless CLUSTER_LOCKED=1 says the caller holds it already.
#
# Every configuration runs REPS times, interleaved (node 1, 2, 3, one relay,
# two relays, then again), so that a burst of load from other processes on a
# shared machine hits all of them alike; the summary gives each
# configuration's mean and its min-max spread, and the ratios of the means.
# CPU is read from /proc for the relay processes and all three broker VMs
# (µs of CPU per delivery), which transfers to other machines better than
# req/s.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

REPS="${REPS:-2}"
DURATION="${DURATION:-20}"
CONCURRENCY="${CONCURRENCY:-64}"
REQUESTS="${REQUESTS:-200000}"   # an upper bound; DURATION ends each run
PORTS=(18451 18452)
ADMIN_PORTS=(19451 19452)
NODE_URLS=(amqp://guest:guest@127.0.0.1:5681/%2f amqp://guest:guest@127.0.0.1:5682/%2f amqp://guest:guest@127.0.0.1:5683/%2f)
ALL_URLS="$(IFS=,; echo "${NODE_URLS[*]}")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$CARGO_TARGET_DIR/release"
RUN_ID="capacity.$(date +%s).$$"
EXCHANGE="$RUN_ID"
QUEUE="$RUN_ID.q"
OUT="${OUT:-$ROOT/target/bench/capacity-$(date +%Y%m%d-%H%M%S)}"
TMP="$(mktemp -d)"
RESULTS="$OUT/results.jsonl"
CPU_LOG="$OUT/cpu.tsv"
RELAY_PIDS=()
mkdir -p "$OUT"
: >"$CPU_LOG"

log() { printf '\n== %s\n' "$*" >&2; }

if [[ -z "${CLUSTER_LOCKED:-}" ]]; then
  exec 9>/tmp/ocrolus-relay-cluster.lock
  flock -w 600 9 || { echo "cluster lock busy" >&2; exit 1; }
fi
scripts/rabbitmq-cluster.sh status >/dev/null 9>&- || {
  echo "the test cluster is not running: scripts/rabbitmq-cluster.sh start" >&2
  exit 1
}

cleanup() {
  set +e
  stop_relays
  [[ -x "$BIN/relay-bench" ]] && "$BIN/relay-bench" teardown --amqp-url "${NODE_URLS[0]}" \
    --exchange "$EXCHANGE" --queue "$QUEUE" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# NO_BUILD=1 measures the release binaries already built (say which commit).
if [[ -z "${NO_BUILD:-}" ]]; then
  log "build (release)"
  nice -n 10 cargo build --release --workspace --bins --quiet
fi

BROKER_PIDS=()
for n in 1 2 3; do BROKER_PIDS+=("$(scripts/rabbitmq-cluster.sh pid "$n")"); done
BENCH=(timeout $((DURATION * 4 + 60)) "$BIN/relay-bench")
topo=(--amqp-url "${NODE_URLS[0]}" --exchange "$EXCHANGE" --queue "$QUEUE")
# The quorum queue is declared through node 1, so its leader is there.
"${BENCH[@]}" setup "${topo[@]}" --quorum
purge() { "${BENCH[@]}" purge "${topo[@]}" >/dev/null 2>&1 || true; }

head -c 24 /dev/urandom | base64 | tr -d '\n/+=' | head -c 32 >"$TMP/secret"
echo >>"$TMP/secret"
printf 'allow:\n  - 127.0.0.1/32\ntrusted_proxies: []\n' >"$TMP/allowlist.yaml"

# utime+stime of the given pids, in clock ticks.
ticks() {
  local sum=0 pid f
  for pid in "$@"; do
    f=$(cut -d')' -f2 "/proc/$pid/stat" 2>/dev/null) || continue
    set -- $f
    sum=$((sum + ${12} + ${13}))
  done
  echo "$sum"
}

start_relay() { # index
  local i=$1
  rm -rf "$TMP/spool$i"
  "$BIN/ocrolus-relay" serve --plaintext \
    --listen "127.0.0.1:${PORTS[$i]}" --admin-listen "127.0.0.1:${ADMIN_PORTS[$i]}" \
    --allowlist "$TMP/allowlist.yaml" --secret-file "$TMP/secret" \
    --amqp-url "$ALL_URLS" --exchange "$EXCHANGE" --alternate-exchange '' --dead-letter-exchange '' \
    --spool-dir "$TMP/spool$i" \
    --rate-limit-per-ip 10000000 --rate-limit-global 10000000 --max-in-flight 100000 \
    >>"$OUT/relay$i.log" 2>&1 &
  RELAY_PIDS[$i]=$!
  for _ in $(seq 200); do
    curl -fsS "http://127.0.0.1:${ADMIN_PORTS[$i]}/readyz" >/dev/null 2>&1 && return 0
    kill -0 "${RELAY_PIDS[$i]}" 2>/dev/null || { tail -20 "$OUT/relay$i.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "relay $i did not become ready" >&2
  exit 1
}

stop_relays() {
  local pid
  for pid in "${RELAY_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  RELAY_PIDS=()
}

# Runs the given bench commands at once (one per argument, each a string),
# records their results and the CPU the relays and brokers spent.
measure() { # label commands...
  local label=$1 b0 r0 b1 r1 pids=()
  shift
  purge
  b0=$(ticks "${BROKER_PIDS[@]}")
  r0=$(ticks "${RELAY_PIDS[@]}")
  for cmd in "$@"; do
    eval "${BENCH[*]} $cmd --label $label --json-out $RESULTS --duration $DURATION --requests $REQUESTS" >/dev/null 2>>"$OUT/bench.log" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  b1=$(ticks "${BROKER_PIDS[@]}")
  r1=$(ticks "${RELAY_PIDS[@]}")
  printf '%s\t%s\t%s\t%s\n' "$label" "$((b1 - b0))" "$((r1 - r0))" "$(cut -d' ' -f1 /proc/loadavg)" >>"$CPU_LOG"
}

relay_cmd() { # index concurrency
  echo "relay --url http://127.0.0.1:${PORTS[$1]}/webhooks/ocrolus --secret-file $TMP/secret --concurrency $2"
}

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "rabbitmq: $(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo unknown), 3 nodes on this machine"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt" >&2

half=$((CONCURRENCY / 2))
for rep in $(seq "$REPS"); do
  for n in 1 2 3; do
    log "rep $rep: direct publish with confirms through node $n, c=$CONCURRENCY"
    measure "node$n" "baseline --amqp-url ${NODE_URLS[$((n - 1))]} --exchange $EXCHANGE --concurrency $CONCURRENCY"
  done
  log "rep $rep: one relay replica, c=$CONCURRENCY"
  start_relay 0
  measure "relay1" "$(relay_cmd 0 "$CONCURRENCY")"
  log "rep $rep: two relay replicas, c=$half each"
  start_relay 1
  measure "relay2" "$(relay_cmd 0 "$half")" "$(relay_cmd 1 "$half")"
  stop_relays
done

log "summary ($RESULTS, $CPU_LOG)"
# req/s of a run = the sum over the bench processes of one measure() call:
# results are grouped per label in the order they were written, REPS runs
# each, and a two-replica run wrote two lines.
jq -r -s --argjson reps "$REPS" '
  group_by(.label) | .[] | .[0].label as $l |
  (if $l == "relay2" then [range(0; length; 2) as $i | .[$i].throughput_rps + .[$i + 1].throughput_rps]
   else map(.throughput_rps) end) as $rps |
  ($rps | sort) as $s |
  "\($l)\t\($s | add / length | round)\t\($s[0] | round)-\($s[-1] | round)\t\(map(.latency_us.p99) | sort | .[(length / 2 | floor)])\t\(map(.outcomes | to_entries | map("\(.key)=\(.value)") | join(",")) | unique | join(" "))"' \
  "$RESULTS" | sort >"$OUT/summary.tsv"
awk -F'\t' -v hz="$(getconf CLK_TCK)" '
  { b[$1] += $2; r[$1] += $3; n[$1]++; la[$1] = la[$1] " " $4 }
  END { for (k in b) printf "%s\t%d\t%d\t%s\n", k, b[k] * 1e6 / hz, r[k] * 1e6 / hz, la[k] }' \
  "$CPU_LOG" | sort >"$OUT/cpu-sum.tsv"
jq -r -s 'group_by(.label) | .[] | "\(.[0].label)\t\(map(.ok) | add)"' "$RESULTS" | sort >"$OUT/ok.tsv"
join -t $'\t' "$OUT/summary.tsv" "$OUT/cpu-sum.tsv" | join -t $'\t' - "$OUT/ok.tsv" |
  awk -F'\t' 'BEGIN { OFS = "\t"; print "config", "mean req/s", "min-max", "p99 us", "outcomes", "broker CPU us/req (3 nodes)", "relay CPU us/req", "load avg per run" }
    { print $1, $2, $3, $4, $5, ($9 ? int($6 / $9) : "-"), ($9 && $7 ? int($7 / $9) : "-"), $8 }' |
  tee "$OUT/table.tsv" | column -t -s $'\t' >&2
mean() { awk -F'\t' -v l="$1" '$1 == l { print $2 }' "$OUT/summary.tsv"; }
jq -rn --argjson r1 "$(mean relay1)" --argjson r2 "$(mean relay2)" --argjson n1 "$(mean node1)" \
  --argjson n2 "$(mean node2)" --argjson n3 "$(mean node3)" '
  "two replicas / one replica: \($r2 / $r1 * 100 | round / 100)",
  "one replica / direct publish through node 1: \($r1 / $n1 * 100 | round / 100)",
  "through node 2 / node 1: \($n2 / $n1 * 100 | round / 100); node 3 / node 1: \($n3 / $n1 * 100 | round / 100) (the queue leader is on node 1)"' |
  tee "$OUT/ratios.txt" >&2
echo "results: $OUT" >&2
