"""Warnings of a backup run, as values.

A backup that meets an unreadable file does not stop (as restic and Borg do
not), but what it could not do must decide the exit status.  The CLI decides
from :attr:`BackupWarning.kind`, never from message text, which is free to
change and to be translated.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class WarningKind(enum.Enum):
    UNREADABLE_FILE = "unreadable_file"
    UNREADABLE_DIR = "unreadable_dir"
    SPECIAL_FILE = "special_file"
    CHANGED_WHILE_READ = "changed_while_read"
    REPLACED = "replaced"  # the entry listed is not what was opened (swapped, renamed, a symlink now)
    VANISHED = "vanished"  # deleted between listing and reading: the snapshot is consistent without it
    DEGRADED_PACK = "degraded_pack"
    UNREADABLE_METADATA = "unreadable_metadata"  # extended attributes or flags: the content is in
    PARENT_UNREADABLE = "parent_unreadable"  # the parent's tree is (partly) lost: those files are read again


# Kinds that leave source data out of the snapshot: the run "saved, but incomplete" (exit 11).
INCOMPLETE: frozenset[WarningKind] = frozenset(
    {WarningKind.UNREADABLE_FILE, WarningKind.UNREADABLE_DIR, WarningKind.REPLACED, WarningKind.UNREADABLE_METADATA}
)


@dataclass(frozen=True)
class BackupWarning:
    path: str
    kind: WarningKind
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def to_doc(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind.value, "message": str(self)}
