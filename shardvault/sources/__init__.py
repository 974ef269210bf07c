"""Sources: what is backed up.  One module per source type."""
