"""Erasure coding, the shard format, placement over peers and the peer stores."""
