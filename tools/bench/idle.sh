#!/usr/bin/env bash
# The agent's cost with many files and little traffic (issue 16): FILES files, WRITTEN of
# them appended to at RATE lines/s in all (one write per file per 10 ms), the agent's
# CPU (utime + stime from /proc, 10 ms ticks) over DURATION seconds after a warm-up, into a null
# receiver.
#
#   tools/bench/idle.sh [AGENT]     # FILES=1000 WRITTEN=10 RATE=1000 DURATION=20
#
# Prints the share of one core. CPU seconds of the agent alone, not wall time: the
# machine's other load moves it little (the writer and the receiver are separate
# processes). Needs python3 (the writer and the receiver).
set -euo pipefail
cd "$(dirname "$0")/../.."
AGENT=${1:-target/release/logpipe-agent}
FILES=${FILES:-1000}
WRITTEN=${WRITTEN:-10}
RATE=${RATE:-1000}
DURATION=${DURATION:-20}
WARMUP=${WARMUP:-5}
PORT=${PORT:-24992}
METRICS_PORT=${METRICS_PORT:-24993}
dir=$(mktemp -d "${TMPDIR:-/tmp}/logpipe-idle.XXXXXX")
root="$dir/var/log/pods"
ts=$(date -u +%Y-%m-%dT%H:%M:%S.000000000Z)
for i in $(seq 1 "$FILES"); do
  d="$root/ns_pod-${i}_uid-$i/app"
  mkdir -p "$d"
  echo "$ts stdout F started $i" >"$d/0.log"
done
pids=()
cleanup() { kill -9 "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
python3 tools/bench/null_receiver.py "$PORT" &
pids+=($!)
cat >"$dir/agent.yaml" <<YAML
loki:
  url: http://127.0.0.1:$PORT/loki/api/v1/push
  tenant: "1"
logRoot: $root
positionsFile: $dir/positions.json
listen: 127.0.0.1:$METRICS_PORT
YAML
cat tools/bench/reference_pipeline.yaml >>"$dir/agent.yaml"
"$AGENT" --config "$dir/agent.yaml" --node-name idle-node --log-format text >"$dir/agent.log" 2>&1 &
agent=$!
pids+=($agent)
python3 - "$root" "$WRITTEN" "$RATE" <<'PY' &
import datetime, os, sys, time
root, written, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
files = [open(os.path.join(root, f"ns_pod-{i}_uid-{i}/app/0.log"), "a") for i in range(1, written + 1)]
per_tick = rate / 100.0 / max(written, 1)
owed = [0.0] * written
body = "level=info msg=\"request served\" path=/api/v1/items status=200 duration_ms=12 " + "x" * 90
next_tick = time.monotonic()
while written:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    for i, f in enumerate(files):
        owed[i] += per_tick
        n = int(owed[i]); owed[i] -= n
        if n:
            f.write("".join(f"{now} stdout F {body}\n" for _ in range(n))); f.flush()
    next_tick += 0.01
    time.sleep(max(0.0, next_tick - time.monotonic()))
while True:
    time.sleep(60)
PY
pids+=($!)
cpu() { awk '{print $14 + $15}' "/proc/$agent/stat"; }
sleep "$WARMUP"
before=$(cpu)
sleep "$DURATION"
after=$(cpu)
ticks=$(getconf CLK_TCK)
awk -v d=$((after - before)) -v t="$ticks" -v s="$DURATION" -v f="$FILES" -v w="$WRITTEN" -v r="$RATE" \
  'BEGIN { printf "files %d written %d rate %d/s: %.2f %% of a core (%d ticks in %d s)\n", f, w, r, 100 * d / t / s, d, s }'
