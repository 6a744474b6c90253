"""reasonseg.convert."""
