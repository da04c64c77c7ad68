"""grpcio (gRPC C-core) peer for the interop tests: the greet service with raw bytes, no protoc.

    grpcio_peer.py server --name NAME --port PORT [--host IP]
        Serves /greet.Greeter/SayHello on HOST:PORT (default [::], every address), answering "hello <request> from NAME";
        prints READY once it listens.
    grpcio_peer.py client --target HOST:PORT --runs R --calls N --concurrency C [--deadline-s S]
        R runs, each on a fresh channel (one HTTP/2 connection): N unary calls with a 1-byte
        request, spread over C callers; each call has a deadline of S seconds. Prints one line:
        RESULT {"ok": .., "failed": .., "errors": {status: count}, "by_server": {name: count}}

Same method, message and output as tests/src/greet.rs and grpc_js_peer.js, so every client
works against every server.
"""

import argparse
import json
import sys
import threading
from concurrent import futures

import grpc

METHOD = "/greet.Greeter/SayHello"


def identity(b):
    return b


def serve(name, host, port):
    def say_hello(request, context):
        return b"hello " + request + b" from " + name.encode()

    handler = grpc.method_handlers_generic_handler(
        "greet.Greeter",
        {
            "SayHello": grpc.unary_unary_rpc_method_handler(
                say_hello, request_deserializer=identity, response_serializer=identity
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(addr) == 0:
        sys.exit(f"grpcio server: cannot bind {addr}")
    server.start()
    print("READY", flush=True)
    server.wait_for_termination()


def run_client(target, runs, calls, concurrency, deadline):
    lock = threading.Lock()
    ok, failed = 0, 0
    errors, by_server = {}, {}

    def record(reply=None, error=None):
        nonlocal ok, failed
        with lock:
            if error is None:
                ok += 1
                server = reply.decode(errors="replace").rsplit(" from ", 1)[-1]
                by_server[server] = by_server.get(server, 0) + 1
            else:
                failed += 1
                errors[error] = errors.get(error, 0) + 1

    for _ in range(runs):
        # A fresh channel per run; the options stop C-core from sharing a subchannel
        # (and so a connection) between runs.
        with grpc.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            call = channel.unary_unary(
                METHOD, request_serializer=identity, response_deserializer=identity
            )
            shares = [calls // concurrency + (1 if i < calls % concurrency else 0)
                      for i in range(concurrency)]

            def caller(n):
                for _ in range(n):
                    try:
                        record(reply=call(b"x", timeout=deadline))
                    except grpc.RpcError as e:
                        record(error=f"{e.code()}: {e.details()}")

            threads = [threading.Thread(target=caller, args=(n,)) for n in shares]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    print("RESULT " + json.dumps(
        {"ok": ok, "failed": failed, "errors": errors, "by_server": by_server}), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--host", default="::")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--runs", type=int, default=1)
    c.add_argument("--calls", type=int, default=1000)
    c.add_argument("--concurrency", type=int, default=1)
    c.add_argument("--deadline-s", type=float, default=5.0)
    a = p.parse_args()
    if a.cmd == "server":
        serve(a.name, a.host, a.port)
    else:
        run_client(a.target, a.runs, a.calls, a.concurrency, a.deadline_s)


if __name__ == "__main__":
    main()
