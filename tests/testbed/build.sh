#!/usr/bin/env bash
# Build the test bed's Go components from the Go module proxy into the cache (never the repo).
#   tests/testbed/build.sh [etcd|kube|kwok|victorialogs|otelcol|helm|argocd|prometheus ...]   (default: the core set)
#   tests/testbed/build.sh servicemonitor-crd   (prints the path of prometheus-operator's ServiceMonitor CRD)
# A binary already in the cache is reused; each component prints one progress line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${LOGPIPE_CACHE:-$HOME/.cache/logpipe}
BIN=$CACHE/bin
mkdir -p "$BIN" "$CACHE/src" "$CACHE/logs"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
command -v go >/dev/null || { echo "build.sh: Go is required (https://go.dev/doc/install)" >&2; exit 1; }
GO_VERSION=$(go env GOVERSION | sed -E 's/^go([0-9]+\.[0-9]+).*/\1/')

have() { [ -x "$BIN/$1" ]; }

progress() { printf '[testbed build] %-10s %s\n' "$1" "$2"; }

# wrapper NAME MODULE VERSION DEFAULT_REPLACE_VERSION LDFLAGS PKG=OUT ...
wrapper() {
  local name=$1 module=$2 version=$3 default=$4 ldflags=$5; shift 5
  local dir="$CACHE/src/$name-$version" log="$CACHE/logs/build-$name-$version.log"
  mkdir -p "$dir"
  local started=$SECONDS
  progress "$name" "building $module@$version (log: $log)"
  (
    set -e  # errexit is off in a subshell guarded by ||, so each step checks itself
    cd "$dir" || exit 1
    rm -f go.mod go.sum tools.go  # a stale wrapper would break go mod download
    local modfile
    modfile=$(go mod download -json "$module@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])') || exit 1
    python3 "$here/gomod_wrapper.py" "$modfile" "$module" "$version" "$default" "$GO_VERSION" > go.mod || exit 1
    {
      echo "//go:build tools"
      echo "package tools"
      echo "import ("
      for spec in "$@"; do echo "  _ \"${spec%%=*}\""; done
      echo ")"
    } > tools.go
    go mod tidy || exit 1
    [ -z "${WRAPPER_PATCH:-}" ] || "$WRAPPER_PATCH" || exit 1
    for spec in "$@"; do
      go build -trimpath -ldflags "$ldflags" -o "$BIN/${spec#*=}.tmp" "${spec%%=*}" || exit 1
      mv "$BIN/${spec#*=}.tmp" "$BIN/${spec#*=}" || exit 1
    done
  ) >"$log" 2>&1 || { progress "$name" "FAILED, see $log"; tail -20 "$log" >&2; return 1; }
  progress "$name" "built in $((SECONDS - started)) s"
}

# plain_install NAME PKG VERSION OUT
plain_install() {
  local name=$1 pkg=$2 version=$3 out=$4 log="$CACHE/logs/build-$1-$3.log" started=$SECONDS
  progress "$name" "go install $pkg@$version (log: $log)"
  local gobin; gobin=$(mktemp -d)
  GOBIN=$gobin go install -trimpath "$pkg@$version" >"$log" 2>&1 \
    || { progress "$name" "FAILED, see $log"; tail -20 "$log" >&2; return 1; }
  mv "$gobin/$(basename "$pkg")" "$BIN/$out"; rmdir "$gobin"
  progress "$name" "built in $((SECONDS - started)) s"
}

build_etcd() {
  have "etcd-$ETCD_VERSION" && { progress etcd "cached"; return; }
  wrapper etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION" "" \
    "go.etcd.io/etcd/server/v3=etcd-$ETCD_VERSION"
}

build_kube() {
  if have "kube-apiserver-$K8S_VERSION" && have "kube-controller-manager-$K8S_VERSION" \
     && have "kube-scheduler-$K8S_VERSION" && have "kubectl-$K8S_VERSION"; then
    progress kube "cached"; return
  fi
  local minor; minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  wrapper kube k8s.io/kubernetes "$K8S_VERSION" "$K8S_STAGING_VERSION" "$ld" \
    "k8s.io/kubernetes/cmd/kube-apiserver=kube-apiserver-$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager=kube-controller-manager-$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-scheduler=kube-scheduler-$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kubectl=kubectl-$K8S_VERSION"
}

build_kwok() {
  have "kwok-$KWOK_VERSION" && { progress kwok "cached"; return; }
  plain_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" "kwok-$KWOK_VERSION"
}

build_victorialogs() {
  have "victoria-logs-$VICTORIALOGS_VERSION" && { progress victorialogs "cached"; return; }
  plain_install victorialogs github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs \
    "$VICTORIALOGS_VERSION" "victoria-logs-$VICTORIALOGS_VERSION"
}

# The comparator of `make bench`: tests/otelcol/main.go built against pinned collector modules.
# A throwaway module under $CACHE/src/ (go.mod from tests/otelcol/go.mod.tmpl, main.go copied),
# `go mod tidy` there, then one binary. Every collector module must come out at one release.
build_otelcol() {
  have "otelcol-$OTELCOL_VERSION" && { progress otelcol "cached"; return; }
  local src="$here/../otelcol" dir="$CACHE/src/otelcol-$OTELCOL_VERSION"
  local log="$CACHE/logs/build-otelcol-$OTELCOL_VERSION.log" out="$BIN/otelcol-$OTELCOL_VERSION"
  local started=$SECONDS
  mkdir -p "$dir"
  progress otelcol "building tests/otelcol with collector $OTELCOL_VERSION, contrib $OTELCOL_CONTRIB_VERSION (log: $log)"
  (
    set -e
    cd "$dir" || exit 1
    rm -f go.mod go.sum main.go
    sed -e "s/@GO_VERSION@/$GO_VERSION/" -e "s/@OTELCOL_VERSION@/$OTELCOL_VERSION/g" \
        -e "s/@OTELCOL_CONTRIB_VERSION@/$OTELCOL_CONTRIB_VERSION/g" "$src/go.mod.tmpl" > go.mod || exit 1
    cp "$src/main.go" main.go || exit 1
    go mod tidy || exit 1
    # One release: core modules at OTELCOL_VERSION (or its v1.x twin), contrib at OTELCOL_CONTRIB_VERSION.
    local stray
    stray=$(go list -m all | awk -v core="$OTELCOL_VERSION" -v contrib="$OTELCOL_CONTRIB_VERSION" '
      $1 ~ /^go\.opentelemetry\.io\/collector/ && $2 != core && $2 !~ /^v1\./ { print }
      $1 ~ /^github\.com\/open-telemetry\/opentelemetry-collector-contrib\// && $2 != contrib { print }') || exit 1
    [ -z "$stray" ] || { echo "collector modules off the pinned release:"; echo "$stray"; exit 1; }
    go list -m all | grep -E 'opentelemetry-collector|go.opentelemetry.io/collector' || true
    go build -trimpath -ldflags "-s -w -X main.version=$OTELCOL_VERSION" -o "$out.tmp" . || exit 1
    mv "$out.tmp" "$out" || exit 1
  ) >"$log" 2>&1 || { progress otelcol "FAILED, see $log"; tail -20 "$log" >&2; return 1; }
  progress otelcol "built in $((SECONDS - started)) s"
}

# Argo CD: one binary that runs as each component by ARGOCD_BINARY_NAME. v3 has one relative
# replace (gitops-engine, published as its own module at the same release) and needs Go 1.27:
# GOTOOLCHAIN=go1.27.3 is fetched by the go command from the module proxy (README "Test bed").
build_argocd() {
  have "$ARGOCD_BINARY" && { progress argocd "cached"; return; }
  GOTOOLCHAIN=$ARGOCD_GOTOOLCHAIN GO_VERSION=$(GOTOOLCHAIN=$ARGOCD_GOTOOLCHAIN go env GOVERSION | sed -E 's/^go([0-9]+\.[0-9]+).*/\1/') \
    WRAPPER_PATCH=argocd_metrics_on_loopback \
    wrapper argocd github.com/argoproj/argo-cd/v3 "$ARGOCD_VERSION" "$ARGOCD_VERSION" \
    "-s -w -X github.com/argoproj/argo-cd/v3/common.version=${ARGOCD_VERSION#v}" \
    "github.com/argoproj/argo-cd/v3/cmd=$ARGOCD_BINARY"
}

# The application controller of v3.6.1 binds its metrics listener to 0.0.0.0 and has no flag
# for the address; the test bed listens on loopback only. So the wrapper builds a copy of the
# module with that one address changed (run in the wrapper's directory, after `go mod tidy`).
argocd_metrics_on_loopback() {
  local src file=argo-cd/controller/appcontroller.go
  src=$(go list -m -f '{{.Dir}}' github.com/argoproj/argo-cd/v3) || return 1
  rm -rf argo-cd && cp -r "$src" argo-cd && chmod -R u+w argo-cd || return 1
  grep -q 'fmt.Sprintf("0.0.0.0:%d", metricsPort)' "$file" \
    || { echo "argocd: the metrics address is not where build.sh expects it in $file"; return 1; }
  sed -i 's/fmt.Sprintf("0.0.0.0:%d", metricsPort)/fmt.Sprintf("127.0.0.1:%d", metricsPort)/' "$file" || return 1
  go mod edit -replace "github.com/argoproj/argo-cd/v3=./argo-cd"
}

# Prometheus with only Kubernetes service discovery (the tags drop the other discoverers
# and keep the binary small); the web UI's assets are not embedded (the API is enough).
build_prometheus() {
  have "prometheus-$PROMETHEUS_VERSION" && { progress prometheus "cached"; return; }
  GOFLAGS="$GOFLAGS -tags=remove_all_sd,enable_kubernetes_sd" plain_install prometheus \
    github.com/prometheus/prometheus/cmd/prometheus "$PROMETHEUS_VERSION" "prometheus-$PROMETHEUS_VERSION"
}

# The ServiceMonitor CRD as prometheus-operator publishes it (example/prometheus-operator-crd/):
# its module source is downloaded, nothing is built. Prints the CRD file's path.
prometheus_operator_crd() {
  local dir
  dir=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])') || return 1
  echo "$dir/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
}

build_helm() {
  have "helm-$HELM_VERSION" && { progress helm "cached"; return; }
  plain_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "helm-$HELM_VERSION"
}

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(etcd kube kwok victorialogs)
# One build of a component at a time: a second caller waits, then finds it cached.
locked() {
  exec {lock}>"$CACHE/build-$1.lock"
  flock "$lock"
  "build_$1"
  exec {lock}>&-
}
for c in "${components[@]}"; do
  case $c in
    etcd|kube|kwok|victorialogs|otelcol|helm|argocd|prometheus) locked "$c" ;;
    servicemonitor-crd) prometheus_operator_crd ;;
    all) for a in etcd kube kwok victorialogs otelcol helm argocd prometheus; do locked "$a"; done ;;
    *) echo "build.sh: unknown component '$c' (etcd kube kwok victorialogs otelcol helm argocd prometheus servicemonitor-crd all)" >&2; exit 2 ;;
  esac
done
