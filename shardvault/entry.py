"""The ``shardvault`` console script: fast paths for PostgreSQL's WAL calls, then the command line.

PostgreSQL starts ``wal-push`` (archive_command) and ``wal-fetch``
(restore_command) once per WAL file.  When the work was done ahead
(:mod:`shardvault.walspool`: a segment pushed ahead, or fetched ahead), all
the call has to do is check a marker or move a file, which needs no
configuration, passphrase or peer; so it is done here, before click, rich
and the library are imported (most of the start-up of a call).  A call
whose file the spool's worker is about to deliver waits for it here too.
Anything else goes to :func:`shardvault.cli.main`, which parses and checks
everything as usual and does the work itself when the spool did not.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

_GLOBAL = ("--config", "--password-file")  # the options before a command that take a value
# Per command: its options that take a value, its flags, how many arguments.
_COMMANDS = {"wal-push": (("--source", "--ahead", "--timeout"), ("--async",), 1), "wal-fetch": (("--source",), (), 2)}


class Call(NamedTuple):
    command: str
    arguments: list[str]
    options: dict[str, str]


def parse(args: list[str]) -> Call | None:
    """A plain ``[--config X] [--password-file Y] wal-push|wal-fetch [options] ARGS``; None for anything else."""
    i = 0
    while i < len(args) and args[i] in _GLOBAL:
        i += 2
    command = args[i] if i < len(args) else ""
    if command not in _COMMANDS:
        return None
    valued, flags, count = _COMMANDS[command]
    arguments: list[str] = []
    options: dict[str, str] = {}
    rest = iter(args[i + 1 :])
    for arg in rest:
        key, eq, value = arg.partition("=")
        if arg in valued:
            options[arg] = next(rest, "")
        elif eq and key in valued:
            options[key] = value
        elif arg in flags:
            options[arg] = ""
        elif arg.startswith("-"):
            return None  # --help, or anything this parser does not know: the command line decides
        else:
            arguments.append(arg)
    return Call(command, arguments, options) if len(arguments) == count else None


def _fast(call: Call) -> int | None:
    """The exit code of a call the spools served, or None: the command line takes it."""
    from shardvault import walspool

    if call.command == "wal-fetch":
        name, dest = call.arguments
        spool = walspool.prefetch_dir(dest)

        def coming() -> bool:  # the prefetcher is fetching this segment or one before it on its timeline
            now = walspool.fetching(spool)
            return len(now) == len(name) and now[:8] == name[:8] and now <= name and walspool.worker_alive(spool)

        outcome = walspool.await_worker(spool, lambda: walspool.take_prefetched(name, dest), walspool.TIMEOUT, coming)
        if outcome is walspool.Outcome.DONE:
            return 0
        if source := walspool.history_missing(name, dest):
            from shardvault.errors import WalMissingError

            missing = WalMissingError(source, name, "")
            print(f"shardvault: error: {missing}", file=sys.stderr)
            return missing.exit_code
        return None
    path = call.arguments[0]
    if walspool.take_pushed(path):
        return 0
    spool = walspool.pushed_dir(path)
    if "--async" not in call.options or not walspool.worker_alive(spool):
        return None
    try:
        timeout = float(call.options.get("--timeout", walspool.TIMEOUT))
    except ValueError:
        return None
    outcome, message, code = walspool.await_pushed(path, timeout)
    if outcome is walspool.Outcome.DONE:
        return 0
    if outcome is walspool.Outcome.GONE:
        return None  # the command line starts another pusher, or pushes it itself
    print(f"shardvault: error: {message}", file=sys.stderr)
    return code


def main() -> None:
    call = parse(sys.argv[1:])
    if call is not None and (code := _fast(call)) is not None:
        sys.exit(code)
    from shardvault.allocator import tune

    tune()
    from shardvault.cli import main as cli_main

    cli_main()
