"""upagekite (PyPI) as a PageKite back-end for the relay's tests.

Usage: upagekite_backend.py RELAY_IP RELAY_PORT KITE_NAME SECRET

Flies one http kite through the relay at RELAY_IP:RELAY_PORT (plaintext,
no TLS), answering every request with `hello from upagekite KITE_NAME`.
Nothing leaves loopback: kite names are not resolved and the dynamic DNS
update is a no-op.
"""

import sys

from upagekite import Kite, uPageKite
from upagekite.proto import uPageKiteDefaults

RELAY_IP, RELAY_PORT, NAME, SECRET = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]


class Defaults(uPageKiteDefaults):
    FE_NAME = RELAY_IP
    FE_PORT = RELAY_PORT
    WITH_SSL = False
    info = uPageKiteDefaults.log
    error = uPageKiteDefaults.log

    @classmethod
    async def get_kite_addrinfo(cls, kite):
        return []

    @classmethod
    async def update_dns(cls, relay_ip, kites):
        return True


async def handle_http_request(kite, conn, frame):
    await conn.reply(
        frame,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from upagekite %s\n" % kite.name,
    )


print("starting upagekite for %s via %s:%d" % (NAME, RELAY_IP, RELAY_PORT), flush=True)
uPageKite([Kite(NAME, SECRET, handler=handle_http_request)], uPK=Defaults).run()
