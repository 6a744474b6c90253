"""reasonseg.model.sam."""
