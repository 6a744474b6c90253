"""reasonseg.evaluation: the published ReasonSeg, refCOCO and gRefCOCO protocols.

* :mod:`~reasonseg.evaluation.metrics`: gIoU / cIoU (LISA) and GSVA's no-target rules (N-acc, T-acc).
* :mod:`~reasonseg.evaluation.protocols`: data specs and the items and prompts of each benchmark.
* :mod:`~reasonseg.evaluation.segmenter`: the interface a model implements for evaluation;
  :mod:`~reasonseg.evaluation.lisa_segmenter` adapts ``LisaModel`` (teacher-forced and generative).
* :mod:`~reasonseg.evaluation.runner`: batches, several processes (accelerate), exact aggregation,
  resume from the append-only per-sample store (:mod:`~reasonseg.evaluation.store`).
* :mod:`~reasonseg.evaluation.report`: summary JSON/Markdown, per-sample JSONL, worst-K overlays,
  IoU histogram. :mod:`~reasonseg.evaluation.command` is ``reasonseg eval``.

Importing this package is cheap; torch and the model load only where they are used.
"""

from reasonseg.evaluation.metrics import (
    GSVA_RULES,
    LISA_RULES,
    MetricRules,
    MetricSummary,
    score_target,
    summarize,
)
from reasonseg.evaluation.segmenter import MODES, EvalItem, EvalMode, Segmenter, SegmentResult

__all__ = [
    "GSVA_RULES",
    "LISA_RULES",
    "MODES",
    "EvalItem",
    "EvalMode",
    "MetricRules",
    "MetricSummary",
    "SegmentResult",
    "Segmenter",
    "score_target",
    "summarize",
]
