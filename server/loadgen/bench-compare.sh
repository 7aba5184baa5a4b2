#!/usr/bin/env bash
# The side-by-side table of BENCHMARKS.md: each row runs `confab-bench compare` (Confab,
# then nats-server from the distribution's package, each pinned to CPU 0 with the
# generator on CPU 1, one connection per subscriber) RUNS times, and
# server/loadgen/compare-table.py prints the median run of each side. The JSON of every
# run goes to $OUT (default: bench-compare.jsonl), each line with its row's arguments.
#   bash server/loadgen/bench-compare.sh                       # every row, 3 runs each
#   RUNS=1 WARMUP=3s DURATION=10s bash server/loadgen/bench-compare.sh
#   STORE=memory bash server/loadgen/bench-compare.sh          # Confab with --in-memory
#   ROWS="--subscribers 100 --rate 5000" bash server/loadgen/bench-compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q --release -p confab-server -p confab-bench
bench=target/release/confab-bench
out=${OUT:-bench-compare.jsonl}
runs=${RUNS:-3}
warmup=${WARMUP:-5s}
duration=${DURATION:-20s}
store=${STORE:-sqlite}
if [ -n "${ROWS:-}" ]; then
  rows=("$ROWS")
else
  rows=(
    "--subscribers 100 --rate 10"
    "--subscribers 100 --rate 100"
    "--subscribers 100 --rate 5000"
    "--subscribers 100 --rate 10000"
    "--subscribers 100 --rate 15000"
    "--subscribers 100 --rate 17500"
    "--subscribers 100 --rate 20000"
    "--subscribers 100 --rate 22500"
    "--subscribers 1000 --rate 10"
    "--subscribers 1000 --rate 50"
    "--subscribers 1000 --rate 100"
    "--subscribers 1000 --rate 200"
    "--subscribers 1000 --rate 500"
    "--subscribers 1000 --rate 1000"
    "--rooms 1000 --per-room 10 --rate 1"
    "--rooms 1000 --per-room 10 --rate 2"
    "--rooms 1000 --per-room 10 --rate 5"
    "idle --connections 10000"
    "pingpong"
  )
fi
: >"$out"
for row in "${rows[@]}"; do
  for run in $(seq 1 "$runs"); do
    echo "== compare $row (run $run)" >&2
    window=(--warmup "$warmup" --duration "$duration")
    # Idle pings come once a minute (Confab) or two (nats-server): watch for two minutes.
    case $row in idle*) window=(--duration 120s) ;; esac
    # shellcheck disable=SC2086
    $bench compare $row "${window[@]}" --store "$store" --json |
      sed "s|^{|{\"args\":\"$row\",|" >>"$out" || echo "(that run failed: see above)" >&2
  done
done
python3 server/loadgen/compare-table.py "$out"
