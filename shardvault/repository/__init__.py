"""The repository: keys, config, index, snapshots and packs, kept on the peers.

:mod:`.core` opens and writes it (:class:`Repository`); beside it live the
formats of its objects: :mod:`.metadata` (sealed objects, keys, identities,
names, versions), :mod:`.index`, :mod:`.packs`, :mod:`.snapshot` and
:mod:`.wal` (the WAL archive's records); :mod:`.opening` asks every peer
what it is and finds the key that opens.  The repository sits on the shards
layer (erasure coding, placement, peer stores) and knows nothing of backup,
restore or verification.
"""

from .core import BlobReader, Repository, open_peers, random_pack_id
from .metadata import MetaProblem

__all__ = ["BlobReader", "MetaProblem", "Repository", "open_peers", "random_pack_id"]
