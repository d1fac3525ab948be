#!/usr/bin/env python3
"""Test backends behind a kitepipe connector: real servers, standard library only.

usage: backend.py http|tcp-echo [--bind ADDR] [--port N]
Prints "READY <port>" once listening.

http routes:
  GET  /            "hello from backend"
  GET  /headers     the request headers as JSON
  GET  /conn        the client address as the backend saw it (keep-alive check)
  GET  /chunked     a chunked response: "chunk-0\\n" .. "chunk-9\\n"
  GET  /bytes/N     N deterministic bytes
  POST /sha256      {"len": N, "sha256": HEX} of the body (Content-Length or chunked)
  GET  /ws          WebSocket echo (RFC 6455; text and binary, close)
"""
import base64
import hashlib
import json
import socket
import socketserver
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B85"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def reply(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/":
            self.reply(200, b"hello from backend\n")
        elif self.path == "/headers":
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            self.reply(200, body, "application/json")
        elif self.path == "/conn":
            self.reply(200, ("%s:%d" % self.client_address).encode())
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(10):
                chunk = ("chunk-%d\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = bytes(range(256)) * 256
            while n > 0:
                part = block[: min(n, len(block))]
                self.wfile.write(part)
                n -= len(part)
        elif self.path == "/ws":
            self.websocket()
        else:
            self.reply(404, b"no such path\n")

    def do_POST(self):
        if self.path != "/sha256":
            self.reply(404, b"no such path\n")
            return
        digest = hashlib.sha256()
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(size)
                digest.update(data)
                total += len(data)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining > 0:
                data = self.rfile.read(min(remaining, 1 << 16))
                if not data:
                    break
                digest.update(data)
                total += len(data)
                remaining -= len(data)
        body = json.dumps({"len": total, "sha256": digest.hexdigest()}).encode()
        self.reply(200, body, "application/json")

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode = head[0] & 0x0F
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytearray(self.rfile.read(length))
            for i in range(len(data)):
                data[i] ^= mask[i % 4]
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                return
            frame = bytearray([0x80 | opcode])
            if len(data) < 126:
                frame.append(len(data))
            elif len(data) < 65536:
                frame.append(126)
                frame += struct.pack(">H", len(data))
            else:
                frame.append(127)
                frame += struct.pack(">Q", len(data))
            self.wfile.write(bytes(frame) + bytes(data))
            self.wfile.flush()
        self.close_connection = True


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        while True:
            data = sock.recv(1 << 16)
            if not data:
                break
            sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class ThreadingTCP(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    mode = sys.argv[1]
    bind = "127.0.0.1"
    port = 0
    args = sys.argv[2:]
    while args:
        if args[0] == "--bind":
            bind = args[1]
        elif args[0] == "--port":
            port = int(args[1])
        args = args[2:]
    if mode == "http":
        ThreadingHTTPServer.daemon_threads = True
        server = ThreadingHTTPServer((bind, port), Handler)
    elif mode == "tcp-echo":
        server = ThreadingTCP((bind, port), EchoHandler)
    else:
        sys.exit("unknown mode " + mode)
    print("READY %d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
