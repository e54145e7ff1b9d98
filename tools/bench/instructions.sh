#!/usr/bin/env bash
# Instructions per line of an agent binary on a bench corpus, by callgrind: repeatable
# whatever else the machine runs (CPU seconds on shared cores are not). Issue 16.
#
#   tools/bench/instructions.sh [AGENT] [CORPUS_DIR]
#
# AGENT defaults to target/release/logpipe-agent; CORPUS_DIR to target/bench/corpus-short
# (write it with `target/release/logpipe-bench --corpus-only --size 32 --shapes short`).
# The agent reads the whole corpus from the start with the reference pipeline
# (cri -> timestamp -> labelDrop) and pushes to a null receiver (a few lines of Python
# answering 204) until it has sent every entry; then it gets SIGTERM and exits as in a
# pod. Start-up and shutdown are counted. Prints instructions, entries and their ratio;
# the callgrind profile stays in $OUT (target/perline) for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/../.."
AGENT=${1:-target/release/logpipe-agent}
CORPUS=${2:-target/bench/corpus-short}
OUT=${OUT:-target/perline}
PORT=${PORT:-24990}
METRICS_PORT=${METRICS_PORT:-24991}
mkdir -p "$OUT"
# Absolute: the agent config names both, and either may be given relative or absolute.
CORPUS=$(realpath "$CORPUS")
OUT=$(realpath "$OUT")
entries=$(jq .entries "$CORPUS/manifest.json")
run="$OUT/run.$$"
mkdir -p "$run"
python3 tools/bench/null_receiver.py "$PORT" &
receiver=$!
agent=
trap 'kill $receiver $agent 2>/dev/null || true' EXIT
cat > "$run/agent.yaml" <<YAML
loki:
  url: http://127.0.0.1:$PORT/loki/api/v1/push
  tenant: "1"
  batchWait: 1s
  batchBytes: 1048576
logRoot: $CORPUS/var/log/pods
positionsFile: $run/positions.json
listen: 127.0.0.1:$METRICS_PORT
YAML
cat tools/bench/reference_pipeline.yaml >>"$run/agent.yaml"
sleep 0.5
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
  "$AGENT" --config "$run/agent.yaml" --node-name bench-node --log-format text \
  >"$run/agent.log" 2>&1 &
agent=$!
sent=0
while kill -0 $agent 2>/dev/null; do
  sleep 1
  sent=$(curl -s "http://127.0.0.1:$METRICS_PORT/metrics" |
    awk '/^promtail_sent_entries_total/ {n += $2} END {print n + 0}' || true)
  [ "$sent" -ge "$entries" ] && break
done
kill -TERM $agent
wait $agent || true
agent=
total=$(awk '/^summary:/ {print $2}' "$OUT/callgrind.out")
echo "entries $entries sent $sent instructions $total per_line $((total / entries))"
rm -rf "$run"
