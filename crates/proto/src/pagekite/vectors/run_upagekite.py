# upagekite back-end for a local front-end: KITE SECRET FE_PORT
import sys
from upagekite import Kite, uPageKite, uPageKiteDefaults

class Local(uPageKiteDefaults):
    FE_NAME = '127.0.0.1'
    FE_PORT = int(sys.argv[3])
    WITH_SSL = False
    FE_HINT_URL = None
    DDNS_URL = None
    info = uPageKiteDefaults.log

    @classmethod
    async def update_dns(cls, relay_ip, kites):
        return True  # no dynamic DNS on loopback

    @classmethod
    async def get_kite_addrinfo(cls, kite):
        return []
    error = uPageKiteDefaults.log

async def handle(kite, conn, frame):
    await conn.reply(frame, 'HTTP/1.0 200 OK\nContent-Type: text/plain\n\nhello from upagekite %s\n' % frame.remote_ip)

uPageKite([Kite(sys.argv[1], sys.argv[2], handler=handle)], uPK=Local).run()
