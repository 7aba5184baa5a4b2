"""The BENCHMARKS.md table from bench-all.sh's results: one row per scenario, its median run.

    python3 server/loadgen/bench-table.py bench-results.jsonl

The median run is taken by p99 (by memory per connection for `idle`). For `slow-reader`
each run measures the others' p99 twice in a row, without and then with the stalled
reader, so each run gives a paired rise; the row shows the median of those rises and
every run's, because single windows at this load vary by tens of percent.
"""
import json
import statistics
import sys

rows = {}
for line in open(sys.argv[1]):
    run = json.loads(line)
    rows.setdefault(run["args"], []).append(run)


def ms(us):
    return f"{us / 1000:.2f} ms"


print("| scenario | offered msg/s | delivered/s | p50 | p99 | p99.9 | max | lost | server CPU | load CPU | server RSS |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for args, runs in rows.items():
    key = "rss_per_connection_bytes" if "idle" in args else "p99_us"
    runs.sort(key=lambda r: r[key])
    r = runs[len(runs) // 2]
    if "idle" in args:
        print(f"| `{args}` | — | — | — | — | — | — | — | {r['server_cpu_s']} s | — | "
              f"{r['server_rss_bytes'] // 1024} KiB, **{r['rss_per_connection_bytes'] / 1024:.1f} KiB per connection** |")
        continue
    extra = ""
    if "baseline_p99_us" in r:
        rises = [run["p99_rise_pct"] for run in runs]
        each = ", ".join(f"{rise:+.1f} %" for rise in rises)
        growth = statistics.median(run["stalled_rss_growth_bytes"] for run in runs)
        extra = (f" (the others' p99 rise with the stalled reader: median "
                 f"{statistics.median(rises):+.1f} %, runs {each}; stalled RSS growth {growth // 1024:.0f} KiB)")
    print(f"| `{args}` | {r['offered_msgs_per_sec']:,.0f} | {r['delivered_per_sec']:,.0f} | {ms(r['p50_us'])} | "
          f"**{ms(r['p99_us'])}**{extra} | {ms(r['p999_us'])} | {ms(r['max_us'])} | {r['lost']} | "
          f"{r['server_cpu_s']} s / 20 s | {r.get('load_cpu_s', 0)} s | {r['server_rss_bytes'] // 1024 // 1024} MiB |")
