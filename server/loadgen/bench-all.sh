#!/usr/bin/env bash
# Runs every scenario of BENCHMARKS.md three times (5 s warm-up, 20 s measured; the server
# pinned to CPU 0, confab-bench to CPU 1) and prints the median run of each as a table
# row (server/loadgen/bench-table.py, which can also be run alone on a results file). The
# JSON of every run is kept in $OUT (default: bench-results.jsonl).
#   bash server/loadgen/bench-all.sh            # everything, about 20 minutes
#   RUNS=1 bash server/loadgen/bench-all.sh     # one run each
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q --release -p confab-server -p confab-bench
bench=target/release/confab-bench
out=${OUT:-bench-results.jsonl}
runs=${RUNS:-3}
: >"$out"
# The table's method predates one connection per subscriber and the SQLite default:
# subscribers share 50 (fanout) or 100 (rooms) connections and the server runs in memory.
# The side-by-side table with nats-server (one connection each) is bench-compare.sh.
scenarios=(
  "fanout --subscribers 1000 --rate 1000 --connections 50"
  "fanout --subscribers 1000 --rate 500 --connections 50"
  "fanout --subscribers 100 --rate 10000 --connections 50"
  "fanout --subscribers 100 --rate 5000 --connections 50"
  "rooms --rooms 1000 --per-room 10 --rate 20 --connections 100"
  "rooms --rooms 1000 --per-room 10 --rate 10 --connections 100"
  "rooms --rooms 1000 --per-room 10 --rate 5 --connections 100"
  "pingpong"
  "idle --connections 10000"
  "slow-reader --subscribers 1000 --rate 500 --connections 50"
)
for scenario in "${scenarios[@]}"; do
  for run in $(seq 1 "$runs"); do
    echo "== $scenario (run $run)" >&2
    # shellcheck disable=SC2086
    $bench $scenario --store memory --json | sed "s|^{|{\"args\":\"$scenario\",|" >>"$out"
  done
done
python3 server/loadgen/bench-table.py "$out"
