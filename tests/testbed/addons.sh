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
  wait_for ops-kube-apiserver 60 ops_kubectl wait --for condition=Established --timeout 5s crd/servicemonitors.monitoring.coreos.com
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

# Argo CD outside a cluster, as its own local development runs it: one binary, one
# component per ARGOCD_BINARY_NAME, ops' API server as the management cluster (kubeconfig,
# ARGOCD_FAKE_IN_CLUSTER=true), ops, dev and prod registered as cluster Secrets. Its state
# (CRDs, argocd-cm with our LogPipeline health check, the default AppProject) is applied
# here; the tests write the git repositories (file:// URLs) and the ApplicationSets.
up_argocd() {
  command -v redis-server >/dev/null || fail "redis-server is required (apt-get install redis-server)"
  command -v git >/dev/null || fail "git is required (apt-get install git)"
  "$here/build.sh" argocd
  local dir=$TESTBED/argocd src
  mkdir -p "$dir/tmp"
  src=$(GOTOOLCHAIN=$ARGOCD_GOTOOLCHAIN go mod download -json "github.com/argoproj/argo-cd/v3@$ARGOCD_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])') || fail "cannot download argo-cd $ARGOCD_VERSION"
  for crd in application applicationset appproject; do
    ops_kubectl apply --server-side --force-conflicts --field-manager logpipe-testbed -f "$src/manifests/crds/$crd-crd.yaml" >/dev/null
  done
  local crd
  for crd in applications applicationsets appprojects; do
    wait_for ops-kube-apiserver 60 ops_kubectl wait --for condition=Established --timeout 5s "crd/$crd.argoproj.io"
  done
  argocd_state | ops_kubectl apply --server-side --force-conflicts --field-manager logpipe-testbed -f - >/dev/null

  require_port argocd-redis "$REDIS_PORT"
  start argocd-redis "$(command -v redis-server)" --bind 127.0.0.1 --port "$REDIS_PORT" \
    --save "" --appendonly no --dir "$dir"
  wait_for argocd-redis 30 redis-cli -p "$REDIS_PORT" ping

  cluster_env ops
  local kc=$CDIR/kubeconfig redis=127.0.0.1:$REDIS_PORT repo=127.0.0.1:$ARGOCD_REPO_SERVER_PORT
  local common=(--loglevel info --logformat text)
  # The repo-server runs Argo CD's git-verify-wrapper.sh (from its image) on every
  # revision, and fails the manifest with "permission denied" without it.
  mkdir -p "$dir/bin"
  install -m 0755 "$src/hack/git-verify-wrapper.sh" "$dir/bin/git-verify-wrapper.sh"
  export ARGOCD_FAKE_IN_CLUSTER=true KUBECONFIG=$kc ARGOCD_GPG_ENABLED=false TMPDIR=$dir/tmp PATH=$dir/bin:$PATH
  require_port argocd-repo-server "$ARGOCD_REPO_SERVER_PORT"
  ARGOCD_BINARY_NAME=argocd-repo-server start argocd-repo-server "$BIN/$ARGOCD_BINARY" \
    "${common[@]}" --address 127.0.0.1 --port "$ARGOCD_REPO_SERVER_PORT" --disable-tls --client-ca-path "" \
    --metrics-address 127.0.0.1 --metrics-port "$ARGOCD_REPO_SERVER_METRICS_PORT" --redis "$redis"
  wait_for argocd-repo-server 120 curl -fsS "http://127.0.0.1:$ARGOCD_REPO_SERVER_METRICS_PORT/healthz"
  # Its metrics listener is on 127.0.0.1 in our build (build.sh: no flag for it in v3.6.1).
  require_port argocd-application-controller "$ARGOCD_CONTROLLER_METRICS_PORT"
  ARGOCD_BINARY_NAME=argocd-application-controller start argocd-application-controller "$BIN/$ARGOCD_BINARY" \
    "${common[@]}" --kubeconfig "$kc" --namespace argocd --redis "$redis" \
    --repo-server "$repo" --repo-server-plaintext --metrics-port "$ARGOCD_CONTROLLER_METRICS_PORT" \
    --app-resync 30 --status-processors 4 --operation-processors 4
  wait_for argocd-application-controller 120 curl -fsS "http://127.0.0.1:$ARGOCD_CONTROLLER_METRICS_PORT/healthz"
  require_port argocd-applicationset-controller "$ARGOCD_APPSET_PROBE_PORT"
  ARGOCD_BINARY_NAME=argocd-applicationset-controller start argocd-applicationset-controller "$BIN/$ARGOCD_BINARY" \
    "${common[@]}" --kubeconfig "$kc" --namespace argocd --argocd-repo-server "$repo" --repo-server-plaintext \
    --enable-progressive-syncs --metrics-addr "127.0.0.1:$ARGOCD_APPSET_METRICS_PORT" \
    --probe-addr "127.0.0.1:$ARGOCD_APPSET_PROBE_PORT" --webhook-addr "127.0.0.1:$ARGOCD_APPSET_WEBHOOK_PORT"
  # Its probe address serves no health check in v3.6.1: its metrics answer once it runs.
  wait_for argocd-applicationset-controller 120 curl -fsS "http://127.0.0.1:$ARGOCD_APPSET_METRICS_PORT/metrics"
  echo argocd > "$TESTBED/argocd-namespace"
  say "argocd: application-controller, repo-server ($repo), applicationset-controller, redis ($redis); namespace argocd in ops"
}

# The objects Argo CD reads in its namespace: argocd-cm (our health check; short
# reconciliation, so a new commit is seen within seconds; only LogPipelines and Namespaces
# are watched in the managed clusters), the default AppProject, a cluster Secret per cluster.
argocd_state() {
  cat <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: argocd}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: argocd-cm
  namespace: argocd
  labels: {app.kubernetes.io/part-of: argocd}
data:
  timeout.reconciliation: 10s
  timeout.reconciliation.jitter: 0s
  resource.inclusions: |
    - {apiGroups: ["logpipe.io"], kinds: ["LogPipeline"], clusters: ["*"]}
    - {apiGroups: [""], kinds: ["Namespace"], clusters: ["*"]}
  resource.customizations.health.logpipe.io_LogPipeline: |
$(sed 's/^/    /' "$repo/charts/logpipe/argocd/health.lua")
---
apiVersion: v1
kind: Secret
metadata:
  name: argocd-secret
  namespace: argocd
  labels: {app.kubernetes.io/part-of: argocd}
stringData:
  server.secretkey: testbed-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
---
apiVersion: argoproj.io/v1alpha1
kind: AppProject
metadata: {name: default, namespace: argocd}
spec:
  sourceRepos: ["*"]
  destinations: [{server: "*", namespace: "*"}]
  clusterResourceWhitelist: [{group: "*", kind: "*"}]
YAML
  local c
  for c in "${KNOWN_CLUSTERS[@]}"; do
    cluster_env "$c"
    [ -f "$CDIR/pki/admin.crt" ] || continue
    local b64; b64() { base64 -w0 < "$1"; }
    cat <<YAML
---
apiVersion: v1
kind: Secret
metadata:
  name: cluster-$c
  namespace: argocd
  labels: {argocd.argoproj.io/secret-type: cluster, logpipe.io/testbed-cluster: $c}
stringData:
  name: $c
  server: https://127.0.0.1:$APISERVER_PORT
  config: '{"tlsClientConfig": {"caData": "$(b64 "$CDIR/pki/ca.crt")", "certData": "$(b64 "$CDIR/pki/admin.crt")", "keyData": "$(b64 "$CDIR/pki/admin.key")"}}'
YAML
  done
}

for addon in "$@"; do
  case $addon in
    prometheus) up_prometheus ;;
    argocd) up_argocd ;;
    *) fail "unknown add-on '$addon' (prometheus argocd)" ;;
  esac
done
