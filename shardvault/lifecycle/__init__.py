"""Lifecycle: retention (``forget``) and space reclamation (``prune``).

It sits beside backup, restore and verify and uses only the repository
layer below it.
"""
