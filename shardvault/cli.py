"""The ``shardvault`` command line: parses, calls the library, renders.

Human output goes to stdout, progress (rich, only when stderr is a terminal)
and warnings to stderr; ``--json`` prints exactly one JSON document on stdout.
An expected failure (:class:`ShardvaultError`) prints one line,
``shardvault: error: ...``, and exits with the error's code; see
:mod:`shardvault.errors` for the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import click

from shardvault import walspool
from shardvault.config import BucketSource, Config, FilesSource, PostgresSource, load_config, read_password
from shardvault.durations import parse_duration
from shardvault.errors import (
    BackupIncompleteError,
    BackupInterruptedError,
    DamageFoundError,
    ShardvaultError,
)
from shardvault.progress import Done, ProgressMeter, Totals, Watch, line_interval, progress_line, shorten_path, summary
from shardvault.repository import Repository
from shardvault.walnames import next_segment

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def err() -> Console:
    """The console on stderr.  Made (and rich imported, ~50 ms) only by a command that uses it: start-up counts."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def stderr_is_terminal() -> bool:
    """rich's answer to "is stderr a terminal?", without importing rich where stderr plainly is not one (cron, logs)."""
    if not sys.stderr.isatty() and not os.environ.keys() & {"FORCE_TERMINAL", "TTY_COMPATIBLE"}:
        return False
    return err().is_terminal


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_emitted = {"json": False}  # whether this command already printed its one JSON document


def emit_json(doc: Any) -> None:
    _emitted["json"] = True
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def warn(message: str) -> None:
    err().print(f"shardvault: warning: {message}", markup=False, soft_wrap=True)


def report_bad_shards(problems: list[dict[str, Any]]) -> None:
    """Warn about each corrupt or missing shard; one line per unreachable peer."""
    unreachable: dict[str, int] = {}
    for p in problems:
        kind = p["problem"]
        if kind == "unreachable":
            unreachable[p["peer"]] = unreachable.get(p["peer"], 0) + 1
        else:
            warn(f"{kind} shard {p['object']} on peer {p['peer']} skipped: {p['detail']}")
    for peer, count in unreachable.items():
        warn(f"peer {peer} unreachable: {count} shard(s) read from other peers instead")


def _fail(message: str, code: int, kind: str, as_json: bool, label: str = "error: ") -> None:
    # A verdict (check, scrub, repair) already printed its JSON document: then only this line follows.
    click.echo(f"shardvault: {label}{message}", err=True)
    if as_json and not _emitted["json"]:
        # --json promises one JSON document on stdout, failures included.
        emit_json({"error": {"code": code, "type": kind, "message": message}})
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Turn expected failures into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _emitted["json"] = False
        try:
            return fn(*args, **kwargs)
        except BackupInterruptedError as exc:  # the operator's own act, not an error: it says what was kept
            _fail(str(exc), exc.exit_code, type(exc).__name__, bool(kwargs.get("as_json")), label="")
        except ShardvaultError as exc:
            _fail(str(exc), exc.exit_code, type(exc).__name__, bool(kwargs.get("as_json")))
        except click.UsageError as exc:  # raised by a command body: with --json it is one document too
            if not kwargs.get("as_json"):
                raise
            _fail(exc.format_message(), exc.exit_code, "UsageError", True)
        except KeyboardInterrupt:
            _fail("interrupted", 130, "KeyboardInterrupt", bool(kwargs.get("as_json")), label="")

    return wrapper  # type: ignore[return-value]


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop a backup the same way: the first one cleanly, a second one at once.

    The first raises KeyboardInterrupt (Python's own SIGINT behaviour, now
    for SIGTERM too, which would otherwise kill the process without a
    word): the backup writes its final checkpoint and exits 130.  A second
    signal, while that checkpoint is being written, exits 130 at once,
    leaving what a SIGKILL would (a consistent repository; the packs since
    the last checkpoint are sent again).  A signal the process was started
    with ignored (a background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (an embedding caller keeps its own)
        return
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if received:
            if os.isatty(2):
                os.write(2, b"\x1b[?25h\n")  # the progress bar hid the cursor: give it back
            os.write(2, b"shardvault: interrupted again: stopped at once without a final checkpoint\n")
            os._exit(130)
        received.append(signum)
        raise KeyboardInterrupt

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Context:
    def __init__(self, config_path: str | None, password_file: str | None) -> None:
        self.config_path = config_path
        self.password_file = password_file
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def password(self) -> str:
        return read_password(self.password_file)

    @contextmanager
    def repository(self) -> Iterator[Repository]:
        config = self.config
        notices: list[str] = []

        def peer_down(name: str, why: str) -> None:
            # A silent peer must not look like a hang: an operator at a terminal hears at once
            # which peer was given up; elsewhere the notices follow a command that goes on.
            line = f"peer {name} is down for this run: {why}"
            if stderr_is_terminal():
                warn(line)
            else:
                notices.append(line)

        repo = Repository.open(config, self.password(), peer_down)
        try:
            yield repo
        finally:
            repo.close()
            # One bad copy is survived, never hidden: name it (check and repair deal with it).
            for problem in repo.meta_problems:
                where = f" on peer {problem.peer}" if problem.peer else ""
                warn(f"metadata object {problem.name}{where}: {problem.detail}")
        for line in notices:
            warn(line)


@contextmanager
def progress_bar(enabled: bool, description: str) -> Iterator[Callable[..., None]]:
    """A rich progress line on stderr when it is a terminal; a no-op otherwise."""
    if not (enabled and stderr_is_terminal()):
        yield lambda **_: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err(),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None, info="")

        def update(**fields: Any) -> None:
            bar.update(task, **fields)

        yield update


S = TypeVar("S")


@contextmanager
def _ticking(tick: Callable[[], None], every: float) -> Iterator[None]:
    """Call ``tick`` every ``every`` seconds in a thread until the block ends, and never after.

    The lock makes the end a barrier: once the block has left, no tick is
    running or will run, so nothing is drawn after the command's own output
    (nor after its error).
    """
    stop = threading.Event()
    lock = threading.Lock()

    def loop() -> None:
        while not stop.wait(every):
            with lock:
                if stop.is_set():
                    return
                tick()

    thread = threading.Thread(target=loop, name="sv-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with lock:
            stop.set()
        thread.join()


@contextmanager
def job_progress(
    enabled: bool, label: str, counts: Callable[[S], tuple[Done, Totals]]
) -> Iterator[Callable[[S, str], None] | None]:
    """Progress of a backup or restore on stderr: files and bytes out of their totals, rate, ETA.

    Yields the callback to hand the library, or None when disabled
    (``--json``), so the library does no progress work at all (a backup
    then runs no scanner).  On a terminal a live rich line with the current
    path; elsewhere (cron, Prefect, CI) one plain line every
    ``SHARDVAULT_PROGRESS_INTERVAL`` seconds (5 by default), the first
    only once that much time has passed, so short runs print nothing extra.
    """
    if not enabled:
        yield None
        return
    watch = Watch(counts)
    meter = ProgressMeter()
    if stderr_is_terminal():
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            TextColumn("{task.fields[info]}", markup=False),  # markup off: "[scanning]" is text, not a style
            TextColumn("{task.fields[path]}", style="dim", markup=False),
            TimeElapsedColumn(),
            console=err(),
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=None, info="", path="")

            def draw() -> None:
                reading = watch.reading(meter)
                if reading is None:
                    return
                complete = reading.totals.complete and reading.totals.bytes > 0
                bar.update(
                    task,
                    total=reading.totals.bytes if complete else None,  # no total: a pulsing bar while scanning
                    completed=reading.done.bytes,
                    info=summary(reading),
                    path=shorten_path(reading.path, 40),
                )

            with _ticking(draw, 0.5):
                yield watch
        return
    interval = line_interval(os.environ)
    due = meter.clock() + interval

    def write_line() -> None:
        nonlocal due
        reading = watch.reading(meter)  # sampled on every tick, printed when due: the rate needs the samples
        if reading is None or meter.clock() < due:
            return
        due = meter.clock() + interval
        sys.stderr.write(progress_line(label, reading) + "\n")  # plain text: no rich, so no escape codes in a log
        sys.stderr.flush()

    # Sampled twice per line at least, so the first line already has a rate.
    with _ticking(write_line, min(interval / 2, 1.0)):
        yield watch


pass_ctx = click.make_pass_decorator(Context)


class JsonAwareGroup(click.Group):
    """A group whose usage errors are one JSON document too when ``--json`` was given.

    Click finds bad options while parsing, before a command's own error
    handling runs; this catches them at the top so ``--json`` always means
    exactly one JSON document on stdout.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta.setdefault("json", "--json" in args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if not ctx.meta.get("json"):
                raise
            _fail(exc.format_message(), exc.exit_code, "UsageError", True)


@click.group(cls=JsonAwareGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "config_path", metavar="PATH", help="Config file (default $SHARDVAULT_CONFIG or ./shardvault.toml)."
)
@click.option(
    "--password-file", metavar="PATH", help="Read the passphrase from this file (default $SHARDVAULT_PASSWORD)."
)
@click.version_option(package_name="shardvault")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, password_file: str | None) -> None:
    """Encrypted, deduplicated, erasure-coded backups over independent peers."""
    ctx.obj = Context(config_path, password_file)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def init(ctx: Context, as_json: bool) -> None:
    """Create the repository on every configured peer."""
    config = ctx.config
    repo = Repository.init(config, ctx.password())
    try:
        doc = {"repository": repo.id, "k": repo.doc["k"], "n": repo.doc["n"], "peers": [p.name for p in config.peers]}
    finally:
        repo.close()
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"created repository {repo.id[:8]} ({doc['k']}-of-{doc['n']}) on peers {', '.join(doc['peers'])}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def reconfigure(ctx: Context, as_json: bool) -> None:
    """Record the configuration's k, n and chunker settings as the repository's (a deliberate change).

    Packs already stored keep their k and n; new packs use the new ones.
    """
    config = ctx.config
    repo = Repository.open(config, ctx.password(), check_parameters=False)
    try:
        repo.peers.probe_all()
        doc = repo.reconfigure()
    finally:
        repo.close()
    if as_json:
        emit_json(doc)
    elif not doc["changed"]:
        click.echo(f"nothing to change: the repository already has k = {repo.doc['k']}, n = {repo.doc['n']}")
    else:
        before, after = doc["previous"], doc["parameters"]
        click.echo(
            f"repository reconfigured (revision {doc['revision']}): k {before['k']} -> {after['k']}, "
            f"n {before['n']} -> {after['n']}; written to {len(doc['peers_written'])} peer(s)"
        )
        if doc["peers_missed"]:
            warn(f"not written to {', '.join(doc['peers_missed'])}: run `shardvault repair` when they are back")


@main.command()
@click.argument("source")
@click.option("--full", is_flag=True, help="Re-read every file instead of skipping unchanged ones.")
@click.option("--no-xattrs", is_flag=True, help="Files: do not record extended attributes (nor ACLs).")
@click.option("--no-acls", is_flag=True, help="Files: do not record POSIX ACLs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def backup(ctx: Context, source: str, full: bool, no_xattrs: bool, no_acls: bool, as_json: bool) -> None:
    """Back up SOURCE (incremental unless --full)."""
    from shardvault.backup import BackupStats, backup_source

    source_config = ctx.config.source(source)
    if (no_xattrs or no_acls) and isinstance(source_config, FilesSource):
        source_config = dataclasses.replace(
            source_config, xattrs=source_config.xattrs and not no_xattrs, acls=source_config.acls and not no_acls
        )

    def counts(stats: BackupStats) -> tuple[Done, Totals]:
        # Unchanged files and holes count as done: neither is read, but the totals include them.
        return Done(stats.files, stats.bytes_read + stats.bytes_unchanged + stats.bytes_sparse), stats.totals

    with stop_signals(), ctx.repository() as repo, job_progress(not as_json, f"backup {source}", counts) as on_progress:
        result = backup_source(repo, source_config, full, progress=on_progress)
    s, snap = result.stats, result.snapshot
    if as_json:
        doc = result.to_doc()
        emit_json(doc | {"warnings": doc["stats"]["warnings"], "warning_details": doc["stats"]["warning_details"]})
    else:
        parent = f" (parent {snap.parent[:8]})" if snap.parent else ""
        degraded = f", degraded ({s.packs_degraded} pack(s) short of shards)" if s.degraded else ""
        click.echo(f"snapshot {snap.short_id} saved: {snap.kind}{parent}{degraded}")
        click.echo(
            f"  files: {s.files} ({s.files_read} read, {s.files_unchanged} unchanged), "
            f"dirs: {s.dirs}, symlinks: {s.symlinks}"
        )
        click.echo(
            f"  read {human(s.bytes_read)} of {human(s.bytes_total)}; new data {human(s.bytes_new)}, "
            f"stored {human(s.bytes_stored)} in {s.packs_new} pack(s) ({human(s.shard_bytes_stored)} of shards)"
        )
        if s.changed_while_read:
            click.echo(f"  changed while read ({len(s.changed_while_read)}): {', '.join(s.changed_while_read[:5])}")
        click.echo(f"  duration {s.duration_seconds:.2f} s")
    for w in s.warnings:
        warn(str(w))
    # The exit status comes from the warnings' kinds (never their text); a degraded commit is still exit 0.
    if incomplete := s.incomplete:
        raise BackupIncompleteError(snap.short_id, len(incomplete), str(incomplete[0]))


@main.command()
@click.option("--source", "source", help="Only this source's snapshots.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def snapshots(ctx: Context, source: str | None, as_json: bool) -> None:
    """List snapshots."""
    with ctx.repository() as repo:
        snaps = [s for s in repo.snapshots() if source is None or s.source == source]
    if as_json:
        emit_json([s.summary() for s in snaps])
        return
    click.echo(f"{'ID':<10}{'finished':<27}{'source':<14}{'kind':<13}{'files':>8}{'size':>12}  host")
    for s in snaps:
        size = human(s.stats.get("bytes_total", 0))
        click.echo(
            f"{s.short_id:<10}{s.finished[:26]:<27}{s.source:<14}{s.kind:<13}{s.stats.get('files', 0):>8}{size:>12}"
            f"  {s.hostname}"
        )
    click.echo(f"{len(snaps)} snapshot(s)")


# -- browsing (issue 10): trees only, never data packs -----------------------------------


@main.command(name="ls")
@click.argument("snapshot")
@click.argument("path", default="")
@click.option("--source", help="Source of the snapshot (needed for 'latest' with several sources).")
@click.option("--recursive", "-r", is_flag=True, help="Everything below PATH, not only its children.")
@click.option("--long", "-l", "long_", is_flag=True, help="Mode, owner, size and mtime, as ls -l.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def ls_cmd(
    ctx: Context, snapshot: str, path: str, source: str | None, recursive: bool, long_: bool, as_json: bool
) -> None:
    """List a snapshot's entries below PATH (reads the tree only, never file data)."""
    from shardvault.restore.browse import entry_doc, ls

    with ctx.repository() as repo:
        snap = repo.resolve_snapshot(snapshot, source)
        entries = ls(repo, snap, path, recursive)
    if as_json:
        emit_json({"snapshot": snap.id, "path": path, "entries": [entry_doc(e) for e in entries]})
        return
    for entry in entries:
        name = entry.path + ("/" if entry.type == "d" else "")
        if entry.target is not None:
            name += f" -> {entry.target}"
        if long_:
            doc = entry_doc(entry)
            kind = {"file": "-", "dir": "d", "symlink": "l", "fifo": "p", "chardev": "c", "blockdev": "b"}
            mode = kind.get(doc["type"], "?") + stat.filemode(entry.mode)[1:]
            user, group = entry.user or str(entry.uid), entry.group or str(entry.gid)
            click.echo(f"{mode} {user:>8} {group:>8} {entry.size:>12} {doc['mtime'][:19]} {name}")
        else:
            click.echo(name)


@main.command(name="find")
@click.argument("pattern")
@click.option("--source", help="Only this source's snapshots.")
@click.option("--newest", type=click.IntRange(min=1), help="Only the N newest snapshots.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def find_cmd(ctx: Context, pattern: str, source: str | None, newest: int | None, as_json: bool) -> None:
    """Which snapshots hold a path matching PATTERN (a glob; with a '/', over the whole path)."""
    from shardvault.restore.browse import entry_doc, find

    with ctx.repository() as repo:
        found = [
            {"snapshot": snap.id, "source": snap.source, "time": snap.finished} | entry_doc(entry)
            for snap, entry in find(repo, pattern, source, newest)
        ]
    if as_json:
        emit_json({"pattern": pattern, "matches": found})
        return
    for m in found:
        click.echo(f"{m['snapshot'][:8]}  {m['time'][:19]}  {m['size']:>12}  {m['mtime'][:19]}  {m['path']}")
    click.echo(f"{len(found)} match(es)")


@main.command(name="dump")
@click.argument("snapshot")
@click.argument("path")
@click.option("--source", help="Source of the snapshot (needed for 'latest' with several sources).")
@pass_ctx
@handle_errors
def dump_cmd(ctx: Context, snapshot: str, path: str, source: str | None) -> None:
    """Write one file of a snapshot to stdout; a directory (or / for all) as a tar stream."""
    from shardvault.restore.dump import dump as write_dump

    with ctx.repository() as repo:
        out = sys.stdout.buffer
        write_dump(repo, repo.resolve_snapshot(snapshot, source), path, out)
        out.flush()


@main.command(name="diff")
@click.argument("old")
@click.argument("new")
@click.option("--source", help="Source of the snapshots (needed for 'latest' with several sources).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def diff_cmd(ctx: Context, old: str, new: str, source: str | None, as_json: bool) -> None:
    """What changed from snapshot OLD to NEW: added (+), removed (-), changed (M), metadata only (U)."""
    from shardvault.restore.browse import diff

    with ctx.repository() as repo:
        result = diff(repo, repo.resolve_snapshot(old, source), repo.resolve_snapshot(new, source))
    doc = result.to_doc()
    if as_json:
        emit_json(doc)
        return
    for mark, key in (("+", "added"), ("-", "removed"), ("M", "changed"), ("U", "metadata")):
        for path in doc[key]:
            click.echo(f"{mark}    {path}")
    stats = doc["stats"]
    click.echo(
        f"added {stats['added']}, removed {stats['removed']}, changed {stats['changed']}, "
        f"metadata only {stats['metadata']}"
    )


_KEEP_COUNTS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


def _keep_flags(values: dict[str, str | None]) -> Any:
    """The policy the --keep-* flags give (None without any); RetentionPolicyError (exit 2) for a bad value."""
    from shardvault.errors import RetentionPolicyError
    from shardvault.lifecycle.retention import PolicyError, RetentionPolicy, check_count, parse_duration

    if all(v is None for v in values.values()):
        return None
    counts: dict[str, int | None] = {}
    for name in _KEEP_COUNTS:
        text = values[name]
        flag = "--" + name.replace("_", "-")
        if text is None:
            counts[name] = None
        elif text.strip().lower() == "unlimited":
            counts[name] = -1
        else:
            try:
                number = int(text)
            except ValueError:
                raise RetentionPolicyError(flag, f"{text!r} is not a count (a whole number, or -1/unlimited)") from None
            try:
                counts[name] = check_count(number, flag)
            except PolicyError as exc:
                raise RetentionPolicyError(flag, exc.message) from None
    within = values["keep_within"]
    try:
        duration = parse_duration(within) if within is not None else None
    except PolicyError as exc:
        raise RetentionPolicyError("--keep-within", exc.message) from None
    return RetentionPolicy(**counts, keep_within=duration)


@main.command()
@click.option("--source", "source", help="Only this source (default: every source with a policy).")
@click.option("--keep-last", metavar="N", help="Keep the N newest snapshots (-1 or 'unlimited': all).")
@click.option("--keep-hourly", metavar="N", help="Keep the newest snapshot of each of the N newest hours with one.")
@click.option("--keep-daily", metavar="N", help="... of each of the N newest days with one.")
@click.option("--keep-weekly", metavar="N", help="... of each of the N newest ISO weeks with one.")
@click.option("--keep-monthly", metavar="N", help="... of each of the N newest months with one.")
@click.option("--keep-yearly", metavar="N", help="... of each of the N newest years with one.")
@click.option("--keep-within", metavar="DURATION", help="Keep all within DURATION of the newest (1y2m3d4h, m: months).")
@click.option("--dry-run", is_flag=True, help="Change nothing: show what would go, and which rules keep the rest.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def forget(
    ctx: Context,
    source: str | None,
    keep_last: str | None,
    keep_hourly: str | None,
    keep_daily: str | None,
    keep_weekly: str | None,
    keep_monthly: str | None,
    keep_yearly: str | None,
    keep_within: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove the snapshots the retention policy does not keep (and expired PostgreSQL WAL).

    Without --keep-* flags each source's [sources.retention] applies; with
    them, the flags are the policy of every selected source (the configured
    one is not merged in).  Packs are not deleted: `shardvault prune` frees the space.
    """
    from shardvault.errors import RetentionPolicyError
    from shardvault.lifecycle.forget import configured_policies
    from shardvault.lifecycle.forget import forget as run_forget

    flags = _keep_flags(
        {
            "keep_last": keep_last,
            "keep_hourly": keep_hourly,
            "keep_daily": keep_daily,
            "keep_weekly": keep_weekly,
            "keep_monthly": keep_monthly,
            "keep_yearly": keep_yearly,
            "keep_within": keep_within,
        }
    )
    config = ctx.config
    configured = {s.name: s.retention for s in config.sources}
    if source is not None and source not in configured and flags is None:
        config.source(source)  # names the configured sources
    if flags is None and not any(configured.get(n) for n in ([source] if source else configured)):
        where = f" for source {source!r}" if source else ""
        raise RetentionPolicyError("forget", f"no retention policy{where}: pass --keep-* or set [sources.retention]")
    _, tz = configured_policies(config)
    with ctx.repository() as repo, progress_bar(not as_json, "forget") as update:
        known = set(configured) | {s.source for s in repo.snapshots()}
        if source is not None and source not in known:
            config.source(source)  # neither configured nor in the repository: names the configured ones
        policies = {}
        for name in [source] if source else sorted(known):
            policy = flags or configured.get(name)  # flags replace the configured policy as a whole
            if policy is not None and policy.empty:
                raise RetentionPolicyError(f"source {name}", "the --keep-* flags give no rule (0 switches one off)")
            policies[name] = policy
        report = run_forget(repo, policies, dry_run=dry_run, tz=tz, progress=lambda step: update(info=step))
    if as_json:
        emit_json(report.to_doc())
        return
    for plan in report.sources:
        click.echo(f"source {plan.source}: {plan.policy}")
        if plan.keep:
            click.echo(f"keep {len(plan.keep)} snapshot(s):")
            click.echo(f"  {'ID':<10}{'time':<27}{'host':<16}{'kind':<13}reasons")
            for d in plan.keep:
                s = d.snapshot
                when = d.time.strftime("%Y-%m-%d %H:%M:%S %Z")
                click.echo(f"  {s.short_id:<10}{when:<27}{s.hostname[:15]:<16}{s.kind:<13}{', '.join(d.reasons)}")
        if plan.remove:
            click.echo(f"{'would remove' if dry_run else 'remove'} {len(plan.remove)} snapshot(s):")
            click.echo(f"  {'ID':<10}{'time':<27}{'host':<16}kind")
            for d in plan.remove:
                s = d.snapshot
                when = d.time.strftime("%Y-%m-%d %H:%M:%S %Z")
                click.echo(f"  {s.short_id:<10}{when:<27}{s.hostname[:15]:<16}{s.kind}")
        if plan.wal_expired:
            span = f"{plan.wal_expired[0]} .. {plan.wal_expired[-1]}"
            click.echo(f"{'would expire' if dry_run else 'expire'} {len(plan.wal_expired)} WAL file(s): {span}")
        if plan.wal_note:
            click.echo(plan.wal_note)
    for name in report.unconfigured:
        click.echo(f"source {name}: no retention policy, left alone (set [sources.retention] or pass --keep-*)")
    what = f"{report.snapshots_removed} snapshot(s) and {report.wal_removed} WAL file(s)"
    if dry_run:
        click.echo(f"dry run: would remove {what}; nothing changed")
    else:
        click.echo(f"removed {what}; run 'shardvault prune' to free space")
    for peer, why in report.peers_missed.items():
        warn(f"peer {peer} keeps stray copies ({why}); `shardvault repair` deletes them once the peer allows it")


@main.command()
@click.argument("snapshot")
@click.option("--source", "source", help="Source of the snapshot (needed for 'latest').")
@click.option("--target", type=click.Path(path_type=Path), help="Directory to restore into.")
@click.option("--to-time", help="PostgreSQL: recover up to this time (e.g. '2026-11-22 10:00:00+00').")
@click.option("--to-lsn", help="PostgreSQL: recover up to this LSN.")
@click.option("--database", help="PostgreSQL logical snapshot: restore into this new database.")
@click.option("--to-bucket", help="Bucket snapshot: restore into this bucket (created if missing).")
@click.option("--to-prefix", default="", help="With --to-bucket: put the objects under this prefix.")
@click.option("--endpoint", help="With --to-bucket: another S3 endpoint than the source's.")
@click.option("--delete", "delete_extra", is_flag=True, help="With --to-bucket: remove objects the snapshot lacks.")
@click.option("--start", "start_server", is_flag=True, help="PostgreSQL: start the restored cluster.")
@click.option("--port", type=click.IntRange(1, 65535), default=5432, show_default=True, help="Port for --start.")
@click.option(
    "--overwrite",
    type=click.Choice(["never", "if-changed", "always"]),
    default="never",
    show_default=True,
    help="--target: what to do with paths already there (never: refuse before writing anything).",
)
@click.option("--include", multiple=True, help="Only paths matching this glob (repeatable; see README).")
@click.option("--exclude", multiple=True, help="Not the paths matching this glob (repeatable).")
@click.option("--path", "subtree", default="", help="Restore only this subtree, as the target itself.")
@click.option("--dry-run", is_flag=True, help="Say what would be written and fetched; write nothing.")
@click.option("--no-xattrs", is_flag=True, help="--target: do not restore extended attributes (nor ACLs).")
@click.option("--no-acls", is_flag=True, help="--target: do not restore POSIX ACLs.")
@click.option("--numeric-owner", is_flag=True, help="--target, as root: owners by the recorded ids, not by name.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def restore(
    ctx: Context,
    snapshot: str,
    source: str | None,
    target: Path | None,
    to_time: str | None,
    to_lsn: str | None,
    database: str | None,
    to_bucket: str | None,
    to_prefix: str,
    endpoint: str | None,
    delete_extra: bool,
    start_server: bool,
    port: int,
    overwrite: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    subtree: str,
    dry_run: bool,
    no_xattrs: bool,
    no_acls: bool,
    numeric_owner: bool,
    as_json: bool,
) -> None:
    """Restore SNAPSHOT (an id, a unique prefix, or 'latest') into --target, --database or --to-bucket."""
    from dataclasses import asdict

    from shardvault.restore.files import Overwrite, RestoreStats, plan_restore, restore_files
    from shardvault.restore.inode import MetadataOptions
    from shardvault.restore.select import Selection

    selection = Selection(include, exclude, subtree)

    def counts(stats: RestoreStats) -> tuple[Done, Totals]:
        return Done(stats.files, stats.bytes_written), stats.totals  # bytes_written moves during a long file

    with ctx.repository() as repo, job_progress(not as_json, "restore", counts) as on_progress:
        snap = repo.resolve_snapshot(snapshot, source)
        if (dry_run or not selection.everything) and (snap.source_type == "postgres" or to_bucket):
            raise click.UsageError("--include, --exclude, --path and --dry-run restore files into --target only")
        if snap.source_type == "postgres":
            doc = _restore_postgres(ctx, repo, snap, target, to_time, to_lsn, database, start_server, port)
            if as_json:
                emit_json(doc)
            return
        if to_bucket:
            from shardvault.restore.bucket import restore_to_bucket

            if snap.source_type != "bucket":
                raise click.UsageError("--to-bucket restores bucket snapshots only")
            result = restore_to_bucket(
                repo,
                snap,
                ctx.config.typed_source(snap.source, BucketSource),
                to_bucket,
                to_prefix,
                endpoint,
                delete_extra,
            )
            if as_json:
                emit_json({"snapshot": snap.id} | asdict(result))
            else:
                click.echo(
                    f"restored snapshot {snap.short_id} into s3://{to_bucket}/{to_prefix}: {result.objects} objects, "
                    f"{human(result.bytes)}; {len(result.deleted)} object(s) not in the snapshot removed"
                )
            return
        if dry_run:
            plan = plan_restore(repo, snap, selection)
            if as_json:
                emit_json({"snapshot": snap.id, "dry_run": True} | plan)
            else:
                for path in plan["paths"]:
                    click.echo(path)
                click.echo(
                    f"would restore {plan['files']} files, {plan['dirs']} dirs, {plan['symlinks']} symlinks, "
                    f"{human(plan['bytes'])}; would fetch {plan['packs']} pack(s), about {human(plan['fetch_bytes'])}"
                )
            return
        if target is None:
            raise click.UsageError("--target is required")
        try:
            metadata = MetadataOptions(xattrs=not no_xattrs, acls=not no_acls, numeric_owner=numeric_owner)
            stats = restore_files(repo, snap, target, on_progress, Overwrite(overwrite), selection, metadata)
        except ShardvaultError:
            report_bad_shards([p.to_doc() for p in repo.take_problems()])
            raise
    if as_json:
        emit_json({"snapshot": snap.id, "target": str(target)} | asdict(stats))
        return
    report_bad_shards(stats.bad_shards)
    for note in stats.notes[:20]:  # what the target refused besides content: the content is all there
        warn(note)
    if len(stats.notes) > 20:
        warn(f"... and {len(stats.notes) - 20} more (--json lists them all)")
    specials = f", {stats.special_files} special files" if stats.special_files else ""
    links = f" ({stats.hardlinks} as hard links)" if stats.hardlinks else ""
    click.echo(
        f"restored snapshot {snap.short_id} to {target}: {stats.files} files{links}, {stats.dirs} dirs, "
        f"{stats.symlinks} symlinks{specials}, {human(stats.bytes)} in {stats.duration_seconds:.2f} s; "
        f"{stats.files_skipped_unchanged} unchanged, {stats.files_overwritten} overwritten; "
        "every file matches its hash"
    )


def _restore_postgres(
    ctx: Context,
    repo: Repository,
    snap: Any,
    target: Path | None,
    to_time: str | None,
    to_lsn: str | None,
    database: str | None,
    start_server: bool,
    port: int,
) -> dict[str, Any]:
    from shardvault.restore import postgres as pgr

    source = ctx.config.typed_source(snap.source, PostgresSource)
    if snap.stats.get("postgres", {}).get("mode") == "logical":
        if not database:
            raise click.UsageError("a logical snapshot restores into a new database: pass --database NAME")
        doc = pgr.restore_logical(repo, snap, source, database)
        click.echo(f"restored dump {snap.short_id} into database {database!r}", err=True)
        return doc
    if target is None:
        raise click.UsageError("--target is required (an empty directory for the data directory)")
    password_file = Path(ctx.password_file).absolute() if ctx.password_file else None
    doc = pgr.restore_physical(
        repo,
        snap,
        source,
        target.absolute(),
        config_path=ctx.config.path,
        password_file=password_file,
        to_time=to_time,
        to_lsn=to_lsn,
        prefetch_wal=start_server,
    )
    point = to_time or to_lsn or doc["settings"].get("recovery_target_lsn") or "the end of the archived WAL"
    if start_server:
        pgr.start(source, target.absolute(), port)
        click.echo(f"restored {snap.short_id} to {target}, recovered to {point}; running on 127.0.0.1:{port}", err=True)
    else:
        click.echo(
            f"restored {snap.short_id} to {target}; it recovers to {point} when started:\n"
            f"  runuser -u postgres -- pg_ctl -D {target.absolute()} -o '-p PORT' start",
            err=True,
        )
    return doc


def _postgres_source(ctx: Context, name: str | None) -> PostgresSource:
    if name:
        return ctx.config.typed_source(name, PostgresSource)
    physical = [s for s in ctx.config.sources if isinstance(s, PostgresSource) and s.mode == "physical"]
    if len(physical) != 1:
        raise click.UsageError("pass --source NAME (the configuration has no single physical PostgreSQL source)")
    return physical[0]


@main.command(name="wal-push")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--source", help="The PostgreSQL source (default: the only one).")
@click.option(
    "--ahead",
    type=click.IntRange(0, 64),
    default=8,
    show_default=True,
    help="Also archive up to this many later segments PostgreSQL marked ready (their calls then return at once).",
)
@click.option(
    "--async",
    "async_",
    is_flag=True,
    help="Hand the segment to one long-lived pusher (started when none runs) and wait for its commit "
    "(pgBackRest's archive-async).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    default=walspool.TIMEOUT,
    show_default=True,
    help="With --async: seconds to wait for the pusher before failing (PostgreSQL asks again).",
)
@pass_ctx
@handle_errors
def wal_push(ctx: Context, path: Path, source: str | None, ahead: int, async_: bool, timeout: float) -> None:
    """Archive one WAL file (archive_command = 'shardvault ... wal-push %p')."""
    from shardvault.backup.wal import push, push_ahead

    # A segment archived ahead was acknowledged by the console script (shardvault.entry) before this
    # module loaded; one that gets here is pushed (the same content again is a no-op).
    src = _postgres_source(ctx, source)
    if async_ and _push_async(ctx, src, path, timeout):
        return
    with ctx.repository() as repo:
        push(repo, src, path)
        if ahead:
            push_ahead(repo, src, path, ahead)


def _globals(ctx: Context) -> list[str]:
    """This call's global options, for a worker it starts."""
    argv = ["--config", ctx.config_path] if ctx.config_path else []
    return argv + (["--password-file", ctx.password_file] if ctx.password_file else [])


def _push_async(ctx: Context, src: PostgresSource, path: Path, timeout: float) -> bool:
    """Wait for the pusher to commit ``path``, starting one if none runs; False: this call pushes it itself.

    The pusher pushes what PostgreSQL marked ready: a file without its
    ``.ready`` (a call by hand) is pushed by its own call.
    """
    spool = walspool.pushed_dir(path)
    if walspool.take_pushed(path):
        return True
    if not (path.parent / "archive_status" / f"{path.name}.ready").exists():
        return False
    alive: Callable[[], bool] = lambda: walspool.worker_alive(spool)  # noqa: E731
    if not alive():
        walspool.take_error(spool)  # reported before: this call tries again
        worker = walspool.start_worker(spool, _globals(ctx), "wal-pusher", "--source", src.name, str(path.parent))
        alive = lambda: worker.poll() is None or walspool.worker_alive(spool)  # noqa: E731
    outcome, message, code = walspool.await_pushed(path, timeout, alive)
    if outcome in (walspool.Outcome.FAILED, walspool.Outcome.TIMEOUT):
        _fail(message, code, "WalPusherError", False)
    return outcome is walspool.Outcome.DONE  # else it stopped without it (idle as this call came): push it here


@main.command(name="wal-pusher", hidden=True)
@click.argument("wal_dir", type=click.Path(path_type=Path))
@click.option("--source", help="The PostgreSQL source (default: the only one).")
@click.option("--idle", type=click.FloatRange(0), default=None, help="Seconds without a ready segment before it stops.")
@pass_ctx
@handle_errors
def wal_pusher(ctx: Context, wal_dir: Path, source: str | None, idle: float | None) -> None:
    """Push every WAL segment PostgreSQL marks ready in WAL_DIR until idle (started by wal-push --async)."""
    from shardvault.backup.wal import IDLE, push_ready

    spool = wal_dir / walspool.PUSHED_DIR
    with walspool.worker_lock(spool) as mine:
        if not mine:
            return  # another pusher runs: the calls wait on it
        try:
            src = _postgres_source(ctx, source)
            with ctx.repository() as repo:
                push_ready(repo, src, wal_dir, IDLE if idle is None else idle)
        except ShardvaultError as exc:
            walspool.write_error(spool, str(exc), exc.exit_code)  # before the lock goes: for the waiting call
            raise


@main.command(name="wal-fetch")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--source", help="The PostgreSQL source (default: the only one).")
@pass_ctx
@handle_errors
def wal_fetch(ctx: Context, name: str, dest: Path, source: str | None) -> None:
    """Restore one WAL file (restore_command = 'shardvault ... wal-fetch %f %p')."""
    from shardvault.restore.wal import fetch

    # A file fetched ahead was moved into place by the console script (shardvault.entry).
    src = _postgres_source(ctx, source)
    if walspool.take_prefetched(name, dest):
        return
    with ctx.repository() as repo:
        fetch(repo, src, name, dest)
    spool = walspool.prefetch_dir(dest)
    if (following := next_segment(name)) and not walspool.worker_alive(spool):
        walspool.start_worker(spool, _globals(ctx), "wal-prefetcher", "--source", src.name, following, str(dest))


@main.command(name="wal-prefetcher", hidden=True)
@click.argument("first")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--source", help="The PostgreSQL source (default: the only one).")
@pass_ctx
@handle_errors
def wal_prefetcher(ctx: Context, first: str, dest: Path, source: str | None) -> None:
    """Keep WAL segments from FIRST on fetched ahead for wal-fetch (started by wal-fetch and restore; stops itself)."""
    from shardvault.restore.wal import prefetch

    with walspool.worker_lock(walspool.prefetch_dir(dest)) as mine:
        if mine:
            with ctx.repository() as repo:
                prefetch(repo, _postgres_source(ctx, source), first, dest)


@main.command(name="check")
@click.option("--read-data", is_flag=True, help="Also read every shard and verify its hash.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def check_cmd(ctx: Context, read_data: bool, as_json: bool) -> None:
    """Check that every shard the index expects is present (and intact)."""
    from shardvault.verify.check import check

    with ctx.repository() as repo, progress_bar(not as_json, "check") as update:
        report = check(
            repo, read_data, lambda done, total: update(completed=done, total=total, info=f"{done}/{total} shards")
        )
    if as_json:
        emit_json(report.to_doc())
    else:
        for peer, why in report.peers_unreachable.items():
            lost = sum(1 for i in report.shard_issues if i.peer == peer and i.problem == "unreachable")
            click.echo(f"peer {peer}: UNREACHABLE ({lost} shards not available): {why}")
        for issue in report.shard_issues:
            if issue.problem != "unreachable":
                click.echo(f"{issue.problem} shard {issue.object} on peer {issue.peer}: {issue.detail}")
        for pack in report.damaged_packs:
            click.echo(
                f"pack {pack.pack[:16]} ({pack.kind}): {pack.state.upper()}, "
                f"{pack.good} of {pack.n} good, {pack.k} needed; survives "
                f"{max(pack.peer_failures_survived, 0)} peer failure(s) (of {pack.n - pack.k}), "
                f"{max(pack.zone_failures_survived, 0)} zone failure(s) (of {pack.zone_failures_possible})"
            )
        for error in report.snapshot_errors:
            click.echo(error)
        _render_metadata(report.metadata)
        read = f", {report.shards_read} read ({human(report.bytes_read)})" if read_data else ""
        click.echo(f"{report.shards_checked} shards checked{read}; {report.snapshots} snapshot(s); {report.summary()}")
        if report.unreferenced_shards:
            click.echo(f"{report.unreferenced_shards} unreferenced shard(s) (left by interrupted backups)")
        for peer, left in sorted(report.leftovers.items()):
            click.echo(
                f"peer {peer}: {left.objects} leftover object(s), {human(left.bytes)} "
                f"({left.unreferenced_shards} unreferenced shard(s), {left.temporary} temporary); "
                "`shardvault prune` removes them"
            )
        _render_locks(report.object_lock)
        click.echo("damage found" if report.damaged else "no errors found")
    if report.damaged:
        raise DamageFoundError(report.summary())


def _render_locks(findings: dict[str, Any]) -> None:
    """Object-lock peers whose objects could be deleted now (verify/locks.py): a warning, exit unchanged."""
    for peer, lock in sorted(findings.items()):
        head = f"peer {peer}: object lock ({lock.mode}, {lock.days} day(s))"
        if lock.error:
            click.echo(f"{head}: audit incomplete: {lock.error}")
        waiting = f"; {lock.awaiting_deletion} no longer in use, left to lapse" if lock.awaiting_deletion else ""
        if not lock.exposed:
            click.echo(f"{head}: all {lock.objects - lock.awaiting_deletion} object(s) in use retained{waiting}")
            continue
        parts = []
        if lock.lapsed:
            names = ", ".join(lock.lapsed_objects) + ", ..." * (lock.lapsed > 5)
            parts.append(f"{lock.lapsed} lapsed ({names})")
        if lock.missing:
            names = ", ".join(lock.missing_objects) + ", ..." * (lock.missing > 5)
            parts.append(f"{lock.missing} without retention ({names})")
        in_use = lock.objects - lock.awaiting_deletion
        click.echo(f"{head}: WARNING {lock.exposed} of {in_use} object(s) in use deletable now: {'; '.join(parts)}")


def _render_metadata(meta: Any) -> None:
    """Metadata problems (verify/metadata.py), one line each; unreachable peers are said once above."""
    for name in meta.peers_empty:
        click.echo(f"peer {name}: EMPTY or replaced (no identity), not a member until `shardvault repair` refills it")
    for peer, count in meta.peers_behind.items():
        click.echo(f"peer {peer}: behind, lacks {count} metadata object(s) the others have")
    for issue in meta.issues:
        if issue.problem != "unreachable" and issue.object != "identity" and issue.peer:
            click.echo(f"{issue.problem} metadata copy {issue.object} on peer {issue.peer}: {issue.detail}")
        elif issue.object == "identity" and issue.problem != "missing":
            click.echo(f"peer {issue.peer}: identity {issue.problem}: {issue.detail}")
    for name in meta.lost:
        click.echo(f"LOST metadata object {name}: no peer holds an intact copy")
    for snap in meta.snapshots_missing:
        click.echo(f"snapshot {snap[:8]} was committed (the state recorded it) but no peer has it: rolled back?")
    for name, holders in list(meta.stray.items())[:10]:
        click.echo(f"stray copy of deleted {name} on peer(s) {', '.join(holders)}: `shardvault repair` deletes it")
    if len(meta.stray) > 10:
        click.echo(f"... and {len(meta.stray) - 10} more deleted object(s) with stray copies (`--json` lists them)")
    click.echo(meta.summary())


class ByteSize(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A size: 1000, 64KiB, 500MiB, 2GiB, 1TB (binary and decimal units)."""

    name = "bytes"
    _UNITS: ClassVar[dict[str, int]] = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6}
    _UNITS |= {"mb": 10**6, "mib": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tib": 1 << 40}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :]
        try:
            size = float(number) * self._UNITS[unit]
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size (examples: 500MiB, 2GiB, 1000000)", param, ctx)
        if size <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return int(size)


@main.command()
@click.option("--budget", type=ByteSize(), help="Read at most this many bytes (e.g. 10GiB).")
@click.option("--max-duration", type=click.FloatRange(min=0.001), help="Stop starting reads after this many seconds.")
@click.option("--window", type=click.FloatRange(min=0.001), help="Days within which every shard must be read.")
@click.option("--rate", type=click.FloatRange(min=0), help="Read at most this many MiB/s (0: unlimited).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def scrub(
    ctx: Context,
    budget: int | None,
    max_duration: float | None,
    window: float | None,
    rate: float | None,
    as_json: bool,
) -> None:
    """Read and verify shards, least recently verified first, within a budget."""
    from shardvault.verify.scrub import scrub as run_scrub

    with ctx.repository() as repo, progress_bar(not as_json, "scrub") as update:
        report = run_scrub(
            repo,
            ctx.config.scrub,
            budget_bytes=budget,
            max_seconds=max_duration,
            window_days=window,
            rate_mib=rate,
            progress=lambda n, total, nbytes: update(completed=n, total=total, info=human(nbytes)),
        )
    if as_json:
        emit_json(report.to_doc())
    else:
        for issue in report.issues:
            click.echo(f"{issue.problem} shard {issue.object} on peer {issue.peer}: {issue.detail}")
        _render_metadata(report.metadata)
        stop = f" (stopped by the {report.stopped_by} limit)" if report.stopped_by else ""
        click.echo(
            f"read {report.shards_read} of {report.shards_total} shards ({human(report.bytes_read)}) "
            f"in {report.duration_seconds:.2f} s{stop}; coverage {report.coverage:.1%} within "
            f"{report.window_days:g} days; {report.shards_left} shard(s) still due"
        )
        click.echo("damage found: run `shardvault repair`" if report.damaged else "no errors found")
    if report.damaged:
        found = f"{len(report.issues)} bad shard(s); {report.metadata.summary()}"
        raise DamageFoundError(found)


def _render_repair(doc: dict[str, Any]) -> None:
    for lost in doc["lost"]:
        needed = ", ".join(lost["snapshots"]) or "no snapshot"
        click.echo(f"LOST pack {lost['pack'][:16]}: {lost['good']} good shards, {lost['k']} needed; needed by {needed}")
        for f in lost["files"]:
            click.echo(f"  {f}")
    for line in doc["unplaced"]:
        click.echo(f"not placed: {line}")
    meta = doc.get("metadata")
    if meta:
        for name in meta["identities_written"]:
            click.echo(f"peer {name}: empty or replaced, identity written and metadata refilled")
        for line in meta["failed"]:
            click.echo(f"metadata not repaired: {line}")
        for name in meta["after"]["lost"]:
            click.echo(f"LOST metadata object {name}: no peer holds an intact copy")
        for snap in meta["after"]["snapshots_missing"]:
            click.echo(f"snapshot {snap[:8]} was committed (the state recorded it) but is on no peer: not repairable")
        click.echo(f"metadata: {meta['copies_written']} copies written, {meta['stray_deleted']} stray copies deleted")
    for peer, lock in sorted(doc.get("object_lock", {}).items()):
        failed = f"; incomplete: {lock['error']}" if lock["error"] else ""
        click.echo(
            f"peer {peer}: object lock ({lock['mode']}): retention of {lock['extended']} of {lock['objects']} "
            f"object(s) extended to {lock['until']}{failed}"
        )
    click.echo(
        f"repaired {doc['packs_repaired']} of {doc['packs']} packs: {doc['shards_rebuilt']} shard(s) rebuilt, "
        f"{doc['shards_relocated']} on another peer, {human(doc['bytes_written'])} written"
    )


@main.command(name="repair")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def repair_cmd(ctx: Context, as_json: bool) -> None:
    """Rebuild missing and corrupt shards from k good ones, honouring zones."""
    from shardvault.verify.repair import raise_for_verdict, repair

    with ctx.repository() as repo, progress_bar(not as_json, "repair") as update:
        report = repair(repo, progress=lambda done, total: update(completed=done, total=total, info=f"{done}/{total}"))
    doc = report.to_doc()
    if as_json:
        emit_json(doc)
    else:
        _render_repair(doc)
    raise_for_verdict(doc)


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """``0``, ``90s``, ``15m``, ``4h``, ``2d``."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value, allow_zero=True)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _finite(value: float | None, param: click.Parameter) -> float | None:
    """FloatRange lets 'nan' through (every comparison with it is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number between 0 and 100", param=param)
    return value


def _render_prune(doc: dict[str, Any]) -> None:
    verb = "would" if doc["dry_run"] else "did"
    click.echo(
        f"{doc['snapshots']} snapshot(s); {doc['packs_total']} pack(s): {doc['packs_used']} used, "
        f"{doc['packs_partly_used']} partly used, {doc['packs_unused']} unused, {doc['packs_orphaned']} orphaned; "
        f"{human(doc['bytes_used'])} used, {human(doc['bytes_unused'])} unused"
    )
    if doc["repacked_packs"]:
        click.echo(
            f"repack{'' if doc['dry_run'] else 'ed'}: {doc['repacked_packs']} pack(s), {human(doc['repacked_bytes'])}"
        )
    c = doc["condemned"]
    click.echo(
        f"{verb} condemn: {c['packs']} pack(s), {c['stray_shards']} stray shard(s), {c['leftovers']} leftover(s)"
    )
    d = doc["deleted"]
    if not doc["dry_run"]:
        click.echo(
            f"deleted: {d['packs']} pack(s) ({d['shards']} shards), {d['stray_shards']} stray shard(s), "
            f"{d['leftovers']} leftover(s), {d['index_files']} index file(s), {d['sessions']} dead session(s)"
        )
        click.echo(f"index files: {doc['index_files_before']} -> {doc['index_files_after']}")
        for peer, size in sorted(doc["freed_bytes"].items()):
            click.echo(f"  freed on {peer}: {human(size)}")
    for wait in doc["waiting"]:
        click.echo(f"condemned set {wait['set'][:8]}: deletion deferred ({wait['why']})")
    if doc["kept_referenced"]:
        click.echo(f"kept {doc['kept_referenced']} condemned pack(s) that a newer snapshot references")
    if doc["chunks_unrecoverable"]:
        warn(f"{doc['chunks_unrecoverable']} referenced chunk(s) are in no recoverable pack: run 'shardvault check'")
    for refused in doc["refused"][:5]:
        warn(f"not deleted: {refused}")


@main.command()
@click.option("--dry-run", is_flag=True, help="Say what would be repacked, condemned and deleted; change nothing.")
@click.option(
    "--max-unused",
    type=click.FloatRange(0, 100),
    callback=lambda ctx, param, value: _finite(value, param),
    help="Repack partly used packs until unused space is at most PERCENT of used space "
    "(default: [prune] max_unused, 5).",
)
@click.option(
    "--grace",
    type=Duration(),
    help="Delete condemned data no sooner than this after it was condemned (default: [prune] grace, 24h). "
    "0 frees at once what no running process can still need.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def prune(ctx: Context, dry_run: bool, max_unused: float | None, grace: float | None, as_json: bool) -> None:
    """Delete data no snapshot needs: unused packs, repacked ones, orphans of killed runs; compact the index."""
    from shardvault.lifecycle.prune import PruneOptions
    from shardvault.lifecycle.prune import prune as run_prune

    settings = ctx.config.prune
    options = PruneOptions(
        dry_run=dry_run,
        max_unused_percent=settings.max_unused_percent if max_unused is None else max_unused,
        grace_seconds=settings.grace_seconds if grace is None else grace,
    )
    with ctx.repository() as repo, progress_bar(not as_json, "prune") as update:
        report = run_prune(repo, options, progress=lambda message: update(info=message))
    doc = report.to_doc()
    if as_json:
        emit_json(doc)
    else:
        _render_prune(doc)


@main.command()
@click.option(
    "--remove-all", is_flag=True, help="Also remove sessions that look alive (only when you know they are dead)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def unlock(ctx: Context, remove_all: bool, as_json: bool) -> None:
    """Remove the sessions that killed processes left behind; name the live ones."""
    from shardvault.repository.sessions import unlock as run_unlock

    with ctx.repository() as repo:
        repo.announce_sessions = False
        report = run_unlock(repo, ctx.config.prune.stale_after_seconds, remove_all=remove_all)
    doc = report.to_doc()
    if as_json:
        emit_json(doc)
        return
    for item in doc["removed"]:
        click.echo(
            f"removed {item['kind']} session {item['id']} of {item['hostname']} (pid {item['pid']}): {item['why']}"
        )
    for item in doc["live"]:
        warn(
            f"{item['kind']} session {item['id']} of {item['hostname']} (pid {item['pid']}) is live: {item['why']}; "
            "not removed (if you know it is dead: shardvault unlock --remove-all)"
        )
    if not doc["removed"] and not doc["live"]:
        click.echo("no sessions")


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def peers(click_ctx: click.Context, as_json: bool) -> None:
    """Show each peer (reachable or not, shards and bytes held); add, drain or remove one."""
    if click_ctx.invoked_subcommand is None:
        click_ctx.invoke(peers_list, as_json=as_json)


@peers.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def peers_list(ctx: Context, as_json: bool) -> None:
    """Show each peer: reachable or not, shards and bytes held."""
    from dataclasses import asdict

    from shardvault.verify.check import peer_usage

    with ctx.repository() as repo:
        rows = peer_usage(repo)
    if as_json:
        emit_json([asdict(r) for r in rows])
        return
    click.echo(f"{'peer':<12}{'zone':<10}{'state':<14}{'shards':>8}{'bytes':>12}  url")
    for r in rows:
        state = "up" if r.reachable else "UNREACHABLE"
        click.echo(f"{r.name:<12}{r.zone:<10}{state:<14}{r.shards:>8}{human(r.shard_bytes):>12}  {r.url}")
        if r.error:
            click.echo(f"  {r.error}")


def _peer_action(ctx: Context, action: str, name: str, as_json: bool) -> None:
    from shardvault.verify import rebalance

    with ctx.repository() as repo:
        report = getattr(rebalance, action)(repo, name)
    doc = report.to_doc()
    if as_json:
        emit_json(doc)
    else:
        for line in doc["unreadable"]:
            click.echo(f"unreadable, rebuilt from other peers: {line}")
        if doc["metadata_copied"]:
            click.echo(f"copied {doc['metadata_copied']} metadata object(s) to {name}")
        click.echo(f"{action}: {doc['shards_moved']} shard(s) moved ({human(doc['bytes_moved'])})")
        if doc["repair"]:
            _render_repair(doc["repair"])
        if doc["removable"]:
            click.echo(f"peer {name} holds no shard the index needs: it can be taken out of the configuration")
    if doc["repair"]:
        from shardvault.verify.repair import raise_for_verdict

        raise_for_verdict(doc["repair"])
    if action in ("drain", "remove") and doc["shards_remaining"]:
        from shardvault.errors import PeerNotDrainedError

        raise PeerNotDrainedError(name, doc["shards_remaining"], action)


def _peer_command(action: str, doc: str) -> None:
    @peers.command(name=action, help=doc)
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
    @pass_ctx
    @handle_errors
    def command(ctx: Context, name: str, as_json: bool) -> None:
        _peer_action(ctx, action, name, as_json)


_peer_command("add", "Bring NAME (already in the config) into the repository and move its share of shards onto it.")
_peer_command("drain", "Move every shard off NAME (copy, commit, then delete), keeping every pack whole.")
_peer_command("remove", "Give up on a dead peer NAME: rebuild its shards on the other peers.")


# -- keys (issue 9) ---------------------------------------------------------------------


@main.group(name="key", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def key_group(click_ctx: click.Context, as_json: bool) -> None:
    """List the passphrases and key files that open the repository; add, remove or change one."""
    if click_ctx.invoked_subcommand is None:
        click_ctx.invoke(key_list, as_json=as_json)


@key_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def key_list(ctx: Context, as_json: bool) -> None:
    """Show every key: id, when, where and by whom it was made; * marks the one your passphrase opened."""
    from shardvault.repository.keys import list_keys

    with ctx.repository() as repo:
        entries = list_keys(repo)
        current = repo.key_name.removeprefix("keys/")
    if as_json:
        emit_json({"keys": [e.to_doc() for e in entries], "current": current})
        return
    click.echo(f"  {'id':<18}{'created':<27}{'host':<18}{'user':<12}{'peers':>6}  label")
    for e in entries:
        mark = "*" if e.current else " "
        click.echo(
            f"{mark} {e.id:<18}{e.created or '?':<27}{e.hostname or '?':<18}{e.username or '?':<12}"
            f"{len(e.peers):>6}  {e.label}"
        )
        if e.problem:
            click.echo(f"    {e.problem}")


def _new_passphrase(new_password_file: str | None, generate: Path | None) -> tuple[str, Path | None]:
    """The new passphrase: from a file, a freshly generated key file, or asked twice (hidden)."""
    from shardvault.errors import ConfigValueError
    from shardvault.repository.keys import generate_key_file

    if new_password_file and generate:
        raise click.UsageError("give --new-password-file or --generate-key-file, not both")
    if new_password_file:
        return read_password(new_password_file), None
    if generate is not None:
        try:
            return generate_key_file(generate), generate
        except FileExistsError:
            raise ConfigValueError(generate, "(key file)", "already exists; refusing to replace it") from None
        except OSError as exc:
            raise ConfigValueError(generate, "(key file)", f"cannot write: {exc.strerror}") from None
    try:
        secret = click.prompt(
            "New passphrase", hide_input=True, confirmation_prompt="Repeat the new passphrase", err=True
        )
    except click.Abort:  # no terminal and no input
        raise click.UsageError("no new passphrase: give --new-password-file F (or type it at a terminal)") from None
    return str(secret), None


_NEW_KEY_OPTIONS = [
    click.option("--new-password-file", metavar="PATH", help="Read the new passphrase (or key file) from PATH."),
    click.option(
        "--generate-key-file",
        "generate",
        type=click.Path(path_type=Path),
        help="Write a new random key file to PATH (mode 0600, never replaced) and add it.",
    ),
    click.option("--label", default="", help="A note kept (sealed) with the key, shown by `key list`."),
]


def _new_key_options(fn: F) -> F:
    for option in reversed(_NEW_KEY_OPTIONS):
        fn = option(fn)
    return fn


def _render_key_change(doc: dict[str, Any]) -> None:
    if doc["added"]:
        click.echo(f"added key {doc['added']['id']} on {len(doc['added']['peers'])} peer(s)")
    if doc["removed"]:
        click.echo(f"removed key {doc['removed']} from {len(doc['peers_deleted'])} peer(s)")
        for peer, why in sorted(doc["peers_kept"].items()):
            click.echo(f"  peer {peer} keeps its copy ({why}): it is refused, and `repair` deletes it")


def _key_change(
    ctx: Context,
    as_json: bool,
    action: Callable[[Repository, str], Any],
    new_password_file: str | None,
    generate: Path | None,
) -> None:
    from shardvault.errors import KeyRotationIncompleteError

    with ctx.repository() as repo:
        passphrase, written = _new_passphrase(new_password_file, generate)
        try:
            change = action(repo, passphrase)
        except KeyRotationIncompleteError:
            raise  # the new key was added: its key file is the way in, keep it
        except BaseException:
            if written is not None:  # a key file for a key that was never added would only mislead
                written.unlink(missing_ok=True)
            raise
    doc = change.to_doc()
    if written is not None:
        doc["key_file"] = str(written)
    if as_json:
        emit_json(doc)
    else:
        _render_key_change(doc)
        if written is not None:
            click.echo(f"key file {written}: open the repository with --password-file {written}")


@key_group.command(name="add")
@_new_key_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def key_add(ctx: Context, new_password_file: str | None, generate: Path | None, label: str, as_json: bool) -> None:
    """Add a passphrase or key file that opens the repository (it wraps the same master key)."""
    from shardvault.repository.keys import KeyChange, add_key

    _key_change(ctx, as_json, lambda repo, pw: KeyChange(added=add_key(repo, pw, label)), new_password_file, generate)


@key_group.command(name="remove")
@click.argument("key_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def key_remove(ctx: Context, key_id: str, as_json: bool) -> None:
    """Remove the key ID (or a unique prefix); never the last key, nor the one your passphrase opened."""
    from shardvault.repository.keys import remove_key

    with ctx.repository() as repo:
        change = remove_key(repo, key_id)
    doc = change.to_doc()
    if as_json:
        emit_json(doc)
    else:
        _render_key_change(doc)


@key_group.command(name="passwd")
@_new_key_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def key_passwd(ctx: Context, new_password_file: str | None, generate: Path | None, label: str, as_json: bool) -> None:
    """Change your passphrase: add the new key, then remove the one in use (data is not re-encrypted)."""
    from shardvault.repository.keys import change_passphrase

    _key_change(ctx, as_json, lambda repo, pw: change_passphrase(repo, pw, label), new_password_file, generate)


@main.command()
@click.option("--listen", default="127.0.0.1:9477", show_default=True, help="HOST:PORT to serve /metrics on.")
@click.option("--once", is_flag=True, help="Print the metrics once on stdout instead of serving them.")
@pass_ctx
@handle_errors
def exporter(ctx: Context, listen: str, once: bool) -> None:
    """Serve Prometheus metrics computed from the local state (no passphrase needed)."""
    from shardvault.verify.exporter import find_state, make_exporter, render

    config = ctx.config
    state = find_state(config)
    if once:
        click.echo(render(config, state).decode(), nl=False)
        return
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{listen!r} is not HOST:PORT", param_hint="--listen")
    try:
        server = make_exporter(config, state, host, int(port))
    except OSError as exc:
        raise click.BadParameter(f"cannot listen on {listen}: {exc.strerror}", param_hint="--listen") from None
    base = f"http://{host}:{server.server_port}"
    err().print(f"serving {base}/metrics, {base}/health and {base}/health/detailed", markup=False)
    server.serve_forever()


@main.command()
@click.argument("playbook", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the drill report as one JSON document.")
@pass_ctx
@handle_errors
def drill(ctx: Context, playbook: Path, as_json: bool) -> None:
    """Run the DR playbook PLAYBOOK: restore, check, measure RTO and RPO, report (exit 13: a check failed, 14: an objective missed)."""  # noqa: E501
    from shardvault.restore.drill import run_drill
    from shardvault.restore.playbook import load_playbook

    book = load_playbook(playbook, ctx.config)  # validated before anything runs (or asks for the passphrase)
    with progress_bar(not as_json, f"drill {book.name}") as update:
        report = run_drill(ctx.config, ctx.password(), book, lambda step: update(info=step))
    if as_json:
        emit_json(report.to_doc())
    else:
        for check in report.checks:
            click.echo(f"{'ok    ' if check.passed else 'FAILED'} {check.name}: {check.detail}")

        def secs(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} s"

        click.echo(
            f"drill {book.name}: {report.result.value}; RTO {secs(report.rto_seconds)} "
            f"(objective {report.rto_objective_seconds:g} s), RPO {secs(report.rpo_seconds)} "
            f"(objective {report.rpo_objective_seconds:g} s); report {report.reports.get('markdown', '-')}"
        )
    error = report.error()
    if error is not None:
        raise error


_playbooks_option = click.option(
    "--playbooks",
    "playbooks_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory of DR playbooks (default: dr_playbooks/ beside the config, else in the working directory).",
)


@main.command()
@_playbooks_option
@click.option("--limit", type=click.IntRange(min=1), help="At most this many runs at once in this process.")
@pass_ctx
@handle_errors
def serve(ctx: Context, playbooks_dir: Path | None, limit: int | None) -> None:
    """Register every deployment of the config with the Prefect API ($PREFECT_API_URL) and run them here."""
    from shardvault.flows.deployments import plan_for, require_api, serve_plan

    # The plan is checked (crons, timezone) and the API asked before anything is registered.
    plan = plan_for(ctx.config, ctx.password_file, playbooks_dir)
    if not ctx.password_file:
        ctx.password()  # runs inherit $SHARDVAULT_PASSWORD: say now that it is missing, not in every run
    require_api()
    names = ", ".join(d.full_name for d in plan.deployments)
    err().print(f"serving {len(plan.deployments)} deployment(s) (timezone {plan.timezone}): {names}", markup=False)
    serve_plan(plan, limit, ctx.config.repository.state_dir)


@main.command()
@_playbooks_option
@click.option("--count", type=click.IntRange(1, 100), default=3, show_default=True, help="Next runs per schedule.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_ctx
@handle_errors
def schedule(ctx: Context, playbooks_dir: Path | None, count: int, as_json: bool) -> None:
    """Show what will run when: every deployment, its crons and its next runs (computed locally)."""
    from shardvault.flows.deployments import plan_for
    from shardvault.schedule import next_runs, plan_doc

    plan = plan_for(ctx.config, ctx.password_file, playbooks_dir)
    runs = next_runs(plan, count)
    if as_json:
        emit_json(plan_doc(plan, runs))
        return
    click.echo(f"timezone {plan.timezone}")
    for d in plan.deployments:
        crons = ", ".join(f"{s.label} {s.cron!r}" for s in d.schedules) or "on demand only"
        click.echo(f"{d.full_name:<28} {crons}")
    if runs:
        click.echo("next runs:")
    for r in runs:
        click.echo(f"  {r.at:%Y-%m-%d %H:%M %Z}  {r.deployment:<28} {r.label}")


@main.command()
@_playbooks_option
@click.option("--pool", "work_pool", default="shardvault", show_default=True, help="Process work pool of the workers.")
@click.option(
    "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write prefect.yaml here (default: print)."
)
@pass_ctx
@handle_errors
def deploy(ctx: Context, playbooks_dir: Path | None, work_pool: str, output: Path | None) -> None:
    """Describe the same deployments as `serve` as a prefect.yaml, for `prefect deploy --all` and workers."""
    from shardvault.flows.deployments import plan_for, prefect_yaml

    plan = plan_for(ctx.config, ctx.password_file, playbooks_dir)
    text = prefect_yaml(plan, work_pool, str(Path.cwd()))
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {len(plan.deployments)} deployment(s) to {output}; then: prefect deploy --all")


if __name__ == "__main__":
    main()
