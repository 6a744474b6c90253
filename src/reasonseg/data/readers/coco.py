"""COCO ``instances.json`` access shared by the REFER and gRefCOCO readers (masks via pycocotools)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from reasonseg.data.readers.base import check_polygon, read_json, require
from reasonseg.data.samples import DataError, image_size


class CocoInstances:
    """Images and annotations of a COCO ``instances.json``, indexed by id.

    ``segmentation`` may be polygons (list of flat [x0, y0, x1, y1, ...] lists), uncompressed RLE
    (``counts`` a list) or compressed RLE (``counts`` a string); all decode to uint8 [H,W] masks. Every
    annotation is a target object, so one whose mask is empty (an empty RLE, a degenerate polygon) is
    malformed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        data = read_json(self.path)
        images = require(data, "images", list, self.path)
        anns = require(data, "annotations", list, self.path)
        self.images: dict[int, dict[str, Any]] = {}
        for im in images:
            iid = require(im, "id", int, self.path)
            require(im, "file_name", str, self.path)
            require(im, "height", int, self.path)
            require(im, "width", int, self.path)
            self.images[iid] = im
        self.anns: dict[int, dict[str, Any]] = {}
        for a in anns:
            aid = require(a, "id", int, self.path)
            require(a, "image_id", int, self.path)
            self.anns[aid] = a
        self.categories: dict[int, str] = {
            int(c["id"]): str(c["name"]) for c in data.get("categories", []) if "id" in c and "name" in c
        }

    def image(self, image_id: int) -> dict[str, Any]:
        if image_id not in self.images:
            raise DataError(self.path, f"image id {image_id} is not in 'images'")
        return self.images[image_id]

    def checked_image_path(self, image_id: int, image_root: Path) -> tuple[dict[str, Any], Path]:
        """The image record and its file under ``image_root``, after checking the file's size against
        the record (a mismatch means the wrong image folder or a corrupt file)."""
        im = self.image(image_id)
        path = image_root / im["file_name"]
        if not path.is_file():
            raise DataError(path, f"image file is missing (image id {image_id} of {self.path})")
        hw = image_size(path)
        if hw != (im["height"], im["width"]):
            raise DataError(
                path, f"image is {hw[1]}x{hw[0]} but instances.json says {im['width']}x{im['height']}"
            )
        return im, path

    def ann(self, ann_id: int) -> dict[str, Any]:
        if ann_id not in self.anns:
            raise DataError(self.path, f"annotation id {ann_id} is not in 'annotations'")
        return self.anns[ann_id]

    def ann_mask(self, ann_id: int) -> np.ndarray:
        """uint8 [H,W] mask of one annotation (H,W from its image entry); DataError if it is empty."""
        ann = self.ann(ann_id)
        im = self.image(int(ann["image_id"]))
        h, w = int(im["height"]), int(im["width"])
        segm = ann.get("segmentation")
        what = f"annotation {ann_id}"
        if isinstance(segm, list):
            if not segm:
                raise DataError(self.path, f"{what}: empty polygon list")
            polys = [check_polygon(p, (h, w), self.path, what).reshape(-1).tolist() for p in segm]
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
            if list(segm["size"]) != [h, w]:
                raise DataError(self.path, f"{what}: RLE size {segm['size']} != image size {[h, w]}")
            rle = mask_utils.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else dict(segm)
            if isinstance(rle.get("counts"), str):
                rle["counts"] = rle["counts"].encode("ascii")
        else:
            raise DataError(self.path, f"{what}: 'segmentation' is neither polygons nor RLE")
        mask = np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)
        if not mask.any():
            raise DataError(self.path, f"{what}: its segmentation decodes to an empty mask")
        return mask
