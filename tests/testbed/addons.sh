#!/usr/bin/env bash
# Start the test bed's add-ons beside a running test bed (tests/testbed/up.sh):
#   tests/testbed/addons.sh prometheus   prometheus-operator's ServiceMonitor CRD in ops, and a
#                                        Prometheus that discovers ops' pods (role: pod)
#   tests/testbed/addons.sh argocd       Argo CD (application-controller, repo-server,
#                                        applicationset-controller, Redis) managing ops, dev, prod
# Idempotent like up.sh; stopped by down.sh. Every listener binds 127.0.0.1 on a port
# derived from LOGPIPE_PORT_BASE (lib.sh).
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"

ops_kubectl() { cluster_env ops; "$KUBECTL" --kubeconfig "$CDIR/kubeconfig" "$@"; }

# Prometheus scrapes what the tests describe: its config only includes the files under
# prometheus/scrape/ (each test writes the scrape config it derives from the operator's
# ServiceMonitor there, then POSTs /-/reload).
up_prometheus() {
  "$here/build.sh" prometheus
  local crd; crd=$("$here/build.sh" servicemonitor-crd) || fail "cannot download prometheus-operator $PROMETHEUS_OPERATOR_VERSION"
  ops_kubectl apply --server-side --force-conflicts --field-manager logpipe-testbed -f "$crd" >/dev/null
  ops_kubectl wait --for condition=Established --timeout 60s crd/servicemonitors.monitoring.coreos.com >/dev/null
  local dir=$TESTBED/prometheus
  mkdir -p "$dir/scrape" "$dir/data"
  cat > "$dir/prometheus.yml" <<CFG
global: {scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 2s}
scrape_config_files: ["$dir/scrape/*.yaml"]
CFG
  require_port prometheus "$PROMETHEUS_PORT"
  start prometheus "$BIN/prometheus-$PROMETHEUS_VERSION" \
    --config.file "$dir/prometheus.yml" --storage.tsdb.path "$dir/data" \
    --storage.tsdb.retention.time 1d --web.listen-address "127.0.0.1:$PROMETHEUS_PORT" \
    --web.enable-lifecycle --log.level warn
  wait_for prometheus 60 curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"
  echo "http://127.0.0.1:$PROMETHEUS_PORT" > "$TESTBED/prometheus-url"
  say "prometheus: $(cat "$TESTBED/prometheus-url") (scrape configs: $dir/scrape/*.yaml, then POST /-/reload)"
}

for addon in "$@"; do
  case $addon in
    prometheus) up_prometheus ;;
    argocd) up_argocd ;;
    *) fail "unknown add-on '$addon' (prometheus argocd)" ;;
  esac
done
