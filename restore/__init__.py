"""Restores of snapshots into targets, writing only inside them."""
