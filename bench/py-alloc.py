# An allocation-heavy Python workload for the smalloc benchmark: dicts,
# strings and lists built, reshaped and dropped round after round.  Objects
# of 512 bytes or less come from Python's own pool allocator, so the script
# leans on what goes to malloc: long strings, list and dict storage, joins,
# splits and JSON text.  Fixed seed; the last line is a checksum of the work
# and must be the same under every allocator.
#
#   python3 py-alloc.py [quick]

import json
import random
import sys
import zlib


def one_round(rng, r):
    crc = 0

    # A dict of lists of floats, grown and then thinned out.
    d = {}
    for i in range(12000):
        d["k%d-%d" % (r, rng.randrange(1 << 30))] = [
            rng.random() for _ in range(rng.randrange(1, 12))]
    for i, k in enumerate(list(d)):
        if i % 3 == 0:
            del d[k]
    crc = zlib.crc32(repr(sorted(d)[:50]).encode(), crc)

    # Long strings: repeat, join, split, replace, slice.
    parts = [("%016x" % rng.getrandbits(64)) * rng.randrange(1, 64)
             for _ in range(3000)]
    text = ",".join(parts)
    text = text.replace("a", "AA").upper()
    pieces = text.split(",")
    crc = zlib.crc32(pieces[len(pieces) // 2].encode(), crc)
    crc = zlib.crc32(str(sum(len(p) for p in pieces)).encode(), crc)

    # Lists of tuples grown by append, sorted, sliced.
    rows = []
    for i in range(40000):
        rows.append((rng.randrange(1000), str(i), i * 0.5))
    rows.sort()
    crc = zlib.crc32(repr(rows[::997]).encode(), crc)

    # JSON round trip of a nested structure.
    doc = {k: {"v": v, "n": len(v), "s": "x" * (len(v) * 40)}
           for k, v in list(d.items())[:3000]}
    blob = json.dumps(doc)
    back = json.loads(blob)
    crc = zlib.crc32(str(len(blob)).encode(), crc)
    crc = zlib.crc32(repr(sorted(back)[:20]).encode(), crc)

    # bytearray growth by small appends, then bytes copies.
    buf = bytearray()
    for i in range(60000):
        buf += b"%d;" % (i * 7919 % 100003)
    crc = zlib.crc32(bytes(buf[-4096:]), crc)
    return crc


def main():
    quick = len(sys.argv) > 1 and sys.argv[1] == "quick"
    rounds = 2 if quick else 12
    rng = random.Random(20240611)
    crc = 0
    for r in range(rounds):
        crc = zlib.crc32(b"%d" % one_round(rng, r), crc)
    print("checksum=%08x" % crc)


if __name__ == "__main__":
    main()
