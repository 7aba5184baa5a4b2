"""The side-by-side table of BENCHMARKS.md from bench-compare.sh's results.

    python3 server/loadgen/compare-table.py bench-compare.jsonl

Each row is one `compare` scenario; each side shows its median run (by p99; by memory per
connection for idle), so the two sides of a row may come from different runs. CPU per
delivery is the server's CPU time in the measured window over the deliveries in it.
"""
import json
import sys

rows = {}
for line in open(sys.argv[1]):
    run = json.loads(line)
    rows.setdefault(run["args"], []).append(run)


def median(runs, side, key):
    ordered = sorted(runs, key=lambda r: r[side][key])
    return ordered[len(ordered) // 2][side]


def ms(us):
    return f"{us / 1000:.2f}"


def ratio(a, b):
    return f"{a / b:.2f}" if b else "—"


print("| compare | runs | delivered/s (C / N) | p50 ms (C / N) | p99 ms (C / N) | lost (C / N) "
      "| server CPU µs per delivery (C / N, ratio) |")
print("|---|---|---|---|---|---|---|")
idle = []
for args, runs in rows.items():
    if args.startswith("idle"):
        idle.append((args, runs))
        continue
    c, n = median(runs, "confab", "p99_us"), median(runs, "nats", "p99_us")
    cpu_c = c.get("server_cpu_us_per_delivery", 0)
    cpu_n = n.get("server_cpu_us_per_delivery", 0)
    p99s = ", ".join(f"{r['confab']['p99_us'] / 1000:.1f}/{r['nats']['p99_us'] / 1000:.1f}" for r in runs)
    print(f"| `{args}` | {len(runs)} | {c['delivered_per_sec']:,.0f} / {n['delivered_per_sec']:,.0f} "
          f"| {ms(c['p50_us'])} / {ms(n['p50_us'])} | **{ms(c['p99_us'])}** / {ms(n['p99_us'])} (each run: {p99s}) "
          f"| {c['lost']} / {n['lost']} | {cpu_c} / {cpu_n} ({ratio(cpu_c, cpu_n)}) |")
if idle:
    print()
    print("| compare | runs | RSS per connection KiB (C / N) | idle server CPU, % of a core (C / N) |")
    print("|---|---|---|---|")
    for args, runs in idle:
        c = median(runs, "confab", "rss_per_connection_bytes")
        n = median(runs, "nats", "rss_per_connection_bytes")
        print(f"| `{args}` | {len(runs)} | {c['rss_per_connection_bytes'] / 1024:.1f} / "
              f"{n['rss_per_connection_bytes'] / 1024:.1f} | {c['idle_cpu_pct']} / {n['idle_cpu_pct']} |")
