"""reasonseg.inference."""
