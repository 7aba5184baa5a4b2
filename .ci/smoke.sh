#!/usr/bin/env bash
# Starts the real confab-server and talks to it with tools no one here wrote: grpcurl
# (reflection list, health check, login, an error with its details), buf curl, a Python
# grpcio client chatting with the Rust one, and curl on the metrics page.
set -euo pipefail
cd "$(dirname "$0")/.."
grpcurl=.ci/venv/bin/grpcurl
buf=$PWD/.ci/node_modules/.bin/buf
log=$(mktemp)
# The binary the test build made (a plain `cargo build` would build again: features
# unify differently without the dev-dependencies).
cargo test -q --workspace --no-run 2>/dev/null
target/debug/confab-server --in-memory --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 2>"$log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
addr=""
for _ in $(seq 1 100); do
  addr=$(grep -o 'listening on [0-9.:]*' "$log" | head -n1 | cut -d' ' -f3 || true)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$log"; echo "confab-server did not start"; exit 1; }
# The server logs its metrics address before "listening on", its last line of start-up.
metrics=$(grep -o 'metrics at http://[0-9.:]*' "$log" | head -n1 | cut -d/ -f3 || true)
[ -n "$metrics" ] || { cat "$log"; echo "confab-server did not say where its metrics are"; exit 1; }
echo "server at $addr, metrics at $metrics"

expect() { # expect WHAT PATTERN TEXT
  if ! grep -q -- "$2" <<<"$3"; then echo "FAIL: $1: expected /$2/ in:"; echo "$3"; exit 1; fi
  echo "ok: $1"
}

services=$($grpcurl -plaintext "$addr" list)
echo "$services"
expect "grpcurl lists the chat service" '^chat.v1.ChatService$' "$services"
expect "grpcurl lists health" '^grpc.health.v1.Health$' "$services"
expect "grpcurl lists reflection" '^grpc.reflection.v1.ServerReflection$' "$services"
expect "grpcurl lists reflection v1alpha" '^grpc.reflection.v1alpha.ServerReflection$' "$services"
expect "health is SERVING" '"status": "SERVING"' "$($grpcurl -plaintext "$addr" grpc.health.v1.Health/Check)"

login=$($grpcurl -plaintext -d '{"nickname":"ci"}' "$addr" chat.v1.ChatService/Login)
token=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$login")
auth="authorization: Bearer $token"
expect "create a room" '"name": "ci-room"' \
  "$($grpcurl -plaintext -H "$auth" -d '{"room":"ci-room","topic":"smoke"}' "$addr" chat.v1.ChatService/CreateRoom)"
expect "publish" '"seq": "1"' \
  "$($grpcurl -plaintext -H "$auth" -d '{"message":{"room":"ci-room","text":"hi","client_msg_id":"1"}}' "$addr" chat.v1.ChatService/Publish)"
bad=$($grpcurl -plaintext -H "$auth" -d '{"message":{"room":"Bad Name","text":"hi","client_msg_id":"2"}}' "$addr" chat.v1.ChatService/Publish 2>&1 || true)
expect "a bad request is INVALID_ARGUMENT" 'Code: InvalidArgument' "$bad"
expect "its BadRequest details name the field" '"field":"message.room"' "$bad"
expect "no token is UNAUTHENTICATED" 'Code: Unauthenticated' \
  "$($grpcurl -plaintext -d '{}' "$addr" chat.v1.ChatService/ListRooms 2>&1 || true)"

# buf curl resolves the schema through reflection (it reads proto/buf.yaml from here).
room=$(cd proto && $buf curl --protocol grpc --http2-prior-knowledge -H "$auth" \
  -d '{"room":"ci-room"}' "http://$addr/chat.v1.ChatService/GetRoom")
expect "buf curl GetRoom through reflection" '"headSeq": "1"' "$room"

# A client built on grpcio, its stubs generated from proto/ here and now.
.ci/venv/bin/python tests/interop/chat_client.py "$addr" target/debug/confab

# The metrics page after all that.
page=$(curl -fsS "http://$metrics/metrics")
value() { awk -v name="$1" '$1 == name { print $2 }' <<<"$page"; }
positive() { # positive WHAT SAMPLE
  v=$(value "$2"); awk -v v="$v" 'BEGIN { exit !(v > 0) }' || { echo "FAIL: $1: $2 is '$v'"; echo "$page"; exit 1; }
  echo "ok: $1 ($2 = $v)"
}
zero() { # zero WHAT SAMPLE: streams close a moment after their clients go, so poll
  for _ in $(seq 1 50); do
    v=$(value "$2"); [ "$v" = 0 ] && break
    sleep 0.1; page=$(curl -fsS "http://$metrics/metrics")
  done
  [ "$v" = 0 ] || { echo "FAIL: $1: $2 is '$v'"; echo "$page"; exit 1; }
  echo "ok: $1 ($2 = $v)"
}
positive "connections were accepted" confab_connections_accepted_total
positive "messages came in" confab_messages_in_total
positive "messages were delivered" confab_deliveries_total
positive "rooms exist" confab_rooms
positive "commits were timed" confab_store_commit_seconds_count
positive "the flood was limited" 'confab_limited_total{limit="send_rate"}'
zero "no chat stream is left open" 'confab_streams{kind="chat"}'
zero "no subscription is left open" 'confab_streams{kind="subscribe"}'
zero "no reader stalled" confab_slow_reader_disconnects_total
expect "the commit latency is a histogram" '^# TYPE confab_store_commit_seconds histogram' "$page"

kill -TERM "$pid"
wait "$pid"
echo "ok: confab-server exited 0 on SIGTERM"
