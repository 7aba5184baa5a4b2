#!/usr/bin/env bash
# Starts the real confab-server and talks to it with tools no one here wrote: grpcurl
# (reflection list, health check, login, an error with its details) and buf curl.
set -euo pipefail
cd "$(dirname "$0")/.."
grpcurl=.ci/venv/bin/grpcurl
buf=$PWD/.ci/node_modules/.bin/buf
log=$(mktemp)
# The binary the test build made (a plain `cargo build` would build again: features
# unify differently without the dev-dependencies).
cargo test -q --workspace --no-run 2>/dev/null
target/debug/confab-server --listen 127.0.0.1:0 2>"$log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
addr=""
for _ in $(seq 1 100); do
  addr=$(grep -o 'listening on [0-9.:]*' "$log" | head -n1 | cut -d' ' -f3 || true)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$log"; echo "confab-server did not start"; exit 1; }
echo "server at $addr"

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

kill -TERM "$pid"
wait "$pid"
echo "ok: confab-server exited 0 on SIGTERM"
