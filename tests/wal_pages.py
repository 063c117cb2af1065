#!/usr/bin/env python3
"""Which pages the buffer's commits wrote: reads <dir>/buffer.db-wal (the frames since the WAL
last started again), groups its frames by commit, and names each frame's page by the b-tree
that holds it now (SQLite's dbstat table, on a copy of <dir>'s buffer.db and WAL). Pages no
b-tree holds are the freelist's (and, with auto_vacuum, pointer-map pages: page 2 first).

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
        con.close()
    counts = collections.Counter()
    for c in commits:
        for p in c:
            if p == 1:
                name = "page 1 (the file's header, and sqlite_schema)"
            elif p == 2 and p not in owner:
                name = "page 2 (pointer map)"
            else:
                name = owner.get(p, "freelist")
            counts[name] += 1
    n = len(commits)
    print(f"page size {page_size}; {n} commits, {sum(map(len, commits)) / n:.2f} frames each")
    print("| page | frames per commit |\n|---|---:|")
    for name, count in counts.most_common():
        print(f"| {name} | {count / n:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
