"""reasonseg.model."""
