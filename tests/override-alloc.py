#!/usr/bin/env python3
"""Allocation-heavy work with a deterministic result, for running the Python
interpreter on top of a preloaded smalloc (tests/override.c).

Prints one line, "checksum <hex> <n>", that must not depend on the allocator.
Nothing here depends on hash order or addresses.
"""
import json
import sys
import zlib

MASK = (1 << 64) - 1


class Rng:
    def __init__(self, seed):
        self.s = seed

    def next(self):
        self.s = (self.s * 6364136223846793005 + 1442695040888963407) & MASK
        return self.s >> 33


def rounds(rng, crc, n):
    count = 0
    for r in range(n):
        # dicts of lists of dicts, through a JSON round trip
        d = {}
        for i in range(3000):
            key = "k%d_%d" % (r, rng.next() % 50000)
            d[key] = [i, str(i) * (rng.next() % 8),
                      {"x": i, "y": [i] * (rng.next() % 6), "z": None}]
        text = json.dumps(d, sort_keys=True)
        back = json.loads(text)
        if back != d:
            raise SystemExit("json round trip differs")
        crc = zlib.crc32(text.encode(), crc)
        count += len(back)

        # many short strings, joined and split again
        parts = [("%x" % rng.next()) * (1 + rng.next() % 12) for _ in range(4000)]
        joined = "-".join(parts)
        if joined.split("-") != parts:
            raise SystemExit("split differs")
        crc = zlib.crc32(joined.encode(), crc)

        # lists: build, sort, slice, drop
        lst = [rng.next() for _ in range(15000)]
        lst.sort()
        crc = zlib.crc32(repr(lst[::101]).encode(), crc)
        tuples = sorted((x % 1000, x) for x in lst[:5000])
        crc = zlib.crc32(repr(tuples[::53]).encode(), crc)

        # a growing buffer and a set, reported in sorted order
        buf = bytearray()
        for i in range(1500):
            buf += bytes([i & 255]) * (rng.next() % 200)
        crc = zlib.crc32(bytes(buf), crc)
        seen = {rng.next() % 7919 for _ in range(3000)}
        crc = zlib.crc32(repr(sorted(seen)[:200]).encode(), crc)

        # a few large and huge blocks
        big = ("%d" % r) * ((1 << 17) + rng.next() % 4096)
        huge = bytes(3 << 20) + big.encode()
        crc = zlib.crc32(huge[-4096:], crc)
        count += len(huge) // 4096
        del big, huge, d, back, lst, tuples, parts
    return crc, count


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    crc, count = rounds(Rng(12345), 0, n)
    print("checksum %08x %d" % (crc, count))


if __name__ == "__main__":
    main()
