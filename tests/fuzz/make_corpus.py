#!/usr/bin/env python3
"""Writes the fuzzers' seed corpus (tests/fuzz/corpus/<target>/): well-formed inputs
that reach deep into each decoder, for libFuzzer to mutate. Rerun after a wire change."""
import os
import struct
import sys

MAGIC, VERSION = 0x3154564B, 3
HELLO, PING, STATS, CTL = 1, 4, 6, 8
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def msg(t, payload=b""):
    return struct.pack("<IHHIi", MAGIC, VERSION, t, len(payload), 0) + payload


def hello(layout=(2, 2, 2, 64, 2, 16, 0, 2), tenant=b"", entries=16, data=0):
    return struct.pack("<II8I32sIIQ", 88, 0, *layout, tenant.ljust(32, b"\0"), entries, 0, data)


def ctl(*words):
    return msg(CTL, b"".join(w.encode() + b"\0" for w in words))


def sqe(op, flags=0, layer=0, seq=0, user=0, ntok=0, budget=0, off=(0, 0, 0), stride=0,
        sink=0, window=0, top_p=0.0):
    return struct.pack("<BBHIQII3QIIIf", op, flags, layer, seq, user, ntok, budget, *off,
                       stride, sink, window, top_p)


def write(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# the control socket
write("wire", "hello", msg(HELLO, hello()))
write("wire", "hello-tenant", msg(HELLO, hello(tenant=b"a")) + msg(PING))
write("wire", "hello-bad-layout", msg(HELLO, hello(layout=(0, 2, 2, 64, 2, 16, 0, 2))))
write("wire", "stats", msg(STATS))
for i, words in enumerate([("status",), ("tiers",), ("clients",), ("seqs", "client=1"),
                           ("pages", "client=1", "seq=0"), ("stats",), ("metrics",),
                           ("config", "get", "name=ipc.socket"),
                           ("config", "set", "name=prefetch.enable", "value=0"),
                           ("evict", "tier=host"), ("drain", "tier=gpu"), ("flush",),
                           ("job",), ("cancel",)]):
    write("wire", "ctl-%02d-%s" % (i, words[0]), ctl(*words))

# the ring: SEQ_CREATE=1 CLOSE=2 FORK=3 APPEND=4 SELECT=5 INFO=6 STATS=7 OPEN=8 SYNC=9
# REMOVE=10
K, V = 0, 2 * 16 * 2 * 64 * 4 // 2  # one page of K then V at the data area's start
app = sqe(4, seq=0, layer=0, ntok=16, off=(0, 16 * 2 * 64 * 4, 0), user=2)
q_off, ids_off, out_off = 65536, 65536 + 4096, 65536 + 8192
sel = sqe(5, seq=1, layer=0, budget=4, off=(ids_off, q_off, out_off), stride=8, sink=16,
          window=16, user=3)
data = bytearray(65536 + 16384)
for i in range(0, 65536, 4):
    struct.pack_into("<f", data, i, ((i * 2654435761) % 2000) / 1000.0 - 1.0)
struct.pack_into("<I", data, ids_off, 0)


def ring(reqs, tail=b""):
    return bytes([len(reqs)]) + b"".join(reqs) + bytes(data) + tail


write("ring", "create", ring([sqe(1, user=1)]))
write("ring", "create-append-select", ring([sqe(1, user=1), app, app, sel]))
write("ring", "create-append-info-stats",
      ring([sqe(1, user=1), app, sqe(6, seq=0, user=4), sqe(7, seq=0, off=(0, 0, 0), user=5)]))
write("ring", "fork-close", ring([sqe(1, user=1), app, app, sqe(3, seq=0, ntok=16, user=6),
                                  sqe(2, seq=1, user=7), sqe(2, seq=0, user=8)]))
write("ring", "nops", ring([sqe(0, user=i) for i in range(8)]))
# named sequences: SEQ_OPEN=8 (flags 1: create), SEQ_SYNC=9, SEQ_REMOVE=10; the name at
# a free spot of the data area
name_off = 65536 + 12288
named = bytearray(data)
named[name_off:name_off + 6] = b"fz/seq"
nm = dict(ntok=6, off=(name_off, 0, 0))
write("ring", "named-open-sync-close-reopen-remove",
      bytes([6]) + b"".join([sqe(8, flags=1, user=1, **nm), app, sqe(9, seq=0, user=3),
                             sqe(2, seq=0, user=4), sqe(8, user=5, **nm),
                             sqe(2, seq=0, user=6)]) + bytes(named))
write("ring", "named-remove-busy",
      bytes([3]) + b"".join([sqe(8, flags=3, user=1, **nm), sqe(10, user=2, **nm),
                             sqe(8, flags=1, user=3, **nm)]) + bytes(named))
write("ring", "bad-index", ring([sqe(0)], tail=b"\xc7"))

# the config
write("config", "conf", b"""[store]
state_dir = /var/lib/kvtier
page_bytes = 32K
nvme_bytes = 16G
disk_full = evict
fault_inject = read_eio=0.01,write_hang=@5,hang_ms=100
[ipc]
allow_uids = 0,1000
socket_mode = 0660
[tenant]
host_bytes = 1G
gpu_bytes = 512M
[prefetch]
enable = true
""")
write("config", "sets", b"ipc.max_clients=64\nstore.queue_depth=0\nselect.substitute_gap=3\n4T\n")
print("corpus in", root)
