#!/usr/bin/env bash
# Stop exactly the processes up.sh started, by recorded PID (never by name); keep logs.
set -uo pipefail
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"
[ -d "$PIDS" ] || { echo "[testbed] nothing to stop"; exit 0; }
# Dependents first: Argo CD and Prometheus (addons.sh), operators, node simulators (and
# their agents), then KWOK, schedulers, controller-managers, API servers, etcd, the log store.
order=(argocd prometheus redis operator nodesim kwok kube-scheduler kube-controller-manager kube-apiserver etcd victorialogs)
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
