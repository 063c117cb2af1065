#!/usr/bin/env python3
"""Which pages the buffer's commits wrote: reads <dir>/buffer.db-wal (the frames since the WAL
last started again), groups its frames by commit, and names each frame's page by what it is
at the end: the b-tree that holds it (SQLite's dbstat table), a freelist trunk or leaf page, a
pointer-map page (auto_vacuum), or page 1 (the file's header). Read from a copy of <dir>'s
buffer.db and WAL, checkpointed.

    BENCH_FLASH_CAPTURE=/tmp/cap BENCH_ONLY=flash BENCH_FLASH_RATES=100 ./target/release/bench
    python3 tests/wal_pages.py /tmp/cap
"""
import collections
import os
import shutil
import sqlite3
import struct
import sys
import tempfile


def main(d):
    wal = open(os.path.join(d, "buffer.db-wal"), "rb").read()
    if len(wal) < 32:
        sys.exit(f"{d}/buffer.db-wal holds no frames")
    page_size, _, salt1, salt2 = struct.unpack(">IIII", wal[8:24])
    commits, current, off = [], [], 32
    while off + 24 + page_size <= len(wal):
        page, commit, s1, s2 = struct.unpack(">IIII", wal[off:off + 16])
        if (s1, s2) != (salt1, salt2):
            break  # a frame from before the WAL started again
        current.append(page)
        if commit:
            commits.append(current)
            current = []
        off += 24 + page_size
    if not commits:
        sys.exit("no commit in the WAL since it last started again")
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("buffer.db", "buffer.db-wal"):
            shutil.copy(os.path.join(d, f), os.path.join(tmp, f))
        con = sqlite3.connect(os.path.join(tmp, "buffer.db"))
        owner = {p: f"{name} ({kind})" for name, p, kind in
                 con.execute("SELECT name, pageno, pagetype FROM dbstat")}
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        db = open(os.path.join(tmp, "buffer.db"), "rb").read()
    owner.update(freelist(db, page_size))
    owner.update(pointer_maps(db, page_size))
    owner[1] = "page 1 (the file's header, and sqlite_schema)"
    counts = collections.Counter()
    for c in commits:
        for p in c:
            counts[owner.get(p, "other (free space past the file's end)")] += 1
    n = len(commits)
    print(f"page size {page_size}; {n} commits, {sum(map(len, commits)) / n:.2f} frames each")
    print("| page | frames per commit |\n|---|---:|")
    for name, count in counts.most_common():
        print(f"| {name} | {count / n:.2f} |")


def freelist(db, page_size):
    """The freelist's pages: {page: "freelist trunk" or "freelist leaf"}."""
    pages = {}
    trunk = struct.unpack(">I", db[32:36])[0]
    while trunk and trunk not in pages and trunk * page_size <= len(db):
        pages[trunk] = "freelist trunk"
        base = (trunk - 1) * page_size
        nxt, leaves = struct.unpack(">II", db[base:base + 8])
        for i in range(min(leaves, page_size // 4 - 2)):
            leaf = struct.unpack(">I", db[base + 8 + 4 * i:base + 12 + 4 * i])[0]
            pages[leaf] = "freelist leaf"
        trunk = nxt
    return pages


def pointer_maps(db, page_size):
    """The pointer-map pages of an auto_vacuum file: page 2, then one every usable/5 + 1."""
    if struct.unpack(">I", db[52:56])[0] == 0:
        return {}
    usable = page_size - db[20]
    step = usable // 5 + 1
    count = len(db) // page_size
    return {p: "pointer map" for p in range(2, count + 1, step)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
