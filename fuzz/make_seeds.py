#!/usr/bin/env python3
"""Writes the hand-made seeds of fuzz/corpus/ (the rest of each corpus is what libFuzzer found
and kept, minimised). Run from anywhere: python3 fuzz/make_seeds.py"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# --- session: the format of fuzz/src/session.rs (Message::read) ---------------------------

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG, RESET_DEVICE = 24, 25, 34
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 36, 37, 38

PROTOCOL_FEATURES = 1 << 30
VERSION_1 = 1 << 32
# MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS
PROTOCOLS = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 15)
USER = 0x7F00_0000_0000


def device(read_only=0, pages=255, queues=1, qsize_log=8, blk4k=0, wce=1):
    return bytes([read_only]) + struct.pack("<H", pages) + bytes([queues - 1, qsize_log, blk4k, wce])


def msg(code, payload=b"", nfds=0, memfds=0, reply=1):
    return bytes([code, reply]) + struct.pack("<H", len(payload)) + payload + bytes([nfds]) + struct.pack("<H", memfds)


def u64(v):
    return struct.pack("<Q", v)


def region(gpa, size, user, offset=0):
    return struct.pack("<QQQQ", gpa, size, user, offset)


def vring_state(index, num):
    return struct.pack("<II", index, num)


def vring_addr(index, desc, used, avail):
    return struct.pack("<IIQQQQ", index, 0, desc, used, avail, 0)


def negotiate():
    return (
        msg(GET_FEATURES)
        + msg(SET_FEATURES, u64(PROTOCOL_FEATURES | VERSION_1))
        + msg(GET_PROTOCOL_FEATURES)
        + msg(SET_PROTOCOL_FEATURES, u64(PROTOCOLS))
        + msg(SET_OWNER)
    )


def ring(index=0, size=16, base=USER):
    return (
        msg(SET_VRING_NUM, vring_state(index, size))
        + msg(SET_VRING_BASE, vring_state(index, 0))
        + msg(SET_VRING_ADDR, vring_addr(index, base, base + 0x2000, base + 0x1000))
        + msg(SET_VRING_CALL, u64(index), nfds=1)
        + msg(SET_VRING_KICK, u64(index), nfds=1)
        + msg(SET_VRING_ENABLE, vring_state(index, 1))
    )


def session_seeds():
    table = struct.pack("<II", 1, 0) + region(0, 0x10000, USER)
    yield "qemu-start-stop", (
        device()
        + negotiate()
        + msg(SET_MEM_TABLE, table, nfds=1)
        + ring()
        + msg(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))
        + msg(SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\x00")
        + msg(GET_VRING_BASE, vring_state(0, 0))
    )
    yield "mem-slots", (
        device(queues=2)
        + negotiate()
        + msg(GET_MAX_MEM_SLOTS)
        + msg(ADD_MEM_REG, u64(0) + region(0, 0x10000, USER), nfds=1)
        + msg(ADD_MEM_REG, u64(0) + region(0x100000, 0x1000, USER + 0x100000), nfds=1)
        + ring(1)
        + msg(REM_MEM_REG, u64(0) + region(0x100000, 0x1000, USER + 0x100000))
        + msg(REM_MEM_REG, u64(0) + region(0, 0x10000, USER))
        + msg(GET_VRING_BASE, vring_state(1, 0))
    )
    two = struct.pack("<II", 2, 0) + region(0, 0x4000, USER) + region(0x4000, 0x4000, USER + 0x4000, 0)
    yield "table-swap-reset", (
        device(read_only=1, queues=4, qsize_log=10, blk4k=1, wce=0)
        + negotiate()
        + msg(SET_MEM_TABLE, two, nfds=2)
        + ring(2, 8)
        + msg(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(0, 0x4000, USER), nfds=1)
        + msg(GET_QUEUE_NUM)
        + msg(RESET_DEVICE)
        + msg(RESET_OWNER)
    )


# --- request: the format of fuzz/src/request.rs (limits, then serve) -----------------------

NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def limits(read_only=0, align=0, seg_max=128):
    # capacity 1 GiB; discard and write-zeroes offered; 4 Mi sectors, 32 segments.
    return (
        bytes([1, read_only])
        + struct.pack("<HH", seg_max - 1, 1023)
        + bytes([1, 1])
        + struct.pack("<I", 1 << 22)
        + bytes([31, align])
    )


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def header(kind, sector=0):
    return struct.pack("<IIQ", kind, 0, sector)


def mem_write(addr, data):
    return struct.pack("<IB", addr, len(data)) + data


def queue(size_log, descs, heads, writes, event_idx=0, next_avail=0):
    size = 1 << size_log
    table = b"".join(descs).ljust(size * 16, b"\0")
    avail = struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
    avail = avail.ljust(4 + size * 2, b"\0")
    return (
        bytes([size_log, event_idx])
        + struct.pack("<H", next_avail)
        + table
        + avail
        + b"".join(mem_write(a, d) for a, d in writes)
    )


def request_seeds():
    yield "read", limits() + queue(
        3,
        [desc(0x3000, 16, NEXT, 1), desc(0x5000, 0x1000, WRITE | NEXT, 2), desc(0x3100, 1, WRITE)],
        [0],
        [(0x3000, header(T_IN, 8))],
    )
    # Header, data and status in one descriptor each, the data crossing from region A into B.
    yield "write-across-regions", limits() + queue(
        2,
        [desc(0x3000, 16, NEXT, 1), desc(0x3800, 0x1000, NEXT, 2), desc(0x3100, 1, WRITE)],
        [0],
        [(0x3000, header(T_OUT, 0))],
    )
    # An indirect table in region C; then GET_ID, FLUSH and a DISCARD of two segments.
    indirect = desc(0x3000, 16, NEXT, 1) + desc(0x6000, 0x200, WRITE | NEXT, 2) + desc(0x3100, 1, WRITE)
    segments = struct.pack("<QII", 0, 8, 0) + struct.pack("<QII", 64, 16, 0)
    yield "indirect-getid-flush-discard", limits() + queue(
        4,
        [
            desc(0x10000, 48, INDIRECT),
            desc(0x3200, 16, NEXT, 2),
            desc(0x6200, 20, WRITE | NEXT, 3),
            desc(0x3300, 1, WRITE),
            desc(0x3400, 16, NEXT, 5),
            desc(0x3500, 1, WRITE),
            desc(0x3600, 16 + 32, NEXT, 7),
            desc(0x3700, 1, WRITE),
        ],
        [0, 1, 4, 6],
        [
            (0x10000, indirect),
            (0x3000, header(T_IN, 1)),
            (0x3200, header(T_GET_ID)),
            (0x3400, header(T_FLUSH)),
            (0x3600, header(T_DISCARD) + segments),
        ],
    )
    zeroes = struct.pack("<QII", 8, 8, 1) + struct.pack("<QII", 128, 8, 0)
    yield "write-zeroes-direct-event-idx", limits(align=1) + queue(
        1,
        [desc(0x3000, 16 + 32, NEXT, 1), desc(0x3100, 1, WRITE)],
        [0],
        [(0x3000, header(T_WRITE_ZEROES) + zeroes)],
        event_idx=1,
    )


# --- inflight: the format of fuzz/src/inflight.rs (ring, steps, then the region's bytes) ----

TAKE, COMPLETE, CRASH = 0, 0x8000, 0x80


def ring_size(size):
    return bytes([size - 1]) if size <= 0xF0 else b"\xf0" + struct.pack("<H", size)


def inflight_input(size, ring_used, base, steps=(), crash=False, region=b""):
    n = len(steps) | (CRASH if crash else 0)
    return (
        ring_size(size)
        + struct.pack("<HHB", ring_used, base, n)
        + b"".join(struct.pack("<H", s) for s in steps)
        + region
    )


def inflight_region(desc_num, last_batch_head, used_idx, states, version=1, features=0):
    """states: {head: (inflight, next, counter)}; the other heads are zero."""
    descs = b"".join(
        struct.pack("<B5xHQ", *states.get(head, (0, 0, 0))) for head in range(desc_num)
    )
    return struct.pack("<QHHHH", features, version, desc_num, last_batch_head, used_idx) + descs


def inflight_seeds():
    # A region no backend has written (all zeros): recovery initialises it, then heads are
    # taken and completed, and the backend dies in the middle of a completion.
    yield "empty", inflight_input(
        8, 0, 0, [TAKE | 3, TAKE | 5, COMPLETE | 0, TAKE | 1], crash=True
    )
    # Heads 0, 2, 5 and 7 in flight; 2 is the last batch, in the used ring (5) but not in the
    # region (4): 7, 5, 0 run again, in counter order.
    yield "heads-in-flight", inflight_input(
        8,
        5,
        5,
        [COMPLETE | 1, TAKE | 4],
        crash=True,
        region=inflight_region(
            8, 2, 4, {0: (1, 0, 13), 2: (1, 6, 14), 5: (1, 0, 12), 7: (1, 0, 11), 6: (0, 1, 9)}
        ),
    )
    # Nothing in flight: the region follows the ring (a driver that reset its ring).
    yield "nothing-in-flight", inflight_input(
        256, 0, 0, region=inflight_region(256, 17, 1000, {3: (0, 4, 99)})
    )
    # The largest ring the target's region holds, fresh; one larger is refused.
    yield "largest-ring", inflight_input(1024, 7, 7, [TAKE | 1023, COMPLETE | 0])
    yield "ring-too-big", inflight_input(2048, 0, 0)


def write(target, seeds):
    out = os.path.join(HERE, "corpus", target)
    os.makedirs(out, exist_ok=True)
    for name, data in seeds:
        with open(os.path.join(out, "seed-" + name), "wb") as f:
            f.write(data)


write("session", session_seeds())
write("request", request_seeds())
write("inflight", inflight_seeds())
