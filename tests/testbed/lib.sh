# Shared by up.sh and down.sh: where things live and which loopback ports and addresses
# each cluster uses. Every listener and every address is in 127.0.0.0/8.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${LOGPIPE_CACHE:-$HOME/.cache/logpipe}
BIN=$CACHE/bin
TESTBED=${LOGPIPE_TESTBED:-$repo/target/testbed}
LOGS=$TESTBED/logs
PIDS=$TESTBED/pids
# A second test bed can run beside the first (e.g. a CI run while developing) with other
# ports and another loopback pod network: LOGPIPE_PORT_BASE=51000 LOGPIPE_NET_OFFSET=64.
PORT_BASE=${LOGPIPE_PORT_BASE:-41000}
NET_OFFSET=${LOGPIPE_NET_OFFSET:-0}
STORE_HTTP_PORT=${STORE_HTTP_PORT:-$((PORT_BASE + 2100))}
# The add-ons (tests/testbed/addons.sh): Prometheus, and Argo CD with its Redis.
PROMETHEUS_PORT=$((PORT_BASE + 2200))
REDIS_PORT=$((PORT_BASE + 2300))
ARGOCD_REPO_SERVER_PORT=$((PORT_BASE + 2301))
ARGOCD_REPO_SERVER_METRICS_PORT=$((PORT_BASE + 2302))
ARGOCD_CONTROLLER_METRICS_PORT=$((PORT_BASE + 2303))
ARGOCD_APPSET_METRICS_PORT=$((PORT_BASE + 2304))
ARGOCD_APPSET_PROBE_PORT=$((PORT_BASE + 2305))
ARGOCD_APPSET_WEBHOOK_PORT=$((PORT_BASE + 2306))
ARGOCD_CONTROLLER_HEALTHZ_PORT=$((PORT_BASE + 2307))
KUBECTL=$BIN/kubectl-$K8S_VERSION

# The clusters the test bed knows, in a fixed order: the index fixes ports and addresses,
# so `ops` has the same ports whether it is started alone or with dev and prod.
KNOWN_CLUSTERS=(ops dev prod)

cluster_index() {
  local i
  for i in "${!KNOWN_CLUSTERS[@]}"; do
    [ "${KNOWN_CLUSTERS[$i]}" = "$1" ] && { echo "$i"; return; }
  done
  echo "testbed: unknown cluster '$1' (known: ${KNOWN_CLUSTERS[*]})" >&2
  return 1
}

# cluster_env NAME: sets the ports and address ranges of one cluster.
cluster_env() {
  CLUSTER=$1
  CI_INDEX=$(cluster_index "$1")
  local base=$((PORT_BASE + CI_INDEX * 100))
  ETCD_CLIENT_PORT=$((base + 1))
  ETCD_PEER_PORT=$((base + 2))
  APISERVER_PORT=$((base + 43))
  KCM_PORT=$((base + 57))
  SCHEDULER_PORT=$((base + 59))
  KWOK_PORT=$((base + 80))
  # Services: 127.3.<16*i>.0/20. Nodes: InternalIP 127.<200+i>.<n/250>.<n%250+1>.
  # Pods: node n of cluster i owns 127.<16+8i+n/256>.<n%256>.0/24 (2048 nodes a cluster).
  SERVICE_CIDR="127.3.$((CI_INDEX * 16)).0/20"
  KWOK_FALLBACK_CIDR="127.250.$CI_INDEX.1/24"
  CDIR=$TESTBED/$CLUSTER
}

node_ip() { echo "127.$((200 + CI_INDEX)).$(($1 / 250)).$(($1 % 250 + 1))"; }
node_pod_cidr() { echo "127.$((16 + NET_OFFSET + 8 * CI_INDEX + $1 / 256)).$(($1 % 256)).0/24"; }

# alive NAME: the process recorded under NAME runs and is still the binary we started
# (a PID can be reused by an unrelated process after a crash). While a process is inside
# execve its command line reads empty for a moment: that is a start, not an exit (CI once
# failed a healthy kube-apiserver as "exited"), so only a zombie or a gone PID is dead.
alive() {
  local pidfile=$PIDS/$1.pid pid binary cmdline state
  [ -f "$pidfile" ] || return 1
  read -r pid binary < "$pidfile" || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  cmdline=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || return 1
  if [ -z "$cmdline" ]; then
    # The state follows the parenthesised command name, which may hold spaces.
    state=$(sed -E 's/.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != Z ]
    return
  fi
  [[ $cmdline == *"$binary"* ]]
}

# replaced NAME: the process runs, but its binary was rebuilt since (the file it runs from
# was replaced): a stale node simulator would hide a fix.
replaced() {
  local pid
  read -r pid _ < "$PIDS/$1.pid" 2>/dev/null || return 1
  [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == *" (deleted)" ]]
}

# stop NAME: SIGTERM the process recorded under NAME, SIGKILL if it lingers; forget it.
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

# start NAME BINARY ARGS...: run in its own session, record PID and binary, log to logs/.
start() {
  local name=$1 binary=$2; shift 2
  if alive "$name"; then printf '[testbed] %s already running\n' "$name"; return; fi
  mkdir -p "$LOGS" "$PIDS"
  setsid "$binary" "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid $binary" > "$PIDS/$name.pid"
  # Between fork and exec the child still shows this script's command line, and `alive`
  # would call it gone: wait for the exec (or for the child to die). On a loaded machine
  # the exec of a large binary has taken more than 5 s.
  local _
  for _ in $(seq 1 300); do
    alive "$name" && return
    kill -0 "$pid" 2>/dev/null || return
    sleep 0.1
  done
}

# Shared by up.sh and addons.sh.
say() { printf '[testbed] %s\n' "$*"; }
fail() { printf '[testbed] ERROR: %s\n' "$*" >&2; exit 1; }
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for NAME SECONDS CMD...: poll CMD until it succeeds; on timeout show the log.
wait_for() {
  local name=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    # Asked twice, a second apart: one look can fall inside the process's execve.
    if ! alive "$name" && { sleep 1; ! alive "$name"; }; then
      tail -25 "$LOGS/$name.log" >&2
      fail "$name exited (pid, binary: $(cat "$PIDS/$name.pid" 2>/dev/null)); log: $LOGS/$name.log"
    fi
    if [ $SECONDS -ge $deadline ]; then tail -25 "$LOGS/$name.log" >&2; fail "$name not healthy after ${limit}s; log: $LOGS/$name.log"; fi
    sleep 0.5
  done
}

require_port() {
  local name=$1 port=$2
  alive "$name" && return 0
  port_free "$port" || fail "port 127.0.0.1:$port for $name is taken by another process (set LOGPIPE ports or stop it)"
}

