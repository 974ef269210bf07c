"""Every expected failure of shardvault, in one tree.

As in Borg, an error class's docstring is its message template and the class
carries the process exit code the CLI returns for it; as in Barman, there is
one root and one base class per area.  The CLI prints ``str(error)`` on one
line and exits with ``error.exit_code``; anything that is not a
:class:`ShardvaultError` is a bug and keeps its traceback.

Exit codes (stable, documented in the README):

==  ==========================================================
0   success
1   unexpected error (a bug)
2   usage error (click)
3   configuration error
4   wrong passphrase or unusable key
5   peer unreachable, read-only or answering garbage (or too slow: a WAL
    pusher that did not deliver within wal-push --timeout)
6   damage found by ``check``
7   data lost: a restore or read is impossible
8   repository error (missing, already there, snapshot unknown)
9   restore refused: a path would escape the target
10  source error (missing or unreadable source)
11  backup finished but some files could not be read
12  restore target unusable (not a directory, not writable, full, not empty)
13  DR drill: a check failed
14  DR drill: every check passed, but an objective (RTO or RPO) was missed
15  the Prefect API is unreachable
16  repository busy or immutable: a live holder blocks (another prune), or a
    peer refuses deletion (append-only, object lock)
130 interrupted (Ctrl-C or SIGTERM); a backup wrote a final checkpoint and
    committed no snapshot
==  ==========================================================
"""

from __future__ import annotations

from typing import Any, ClassVar


class ShardvaultError(Exception):
    """Error: {}"""

    exit_code: ClassVar[int] = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args)
        self.args_ = args
        self.kwargs = kwargs

    def __str__(self) -> str:
        template = (type(self).__doc__ or "{}").strip().splitlines()[0]
        try:
            return template.format(*self.args_, **self.kwargs)
        except (IndexError, KeyError):  # a template/argument mismatch must not hide the error
            return f"{template} {self.args_!r} {self.kwargs!r}"


# --- configuration -----------------------------------------------------------


class ConfigError(ShardvaultError):
    """Configuration error: {}"""

    exit_code = 3


class ConfigFileNotFoundError(ConfigError):
    """Configuration file {0} not found (use --config PATH or $SHARDVAULT_CONFIG)"""


class ConfigValueError(ConfigError):
    """{0}: {1}: {2}"""


class PasswordMissingError(ConfigError):
    """No passphrase: set $SHARDVAULT_PASSWORD or pass --password-file"""


class AliasedPeersError(ConfigError):
    """Peers {0} and {1} are the same storage ({2}): each peer must be an independent disk or bucket"""


class RepositoryMismatchError(ConfigError):
    """{0}: {1} is {2} in the configuration but {3} in the repository (authoritative; `reconfigure` records a change)"""


# --- helper areas: append new classes below your own marker only ---------------
# [backup]


class BackupInterruptedError(ShardvaultError):
    """interrupted: {0} packs ({1}) checkpointed{2}; run the backup again to resume"""

    exit_code = 130  # 128 + SIGINT, as shells report Ctrl-C; SIGTERM takes the same path


# [restore]


class PathNotInSnapshotError(ShardvaultError):
    """Path {0!r} is not in snapshot {1}"""

    exit_code = 8


class LatestNeedsSourceError(ShardvaultError):
    """'latest' is ambiguous: the repository holds snapshots of {0} sources ({1}); pass --source NAME"""

    exit_code = 2


# [config]
# [verify]
# [flows]
# [drill]
# [alerts]
# [stack]


class PeerNotDrainedError(ShardvaultError):
    """Peer {0} still holds {1} shard(s) the index needs (backups wrote them meanwhile): keep it configured; run `shardvault peers {2} {0}` again"""  # noqa: E501

    exit_code = 5  # the peer area's code: the peer cannot be given up yet


# --- keys and crypto ---------------------------------------------------------


class CredentialError(ShardvaultError):
    """Credential error: {}"""

    exit_code = 4


class WrongPassphraseError(CredentialError):
    """Wrong passphrase: no key in the repository opens with it"""


# --- peers (the storage boundary) --------------------------------------------


class PeerError(ShardvaultError):
    """Peer {0}: {1}"""

    exit_code = 5


class PeerUnavailableError(PeerError):
    """Peer {0} is unreachable: {1}"""


class PeerReadOnlyError(PeerError):
    """Peer {0} is not writable: {1}"""


class PeerProtocolError(PeerError):
    """Peer {0} answered garbage: {1}"""


class ObjectNotFoundError(PeerError):
    """Peer {0} has no object {1}"""


class InvalidObjectNameError(PeerError):
    """Invalid object name {0!r}: {1}"""


class RepairIncompleteError(PeerError):
    """Repair incomplete (what it rebuilt is committed): {0}"""


class NotEnoughPeersError(PeerError):
    """Only {0} of the required {1} peers answered: {2}"""


class UnderReplicatedError(PeerError):
    """{0} is held by only {1} peer(s), fewer than the write quorum of {2}, and no other peer could take a copy"""


# --- shards ------------------------------------------------------------------


class ShardError(ShardvaultError):
    """Shard error: {}"""

    exit_code = 7


class CorruptShardError(ShardError):
    """Corrupt shard {0} on peer {1}: {2}"""


class NotEnoughShardsError(ShardError):
    """Pack {0} is lost: {1} good shards, {2} needed ({3})"""


# --- repository --------------------------------------------------------------


class RepositoryError(ShardvaultError):
    """Repository error: {}"""

    exit_code = 8


class RepositoryNotFoundError(RepositoryError):
    """No repository on any reachable peer ({0}); run 'shardvault init' first"""


class RepositoryNotReachableError(RepositoryError):
    """No key object on the peers that answered ({0}): {1}"""


class RepositoryExistsError(RepositoryError):
    """A repository already exists on peer {0}"""


class RepositoryCorruptError(RepositoryError):
    """Repository object {0} is unreadable on every peer: {1}"""


class ForeignRepositoryError(RepositoryError):
    """Peer {0} holds repository {1}, not {2} (a peer of another repository is configured here)"""


class UnsupportedFormatError(RepositoryError):
    """{0} has format version {1}; this shardvault reads version {2}"""


class SnapshotNotFoundError(RepositoryError):
    """No snapshot matches {0!r}{1}"""


class AmbiguousSnapshotError(RepositoryError):
    """Snapshot prefix {0!r} matches {1} snapshots; give more characters"""


class BlobNotFoundError(RepositoryError):
    """Chunk {0} is not in any index: the repository is missing data"""


# --- data loss and restore -----------------------------------------------------


class DataLossError(ShardvaultError):
    """Data lost: {0}"""

    exit_code = 7


class RestoreError(ShardvaultError):
    """Restore failed: {}"""

    exit_code = 7


class RestoreRefusedError(RestoreError):
    """Cannot restore {0}: {1}"""

    exit_code = 8


class UnsafePathError(RestoreError):
    """Refusing to restore {0!r}: {1}"""

    exit_code = 9


class IntegrityError(RestoreError):
    """Integrity check failed for {0}: {1}"""


class RestoreTargetError(ShardvaultError):
    """Restore target {0}: {1}"""

    exit_code = 12


class TargetNotEmptyError(RestoreTargetError):
    """Restore target {0} is not empty ({1}); choose --overwrite if-changed or always, or an empty directory"""


# --- check -------------------------------------------------------------------


class DamageFoundError(ShardvaultError):
    """Damage found: {0}"""

    exit_code = 6


# --- sources -----------------------------------------------------------------


class SourceError(ShardvaultError):
    """Source {0}: {1}"""

    exit_code = 10


class WalConflictError(SourceError):
    """Source {0}: WAL file {1} is already archived with different content; refusing to replace it"""


class WalMissingError(RepositoryError):
    """Source {0}: WAL file {1} is not in the archive{2}"""


class WalWorkerTimeoutError(ShardvaultError):
    """WAL file {0}: {1} did not finish it within {2:.0f} s (it goes on; PostgreSQL asks again); a slow peer?"""

    exit_code = 5


class BackupIncompleteError(ShardvaultError):
    """Snapshot {0} saved, but {1} file(s) could not be read (first: {2})"""

    exit_code = 11


# --- orchestration and DR drills (issue 8) -------------------------------------


class PlaybookError(ConfigError):
    """Playbook {0}: {1}"""


class ScheduleConfigError(ConfigError):
    """Schedule error: {0}: {1}"""


class PrefectUnavailableError(ShardvaultError):
    """The Prefect API at {0} is unreachable: {1}"""

    exit_code = 15


class DrillCheckFailedError(ShardvaultError):
    """Drill {0} failed: check {1!r}: {2}"""

    exit_code = 13


class DrillObjectiveMissedError(ShardvaultError):
    """Drill {0}: every check passed, but {1}"""

    exit_code = 14


# --- lifecycle: forget, prune, sessions, keys, immutability (issue 9) --------------
# [lifecycle]


class RetentionPolicyError(ShardvaultError):
    """{0}: {1}"""

    exit_code = 2  # a usage error: the keep-* flags (the TOML's policy is a ConfigValueError, exit 3)


# [keys]


class KeyNotFoundError(RepositoryError):
    """No key matches {0!r} (`shardvault key list` shows the ids)"""


class AmbiguousKeyError(RepositoryError):
    """Key prefix {0!r} matches {1} keys; give more characters"""


class KeyRemovalRefusedError(RepositoryError):
    """Refusing to remove key {0}: {1}"""


class KeyRemovedError(CredentialError):
    """The key this passphrase opens ({0}) was removed from the repository; use another passphrase or key file"""


class KeyRotationIncompleteError(PeerError):
    """New key {0} was added, but the old key {1} could not be removed ({2}): both open the repository; run `shardvault key remove {1}` with the new passphrase"""  # noqa: E501


# [immutability]


class OverwriteRefusedError(PeerError):
    """Peer {0} refuses to overwrite {1} ({2}): an append-only peer only takes new objects"""

    exit_code = 16


class ObjectLockNotEnabledError(ConfigError):
    """Peer {0}: bucket {1!r} has no S3 Object Lock, but the configuration asks for object_lock = "{2}" (enable object lock on the bucket, or use a new bucket: `shardvault init` creates it with object lock)"""  # noqa: E501


class RepositoryBusyError(ShardvaultError):
    """{0} is held by {1}; wait for it to finish, or if it was killed run `shardvault unlock`"""

    exit_code = 16


class SessionLostError(ShardvaultError):
    """Stopped before committing or deleting anything more: this process could not renew its session on the peers (or was frozen) for over {0:.0f} s, so a prune elsewhere may have taken it for dead; run it again"""  # noqa: E501

    exit_code = 5


class PruneRefusedError(RepositoryError):
    """Prune refused: {0}"""


class DeletionRefusedError(ShardvaultError):
    """Peer {0} refuses deletion ({1}): {2}"""

    exit_code = 16


class PeerRefusesDeletionError(DeletionRefusedError, PeerError):
    """Peer {0} refuses deletion ({1}): {2}"""

    # What a store raises (append-only client, S3 Object Lock retention, a policy without
    # s3:DeleteObject): prune, sessions and forget catch DeletionRefusedError to mean "kept
    # for now, retried next run"; every other caller handles it as the PeerError it also is.
    exit_code = 16
