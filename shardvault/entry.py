"""The ``shardvault`` console script: one fast path, then the command line.

PostgreSQL starts ``wal-push`` once per WAL segment.  When an earlier call
pushed the segment ahead (:mod:`shardvault.backup.wal`), all this call has
to do is check the segment's marker (:mod:`shardvault.walmarkers`), which
needs no configuration, passphrase or peer; so it is done here, before
click, rich and the library are imported (most of the start-up of a call).
Anything else, and a segment without a valid marker, goes to
:func:`shardvault.cli.main`, which parses and checks everything as usual.
"""

from __future__ import annotations

import sys

_GLOBAL = ("--config", "--password-file")  # the options before a command that take a value
_WAL_PUSH = ("--source", "--ahead")


def pushed_segment(args: list[str]) -> str | None:
    """The PATH of a plain ``[--config X] [--password-file Y] wal-push [--source S] [--ahead N] PATH``; else None."""
    i = 0
    while i < len(args) and args[i] in _GLOBAL:
        i += 2
    if args[i : i + 1] != ["wal-push"]:
        return None
    paths: list[str] = []
    rest = iter(args[i + 1 :])
    for arg in rest:
        if arg in _WAL_PUSH:
            next(rest, None)
        elif arg.startswith(tuple(f"{option}=" for option in _WAL_PUSH)):
            continue
        elif arg.startswith("-"):
            return None  # --help, or anything this parser does not know: the command line decides
        else:
            paths.append(arg)
    return paths[0] if len(paths) == 1 else None


def main() -> None:
    path = pushed_segment(sys.argv[1:])
    if path is not None:
        from shardvault.walmarkers import take_pushed

        if take_pushed(path):
            sys.exit(0)
    from shardvault.cli import main as cli_main

    cli_main()
