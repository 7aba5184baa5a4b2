#!/usr/bin/env bash
# Cluster mode's figures for BENCHMARKS.md: one redis-server and two confab-server nodes
# on it (flood control off), loaded by confab-bench over several --server URLs. On the
# project's 2-core machine Redis, the nodes and the generator share both cores: nothing is
# pinned, and the figures are for comparing the rows with one another, not with the
# single-node table (where the server has a core of its own).
#   bash server/loadgen/bench-cluster.sh                 # every row, RUNS=3 each
#   RUNS=1 DURATION=8s bash server/loadgen/bench-cluster.sh
# The JSON of every run goes to $OUT (default: bench-cluster.jsonl), each line with the
# row's name in "args".
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q --release -p confab-server -p confab-bench
bench=target/release/confab-bench
server=target/release/confab-server
out=${OUT:-bench-cluster.jsonl}
runs=${RUNS:-3}
warmup=${WARMUP:-5s}
duration=${DURATION:-20s}
fsync=${APPENDFSYNC:-everysec}
: >"$out"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --appendonly yes \
  --appendfsync "$fsync" --save '' --logfile redis.log &
pids+=($!)
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done

declare -A url pid
for node in a b; do
  port=$(free_port)
  RUST_LOG=warn $server --redis "redis://127.0.0.1:$redis_port" --node-id "$node" \
    --listen "127.0.0.1:$port" --send-rate 0 --room-creation-per-minute 0 \
    --max-rooms 100000000 --max-connections-per-ip 1000000 \
    --max-streams-per-user 1000000 --max-rooms-per-stream 100000 --history-on-join 0 &
  pid[$node]=$!
  pids+=($!)
  url[$node]="http://127.0.0.1:$port"
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done
done
a=(--server "${url[a]}" --server-pid "${pid[a]}")
both=(--server "${url[a]}" --server "${url[b]}" --server-pid "${pid[a]}" --server-pid "${pid[b]}")
only_b=(--server "${url[b]}" --publish-server "${url[a]}" --server-pid "${pid[a]}" --server-pid "${pid[b]}")
spread=(--publish-server "${url[a]}" --publish-server "${url[b]}")

run() {
  local name=$1
  shift
  for r in $(seq 1 "$runs"); do
    echo "== $name (run $r)" >&2
    # A run that loses messages still prints its figures (then fails): keep them.
    { $bench "$@" --no-pin --warmup "$warmup" --duration "$duration" --json || true; } |
      sed "s|^{|{\"args\":\"$name\",|" >>"$out"
  done
}

# Fan-out: subscribers on the publisher's node, on the other node only (every delivery
# crosses Redis pub/sub to get there), and spread over both.
run "fanout 1000 x 200/s, one node" fanout --subscribers 1000 --rate 200 "${a[@]}"
run "fanout 1000 x 200/s, subscribers on the other node" fanout --subscribers 1000 --rate 200 "${only_b[@]}"
run "fanout 1000 x 200/s, subscribers on both nodes" fanout --subscribers 1000 --rate 200 "${both[@]}"
# Append rate: 100 rooms, one subscriber each, 10 publishers, through one node and two.
for rate in 50 100 200 400; do
  run "append $((rate * 100))/s through one node" rooms --rooms 100 --per-room 1 --rate "$rate" --connections 10 "${a[@]}"
  run "append $((rate * 100))/s through two nodes" rooms --rooms 100 --per-room 1 --rate "$rate" --connections 10 "${both[@]}" "${spread[@]}"
done
python3 - "$out" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    run = json.loads(line)
    rows.setdefault(run["args"], []).append(run)
print("| run | delivered/s | p50 | p99 | lost | servers' CPU |")
print("|---|---|---|---|---|---|")
for name, runs in rows.items():
    runs.sort(key=lambda r: r["p99_us"])
    m = runs[len(runs) // 2]
    p99s = ", ".join(f"{r['p99_us'] / 1000:.1f}" for r in runs)
    print(f"| {name} | {m['delivered_per_sec']:,.0f} | {m['p50_us'] / 1000:.2f} ms "
          f"| {m['p99_us'] / 1000:.2f} ms (runs: {p99s}) | {m['lost']} | {m['server_cpu_s']:.1f} s |")
EOF
