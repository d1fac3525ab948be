#!/usr/bin/env python3
"""A gRPC test server and client (grpcio, generic handlers: no codegen).

usage: grpc_echo.py server
       grpc_echo.py client ADDR AUTHORITY

The server listens on 127.0.0.1 (h2c, no TLS), prints "READY <port>", and
serves kitepipe.Test with raw bytes as messages:
  Unary         b"echo:" + request; trailing metadata x-trailer: unary-<request>
  Stream        request N (decimal): N messages "item-0".."item-<N-1>",
                then trailing metadata x-count: N
  Collect       the client's messages joined with "+"
  Fail          status PERMISSION_DENIED, details "no entry"
The client calls each once through ADDR with :authority AUTHORITY and
prints one JSON object with what it got.
"""
import json
import sys
from concurrent import futures

import grpc

SERVICE = "kitepipe.Test"


def unary(request, context):
    context.set_trailing_metadata((("x-trailer", "unary-" + request.decode()),))
    return b"echo:" + request


def stream(request, context):
    n = int(request.decode())
    for i in range(n):
        yield ("item-%d" % i).encode()
    context.set_trailing_metadata((("x-count", str(n)),))


def collect(request_iterator, context):
    return b"+".join(request_iterator)


def fail(request, context):
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "no entry")


def server():
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    print("READY %d" % port, flush=True)
    srv.wait_for_termination()


def client(addr, authority, root=None):
    """Calls every method through `addr` as `authority`: over h2c, or over
    TLS verified against the CA file `root` when given."""
    options = [("grpc.default_authority", authority)]
    out = {}
    if root is None:
        channel = grpc.insecure_channel(addr, options=options)
    else:
        with open(root, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        options.append(("grpc.ssl_target_name_override", authority))
        channel = grpc.secure_channel(addr, credentials, options=options)
    with channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        method = "/%s/" % SERVICE
        reply, call = channel.unary_unary(method + "Unary").with_call(b"hi", timeout=30)
        out["unary"] = reply.decode()
        out["unary_trailer"] = dict(call.trailing_metadata()).get("x-trailer")
        out["unary_code"] = call.code().name
        items = channel.unary_stream(method + "Stream")(b"5", timeout=30)
        out["stream"] = [item.decode() for item in items]
        out["stream_trailer"] = dict(items.trailing_metadata()).get("x-count")
        out["stream_code"] = items.code().name
        reply = channel.stream_unary(method + "Collect")(iter([b"a", b"b", b"c"]), timeout=30)
        out["collect"] = reply.decode()
        try:
            channel.unary_unary(method + "Fail")(b"x", timeout=30)
            out["fail_code"] = "OK"
        except grpc.RpcError as err:
            out["fail_code"] = err.code().name
            out["fail_details"] = err.details()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server()
    else:
        client(*sys.argv[2:5])
