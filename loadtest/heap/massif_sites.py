#!/usr/bin/env python3
"""Bytes by allocation site in a massif profile's peak snapshot (or snapshot N).

A site is the first frame of the allocation's stack, from malloc outwards, that belongs to
reachd's crates or to the libraries whose allocations are per socket or per user (tokio,
tungstenite, hyper, dashmap, sqlite, ...); allocator and std frames are skipped.

    loadtest/heap/massif_sites.py massif.out [--snapshot N] [--per SOCKETS] [--top K]
"""
import argparse
import re
from collections import defaultdict

SKIP = re.compile(
    r"^(0x[0-9A-F]+: )?(\?\?\?|malloc|calloc|realloc|posix_memalign|aligned_alloc|"
    r"__rust_|__rdl_|__rg_|alloc::|<alloc::|core::|<core::|std::|<std::|hashbrown::|"
    r"<hashbrown::|bytes::|<bytes::|smallvec|<smallvec|sqlite3Malloc|sqlite3DbMalloc|"
    r"sqlite3Realloc|dbMalloc|sqlite3MallocZero|sqlite3DbRealloc|sqlite3_malloc|"
    r"sqlite3_realloc|sqlite3DbMallocRaw|sqlite3DbMallocZero|pcache1Alloc|sqlite3PageMalloc|"
    r"<tracing|tracing::|<serde|serde::|arc_swap|<arc_swap|aligned_malloc|alloc |"
    r"alloc_impl|allocate|box_new|grow_|finish_grow|reserve|do_reserve|with_capacity|"
    r"try_with_capacity|allocate_in|try_allocate_in|clone<|to_vec|new_uninit|"
    r"from<|into<|exchange_malloc|RawVec|RawVecInner)"
)
LIBRARY = re.compile(r"^(library/|unix\.rs|alloc\.rs|raw_vec|src/raw/|boxed\.rs|vec/)")
NODE = re.compile(r"^( *)n(\d+): (\d+) (.*)$")


def shorten(name):
    """The frame without generic arguments, with its file and line."""
    where = re.search(r"\(([^()]*)\)$", name)
    body = name[: where.start()].strip() if where else name
    out, depth = [], 0
    for ch in body:
        if ch == "<":
            depth += 1
            if depth == 1:
                out.append("<..>")
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)[:110] + (f" ({where.group(1)})" if where else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--snapshot", type=int)
    ap.add_argument("--per", type=int, default=1, help="divide by this many sockets")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    snaps, cur = {}, None
    peak = None
    for line in open(a.file, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("snapshot="):
            cur = int(line.split("=")[1])
            snaps[cur] = {"tree": [], "heap": 0}
        elif line.startswith("mem_heap_B="):
            snaps[cur]["heap"] = int(line.split("=")[1])
        elif line.startswith("heap_tree=peak"):
            peak = cur
        elif NODE.match(line) and cur is not None:
            snaps[cur]["tree"].append(line)
    n = a.snapshot if a.snapshot is not None else peak
    tree = snaps[n]["tree"]
    sites = defaultdict(int)
    stack = []  # (depth, label)
    # A node's own bytes not explained by its children are attributed at that node.
    parsed = []
    for line in tree:
        m = NODE.match(line)
        depth, kids, size, label = len(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
        parsed.append((depth, kids, size, label))
    for i, (depth, kids, size, label) in enumerate(parsed):
        while stack and stack[-1][0] >= depth:
            stack.pop()
        stack.append((depth, label))
        if kids == 0:
            frames = [l for _, l in stack[1:]]
            site = "(below threshold)" if "below massif's threshold" in label else None
            if site is None:
                for f in frames:
                    name = re.sub(r"^0x[0-9A-F]+: ", "", f)
                    where = re.search(r"\(([^()]*)\)$", name)
                    where = where.group(1) if where else ""
                    if SKIP.match(name) or LIBRARY.search(where) or "UnknownInlinedFun" in name:
                        continue
                    site = f"{shorten(name)}"
                    break
            sites[site or frames[-1][:150]] += size
    total = snaps[n]["heap"]
    print(f"snapshot {n}: heap {total:,} B; per socket ({a.per}): {total / a.per:,.0f} B")
    for site, size in sorted(sites.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"{size / a.per:10,.0f}  {site}")


if __name__ == "__main__":
    main()
