"""Failpoints: named places where a test can freeze this process (as etcd's and TiKV's failpoints do).

``SHARDVAULT_FAILPOINTS=commit`` (comma-separated names) makes the process
stop itself (SIGSTOP) when it reaches that place, so a test can act at the
worst moment (run a prune while a backup has chosen its references but not
yet committed) and then let it go on (SIGCONT).  Unset, a failpoint costs
one dictionary lookup.  Names in use:

* ``index-loaded`` - a process has read the condemned sets and the index;
* ``commit`` - a backup has stored every pack and is about to write its snapshot.
* ``key-added`` - ``key passwd`` has written the new key and is about to remove the old one.
"""

from __future__ import annotations

import os
import signal

_ACTIVE = frozenset(filter(None, os.environ.get("SHARDVAULT_FAILPOINTS", "").split(",")))


def failpoint(name: str) -> None:
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGSTOP)
