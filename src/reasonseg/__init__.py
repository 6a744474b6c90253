"""reasonseg: reasoning segmentation (LISA, GSVA) that trains, evaluates and serves, offline on a CPU or on GPUs."""

__version__ = "0.1.0"
