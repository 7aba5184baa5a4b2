#!/usr/bin/env bash
# Where a light-load message's time goes, on Confab and on nats-server: one
# `confab-bench compare` fan-out (one connection per subscriber, each server pinned to
# CPU 0, the generator on CPU 1), with `perf record` taking every socket and WAL system
# call of the server and of the generator for 6 s of each side's measured window. For
# each message, server/loadgen/trace-fanout.py prints the medians, from the server's read
# of the publisher's frame: the server's 1st, 50th and last delivery write, and the
# generator's reads of them; and from the publisher's write to that read (waking an idle
# core). Needs perf (Debian's linux-perf) and root, or perf_event_paranoid <= 1.
#   bash server/loadgen/trace-fanout.sh                    # 100 subscribers at 10 msg/s
#   RATE=100 STORE=memory bash server/loadgen/trace-fanout.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q --release -p confab-server -p confab-bench
rate=${RATE:-10}
subscribers=${SUBSCRIBERS:-100}
store=${STORE:-sqlite}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
events=syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_read
events+=,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_pwrite64

target/release/confab-bench compare --subscribers "$subscribers" --rate "$rate" \
  --store "$store" --warmup 3s --duration 14s >"$dir/compare.txt" 2>&1 &
compare=$!
for server in confab-server nats-server; do
  pid=
  for _ in $(seq 1 900); do
    pid=$(pgrep -x "$server" | head -1) && break
    sleep 0.1
  done
  [ -n "$pid" ] || { echo "trace-fanout: $server did not start" >&2; exit 1; }
  bench=$(pgrep -x confab-bench | head -1)
  # Past the set-up and the warm-up, into the measured window.
  sleep 8
  perf record -q -o "$dir/$server.data" -p "$pid,$bench" -e "$events" -- sleep 6 2>/dev/null
  perf script -i "$dir/$server.data" -F pid,time,event,trace 2>/dev/null >"$dir/$server.txt"
  echo "$pid $bench" >"$dir/$server.pids"
  # Wait for this side to end before looking for the next.
  while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
done
wait "$compare"
grep -E "^(fanout|p50|p99 )" "$dir/compare.txt" || true
python3 server/loadgen/trace-fanout.py "$dir/confab-server" "$dir/nats-server"
