"""Importers for official checkpoints (LISA merged, GSVA with LoRA merged at import); see ``convert.lisa``."""

from reasonseg.convert.lisa import (
    CheckpointImportError,
    ImportReport,
    import_gsva_checkpoint,
    import_lisa_checkpoint,
    lisa_key_map,
    merge_lora,
    read_state_dict,
)

__all__ = [
    "CheckpointImportError",
    "ImportReport",
    "import_gsva_checkpoint",
    "import_lisa_checkpoint",
    "lisa_key_map",
    "merge_lora",
    "read_state_dict",
]
