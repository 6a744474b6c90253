"""reasonseg.evaluation."""
