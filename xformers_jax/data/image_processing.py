"""BEiT image processing in numpy/PIL, equal to `transformers.BeitImageProcessor`.

Images: (optional) resize with PIL (bicubic by default) to `size`, center crop to `crop_size`
(zero padding where the image is smaller), rescale by 1/255, normalise with mean/std, output
`[channels, height, width]` float32. Segmentation maps: (optional) `reduce_labels` (0 -> 255,
others - 1, as ADE20k), the same resize (transformers resizes label maps with the image's
filter) and crop, output int64 `[height, width]`. `post_process_semantic_segmentation` turns
logits into label maps, bilinearly resized to target sizes first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


def _hw(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict):
        return int(size["height"]), int(size["width"])
    return int(size[0]), int(size[1])


def reduce_label(label: np.ndarray) -> np.ndarray:
    """ADE20k-style: background 0 becomes 255 (ignored), every other class id moves down by 1."""
    label = np.array(label)
    label[label == 0] = 255
    label = label - 1
    label[label == 254] = 255
    return label


def _to_hwc(image: Any) -> np.ndarray:
    """PIL image or array (HWC, CHW or HW) -> HWC array (HW for 2-D inputs)."""
    x = np.asarray(image)
    if x.ndim == 3 and x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        x = np.transpose(x, (1, 2, 0))
    return x


def resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """PIL resize of an HWC / HW uint8 array to `(height, width)`; floats in [0, 1] go through
    uint8 as in transformers."""
    scaled = np.issubdtype(image.dtype, np.floating)
    x = np.round(image * 255).astype(np.uint8) if scaled else image.astype(np.uint8)
    squeeze = x.ndim == 3 and x.shape[-1] == 1
    pil = Image.fromarray(x[..., 0] if squeeze else x)
    out = np.array(pil.resize((size[1], size[0]), resample=resample, reducing_gap=None))
    if squeeze:
        out = out[..., None]
    return out.astype(np.float32) / 255 if scaled else out


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crops the center `(height, width)` of an HWC / HW array, zero-padding a smaller image."""
    h, w = image.shape[:2]
    ch, cw = size
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return image[top : top + ch, left : left + cw]
    ph, pw = max(ch, h), max(cw, w)
    canvas = np.zeros((ph, pw, *image.shape[2:]), image.dtype)
    ot, ol = (ph - h) // 2, (pw - w) // 2
    canvas[ot : ot + h, ol : ol + w] = image
    top, left = top + ot, left + ol
    return canvas[max(top, 0) : max(top, 0) + ch, max(left, 0) : max(left, 0) + cw]


@dataclasses.dataclass
class BeitImageProcessor:
    """transformers' `BeitImageProcessor` defaults and semantics; returns numpy batches.

    Attributes mirror transformers' (`size`/`crop_size` as `{'height', 'width'}` dicts or ints).
    """

    do_resize: bool = True
    size: Any = dataclasses.field(default_factory=lambda: {"height": 256, "width": 256})
    resample: int = Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: Any = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    image_mean: Sequence[float] = IMAGENET_STANDARD_MEAN
    image_std: Sequence[float] = IMAGENET_STANDARD_STD
    do_reduce_labels: bool = False

    def _spatial(self, x: np.ndarray) -> np.ndarray:
        if self.do_resize:
            x = resize(x, _hw(self.size), self.resample)
        if self.do_center_crop:
            x = center_crop(x, _hw(self.crop_size))
        return x

    def preprocess_image(self, image: Any) -> np.ndarray:
        """One image (PIL, or uint8 HWC / CHW array) -> `[channels, height, width]` float32."""
        x = self._spatial(_to_hwc(image))
        if x.ndim == 2:
            x = x[..., None]
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32)
            mean = np.asarray(self.image_mean, np.float32)
            std = np.asarray(self.image_std, np.float32)
            x = (x - mean) / std
        return np.ascontiguousarray(np.transpose(x, (2, 0, 1)).astype(np.float32))

    def preprocess_segmentation_map(self, seg: Any) -> np.ndarray:
        """One label map `[height, width]` -> int64 `[crop_height, crop_width]`."""
        x = np.asarray(seg)
        if self.do_reduce_labels:
            x = reduce_label(x)
        return self._spatial(x).astype(np.int64)

    def __call__(self, images: Any, segmentation_maps: Any = None) -> dict[str, np.ndarray]:
        """Images (one or a list) -> `{'pixel_values': [batch, C, H, W]}` (+ `'labels'`)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = {"pixel_values": np.stack([self.preprocess_image(im) for im in images])}
        if segmentation_maps is not None:
            if not isinstance(segmentation_maps, (list, tuple)):
                segmentation_maps = [segmentation_maps]
            out["labels"] = np.stack(
                [self.preprocess_segmentation_map(s) for s in segmentation_maps]
            )
        return out

    preprocess = __call__

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[np.ndarray]:
        """Logits `[batch, classes, h, w]` (or an output with `.logits`) -> label maps.

        With `target_sizes`, each image's logits are first resized bilinearly (torch's
        `align_corners=False`) to its `(height, width)`.
        """
        from xformers_jax.models.beit import resize_matrix

        logits = np.asarray(getattr(outputs, "logits", outputs), np.float32)
        if target_sizes is None:
            return [m for m in logits.argmax(axis=1)]
        if len(target_sizes) != len(logits):
            raise ValueError(
                f"{len(target_sizes)} target sizes for a batch of {len(logits)} logits"
            )
        maps = []
        for x, (h, w) in zip(logits, target_sizes):
            mh = resize_matrix(x.shape[1], int(h), "bilinear")
            mw = resize_matrix(x.shape[2], int(w), "bilinear")
            maps.append(np.einsum("oh,chw,pw->cop", mh, x, mw).argmax(axis=0))
        return maps
