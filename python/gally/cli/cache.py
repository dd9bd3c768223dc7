"""`gally cache`: what GALLY_HOME holds (converted and quantized models, fetched GGUF files, the
benchmark's derived models), and `gally cache rm NAME...` / `--all` to remove entries."""

from __future__ import annotations

import argparse
import sys
import time

from .. import cache


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cache", help="list the models gally converted or fetched, or remove them",
                              description="List the entries of gally's cache (GALLY_HOME, default ~/.cache/gally) "
                                          "with their sizes, or remove them with `gally cache rm`.")
    p.set_defaults(func=list_command)
    sub = p.add_subparsers(dest="cache_command", metavar="COMMAND")
    ls = sub.add_parser("ls", help="list the entries (the default)")
    ls.set_defaults(func=list_command)
    rm = sub.add_parser("rm", help="remove entries", description="Remove cache entries by the names `gally cache` "
                                                                 "lists (shell patterns such as '*-f16' too).")
    rm.add_argument("names", nargs="*", metavar="NAME", help="an entry's name, or a pattern")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    rm.set_defaults(func=rm_command)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def list_command(args: argparse.Namespace) -> int:
    entries = cache.entries()
    if not entries:
        print(f"the cache {cache.home()} is empty")
        return 0
    rows = [("NAME", "KIND", "DTYPE", "SIZE", "LAST USED", "PATH")]
    rows += [(e.name, e.kind, e.dtype or "-", cache.human_bytes(e.size), _when(e.last_used), e.path) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        cells = [c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells + [r[-1]]))
    total = sum(e.size for e in entries)
    print(f"{len(entries)} entries, {cache.human_bytes(total)} in {cache.home()} (GALLY_HOME); "
          f"`gally cache rm NAME` removes one")
    return 0


def rm_command(args: argparse.Namespace) -> int:
    if args.all == bool(args.names):
        raise ValueError("give the names of the entries to remove (as `gally cache` lists them), or --all")
    chosen = cache.entries() if args.all else cache.find(args.names)
    for e in chosen:
        cache.remove(e)
        print(f"removed {e.name} ({cache.human_bytes(e.size)})", file=sys.stderr)
    print(f"freed {cache.human_bytes(sum(e.size for e in chosen))} in {cache.home()}", file=sys.stderr)
    return 0
