"""Verification of the repository: presence checks and shard reads."""
