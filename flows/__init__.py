"""Prefect flows and deployments (thin wrappers over the library).

None exist yet: the scheduling issue adds them.  The package is here so the
layout matches DESIGN.md and later additions need no packaging change.
"""
