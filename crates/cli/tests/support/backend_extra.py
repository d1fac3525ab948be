#!/usr/bin/env python3
"""A second small test backend: an HTTP server that says which backend it is.

usage: backend_extra.py whoami [--bind ADDR]
Prints "READY <port>" once listening on ADDR (default 127.0.0.1), port 0.

Every GET answers "backend <port>\\n" (its own listening port), so a test
with several backends behind one kite can tell which one answered.
"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WhoAmI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        body = ("backend %d\n" % self.server.server_address[1]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main():
    if len(sys.argv) < 2 or sys.argv[1] != "whoami":
        sys.exit("usage: backend_extra.py whoami [--bind ADDR]")
    bind = "127.0.0.1"
    args = sys.argv[2:]
    while args:
        if args[0] == "--bind":
            bind = args[1]
        args = args[2:]
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((bind, 0), WhoAmI)
    print("READY %d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
