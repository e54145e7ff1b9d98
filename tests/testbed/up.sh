#!/usr/bin/env bash
# Start the test bed: per cluster etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, KWOK with $NODES nodes; one log store (VictoriaLogs) for all. Idempotent: what already runs
# is kept. Env: CLUSTERS="ops dev prod" (default ops), NODES (default 5).
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"
CLUSTERS=${CLUSTERS:-ops}
NODES=${NODES:-5}
STARTED=$SECONDS

command -v openssl >/dev/null || fail "openssl is required (apt-get install openssl)"
command -v curl >/dev/null || fail "curl is required (apt-get install curl)"
"$here/build.sh" etcd kube kwok

mkdir -p "$LOGS" "$PIDS"

# The node simulator is ours (tools/nodesim): build it before the clusters need it.
# LOGPIPE_NODESIM_PROFILE=release (make bench-operator) uses the release build instead.
NODESIM_PROFILE=${LOGPIPE_NODESIM_PROFILE:-debug}
case $NODESIM_PROFILE in
  debug) profile_flag=() ;;
  release) profile_flag=(--release) ;;
  *) fail "LOGPIPE_NODESIM_PROFILE must be debug or release, not '$NODESIM_PROFILE'" ;;
esac
# --workspace: dependencies get the features the whole workspace unifies, as `make build`
# gives them; built alone (-p logpipe-nodesim) they would be compiled a second time and
# each build would replace the other's binary (and so restart the simulator).
say "building the node simulator (cargo build ${profile_flag[*]} --workspace --bin logpipe-nodesim)"
(cd "$repo" && cargo build -q "${profile_flag[@]}" --workspace --bin logpipe-nodesim) || fail "cannot build logpipe-nodesim"
NODESIM=${CARGO_TARGET_DIR:-$repo/target}/$NODESIM_PROFILE/logpipe-nodesim

pki() {
  local dir=$CDIR/pki
  # The last file written: a run stopped halfway through makes them all again.
  [ -f "$dir/sa.pub" ] && return
  mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=logpipe-testbed-$CLUSTER-ca" 2>/dev/null
    local svc_ip; svc_ip=$(echo "$SERVICE_CIDR" | awk -F'[./]' '{print $1"."$2"."$3"."$4+1}')
    printf 'subjectAltName=IP:127.0.0.1,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' "$svc_ip" > serving.ext
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 -extfile serving.ext 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=logpipe-testbed-admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 -extfile client.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr
  )
}

kubeconfig() {
  local b64; b64() { base64 -w0 < "$1"; }
  cat > "$CDIR/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: $CLUSTER
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(b64 "$CDIR/pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$CDIR/pki/admin.crt")
    client-key-data: $(b64 "$CDIR/pki/admin.key")
contexts:
- name: $CLUSTER
  context: {cluster: $CLUSTER, user: admin}
current-context: $CLUSTER
KC
}

kwok_config() {
  cat > "$CDIR/kwok.yaml" <<KW
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  cidr: $KWOK_FALLBACK_CIDR
  nodeIP: 127.0.0.1
  manageAllNodes: false
  manageNodesWithAnnotationSelector: kwok.x-k8s.io/node=fake
  # Pods annotated kwok.x-k8s.io/status=custom are left to the node simulator, which runs
  # real agents for them (see README, "Test bed").
  disregardStatusWithAnnotationSelector: kwok.x-k8s.io/status=custom
  serverAddress: 127.0.0.1:$KWOK_PORT
  # Heartbeats by Lease are cheap; status heartbeats lapse when 2 cores are busy building.
  nodeLeaseDurationSeconds: 40
KW
}

nodes_manifest() {
  local n
  for ((n = 0; n < NODES; n++)); do
    cat <<NODE
---
apiVersion: v1
kind: Node
metadata:
  name: $CLUSTER-node-$n
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: $CLUSTER-node-$n
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    logpipe.io/testbed-cluster: $CLUSTER
spec:
  podCIDR: $(node_pod_cidr "$n")
  podCIDRs: [$(node_pod_cidr "$n")]
status:
  addresses:
  - {type: InternalIP, address: $(node_ip "$n")}
  - {type: Hostname, address: $CLUSTER-node-$n}
  allocatable: {cpu: "32", memory: 256Gi, pods: "110"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110"}
NODE
  done
}

# nodes_ready KUBECONFIG: at least $NODES nodes of $CLUSTER report Ready.
nodes_ready() {
  local ready
  ready=$("$KUBECTL" --kubeconfig "$1" get nodes -l "logpipe.io/testbed-cluster=$CLUSTER" \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c '^True$') || true
  [ "${ready:-0}" -ge "$NODES" ]
}

up_cluster() {
  cluster_env "$1"
  mkdir -p "$CDIR"
  say "cluster $CLUSTER: apiserver https://127.0.0.1:$APISERVER_PORT, etcd :$ETCD_CLIENT_PORT, $NODES nodes"
  pki
  kubeconfig
  kwok_config
  local p=$CDIR/pki kc=$CDIR/kubeconfig

  require_port "$CLUSTER-etcd" "$ETCD_CLIENT_PORT"
  start "$CLUSTER-etcd" "$BIN/etcd-$ETCD_VERSION" \
    --name "$CLUSTER" --data-dir "$CDIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "$CLUSTER=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --log-level warn --quota-backend-bytes 4294967296
  wait_for "$CLUSTER-etcd" 60 curl -fsS "http://127.0.0.1:$ETCD_CLIENT_PORT/health"

  require_port "$CLUSTER-kube-apiserver" "$APISERVER_PORT"
  start "$CLUSTER-kube-apiserver" "$BIN/kube-apiserver-$K8S_VERSION" \
    --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" --client-ca-file "$p/ca.crt" \
    --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --authorization-mode Node,RBAC --service-cluster-ip-range "$SERVICE_CIDR" \
    --endpoint-reconciler-type none --allow-privileged=true --profiling=false \
    --cert-dir "$CDIR/apiserver-certs"
  wait_for "$CLUSTER-kube-apiserver" 120 curl -fsS --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT/readyz"

  require_port "$CLUSTER-kube-controller-manager" "$KCM_PORT"
  start "$CLUSTER-kube-controller-manager" "$BIN/kube-controller-manager-$K8S_VERSION" \
    --kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
    --cluster-signing-cert-file "$p/ca.crt" --cluster-signing-key-file "$p/ca.key" \
    --node-monitor-grace-period 5m \
    --cert-dir "$CDIR/kcm-certs"
  require_port "$CLUSTER-kube-scheduler" "$SCHEDULER_PORT"
  start "$CLUSTER-kube-scheduler" "$BIN/kube-scheduler-$K8S_VERSION" \
    --kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc" \
    --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --leader-elect=false \
    --cert-dir "$CDIR/scheduler-certs"
  require_port "$CLUSTER-kwok" "$KWOK_PORT"
  start "$CLUSTER-kwok" "$BIN/kwok-$KWOK_VERSION" --kubeconfig "$kc" --config "$CDIR/kwok.yaml"
  wait_for "$CLUSTER-kube-controller-manager" 60 curl -fsSk "https://127.0.0.1:$KCM_PORT/healthz"
  wait_for "$CLUSTER-kube-scheduler" 60 curl -fsSk "https://127.0.0.1:$SCHEDULER_PORT/healthz"
  wait_for "$CLUSTER-kwok" 60 curl -fsS "http://127.0.0.1:$KWOK_PORT/healthz"

  # One apply for all nodes. Forced: on a bed that runs already, the TTL controller owns
  # node.alpha.kubernetes.io/ttl once there are more than 100 nodes.
  nodes_manifest | "$KUBECTL" --kubeconfig "$kc" apply --server-side --force-conflicts \
    --field-manager logpipe-testbed -f - >/dev/null
  # Count Ready nodes in one list: `kubectl wait` checks nodes one by one (about 10 a
  # second), so with 1000 nodes it never finishes within its own timeout.
  wait_for "$CLUSTER-kwok" $((120 + NODES / 4)) nodes_ready "$kc"
  # The default ServiceAccount must exist before pods can be created in a namespace.
  wait_for "$CLUSTER-kube-controller-manager" 60 "$KUBECTL" --kubeconfig "$kc" get serviceaccount default -n default

  # The node simulator runs real agents for agent pods annotated kwok.x-k8s.io/status=custom.
  mkdir -p "$TESTBED/images"
  if alive "$CLUSTER-nodesim" && replaced "$CLUSTER-nodesim"; then
    say "$CLUSTER-nodesim was rebuilt: restarting it"
    stop "$CLUSTER-nodesim"
  fi
  start "$CLUSTER-nodesim" "$NODESIM" --kubeconfig "$kc" --cluster "$CLUSTER"
  wait_for "$CLUSTER-nodesim" 60 test -f "$CDIR/nodesim/nodesim.pid"
}

# The log store: VictoriaLogs decodes the agent's Loki push (/insert/loki/api/v1/push) and
# answers LogsQL (/select/logsql/*); tenants are numeric (X-Scope-OrgID: <account>[:<project>]).
# -retentionPeriod: it answers 204 yet drops entries older than its retention, and tests
# replay old timestamps. -loki.disableMessageParsing: keep each line whole in _msg (by
# default JSON lines are split into fields and the line itself is gone).
up_store() {
  local dir=$TESTBED/victorialogs
  mkdir -p "$dir"
  require_port victorialogs "$STORE_HTTP_PORT"
  start victorialogs "$BIN/victoria-logs-$VICTORIALOGS_VERSION" \
    -httpListenAddr="127.0.0.1:$STORE_HTTP_PORT" -storageDataPath="$dir/data" \
    -retentionPeriod=100y -loki.disableMessageParsing
  wait_for victorialogs 60 curl -fsS "http://127.0.0.1:$STORE_HTTP_PORT/insert/loki/ready"
  echo "http://127.0.0.1:$STORE_HTTP_PORT" > "$TESTBED/store-url"
}

# The bed's ports lie in the kernel's ephemeral range (32768-60999): any client socket
# (an agent's push, a watch) may get one as its local port, and a listener started later
# then fails with "address already in use" (a dry run of CI lost prod's KWOK so).
# Reserved ports are never handed out that way; the ports of all three clusters are
# reserved at once, before the first starts. Needs root; without it, say so and go on.
reserve_ports() {
  local file=/proc/sys/net/ipv4/ip_local_reserved_ports
  local want="$PORT_BASE-$((PORT_BASE + ${#KNOWN_CLUSTERS[@]} * 100 - 1)),$STORE_HTTP_PORT,$PROMETHEUS_PORT,$REDIS_PORT-$ARGOCD_CONTROLLER_HEALTHZ_PORT"
  local current; current=$(cat "$file" 2>/dev/null) || current=
  case ",$current," in *",$want,"*) return ;; esac
  if ! { [ -w "$file" ] && echo "${current:+$current,}$want" > "$file"; } 2>/dev/null; then
    say "cannot reserve ports $want from the ephemeral range (not root): a client socket may take one"
  fi
}

for c in $CLUSTERS; do cluster_index "$c" >/dev/null || exit 2; done
reserve_ports
for c in $CLUSTERS; do up_cluster "$c"; done
"$here/build.sh" victorialogs
up_store

say "up in $((SECONDS - STARTED)) s"
for c in $CLUSTERS; do
  cluster_env "$c"
  say "  $c: KUBECONFIG=$CDIR/kubeconfig  ($("$KUBECTL" --kubeconfig "$CDIR/kubeconfig" get nodes --no-headers 2>/dev/null | grep -c ' Ready') nodes Ready)"
done
say "  store: $(cat "$TESTBED/store-url")  (VictoriaLogs; Loki push at /insert/loki/api/v1/push, numeric tenants via X-Scope-OrgID)"
say "  logs: $LOGS   stop: make testbed-down"
