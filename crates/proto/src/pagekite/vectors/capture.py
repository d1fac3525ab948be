#!/usr/bin/env python3
"""Records a PageKite tunnel: listens on 127.0.0.1:LISTEN, connects each
client to 127.0.0.1:UPSTREAM, copies both ways and writes what each side
sent to PREFIX-N.be (back-end -> front-end) and PREFIX-N.fe (front-end ->
back-end), N counting connections from 1. Stops after SECONDS. Standard
library only.

    capture.py LISTEN UPSTREAM PREFIX SECONDS
"""
import socket
import sys
import threading
import time

listen_port, upstream_port, prefix, seconds = (
    int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))


def pipe(src, dst, path):
    with open(path, 'ab') as out:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b''
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            out.write(data)
            out.flush()
            dst.sendall(data)


server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(('127.0.0.1', listen_port))
server.listen(4)
server.settimeout(0.5)
deadline = time.time() + seconds
count = 0
while time.time() < deadline:
    try:
        client, _ = server.accept()
    except socket.timeout:
        continue
    upstream = socket.create_connection(('127.0.0.1', upstream_port))
    count += 1
    for src, dst, suffix in ((client, upstream, '.be'), (upstream, client, '.fe')):
        path = '%s-%d%s' % (prefix, count, suffix)
        threading.Thread(target=pipe, args=(src, dst, path),
                         daemon=True).start()
