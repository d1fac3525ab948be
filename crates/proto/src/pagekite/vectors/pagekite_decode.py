#!/usr/bin/python3
"""Feeds a file of chunks to pagekite.py's own ChunkParser (the decoder of
pagekite/proto/selectables.py) and prints, one line each, the hex of every
chunk payload it decoded, then `corrupt N` and `ok True|False`.

    /usr/bin/python3 pagekite_decode.py FILE [STEP]

STEP feeds the bytes in pieces of that size (default or 0: all at once).
"""
import sys

from pagekite.proto.selectables import ChunkParser


class Collect(ChunkParser):
    def __init__(self):
        ChunkParser.__init__(self)
        self.got = []
        self.corrupt = 0

    def ProcessChunk(self, chunk):
        self.got.append(chunk)
        return True

    def ProcessCorruptChunk(self, chunk):
        self.corrupt += 1
        return True


data = open(sys.argv[1], 'rb').read()
step = (int(sys.argv[2]) if len(sys.argv) > 2 else 0) or len(data)
parser = Collect()
ok = True
for i in range(0, len(data), max(step, 1)):
    ok = parser.ProcessData(data[i:i + step].decode('latin-1')) and ok
for chunk in parser.got:
    print(chunk.encode('latin-1').hex())
print('corrupt %d' % parser.corrupt)
print('ok %s' % ok)
