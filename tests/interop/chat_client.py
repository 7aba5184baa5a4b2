"""A Confab client no one here wrote the stack of: Python and grpcio.

Generates its stubs from proto/ with grpcio-tools, logs in, joins a room on a Chat
stream, and chats there with the Rust client (`confab --pipe`, started here); then reads
the rich error details (google.rpc.BadRequest) of a bad request and the RetryInfo of a
refused flood. Exits non-zero on the first thing that is not as the protocol says.

    python chat_client.py SERVER_ADDR PATH_TO_CONFAB_BINARY
"""

import json
import os
import pathlib
import queue
import subprocess
import sys
import tempfile
import threading

import grpc
from grpc_status import rpc_status
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEADLINE = 20  # seconds: a bound on a hang, not a performance figure


def generate_stubs() -> pathlib.Path:
    """chat_pb2 and chat_pb2_grpc from proto/, with the well-known types grpcio-tools carries."""
    out = pathlib.Path(tempfile.mkdtemp(prefix="confab-stubs-"))
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    for proto in ["chat/v1/chat.proto", "chat/v1/message.proto"]:
        code = protoc.main([
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ])
        if code != 0:
            sys.exit(f"protoc failed on {proto}")
    return out


def violated_fields(error, error_details_pb2):
    """The field paths of a failed call's google.rpc.BadRequest details."""
    fields = []
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def check(what, condition, detail=""):
    if not condition:
        sys.exit(f"FAIL: {what} {detail}")
    print(f"ok: {what}", flush=True)


def main():
    server, confab_binary = sys.argv[1], sys.argv[2]
    sys.path.insert(0, str(generate_stubs()))
    from chat.v1 import chat_pb2, chat_pb2_grpc, message_pb2  # noqa: E402
    from google.rpc import error_details_pb2  # noqa: E402

    channel = grpc.insecure_channel(server)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    login = stub.Login(chat_pb2.LoginRequest(nickname="python"), timeout=DEADLINE)
    check("Python logs in", login.nickname == "python" and login.token)
    check("the server advertises its send limit", login.limits.send_rate_per_second > 0)
    auth = [("authorization", f"Bearer {login.token}")]

    # The Chat stream: requests from a queue, responses read on this thread.
    requests = queue.Queue()

    def frames():
        while True:
            frame = requests.get()
            if frame is None:
                return
            yield frame

    responses = stub.Chat(frames(), metadata=auth, timeout=60)
    requests.put(chat_pb2.ChatRequest(request_id=1, join=chat_pb2.JoinRoom(room="interop")))
    first = next(responses)
    check("Python joins on a Chat stream", first.request_id == 1 and first.HasField("joined"),
          str(first))

    # The Rust client says something; Python hears it and answers.
    rust = subprocess.Popen(
        [confab_binary, "--pipe", "--follow", "--server", f"http://{server}",
         "--nick", "rusty", "--room", "interop"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    rust_lines = queue.Queue()
    threading.Thread(target=lambda: [rust_lines.put(json.loads(l)) for l in rust.stdout],
                     daemon=True).start()
    try:
        def rust_event(kind, predicate=lambda e: True):
            while True:
                event = rust_lines.get(timeout=DEADLINE)
                if event.get("kind") == kind and predicate(event):
                    return event

        rust_event("joined", lambda e: e["room"] == "interop")
        rust.stdin.write("hello from Rust\n")
        rust.stdin.flush()
        for response in responses:
            if response.HasField("message") and response.message.text == "hello from Rust":
                check("Python receives the Rust client's message",
                      response.message.sender == "rusty" and response.message.seq >= 1)
                break
        requests.put(chat_pb2.ChatRequest(request_id=2, send=chat_pb2.OutgoingMessage(
            room="interop", text="hello from Python", client_msg_id="py-1",
            kind=message_pb2.MESSAGE_KIND_TEXT)))
        for response in responses:
            if response.request_id == 2:
                check("Python's message is acked", response.HasField("ack"), str(response))
                break
        heard = rust_event("message", lambda e: e["text"] == "hello from Python")
        check("the Rust client receives Python's message", heard["from"] == "python")
    finally:
        rust.terminate()
        rust.wait(timeout=DEADLINE)
        requests.put(None)

    # A bad request: INVALID_ARGUMENT with a BadRequest naming the field.
    try:
        stub.Publish(chat_pb2.PublishRequest(message=chat_pb2.OutgoingMessage(
            room="Not A Room", text="hi", client_msg_id="py-2")), metadata=auth, timeout=DEADLINE)
        sys.exit("FAIL: a bad room name was accepted")
    except grpc.RpcError as error:
        check("a bad request is INVALID_ARGUMENT", error.code() == grpc.StatusCode.INVALID_ARGUMENT)
        fields = violated_fields(error, error_details_pb2)
        check("its BadRequest details name the field", fields == ["message.room"], str(fields))

    # A 60,000-byte value is quoted cut short, so grpcio with its default metadata limits
    # reads the promised INVALID_ARGUMENT naming the field (not RESOURCE_EXHAUSTED).
    huge = "x" * 60_000
    for what, call, field in [
        ("a huge nickname", lambda: stub.Login(
            chat_pb2.LoginRequest(nickname=huge), timeout=DEADLINE), "nickname"),
        ("a huge room name", lambda: stub.GetRoom(
            chat_pb2.GetRoomRequest(room=huge), metadata=auth, timeout=DEADLINE), "room"),
    ]:
        try:
            call()
            sys.exit(f"FAIL: {what} was accepted")
        except grpc.RpcError as error:
            check(f"{what} is INVALID_ARGUMENT with grpcio's default limits",
                  error.code() == grpc.StatusCode.INVALID_ARGUMENT, str(error.code()))
            trailers = sum(len(k) + len(v) for k, v in error.trailing_metadata())
            check(f"{what}: its trailers are under 1 KiB", trailers < 1024, str(trailers))
            fields = violated_fields(error, error_details_pb2)
            check(f"{what}: the details name the field", fields == [field], str(fields))

    # Past the send rate: RESOURCE_EXHAUSTED with a RetryInfo saying when to come back.
    retry = None
    for n in range(int(login.limits.send_burst) + 5):
        try:
            stub.Publish(chat_pb2.PublishRequest(message=chat_pb2.OutgoingMessage(
                room="interop", text=f"flood {n}", client_msg_id=f"py-flood-{n}")),
                metadata=auth, timeout=DEADLINE)
        except grpc.RpcError as error:
            check("a flood is RESOURCE_EXHAUSTED",
                  error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
            for detail in rpc_status.from_call(error).details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
            break
    check("its RetryInfo says when to retry",
          retry is not None and retry.retry_delay.ToNanoseconds() > 0, str(retry))
    print("interop: all checks passed")


if __name__ == "__main__":
    main()
