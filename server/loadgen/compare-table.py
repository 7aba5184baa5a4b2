"""The side-by-side table of BENCHMARKS.md from bench-compare.sh's results.

    python3 server/loadgen/compare-table.py bench-compare.jsonl [more.jsonl …]

Each row is one `compare` scenario, C for Confab and N for nats-server. A cell gives the
median over the runs and, in brackets, every run's figure in the order they ran (with an
even number of runs the median is the upper middle one). CPU per delivery is the
server's CPU time in the measured window over the deliveries in it; `lost` counts what
had not arrived 10 s after publishing stopped. The pingpong row's deliveries are round
trips.
"""
import json
import sys

rows = {}
for path in sys.argv[1:]:
    for line in open(path):
        run = json.loads(line)
        rows.setdefault(run["args"], []).append(run)


def cell(runs, side, read, fmt):
    values = [read(r[side]) for r in runs]
    middle = sorted(values)[len(values) // 2]
    if len(values) == 1:
        return fmt(middle)
    return f"{fmt(middle)} ({', '.join(fmt(v) for v in values)})"


def ms(us):
    # Light-load latencies are a millisecond or two: to the 10 µs there; a round trip is
    # under one, to the µs.
    if us < 1_000:
        return f"{us / 1000:.3f}"
    return f"{us / 1000:.2f}" if us < 10_000 else f"{us / 1000:.1f}"


def number(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


print("| compare | runs | delivered/s C / N (median) | p50 ms C | p50 ms N | p99 ms C | p99 ms N "
      "| lost C / N | server CPU µs per delivery C | N |")
print("|---|---|---|---|---|---|---|---|---|---|")
idle = []
for args, runs in rows.items():
    if args.startswith("idle"):
        idle.append((args, runs))
        continue
    delivered = " / ".join(number(sorted(r[s]["delivered_per_sec"] for r in runs)[len(runs) // 2])
                           for s in ("confab", "nats"))
    lost = " / ".join(str(sum(r[s]["lost"] for r in runs)) for s in ("confab", "nats"))
    print(f"| `{args}` | {len(runs)} | {delivered} "
          f"| {cell(runs, 'confab', lambda r: r['p50_us'], ms)} "
          f"| {cell(runs, 'nats', lambda r: r['p50_us'], ms)} "
          f"| **{cell(runs, 'confab', lambda r: r['p99_us'], ms)}** "
          f"| {cell(runs, 'nats', lambda r: r['p99_us'], ms)} | {lost} "
          f"| {cell(runs, 'confab', lambda r: r.get('server_cpu_us_per_delivery', 0), number)} "
          f"| {cell(runs, 'nats', lambda r: r.get('server_cpu_us_per_delivery', 0), number)} |")
if idle:
    print()
    print("| compare | runs | RSS per connection KiB C | N | idle server CPU, % of a core C | N |")
    print("|---|---|---|---|---|---|")
    for args, runs in idle:
        kib = lambda r: r["rss_per_connection_bytes"] / 1024  # noqa: E731
        pct = lambda r: r["idle_cpu_pct"]  # noqa: E731
        fmt = lambda x: f"{x:.2f}"  # noqa: E731
        print(f"| `{args}` | {len(runs)} | {cell(runs, 'confab', kib, fmt)} | {cell(runs, 'nats', kib, fmt)} "
              f"| {cell(runs, 'confab', pct, fmt)} | {cell(runs, 'nats', pct, fmt)} |")
