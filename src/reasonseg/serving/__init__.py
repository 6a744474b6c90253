"""reasonseg.serving."""
