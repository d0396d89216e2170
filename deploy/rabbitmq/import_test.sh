#!/usr/bin/env bash
# Import deploy/rabbitmq/definitions.json into a throwaway virtual host of the
# local RabbitMQ node and check that everything was declared as intended.
#
#   bash deploy/rabbitmq/import_test.sh
#
# Needs rabbitmqctl (run as a user that may talk to the node) and python3.
# If the Python package pika is installed it also publishes through the
# imported topology (routing, alternate exchange, dead-lettering, overflow)
# with deploy/rabbitmq/topology_behaviour.py; AMQP_URL_BASE (default
# amqp://guest:guest@127.0.0.1:5672) says where. Set REQUIRE_BEHAVIOUR=1 to
# fail instead of skipping that part when pika is missing.
#
# The broker is left as it was: the virtual host is deleted on exit, and the
# definitions' users are never imported (rabbitmqctl 3.x import_definitions
# has no --vhost option, so the file is rewritten: every "/" becomes the
# throwaway vhost, the users list is dropped and permissions are kept only for
# users that already exist).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
defs="${1:-$here/definitions.json}"
vhost="ocrolus-relay-import-test-$(date +%s)-$$-$RANDOM"
work="$(mktemp -d)"
created=0

cleanup() {
    local rc=$?
    if [ "$created" = 1 ]; then
        rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 \
            || echo "WARNING: could not delete vhost $vhost" >&2
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT INT TERM

command -v rabbitmqctl >/dev/null || { echo "FAIL: rabbitmqctl not found" >&2; exit 1; }
rabbitmqctl -q status >/dev/null 2>&1 || { echo "FAIL: RabbitMQ node not reachable with rabbitmqctl" >&2; exit 1; }

rabbitmqctl -q list_users -s --formatter json >"$work/users.json"

python3 - "$defs" "$vhost" "$work/users.json" "$work/import.json" <<'EOF'
import json, sys
src, vhost, users_file, out = sys.argv[1:]
d = json.load(open(src))
existing = {u["user"] for u in json.load(open(users_file))}
for key in ("vhosts",):
    assert [v["name"] for v in d.get(key, [])] == ["/"], f"expected exactly vhost '/', got {d.get(key)}"
d.pop("users", None)
d["vhosts"] = [{"name": vhost}]
d["permissions"] = [p for p in d.get("permissions", []) if p["user"] in existing]
for section in ("permissions", "topic_permissions", "parameters", "policies", "queues", "exchanges", "bindings"):
    for item in d.get(section, []):
        assert item.get("vhost") == "/", f"{section} item not in vhost '/': {item}"
        item["vhost"] = vhost
json.dump(d, open(out, "w"), indent=2)
EOF

rabbitmqctl -q add_vhost "$vhost" >/dev/null
created=1
echo "importing $defs into throwaway vhost $vhost"
# Fed on standard input: the CLI may run as the rabbitmq user, who cannot
# read this private temporary directory.
rabbitmqctl -q import_definitions --format json <"$work/import.json" >/dev/null

rabbitmqctl -q list_exchanges -p "$vhost" name type durable auto_delete internal arguments --formatter json >"$work/exchanges.json"
rabbitmqctl -q list_queues -p "$vhost" name durable auto_delete arguments policy type --formatter json >"$work/queues.json"
rabbitmqctl -q list_bindings -p "$vhost" source_name source_kind destination_name destination_kind routing_key arguments --formatter json >"$work/bindings.json"
rabbitmqctl -q list_policies -p "$vhost" --formatter json >"$work/policies.json"
rabbitmqctl -q list_permissions -p "$vhost" --formatter json >"$work/permissions.json"

python3 - "$defs" "$work" <<'EOF'
import json, sys
from pathlib import Path

defs = json.load(open(sys.argv[1]))
work = Path(sys.argv[2])
load = lambda name: json.loads((work / name).read_text() or "[]")
passed = failed = 0

def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}" + (f": {detail}" if detail else ""))

def args(a):
    """rabbitmqctl prints arguments as [[key, type, value], ...] or as a map."""
    if isinstance(a, dict):
        return a
    out = {}
    for item in a or []:
        if isinstance(item, list) and len(item) == 3:
            out[item[0]] = item[2]
        elif isinstance(item, list) and len(item) == 2:
            out[item[0]] = item[1]
        else:
            raise ValueError(f"unexpected argument format: {a!r}")
    return out

# 1. What the file must contain (the deployment contract), independent of the broker.
AE = {"alternate-exchange": "ocrolus.events.unrouted"}
want_exchanges = {
    "ocrolus.events": ("topic", AE),
    "ocrolus.events.unrouted": ("fanout", {}),
    "ocrolus.events.dead": ("fanout", {}),
    "ocrolus.dlx": ("topic", {}),
}
example_args = {"x-queue-type": "quorum", "x-dead-letter-exchange": "ocrolus.dlx"}
want_queues = {
    # The relay declares this one itself (durable, no arguments): any
    # argument here would make its declare fail with PRECONDITION_FAILED.
    "ocrolus.events.unrouted": {},
    # The relay's dead-letter queue for events RabbitMQ keeps refusing;
    # declared by the relay too, so no arguments either.
    "ocrolus.events.dead": {},
    "ocrolus.dead-letter": None,
    "ocrolus.unclassified": {"x-queue-type": "quorum"},
    "documents": example_args,
    "book-verified": example_args,
    "book-analytics": example_args,
}
want_bindings = {
    ("ocrolus.events.unrouted", "ocrolus.events.unrouted", ""),
    ("ocrolus.events.dead", "ocrolus.events.dead", ""),
    ("ocrolus.dlx", "ocrolus.dead-letter", "#"),
    ("ocrolus.events", "ocrolus.unclassified", "ocrolus.unclassified"),
    ("ocrolus.events", "documents", "document.#"),
    ("ocrolus.events", "book-verified", "book.verified"),
    ("ocrolus.events", "book-analytics", "book.analytics_completed"),
    ("ocrolus.events", "book-analytics", "book.analytics_v2.generated"),
}
fx = {e["name"]: e for e in defs["exchanges"]}
for name, (typ, a) in want_exchanges.items():
    e = fx.get(name)
    check(e is not None and e["type"] == typ and e["durable"] is True and e["auto_delete"] is False
          and e.get("internal", False) is False and e.get("arguments", {}) == a,
          f"definitions.json: exchange {name} {typ} durable args {a}", str(e))
fq = {q["name"]: q for q in defs["queues"]}
for name, a in want_queues.items():
    q = fq.get(name)
    ok = q is not None and q["durable"] is True and q["auto_delete"] is False
    if ok and a is not None:
        ok = (q["arguments"] == a) if a == {} else all(q["arguments"].get(k) == v for k, v in a.items())
    check(ok, f"definitions.json: durable queue {name}", str(q))
for name in ("documents", "book-verified", "book-analytics"):
    check(isinstance(fq.get(name, {}).get("arguments", {}).get("x-delivery-limit"), int),
          f"definitions.json: {name} has an integer x-delivery-limit")
fb = {(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]}
check(fb == want_bindings, "definitions.json: bindings", f"extra {fb - want_bindings}, missing {want_bindings - fb}")
# Topic wildcards are whole words: a '*' or '#' inside a word is a literal.
bad = [k for _, _, k in fb if any(("*" in w or "#" in w) and w not in ("*", "#") for w in k.split("."))]
check(not bad, "definitions.json: no in-word pseudo-wildcards (e.g. book.analytics_*) in binding keys", str(bad))
fp = {p["name"]: p for p in defs["policies"]}
pol = [p for p in defs["policies"] if p["pattern"] == "^ocrolus\\.events\\.unrouted$"]
check(len(pol) == 1 and pol[0]["apply-to"] == "queues"
      and pol[0]["definition"].get("overflow") == "reject-publish"
      and isinstance(pol[0]["definition"].get("max-length"), int)
      and pol[0]["definition"].get("message-ttl") == 14 * 24 * 3600 * 1000,
      "definitions.json: policy on ocrolus.events.unrouted (max-length, 14-day TTL, reject-publish)", str(pol))

# 2. What the broker now holds equals the file.
bx = {e["name"]: e for e in load("exchanges.json")}
for name, e in fx.items():
    b = bx.get(name)
    check(b is not None and b["type"] == e["type"] and b["durable"] == e["durable"]
          and b["auto_delete"] == e["auto_delete"] and b["internal"] == e.get("internal", False)
          and args(b["arguments"]) == e.get("arguments", {}),
          f"broker: exchange {name}", str(b))
bq = {q["name"]: q for q in load("queues.json")}
check(set(bq) == set(fq), "broker: exactly the queues of the file", f"{sorted(bq)} vs {sorted(fq)}")
for name, q in fq.items():
    b = bq.get(name)
    want_type = q["arguments"].get("x-queue-type", "classic")
    check(b is not None and b["durable"] == q["durable"] and b["auto_delete"] == q["auto_delete"]
          and args(b["arguments"]) == q["arguments"] and b.get("type") == want_type,
          f"broker: queue {name} ({want_type})", str(b))
for p in defs["policies"]:
    import re
    for name in fq:
        if re.search(p["pattern"], name):
            check(bq.get(name, {}).get("policy") == p["name"], f"broker: policy {p['name']} applies to {name}",
                  str(bq.get(name)))
bb = {(b["source_name"], b["destination_name"], b["routing_key"])
      for b in load("bindings.json") if b["source_name"] != ""}   # skip default-exchange bindings
check(bb == fb, "broker: bindings equal the file", f"extra {bb - fb}, missing {fb - bb}")
bp = {p["name"]: p for p in load("policies.json")}
for name, p in fp.items():
    b = bp.get(name)
    d = b and (json.loads(b["definition"]) if isinstance(b["definition"], str) else b["definition"])
    check(b is not None and b["pattern"] == p["pattern"] and b["apply-to"] == p["apply-to"]
          and int(b["priority"]) == p["priority"] and d == p["definition"],
          f"broker: policy {name}", str(b))
perms = load("permissions.json")
check(len(perms) == len([p for p in json.load(open(work / "import.json"))["permissions"]]),
      "broker: permissions imported", str(perms))

print(f"definitions: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
EOF

if python3 -c 'import pika' 2>/dev/null; then
    python3 "$here/topology_behaviour.py" --vhost "$vhost" --amqp-url-base "${AMQP_URL_BASE:-amqp://guest:guest@127.0.0.1:5672}"
elif [ "${REQUIRE_BEHAVIOUR:-0}" = 1 ]; then
    echo "FAIL: pika is not installed (pip install pika) and REQUIRE_BEHAVIOUR=1" >&2
    exit 1
else
    echo "skipped: publishing through the topology (pip install pika to run it)"
fi
echo "OK: definitions import cleanly and declare the intended topology"
