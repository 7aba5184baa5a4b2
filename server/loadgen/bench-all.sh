#!/usr/bin/env bash
# Runs every scenario of BENCHMARKS.md three times (5 s warm-up, 20 s measured; the server
# pinned to CPU 0, confab-bench to CPU 1) and prints the median run of each as a table
# row. The JSON of every run is kept in $OUT (default: bench-results.jsonl).
#   bash server/loadgen/bench-all.sh            # everything, about 20 minutes
#   RUNS=1 bash server/loadgen/bench-all.sh     # one run each
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q --release -p confab-server -p confab-bench
bench=target/release/confab-bench
out=${OUT:-bench-results.jsonl}
runs=${RUNS:-3}
: >"$out"
scenarios=(
  "fanout --subscribers 1000 --rate 1000"
  "fanout --subscribers 1000 --rate 500"
  "fanout --subscribers 100 --rate 10000"
  "fanout --subscribers 100 --rate 5000"
  "rooms --rooms 1000 --per-room 10 --rate 20"
  "rooms --rooms 1000 --per-room 10 --rate 5"
  "pingpong"
  "idle --connections 10000"
  "slow-reader --subscribers 1000 --rate 500"
)
for scenario in "${scenarios[@]}"; do
  for run in $(seq 1 "$runs"); do
    echo "== $scenario (run $run)" >&2
    # shellcheck disable=SC2086
    $bench $scenario --json | sed "s|^{|{\"args\":\"$scenario\",|" >>"$out"
  done
done
python3 - "$out" <<'PY'
import json, sys, statistics
rows = {}
for line in open(sys.argv[1]):
    run = json.loads(line)
    rows.setdefault(run["args"], []).append(run)
print("| scenario | offered msg/s | delivered/s | p50 | p99 | p99.9 | max | lost | server CPU | server RSS |")
print("|---|---|---|---|---|---|---|---|---|---|")
ms = lambda us: f"{us / 1000:.2f} ms"
for args, runs in rows.items():
    key = "rss_per_connection_bytes" if "idle" in args else "p99_us"
    runs.sort(key=lambda r: r[key])
    r = runs[len(runs) // 2]  # the median run by p99 (by memory for idle)
    if "idle" in args:
        print(f"| `{args}` | — | — | — | — | — | — | — | {r['server_cpu_s']} s | "
              f"{r['server_rss_bytes'] // 1024} KiB, **{r['rss_per_connection_bytes'] / 1024:.1f} KiB per connection** |")
        continue
    extra = ""
    if "baseline_p99_us" in r:
        extra = f" (without the stalled reader {ms(r['baseline_p99_us'])}: {r['p99_rise_pct']:+.1f} %; stalled RSS growth {r['stalled_rss_growth_bytes'] // 1024} KiB)"
    print(f"| `{args}` | {r['offered_msgs_per_sec']:,.0f} | {r['delivered_per_sec']:,.0f} | {ms(r['p50_us'])} | "
          f"**{ms(r['p99_us'])}**{extra} | {ms(r['p999_us'])} | {ms(r['max_us'])} | {r['lost']} | "
          f"{r['server_cpu_s']} s / 20 s | {r['server_rss_bytes'] // 1024 // 1024} MiB |")
PY
