"""The peer store interface: the one boundary every peer type implements.

Modelled on borgstore: five verbs over flat, slash-separated object names.

* ``load(name)`` returns the object's bytes;
* ``store(name, data)`` writes it atomically (all or nothing, never a torn
  object, even if the process is killed);
* ``delete(name)`` removes it;
* ``list(prefix)`` yields :class:`ItemInfo` for every object below a prefix;
* ``info(name)`` returns one object's :class:`ItemInfo`.

Plus ``create()`` (make an empty store, refusing if it cannot write) and
``probe()`` (is the peer there and answering, cheaply).

Leftovers: a write killed half-way (SIGKILL, power loss) may leave its
temporary object behind.  ``list()`` never shows it (its last component starts
with a dot, which no valid name does), so ``list_leftovers()`` is the one way
to see them (``check`` reports them) and ``delete_leftover(name)`` the one way
to remove them (prune).  Leftover names are validated like object names: the
directory part is a valid name, the last component a temporary's name.

Immutability: ``retention(name)`` says until when the peer itself refuses to
delete an object (S3 Object Lock), ``None`` where nothing is retained;
:mod:`.immutable` wraps any store into an append-only one.  Deletions a
peer refuses raise :class:`~shardvault.errors.PeerRefusesDeletionError`.

Names are validated here, at the boundary, so no caller can reach outside the
store (``..``, absolute paths, odd characters) whatever the repository's
metadata says.  Peers are untrusted: implementations turn transport failures
into :class:`~shardvault.errors.PeerError` subclasses, and callers verify
every byte they load.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from shardvault.errors import InvalidObjectNameError, ObjectNotFoundError, PeerError

# Lower-case components of letters, digits, '.', '_' and '-', not starting with
# a dot (so no '..', no hidden temp files), at most 8 deep and 255 long.
_COMPONENT = r"[a-z0-9_-][a-z0-9._-]{0,127}"
_NAME_RE = re.compile(rf"^{_COMPONENT}(/{_COMPONENT}){{0,7}}$")
MAX_NAME_LENGTH = 255

# Objects that are not history: a writer's session heartbeats, replaced every
# minute (shardvault.repository.sessions).  They take no Object Lock retention
# (a year of locked heartbeats would be thousands of objects nobody can remove)
# and ``check`` does not ask for one; losing them only ends a session early.
UNRETAINED_PREFIXES = ("sessions/",)


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise."""
    if not isinstance(name, str):
        raise InvalidObjectNameError(repr(name), "not a string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidObjectNameError(name, f"longer than {MAX_NAME_LENGTH} characters")
    if not _NAME_RE.match(name):
        raise InvalidObjectNameError(name, "only lower-case a-z, 0-9, '.', '_', '-' components separated by '/'")
    return name


# The temporaries our stores write: ".tmp-<hex>" (local writes) and ".probe" or
# ".probe-<hex>" (the writability probe of create()).  Nothing else hidden is
# ours, so nothing else is ever reported or deleted as a leftover.
_LEFTOVER_RE = re.compile(r"^\.(tmp-[0-9a-f]{1,64}|probe(-[0-9a-f]{1,64})?)$")


def is_leftover_name(name: str) -> bool:
    """True if ``name`` is a temporary object's name (``data/ab/.tmp-1f2e``, ``.probe``)."""
    head, slash, tail = name.rpartition("/")
    if not _LEFTOVER_RE.match(tail):
        return False
    if not slash:
        return True
    try:
        validate_name(head)
    except InvalidObjectNameError:
        return False
    return True


def validate_leftover_name(name: str) -> str:
    """Return ``name`` if it names a temporary object, else raise (never a real object's name)."""
    if not isinstance(name, str) or not is_leftover_name(name):
        raise InvalidObjectNameError(str(name), "not the name of a leftover temporary object")
    return name


def validate_prefix(prefix: str) -> str:
    """A list prefix is empty or a valid name (a directory-like prefix)."""
    if prefix == "":
        return prefix
    return validate_name(prefix.rstrip("/"))


@dataclass(frozen=True)
class ItemInfo:
    """What a store knows about one object."""

    name: str
    size: int


class PeerStore(ABC):
    """One peer's object store.  Thread-safe: the data path calls it from pools."""

    def __init__(self, peer: str) -> None:
        self.peer = peer

    @abstractmethod
    def create(self) -> None:
        """Create the store (directory or prefix) and check it is writable."""

    @abstractmethod
    def probe(self) -> None:
        """Raise a PeerError if the peer is unreachable or not a store."""

    @abstractmethod
    def load(self, name: str) -> bytes:
        """Return the whole object; ObjectNotFoundError if it is absent."""

    @abstractmethod
    def store(self, name: str, data: bytes | memoryview) -> None:
        """Write the object atomically, replacing any previous one."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object; ObjectNotFoundError if it is absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ItemInfo]:
        """Yield every object whose name starts with ``prefix``."""

    @abstractmethod
    def info(self, name: str) -> ItemInfo:
        """Return the object's info; ObjectNotFoundError if it is absent."""

    def list_leftovers(self) -> Iterator[ItemInfo]:
        """Yield the temporary objects of killed writes, which ``list()`` hides.

        The default, for stores whose writes leave no temporaries, yields nothing.
        """
        return iter(())

    def delete_leftover(self, name: str) -> None:
        """Remove one leftover that ``list_leftovers()`` yielded; ObjectNotFoundError if it is gone."""
        validate_leftover_name(name)
        raise ObjectNotFoundError(self.peer, name)

    def retention(self, name: str) -> datetime | None:
        """Until when the peer refuses to delete the object (timezone-aware), None if it keeps no lock.

        ObjectNotFoundError if the object is absent.  The default, for stores
        without server-side retention (local directories), is None.
        """
        self.info(name)
        return None

    def extend_retention(self, name: str, until: datetime) -> None:
        """Keep the object undeletable until ``until`` (never shortens); only stores with retention can."""
        raise PeerError(self.peer, f"{name}: this peer keeps no retention (object_lock is for S3 peers)")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.peer!r})"
