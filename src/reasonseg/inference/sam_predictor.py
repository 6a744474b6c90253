"""Point/box-prompt SAM predictor: encode an image once, then decode many prompts against it.

    >>> predictor = SamPredictor(build_sam("vit_t", checkpoint=fetch("mobile_sam")))   # doctest: +SKIP
    >>> predictor.set_image("photo.jpg")
    >>> pred = predictor.predict(box=np.array([40, 30, 200, 180]), multimask_output=False)
    >>> pred.masks.shape                                   # [1, H, W] bool

The model stays stateless; the per-image state (embedding and sizes) lives here, as an
:class:`ImageEmbedding` that can also be computed in batches (:meth:`SamPredictor.embed_images`) and
handed back with :meth:`SamPredictor.set_embedding`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from reasonseg.data.transforms import ImageSource, SamTransform, load_image, postprocess_masks
from reasonseg.model.sam import Sam

__all__ = ["ImageEmbedding", "SamPrediction", "SamPredictor"]


@dataclass
class ImageEmbedding:
    """Per-image state: embedding [1, C, h, w] plus the sizes needed to map masks back."""

    embedding: torch.Tensor
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]


@dataclass
class SamPrediction:
    """Masks for one prompt set (or N prompts, with a leading N axis, from ``predict_batch``).

    masks: [M, H, W] bool at the original image size (or float logits with ``return_logits``).
    scores: [M] predicted IoU. low_res_logits: [M, L/4, L/4], usable as ``mask_input`` next time.
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


class SamPredictor:
    """Holds one image's embedding and decodes point/box/mask prompts against it.

    Coordinates are pixels of the original image, (x, y); boxes are (x0, y0, x1, y1).
    """

    def __init__(self, model: Sam, max_pixels: int = 64_000_000) -> None:
        self.model = model.eval()
        self.transform = SamTransform(model.image_size)
        self.max_pixels = max_pixels
        self._state: ImageEmbedding | None = None

    @property
    def is_image_set(self) -> bool:
        return self._state is not None

    @property
    def image_embedding(self) -> ImageEmbedding:
        if self._state is None:
            raise RuntimeError("SamPredictor: call set_image() before predict()")
        return self._state

    @torch.inference_mode()
    def embed_images(self, images: Sequence[ImageSource], batch_size: int = 4) -> list[ImageEmbedding]:
        """Encode several images, ``batch_size`` at a time through the encoder."""
        out: list[ImageEmbedding] = []
        for start in range(0, len(images), batch_size):
            inputs = [
                self.transform.prepare(load_image(img, max_pixels=self.max_pixels))
                for img in images[start : start + batch_size]
            ]
            emb = self.model.encode_images(torch.stack([s.pixels for s in inputs]))
            out += [
                ImageEmbedding(e[None], s.resized_hw, s.original_hw) for e, s in zip(emb, inputs, strict=True)
            ]
        return out

    def set_image(self, image: ImageSource) -> None:
        """Load (see ``load_image``), preprocess and encode one image; replaces the previous one."""
        self._state = self.embed_images([image], batch_size=1)[0]

    def set_embedding(self, state: ImageEmbedding) -> None:
        """Reuse an embedding computed earlier (e.g. by ``embed_images``)."""
        self._state = state

    def reset_image(self) -> None:
        self._state = None

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> SamPrediction:
        """Masks for one prompt set.

        Args:
            point_coords: [P, 2] (x, y); point_labels: [P] with 1 = foreground, 0 = background.
            box: [4] (x0, y0, x1, y1).
            mask_input: [1, L/4, L/4] low-res logits from a previous prediction.
            multimask_output: three candidate masks (ambiguous prompts) instead of one.
        """
        pts = None if point_coords is None else np.asarray(point_coords)[None]
        lab = None if point_labels is None else np.asarray(point_labels)[None]
        boxes = None if box is None else np.asarray(box).reshape(1, 4)
        masks = None if mask_input is None else np.asarray(mask_input)[None]
        pred = self.predict_batch(pts, lab, boxes, masks, multimask_output, return_logits)
        return SamPrediction(pred.masks[0], pred.scores[0], pred.low_res_logits[0])

    @torch.inference_mode()
    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> SamPrediction:
        """Masks for N prompt sets at once: points [N, P, 2] + labels [N, P], boxes [N, 4], masks
        [N, 1, L/4, L/4]. Returns arrays with a leading N axis: masks [N, M, H, W], scores [N, M]."""
        state = self.image_embedding
        dev = self.model.device
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("SamPredictor: point_labels are required with point_coords")
            coords = self.transform.apply_coords(
                np.asarray(point_coords, dtype=np.float64), state.original_hw
            )
            points = (
                torch.as_tensor(coords, dtype=torch.float32, device=dev),
                torch.as_tensor(np.asarray(point_labels), dtype=torch.int64, device=dev),
            )
        box_t = None
        if boxes is not None:
            b = self.transform.apply_boxes(
                np.asarray(boxes, dtype=np.float64).reshape(-1, 4), state.original_hw
            )
            box_t = torch.as_tensor(b, dtype=torch.float32, device=dev)
        mask_t = None if mask_input is None else torch.as_tensor(mask_input, dtype=torch.float32, device=dev)
        out = self.model.decode(state.embedding, points, box_t, mask_t, multimask_output)
        logits = postprocess_masks(
            out.low_res_logits.float(), state.resized_hw, state.original_hw, self.model.image_size
        )
        masks = logits if return_logits else logits > self.model.mask_threshold
        return SamPrediction(
            masks=masks.cpu().numpy(),
            scores=out.iou_predictions.float().cpu().numpy(),
            low_res_logits=out.low_res_logits.float().cpu().numpy(),
        )
