"""reasonseg.data."""
