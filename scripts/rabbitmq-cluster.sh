#!/usr/bin/env bash
# A three-node RabbitMQ cluster on 127.0.0.1 for tests/cluster.rs and for
# trying the relay against a cluster locally (no Docker needed).
#
#   scripts/rabbitmq-cluster.sh start        start (no-op when already up;
#                                            restarts a stopped or killed node)
#   scripts/rabbitmq-cluster.sh stop         stop every node, remove the data
#   scripts/rabbitmq-cluster.sh status       exit 0 when all three nodes run
#   scripts/rabbitmq-cluster.sh env          print the variables tests read
#   scripts/rabbitmq-cluster.sh ctl N ARGS   rabbitmqctl against node N (1-3)
#   scripts/rabbitmq-cluster.sh pid N        OS pid of node N's Erlang VM
#
# Nodes relay-c1..3@localhost listen for AMQP on 127.0.0.1:5681-5683 and for
# Erlang distribution on 127.0.0.1:25681-25683; relay-c1 also has an amqps
# listener on 127.0.0.1:5691 that demands a client certificate (mutual TLS).
# The script makes a fresh CA per cluster with openssl and leaves its key in
# $RELAY_CLUSTER_DIR/tls so that tests sign their own client certificates.
#
# The single node on 127.0.0.1:5672 (rabbit@localhost) that the other tests
# use is never addressed: every rabbitmqctl call here names its node with -n,
# and the cluster has its own Erlang cookie, so a call that reached the wrong
# node would be refused rather than act on it.
set -euo pipefail

DIR="${RELAY_CLUSTER_DIR:-/tmp/ocrolus-relay-cluster}"
NODES=(1 2 3)
RMQ_BIN=/usr/lib/rabbitmq/bin
RUN_AS=rabbitmq
TLS_PORT=5691

node_name() { echo "relay-c$1@localhost"; }
amqp_port() { echo $((5680 + $1)); }
dist_port() { echo $((25680 + $1)); }

# Runs a RabbitMQ tool as the rabbitmq user with node N's environment only
# (never the system-wide /etc/rabbitmq/rabbitmq-env.conf).
as_node() {
  local n=$1
  shift
  runuser -u "$RUN_AS" -- env -i \
    PATH=/usr/bin:/bin:/usr/sbin:/sbin \
    HOME="$DIR/home" \
    LANG=C.UTF-8 \
    RABBITMQ_CONF_ENV_FILE="$DIR/node$n/rabbitmq-env.conf" \
    RABBITMQ_NODENAME="$(node_name "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
    RABBITMQ_DIST_PORT="$(dist_port "$n")" \
    RABBITMQ_MNESIA_BASE="$DIR/node$n/mnesia" \
    RABBITMQ_LOG_BASE="$DIR/node$n/log" \
    RABBITMQ_PID_FILE="$DIR/node$n/pid" \
    RABBITMQ_CONFIG_FILE="$DIR/node$n/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/node$n/enabled_plugins" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    "$@"
}

ctl() {
  local n=$1
  shift
  as_node "$n" "$RMQ_BIN/rabbitmqctl" -q -n "$(node_name "$n")" "$@"
}

vm_running() { ctl "$1" ping >/dev/null 2>&1; }

app_running() {
  ctl "$1" eval 'rabbit:is_running().' 2>/dev/null | grep -qx true
}

# True when all three nodes run the rabbit app and see each other.
healthy() {
  local n
  for n in "${NODES[@]}"; do
    app_running "$n" || return 1
  done
  local running
  running=$(ctl 1 eval 'length(rabbit_nodes:all_running()).' 2>/dev/null || true)
  [ "$running" = "3" ]
}

write_tls() {
  local t="$DIR/tls"
  mkdir -p "$t"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=ocrolus-relay test cluster CA" \
    -keyout "$t/ca.key" -out "$t/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$t/server.key" -out "$t/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$t/server.ext"
  openssl x509 -req -in "$t/server.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
    -days 2 -extfile "$t/server.ext" -out "$t/server.pem" 2>/dev/null
  chmod 0644 "$t"/*
}

write_node() {
  local n=$1 d="$DIR/node$1"
  mkdir -p "$d/mnesia" "$d/log"
  : >"$d/rabbitmq-env.conf"
  echo '[].' >"$d/enabled_plugins"
  {
    echo "listeners.tcp.default = 127.0.0.1:$(amqp_port "$n")"
    # The tests' publish load stays far below these; the defaults would let a
    # shared CI machine's disk or memory pressure block the cluster.
    echo "disk_free_limit.absolute = 50MB"
    echo "vm_memory_high_watermark.relative = 0.4"
    echo "log.file.level = info"
    if [ "$n" = 1 ]; then
      echo "listeners.ssl.default = 127.0.0.1:$TLS_PORT"
      echo "ssl_options.cacertfile = $DIR/tls/ca.pem"
      echo "ssl_options.certfile = $DIR/tls/server.pem"
      echo "ssl_options.keyfile = $DIR/tls/server.key"
      echo "ssl_options.verify = verify_peer"
      echo "ssl_options.fail_if_no_peer_cert = true"
    fi
  } >"$d/rabbitmq.conf"
}

# 9>&-: scripts/test.sh holds the cluster's lock on fd 9; a node that
# inherited it would hold the lock for as long as it runs.
start_vm() {
  as_node "$1" "$RMQ_BIN/rabbitmq-server" -detached >/dev/null 2>&1 9>&-
}

# A freshly started VM registers with epmd only after a few seconds; until
# then await_startup fails at once instead of waiting.
await_node() {
  local _
  for _ in $(seq 1 120); do
    vm_running "$1" && break
    sleep 1
  done
  ctl "$1" await_startup --timeout 120 >/dev/null
}

do_env() {
  echo "RELAY_CLUSTER_DIR=$DIR"
  echo "RELAY_CLUSTER_URLS=amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f"
  echo "RELAY_CLUSTER_TLS_URL=amqps://guest:guest@localhost:$TLS_PORT/%2f"
  echo "RELAY_CLUSTER_CA=$DIR/tls/ca.pem"
  echo "RELAY_CLUSTER_CA_KEY=$DIR/tls/ca.key"
}

do_start() {
  local t0 n
  t0=${EPOCHREALTIME/./}
  if [ -f "$DIR/formed" ] && healthy; then
    echo "cluster: already running (relay-c1..3@localhost on 127.0.0.1:5681-5683)"
    return 0
  fi
  if [ -f "$DIR/formed" ]; then
    # A node a test stopped (stop_app) or killed: bring it back with its
    # data; it rejoins the cluster it belongs to. In parallel: after the
    # whole cluster stopped, each node waits for the others to come back.
    local started=()
    for n in "${NODES[@]}"; do
      if ! vm_running "$n"; then
        echo "cluster: starting node $(node_name "$n")"
        start_vm "$n"
        started+=("$n")
      fi
    done
    for n in "${started[@]}"; do
      await_node "$n" &
    done
    wait
    for n in "${NODES[@]}"; do
      if ! app_running "$n"; then
        echo "cluster: start_app on $(node_name "$n")"
        ctl "$n" start_app >/dev/null 2>&1 &
      fi
    done
    wait
  else
    for n in "${NODES[@]}"; do
      if vm_running "$n"; then
        echo "cluster: a half-made cluster is running; stop it first (stop)" >&2
        return 1
      fi
    done
    rm -rf "$DIR"
    mkdir -p "$DIR/home"
    head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DIR/home/.erlang.cookie"
    write_tls
    for n in "${NODES[@]}"; do write_node "$n"; done
    chown -R "$RUN_AS:$RUN_AS" "$DIR"
    chmod 0400 "$DIR/home/.erlang.cookie"
    for n in "${NODES[@]}"; do start_vm "$n"; done
    for n in "${NODES[@]}"; do await_node "$n"; done
    for n in 2 3; do
      ctl "$n" stop_app >/dev/null
      ctl "$n" join_cluster "$(node_name 1)" >/dev/null
      # start_app logs harmless errors about peers' tables while it joins.
      ctl "$n" start_app >/dev/null 2>&1
    done
    touch "$DIR/formed"
  fi
  for _ in $(seq 1 60); do
    healthy && break
    sleep 1
  done
  if ! healthy; then
    echo "cluster: did not form; logs in $DIR/node*/log" >&2
    return 1
  fi
  local ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
  echo "cluster: up in $((ms / 1000)).$((ms % 1000 / 100)) s" \
    "(relay-c1..3@localhost on 127.0.0.1:5681-5683, amqps on $TLS_PORT)"
}

do_stop() {
  local n pid
  [ -d "$DIR" ] || { echo "cluster: not running"; return 0; }
  for n in "${NODES[@]}"; do
    if vm_running "$n"; then
      ctl "$n" shutdown >/dev/null 2>&1 || true
    fi
  done
  # A VM that did not answer (or shut down) is killed by its own pid.
  for n in "${NODES[@]}"; do
    pid=$(cat "$DIR/node$n/pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  for _ in $(seq 1 30); do
    pgrep -f -- "$DIR/node" >/dev/null || break
    sleep 1
  done
  if pgrep -f -- "$DIR/node" >/dev/null; then
    echo "cluster: processes still running:" >&2
    pgrep -af -- "$DIR/node" >&2
    return 1
  fi
  rm -rf "$DIR"
  echo "cluster: stopped, nothing left running"
}

do_status() {
  local n ok=0
  for n in "${NODES[@]}"; do
    if app_running "$n"; then
      echo "$(node_name "$n"): running (127.0.0.1:$(amqp_port "$n"))"
    elif vm_running "$n"; then
      echo "$(node_name "$n"): VM up, rabbit app stopped"
      ok=1
    else
      echo "$(node_name "$n"): down"
      ok=1
    fi
  done
  return $ok
}

case "${1:-}" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  env) do_env ;;
  ctl)
    shift
    ctl "$@"
    ;;
  pid)
    cat "$DIR/node$2/pid"
    ;;
  *)
    echo "usage: $0 start|stop|status|env|ctl N ARGS|pid N" >&2
    exit 2
    ;;
esac
