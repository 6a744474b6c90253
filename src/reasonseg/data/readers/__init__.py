"""Dataset readers: each turns the records of one published format into :class:`~reasonseg.data.samples.Sample`.

- :mod:`.reasonseg` ReasonSeg (labelme JSON polygons, target/ignore/flag)
- :mod:`.refer` refCOCO / refCOCO+ / refCOCOg / refCLEF (REFER pickle + COCO instances)
- :mod:`.grefer` gRefCOCO (list-valued ``ann_id``, ``[-1]`` = no target)
- :mod:`.semseg` ADE20K, COCO-Stuff, PASCAL-Part, PACO-LVIS, Mapillary (class lists, label maps)
- :mod:`.vqa` LLaVA-Instruct conversations
"""

from reasonseg.data.readers.base import Reader, SkippedRecord

__all__ = ["Reader", "SkippedRecord"]
