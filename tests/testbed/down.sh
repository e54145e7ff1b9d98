#!/usr/bin/env bash
# Stop exactly the processes up.sh started, by recorded PID (never by name); keep logs.
set -uo pipefail
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"
[ -d "$PIDS" ] || { echo "[testbed] nothing to stop"; exit 0; }
stop() {
  local name=$1 pid binary wait=10
  # The node simulator stops every agent within its pod's grace period first.
  case $name in *nodesim*) wait=90 ;; esac
  read -r pid binary < "$PIDS/$name.pid" || return
  if alive "$name"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 $((wait * 5))); do alive "$name" || break; sleep 0.2; done
    alive "$name" && kill -KILL "$pid" 2>/dev/null
    echo "[testbed] stopped $name ($pid)"
  fi
  rm -f "$PIDS/$name.pid"
}
# Dependents first: operators, node simulators (and their agents), then KWOK, schedulers,
# controller-managers, API servers, etcd, Loki.
order=(operator nodesim kwok kube-scheduler kube-controller-manager kube-apiserver etcd loki)
for kind in "${order[@]}"; do
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    case $name in *"$kind"*) stop "$name" ;; esac
  done
done
for f in "$PIDS"/*.pid; do [ -e "$f" ] && stop "$(basename "$f" .pid)"; done
if [ "${1:-}" = "--wipe" ]; then
  find "$TESTBED" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  echo "[testbed] state wiped (logs kept in $LOGS)"
fi
