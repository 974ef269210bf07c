"""Tombstones: the record that objects were deleted on purpose.

Metadata is replicated to every peer, and a peer that is down while
``forget`` (or ``prune``) deletes an object keeps its copy.  Without a record,
that copy would come back: listings are the union over the peers, and
``repair`` re-replicates any object some peer lacks.  So a deleting command
first writes a tombstone, then deletes::

    deleted/<64 hex>     (sealed like every metadata object, replicated to every peer)

    {"version": 1, "names": ["snapshots/<64 hex>", "wal/db/000000010000000000000003", ...],
     "reason": "forget" | "prune" | ..., "time": iso8601, "hostname": str}

Written *before* the objects are deleted (with the write quorum of any
metadata commit), so a crash in between leaves a record that says they are
meant to go, never an object that is half gone.  Every reader treats a name
any tombstone lists as gone: :meth:`Repository.list_meta` leaves it out (so
snapshots, index files and the WAL archive never show it), a read that finds
it missing everywhere is not a problem, and the metadata audit reports a copy
still on some peer as a stray copy that ``repair`` deletes, never as an
object to re-replicate.

Names are never reused: snapshots and index files have random names, WAL
records are named by PostgreSQL's WAL files, which only repeat if a cluster
is re-created under the same source name (then it needs a new source name,
as its old archive's names are taken).  Tombstones themselves are kept (they
are small: one per forget or prune run); tombstoning a tombstone, the config,
an identity or a name that is not metadata is refused.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from shardvault.errors import RepositoryCorruptError, UnsupportedFormatError

from .metadata import MetaProblem, kind_of, new_id

if TYPE_CHECKING:
    from .core import Repository

TOMBSTONE_VERSION = 1
PREFIX = "deleted/"
# The kinds of object a tombstone may name: what forget and prune delete.
DELETABLE_KINDS = frozenset({"snapshot", "index", "wal", "key", "condemned"})


class DeletionReason(StrEnum):
    """Why objects were deleted (any text is accepted; these are the ones shardvault writes)."""

    FORGET = "forget"
    PRUNE = "prune"


def tombstone_doc(names: Iterable[str], reason: str, time: str, hostname: str) -> dict[str, Any]:
    """The body of a tombstone (pinned by tests/vectors/tombstone_v1.json)."""
    listed = sorted(set(names))
    if not listed:
        raise ValueError("a tombstone names at least one object")
    for name in listed:
        if kind_of(name) not in DELETABLE_KINDS:
            raise ValueError(f"{name!r} cannot be tombstoned (only {', '.join(sorted(DELETABLE_KINDS))} objects)")
    if not reason:
        raise ValueError("a tombstone needs a reason")
    return {"version": TOMBSTONE_VERSION, "names": listed, "reason": str(reason), "time": time, "hostname": hostname}


def parse_tombstone(name: str, doc: dict[str, Any]) -> list[str]:
    """The names a (version-checked, authenticated) tombstone body lists; ValueError if malformed."""
    names = doc.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{name}: 'names' is not a list of object names")
    return [n for n in names if kind_of(n) in DELETABLE_KINDS]


def write_tombstone(repo: Repository, names: Iterable[str], reason: str) -> str:
    """Record ``names`` as deleted on purpose; return the tombstone's name.

    Call it *before* deleting the objects.  It is a metadata commit
    (:meth:`Repository.write_meta`): without the write quorum nothing is
    written and NotEnoughPeersError says so, and then nothing may be deleted.
    The repository's :attr:`~Repository.deleted_names` includes the names at
    once.  With no names nothing is written and the name returned is "".
    """
    names = list(names)
    if not names:
        return ""
    doc = tombstone_doc(names, reason, datetime.now(UTC).isoformat(), socket.gethostname())
    name = PREFIX + new_id()
    repo.write_meta(name, doc)
    repo.deleted_names.update(doc["names"])
    return name


def load_deleted(repo: Repository) -> set[str]:
    """Every name any tombstone on any reachable peer lists.

    A tombstone no peer holds intact is reported in ``repo.meta_problems``
    (check names it) and skipped: its names then look present again, which
    loses nothing.  Tombstones are immutable, so the local cache serves them
    after the first read.
    """
    deleted: set[str] = set()
    for name in repo.list_meta(PREFIX):
        try:
            deleted.update(parse_tombstone(name, repo.read_meta(name)))
        except (RepositoryCorruptError, UnsupportedFormatError):
            continue  # read_meta has recorded the problem
        except ValueError as exc:
            problem = MetaProblem(name, "", f"unparsable tombstone body: {exc}")
            if problem not in repo.meta_problems:
                repo.meta_problems.append(problem)
    return deleted
