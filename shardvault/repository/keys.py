"""Keys: several passphrases (or key files) open one repository.

A repository has one set of master keys (:class:`~shardvault.crypto.MasterKeys`,
made at ``init``) and one or more **key objects** ``keys/<16 hex>``, each
wrapping those same master keys under a key derived from one passphrase
with scrypt (:func:`~shardvault.repository.metadata.make_key_object`).
Adding a key wraps the master keys again under a new passphrase; removing one
deletes its objects; ``passwd`` is both, in that order.  No data is ever
re-encrypted: a key is a door to the master keys, not the lock on the data.

Key-object ``info`` (an optional field of key object version 1)
---------------------------------------------------------------

Key objects written by ``init`` and ``key add`` carry one more clear field::

    {"format": "shardvault-key", "version": 1, "kdf": "scrypt", "n": .., "r": .., "p": ..,
     "salt": b64, "data": b64, "info": b64(sealed)}

``info`` is sealed with the repository's master encryption key (AES-256-GCM,
fresh nonce, associated data ``"shardvault key info v1:" + object name``)
around the JSON::

    {"version": 1, "created": ISO 8601 UTC, "hostname": str, "username": str,
     "label": str, "digest": hex BLAKE3 of the key object's other fields}

where the digest is taken over those fields (everything but ``info``) as
canonical JSON (sorted keys, no spaces).  The field is optional, so key
objects without it (written before it existed) and older readers, which
ignore unknown fields, keep working: the version stays 1.  Why it is there:

* whoever holds the master keys (any passphrase) can verify *every* key
  object end to end, not only the one their own passphrase opens, so
  ``check`` judges each copy of every key and ``repair`` can replace a
  damaged copy of another passphrase's key (it never overwrites what it
  cannot judge);
* a key object moved to another name does not verify (the name is bound);
* who made a key, where and when is shown by ``key list`` without telling
  the peers (restic keeps host and user names in the clear).

Key files
---------

A key file is a passphrase file: its content, minus one trailing newline,
is the passphrase, read exactly as ``--password-file`` reads it.  ``key add
--generate-key-file F`` writes a fresh random secret (256 bits, base64url)
to a new file F readable only by its owner and adds it as a key; the file
then opens the repository with ``--password-file F``.

Removal
-------

A key is removed by first writing a tombstone naming it (``deleted/…``, see
:mod:`shardvault.repository.tombstones`) to the write quorum, then deleting
its object on every reachable peer.  A peer that was down keeps its copy;
readers treat the tombstoned name as gone, so repair never copies it back and
the removed passphrase is refused (exit 4) even where a copy survives.  This
is access control for honest operators, not cryptographic revocation: anyone
who kept the old passphrase and a copy of the old key object can still derive
the master keys (README, "Keys").
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardvault.crypto import Cipher, MasterKeys, OpenFailed, b64d, b64e, content_hash
from shardvault.errors import (
    AmbiguousKeyError,
    DeletionRefusedError,
    KeyNotFoundError,
    KeyRemovalRefusedError,
    KeyRemovedError,
    KeyRotationIncompleteError,
    ObjectNotFoundError,
    PeerError,
    RepositoryCorruptError,
    ShardvaultError,
    UnsupportedFormatError,
    WrongPassphraseError,
)
from shardvault.failpoints import failpoint
from shardvault.shards.peers import Peer

from .metadata import MalformedObject, check_version, kind_of, make_key_object, parse_key_object
from .opening import open_key, write_hint
from .tombstones import write_tombstone

if TYPE_CHECKING:
    from .core import Repository

KEYS_PREFIX = "keys/"
_INFO_AAD = b"shardvault key info v1:"
INFO_VERSION = 1


def new_key_name() -> str:
    """A fresh, random key object name: ``keys/<16 hex>``."""
    return f"{KEYS_PREFIX}{secrets.token_hex(8)}"


@dataclass(frozen=True)
class KeyInfo:
    """Who made a key, where and when (sealed in the key object; see the module docstring)."""

    created: str
    hostname: str
    username: str
    label: str = ""

    @classmethod
    def here(cls, label: str = "", now: datetime | None = None) -> KeyInfo:
        """This host, this user, now."""
        try:
            user = getpass.getuser()
        except (OSError, KeyError):  # no login name in some containers: the key works all the same
            user = ""
        stamp = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
        return cls(stamp, socket.gethostname(), user, label)


def _digest(doc: dict[str, Any]) -> str:
    """BLAKE3 of a key object's fields other than ``info``, as canonical JSON."""
    clear = {k: v for k, v in doc.items() if k != "info"}
    return content_hash(json.dumps(clear, separators=(",", ":"), sort_keys=True).encode()).hex()


def info_doc(info: KeyInfo, digest: str) -> dict[str, Any]:
    """The plaintext body of ``info`` (pinned by tests/vectors/keys_v1.json)."""
    return {"version": INFO_VERSION, **asdict(info), "digest": digest}


def make_key(
    passphrase: str, keys: MasterKeys, repo_id: str, name: str, info: KeyInfo, nonce: bytes | None = None
) -> bytes:
    """A key object for ``name``: the master keys wrapped under ``passphrase``, with sealed ``info``.

    ``nonce`` is for golden vectors only.
    """
    doc = json.loads(make_key_object(passphrase, keys, repo_id))
    body = json.dumps(info_doc(info, _digest(doc)), separators=(",", ":"), sort_keys=True).encode()
    doc["info"] = b64e(Cipher(keys.encryption).seal(body, _INFO_AAD + name.encode(), nonce))
    return json.dumps(doc, indent=1).encode()


def read_key_info(cipher: Cipher, name: str, data: bytes) -> KeyInfo | None:
    """The verified ``info`` of a key object; None for a key object without one.

    MalformedObject when the object does not parse, the info does not
    authenticate under the master key (damaged, another repository's, or moved
    from another name), or it does not match the object's other fields.
    """
    doc = parse_key_object(data)
    if "info" not in doc:
        return None
    try:
        body = json.loads(cipher.open(b64d(doc["info"]), _INFO_AAD + name.encode()))
    except OpenFailed:
        raise MalformedObject("key info does not authenticate (damaged, moved, or another repository's)") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise MalformedObject(f"undecodable key info: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedObject("key info is not a JSON object")
    try:
        check_version("key-info", body, name)
    except UnsupportedFormatError as exc:
        raise MalformedObject(str(exc)) from None
    if body.get("digest") != _digest(doc):
        raise MalformedObject("key object fields differ from those its info was sealed with")
    try:
        return KeyInfo(str(body["created"]), str(body["hostname"]), str(body["username"]), str(body.get("label", "")))
    except KeyError as exc:
        raise MalformedObject(f"key info lacks {exc}") from None


def verified_copy(repo: Repository, name: str) -> bytes | None:
    """Bytes of a copy of key object ``name`` that verifies under the master key, or None.

    The key our passphrase opened is verified by having opened; another key
    verifies by its sealed ``info``.  None for a key object without info (only
    its structure can be checked) or one no peer holds intact.
    """
    if name == repo.key_name and repo.key_copy:
        return repo.key_copy
    for _, data in _copies(repo, name):
        try:
            if read_key_info(repo.cipher, name, data) is not None:
                return data
        except MalformedObject:
            continue
    return None


def _copies(repo: Repository, name: str) -> Iterator[tuple[str, bytes]]:
    """(peer, bytes) of each up peer's copy of ``name``, distinct bytes once."""
    seen: set[bytes] = set()
    futures = [(p, repo.io.submit(p.store.load, name)) for p in repo.peers.up()]
    for peer, future in futures:
        try:
            data = future.result()
        except ObjectNotFoundError:
            continue
        except PeerError as exc:
            repo.peers.mark_down(peer, str(exc))
            continue
        if data not in seen:
            seen.add(data)
            yield peer.name, data


# -- listing --------------------------------------------------------------------------


@dataclass
class KeyEntry:
    """One key as ``key list`` shows it."""

    id: str  # the 16 hex of keys/<id>
    current: bool  # the key the passphrase of this run opened
    created: str = ""
    hostname: str = ""
    username: str = ""
    label: str = ""
    verified: bool = False  # a copy authenticated under the master key (or opened with the passphrase)
    peers: list[str] = field(default_factory=list)  # peers holding a copy
    problem: str = ""  # why no copy verifies ("" when one does)

    @property
    def name(self) -> str:
        return KEYS_PREFIX + self.id

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)


def _holders(repo: Repository) -> dict[str, list[str]]:
    """Key object name -> the up peers that list it (configuration order), tombstoned names left out."""
    found: dict[str, list[str]] = {}

    def listing(peer: Peer) -> list[str]:
        return [item.name for item in peer.store.list(KEYS_PREFIX)]

    futures = [(p, repo.io.submit(listing, p)) for p in repo.peers.up()]
    for peer, future in futures:
        try:
            names = future.result()
        except PeerError as exc:
            repo.peers.mark_down(peer, str(exc))
            continue
        for name in names:
            if kind_of(name) == "key":
                found.setdefault(name, []).append(peer.name)
    gone = removed_keys(repo) if found else set()
    return {name: holders for name, holders in sorted(found.items()) if name not in gone}


def removed_keys(repo: Repository) -> set[str]:
    """Key object names a tombstone declares removed."""
    return {name for name in repo.deleted_names if kind_of(name) == "key"}


def refuse_removed_key(
    repo: Repository, passphrase: str, key_names: dict[str, list[Peer]], majority: str | None
) -> None:
    """After opening: a key object a tombstone lists (a copy left on a peer that was down) does not count.

    Another key this passphrase opens is used instead (``passwd`` to the same
    passphrase); with none, KeyRemovedError (exit 4).  The tombstones are read
    whatever the peers hold: on append-only peers a removed key's objects stay
    on every peer.  It costs one LIST of ``deleted/`` per peer (tombstones are
    cached locally once read), which listing snapshots or index files would
    pay anyway.
    """
    if repo.key_name not in repo.deleted_names:
        return
    removed = removed_keys(repo)
    others = {name: peers for name, peers in key_names.items() if name not in removed}
    try:
        opened, problems = open_key(repo.config, passphrase, others, majority)
    except (WrongPassphraseError, RepositoryCorruptError):
        raise KeyRemovedError(repo.key_name[len(KEYS_PREFIX) :]) from None
    if opened.repo_id != repo.id:  # open_key skips other repositories' keys when identities say; be sure
        raise KeyRemovedError(repo.key_name[len(KEYS_PREFIX) :])
    repo.key_name, repo.key_copy = opened.name, opened.copy
    repo.meta_problems.extend(p for p in problems if p not in repo.meta_problems)


def _describe(repo: Repository, name: str, holders: list[str]) -> KeyEntry:
    entry = KeyEntry(name[len(KEYS_PREFIX) :], current=name == repo.key_name, peers=holders)
    problems: list[str] = []
    copies = [("the copy that opened", repo.key_copy)] if entry.current and repo.key_copy else []
    for peer, data in [*copies, *_copies(repo, name)]:
        try:
            info = read_key_info(repo.cipher, name, data)
        except MalformedObject as exc:
            problems.append(f"{peer}: {exc}")
            continue
        if info is not None:
            entry.created, entry.hostname, entry.username, entry.label = (
                info.created,
                info.hostname,
                info.username,
                info.label,
            )
            entry.verified = True
            return entry
        if entry.current:  # no info, but the passphrase opened it
            entry.verified = True
            return entry
    entry.problem = "; ".join(problems) or "no info (a key object from before key management): not verifiable here"
    return entry


def list_keys(repo: Repository) -> list[KeyEntry]:
    """Every key of the repository, the current one marked, oldest first (unknown times last)."""
    entries = [_describe(repo, name, holders) for name, holders in _holders(repo).items()]
    return sorted(entries, key=lambda e: (e.created == "", e.created, e.id))


def resolve_key(names: list[str], spec: str) -> str:
    """A key object name from an id or a unique id prefix (``keys/`` optional)."""
    wanted = spec.strip().lower().removeprefix(KEYS_PREFIX)
    if not wanted or any(c not in "0123456789abcdef" for c in wanted):
        raise KeyNotFoundError(spec)
    matches = [n for n in names if n[len(KEYS_PREFIX) :].startswith(wanted)]
    if not matches:
        raise KeyNotFoundError(spec)
    if len(matches) > 1:
        raise AmbiguousKeyError(spec, len(matches))
    return matches[0]


# -- adding and removing ----------------------------------------------------------


@dataclass
class KeyChange:
    """What ``key add``, ``key remove`` or ``key passwd`` did."""

    added: KeyEntry | None = None
    removed: str = ""  # the removed key's id
    peers_deleted: list[str] = field(default_factory=list)  # peers whose copy of the removed key is gone
    peers_kept: dict[str, str] = field(default_factory=dict)  # peer -> why its copy stays (down, refused)
    tombstone: bool = False  # a tombstone names the removed key (a surviving copy is refused)

    def to_doc(self) -> dict[str, Any]:
        return {
            "added": self.added.to_doc() if self.added else None,
            "removed": self.removed or None,
            "peers_deleted": self.peers_deleted,
            "peers_kept": self.peers_kept,
            "tombstone": self.tombstone,
        }


def add_key(repo: Repository, passphrase: str, label: str = "") -> KeyEntry:
    """Wrap the master keys under a new passphrase and replicate the key object with the write quorum.

    NotEnoughPeersError (and nothing written) when fewer than the write quorum take it.
    """
    return _add(repo, passphrase, label)[0]


def _add(repo: Repository, passphrase: str, label: str) -> tuple[KeyEntry, bytes]:
    repo.require_quorum()
    existing = set(_holders(repo))
    name = new_key_name()
    while name in existing:  # 64 random bits: never, but never is cheap to check
        name = new_key_name()
    info = KeyInfo.here(label)
    data = make_key(passphrase, repo.keys, repo.id, name, info)
    repo.replicate(name, data)
    holders = [p.name for p in repo.peers.up()]
    entry = KeyEntry(
        name[len(KEYS_PREFIX) :], False, info.created, info.hostname, info.username, info.label, True, holders
    )
    return entry, data


def remove_key(repo: Repository, spec: str) -> KeyChange:
    """Remove the key ``spec`` names, as restic does: never the last key, never the one in use."""
    holders = _holders(repo)
    name = resolve_key(list(holders), spec)
    if len(holders) <= 1:
        raise KeyRemovalRefusedError(name[len(KEYS_PREFIX) :], "it is the only key; add another first (`key add`)")
    if name == repo.key_name:
        raise KeyRemovalRefusedError(
            name[len(KEYS_PREFIX) :],
            "it is the key this passphrase opened; open with another key, or use `key passwd`",
        )
    return _remove(repo, name, "key remove")


def _remove(repo: Repository, name: str, reason: str) -> KeyChange:
    """Tombstone ``name``, then delete it on every up peer."""
    repo.require_quorum()
    change = KeyChange(removed=name[len(KEYS_PREFIX) :])
    # The tombstone first, with the write quorum (or nothing happens): a peer that is down now
    # keeps its copy, and every reader (opening, listing, check, repair) then treats it as gone.
    write_tombstone(repo, [name], reason)
    change.tombstone = True
    for peer, future in [(p, repo.io.submit(p.store.delete, name)) for p in repo.peers.up()]:
        try:
            future.result()
            change.peers_deleted.append(peer.name)
        except ObjectNotFoundError:
            change.peers_deleted.append(peer.name)  # it never had one: nothing stays there
        except (PeerError, DeletionRefusedError) as exc:
            change.peers_kept[peer.name] = str(exc)
    for peer_name, why in repo.peers.down().items():
        change.peers_kept.setdefault(peer_name, f"down: {why}")
    return change


def change_passphrase(repo: Repository, passphrase: str, label: str = "") -> KeyChange:
    """``key passwd``: add a key for ``passphrase``, then remove the one in use.

    The new key is on the write quorum before the old one is touched, so a
    failure at any point leaves at least one working key (at worst both).
    """
    old = repo.key_name
    added, data = _add(repo, passphrase, label)
    repo.key_name, repo.key_copy = added.name, data
    added.current = True
    write_hint(repo.config, added.name)  # the next run tries the new key first
    failpoint("key-added")
    try:
        change = _remove(repo, old, "key passwd")
    except ShardvaultError as exc:  # the new key works: say so, and that the old one still does too
        raise KeyRotationIncompleteError(added.id, old[len(KEYS_PREFIX) :], str(exc)) from None
    change.added = added
    return change


# -- key files ----------------------------------------------------------------------


def generate_key_file(path: Path) -> str:
    """Write a new random secret to ``path`` (created, never replaced; mode 0600) and return it.

    FileExistsError when ``path`` exists; OSError when it cannot be written.
    """
    secret = base64.urlsafe_b64encode(os.urandom(32)).decode("ascii").rstrip("=")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secret + "\n")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return secret
