"""The synthetic reasoning-segmentation world: emoji objects on real photographs, with a knowledge
table, query families and writers for the ReasonSeg and gRefCOCO formats. See docs/DATA.md."""

from reasonseg.data.synth.world import WorldConfig, WorldSummary, generate_world

__all__ = ["WorldConfig", "WorldSummary", "generate_world"]
