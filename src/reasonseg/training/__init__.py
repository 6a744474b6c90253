"""reasonseg.training."""
