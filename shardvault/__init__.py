"""shardvault: encrypted, deduplicated, erasure-coded backups over independent peers.

Read DESIGN.md for the words and the invariants.  The layers, from the bottom:
peer stores (``shardvault.shards.stores``) -> shards (erasure coding, shard
format, placement) -> the repository (keys, packs, index, snapshots) ->
backup, restore and verify -> the CLI and the Prefect flows.
"""

__version__ = "0.1.0"
