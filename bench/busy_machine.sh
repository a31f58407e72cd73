#!/usr/bin/env bash
# qkv on a shared machine: the demo (many small calls) and S2 (one large call), each timed on an
# idle machine and again while other processes keep every core busy, in the same run.
#   bench/busy_machine.sh [QKV_BINARY] [BUSY_PROCESSES]    (defaults: build/release/tools/qkv, 2)
# A fair slowdown is about (cores + busy) / cores: 2× with two busy processes on two cores. No
# OpenMP variable is set: this measures what a user gets by default (set OMP_WAIT_POLICY or
# QKV_* yourself before running to compare).
set -euo pipefail
cd "$(dirname "$0")/.."
qkv=${1:-build/release/tools/qkv}
busy=${2:-2}
out=$(mktemp -d)
trap 'kill ${spinners:-} 2>/dev/null || true; rm -rf "$out"' EXIT

seconds() {  # wall seconds of the command
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null
  end=$(date +%s.%N)
  echo "$end - $start" | bc -l
}
demo() { seconds "$qkv" demo --output-dir "$out/demo" --steps 200; }
s2() {  # the median of three S2 forward calls, in milliseconds, from the bench's JSON
  "$qkv" bench --shapes S2 --repetitions 3 --json |
    /usr/bin/python3 -c "import json, sys; print(json.load(sys.stdin)['shapes'][0]['median_ms'])"
}

idle_demo=$(demo)
idle_s2=$(s2)
spinners=""
for _ in $(seq "$busy"); do
  /usr/bin/python3 -c "while True: pass" &
  spinners="$spinners $!"
done
sleep 1
busy_demo=$(demo)
busy_s2=$(s2)
kill $spinners
wait $spinners 2>/dev/null || true
spinners=""

cores=$(nproc)
printf '%s cores, %s busy processes (a fair slowdown: %.1fx)\n' "$cores" "$busy" \
  "$(echo "($cores + $busy) / $cores" | bc -l)"
printf 'demo (200 steps): idle %6.2f s   busy %6.2f s   slowdown %.2fx\n' "$idle_demo" \
  "$busy_demo" "$(echo "$busy_demo / $idle_demo" | bc -l)"
printf 'S2 forward:       idle %6.1f ms  busy %6.1f ms  slowdown %.2fx\n' "$idle_s2" "$busy_s2" \
  "$(echo "$busy_s2 / $idle_s2" | bc -l)"
