#!/usr/bin/env bash
# make demo: on the local test bed, run the operator and real agents, apply a LogPipeline,
# tell the rollout as it happens, and show the shipped logs, read back from the test bed's
# store (VictoriaLogs) with LogsQL.
# Leaves the test bed up; `make testbed-down` stops it. Exits non-zero if the story fails.
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"
cluster_env ops
STARTED=$SECONDS
say() { printf '\033[1m[demo %3ds]\033[0m %s\n' "$((SECONDS - STARTED))" "$*"; }
fail() { printf '[demo] FAILED: %s\n' "$*" >&2; exit 1; }
kc() { "$KUBECTL" --kubeconfig "$CDIR/kubeconfig" "$@"; }
STORE=$(cat "$TESTBED/store-url")
# VictoriaLogs tenants are numeric: the test bed maps the clusters ops, dev, prod to 1, 2, 3.
TENANT=1
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
DEBUG=$repo/target/debug

say "building logpipe (cargo build --bins)"
(cd "$repo" && cargo build -q --bins)

# "Publish" the agent release the operator deploys by default: the node simulator maps the
# image tag to target/testbed/images/<tag>/logpipe-agent, as a registry would serve it.
mkdir -p "$TESTBED/images/$VERSION"
# Copy, then rename: running agents keep the old file, a starting pod never sees half a file.
cp "$DEBUG/logpipe-agent" "$TESTBED/images/$VERSION/logpipe-agent.tmp"
mv "$TESTBED/images/$VERSION/logpipe-agent.tmp" "$TESTBED/images/$VERSION/logpipe-agent"
say "agent release ghcr.io/logpipe/logpipe-agent:$VERSION published to the test bed"

kc apply --server-side --force-conflicts -f "$repo/crds/" >/dev/null
# The agents' ClusterRole the chart ships: the operator only binds it.
kc apply --server-side --force-conflicts -f "$repo/charts/logpipe/files/agent-clusterrole.yaml" >/dev/null
export KUBECONFIG=$CDIR/kubeconfig  # the operator finds its cluster as kubectl does
start ops-operator "$DEBUG/logpipe-operator" run --namespace demo --log-format text
say "operator running (log: $LOGS/ops-operator.log); the node simulator runs the agents (ops-nodesim.log)"

# Workload pods (run by KWOK) whose logs the agents will ship.
kc apply --server-side -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: demo-apps}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: checkout, namespace: demo-apps}
spec:
  replicas: 5
  selector: {matchLabels: {app.kubernetes.io/name: checkout}}
  template:
    metadata: {labels: {app.kubernetes.io/name: checkout, app.kubernetes.io/component: api}}
    spec:
      containers: [{name: api, image: registry.example/checkout:1.4}]
YAML
kc -n demo-apps rollout status deploy/checkout --timeout=60s >/dev/null
say "workload: 5 checkout pods Running on the KWOK nodes"

# apply_lp RELEASE: the demo LogPipeline; RELEASE goes into a static label, so each release
# is a new revision of the agent config (a new hashed ConfigMap, a new DaemonSet revision).
apply_lp() {
  kc apply --server-side -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: logpipe.io/v1alpha1
kind: LogPipeline
metadata: {name: logpipe, namespace: demo}
spec:
  tenant: "$TENANT"   # cluster ops
  endpoint: $STORE/insert/loki/api/v1/push
  agent:
    priorityClassName: system-node-critical
    tolerations: [{operator: Exists}]
    resources:
      requests: {cpu: 250m, memory: 300Mi}
      limits: {memory: 700Mi}
    podAnnotations:
      # The test bed's node simulator, not KWOK, runs these pods: real agent processes.
      kwok.x-k8s.io/status: custom
  pipeline:
    - cri: {}
    - timestamp: {source: time, format: RFC3339}
    - labelDrop: [filename]
    - staticLabels: {release: "$1"}
  rollout:
    maxUnavailable: 1
    steps:
      - canary: {nodes: 1}
      - percent: 50
      - percent: 100
    verify:
      window: 10s
      query: {type: victorialogs, endpoint: "$STORE"}
      maxCpu: 250m
      maxMemory: 700Mi
    soak: 10s
YAML
}

# watch_until_healthy: print `kubectl get lp` whenever it changes, until Healthy.
watch_until_healthy() {
  local last="" line deadline=$((SECONDS + 300))
  while :; do
    line=$(kc -n demo get lp logpipe --no-headers -o custom-columns='PHASE:.status.phase,READY:.status.ready,MSG:.status.message' 2>/dev/null || true)
    if [ "$line" != "$last" ]; then say "kubectl get lp: $line"; last=$line; fi
    case $line in Healthy*) return ;; Degraded*) fail "the rollout went Degraded: $line" ;; esac
    alive ops-operator || { tail -5 "$LOGS/ops-operator.log" >&2; fail "the operator exited (log: $LOGS/ops-operator.log)"; }
    [ $SECONDS -lt $deadline ] || fail "not Healthy after 300 s (see $LOGS/ops-operator.log)"
    sleep 1
  done
}

"$DEBUG/logpipe-loggen" --cluster-dir "$CDIR" --namespace demo-apps --rate 5 --seconds 150 \
  --prefix demo >"$LOGS/demo-loggen.log" 2>&1 &
LOGGEN=$!
trap 'kill $LOGGEN 2>/dev/null || true' EXIT

RUN=$(date +%H%M%S)
say "release 1: install the LogPipeline demo/logpipe (tenant $TENANT, cluster ops); a first install is verified as one step"
apply_lp "1-$RUN"
watch_until_healthy
say "release 2: a pipeline change. Now it moves in phases: canary 1 node, verify, 50%, verify, 100%, verify, soak"
apply_lp "2-$RUN"
sleep 2
watch_until_healthy
kc -n demo get lp -o wide

say "verification recorded in status:"
kc -n demo get lp logpipe -o jsonpath='{range .status.lastVerification.checks[*]}  {.name}: {.value} (limit {.limit}) passed={.passed}{"\n"}{end}'

sleep 5
# logsql QUERY: the JSON lines VictoriaLogs answers, for the demo's tenant.
logsql() { curl -fsS -H "AccountID: $TENANT" -H 'ProjectID: 0' "$STORE/select/logsql/query" --data-urlencode "query=$1"; }
query='{namespace="demo-apps"} _time:10m | stats by (node_name, release) count() lines | sort by (node_name, release)'
say "LogsQL, tenant $TENANT: $query"
logsql "$query" | python3 -c 'import json,sys
rows=[json.loads(l) for l in sys.stdin if l.strip()]
[print("   ", r.get("node_name"), "release", r.get("release"), r["lines"], "lines") for r in rows]
sys.exit(0 if rows else 1)' || fail "no demo-apps logs in the store"
say "a few shipped lines with their labels:"
logsql '{namespace="demo-apps"} _time:10m | sort by (_time desc) | limit 3' | python3 -c 'import json,sys
for l in sys.stdin:
    r=json.loads(l); print("   ", r["_stream"]); print("      ", r["_msg"])'
say "done in $((SECONDS - STARTED)) s. The test bed stays up: KUBECONFIG=$CDIR/kubeconfig kubectl get lp -A"
say "stop everything with: make testbed-down"
