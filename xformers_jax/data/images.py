"""Image datasets that install with scikit-learn; grain pipelines for MIM, classification and
segmentation.

Sources (no download): `load_digits` (1797 8x8 grey digits, 10 classes; split 80/20 by a fixed
permutation) and `load_sample_images` (two 427x640 photos, seen through random crops). Images
are kept small (uint8) and rendered per example: resized bicubically to `image_size`, grey
replicated to 3 channels, rescaled and normalised as `BeitImageProcessor` (mean = std = 0.5), so a
224 / 384 px run never holds the upscaled dataset in memory.

Segmentation scenes (`DigitScenes`): digits pasted on dark photo crops at any size, with
per-pixel class maps (background 0, digit d -> d + 1, stroke borders ignored).

Pipelines, as `pipeline.mlm_dataset`:

    source(items) -> shuffle(seed) -> repeat() -> random_map(render + example) -> [shard::count]
    -> batch -> to_iter_dataset()

The per-example rng (photo crops, MIM masks) derives from the *global* element index, so examples
do not depend on the host count, and the iterator state (`get_state` / `set_state`) resumes
exactly. Eval pipelines are one pass, padded with empty examples (zero pixels, labels ignored) to
a multiple of `shard_count * batch_size`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import grain
import numpy as np
from PIL import Image

from xformers_jax.data.image_processing import BeitImageProcessor
from xformers_jax.data.masking import MaskingGenerator
from xformers_jax.data.pipeline import block_indices, global_batch_rows, iterate, sharded_stream
from xformers_jax.models.base import InputError

SOURCES = ("digits", "sample_images")
_DIGITS, _PHOTO, _PAD = 0, 1, -1


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """`[n, H, W]` grey or `[n, H, W, 3]` RGB -> uint8-compatible `[n, H, W, 3]`.

    Raises:
      ValueError: any other layout or channel count (the message names the shape).
    """
    x = np.asarray(images)
    if x.ndim == 3:
        return np.repeat(x[..., None], 3, axis=-1)
    if x.ndim == 4 and x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    if x.ndim == 4 and x.shape[-1] == 3:
        return x
    raise InputError(
        f"{what} has shape {x.shape}; expected [n, height, width] grey or [n, height, width, 3] "
        "RGB (channels last)"
    )


@dataclasses.dataclass
class ImageSet:
    """The raw images of one split and how to render them.

    Attributes:
      digits: uint8 `[n, h, w, 3]` (the digits, or any labelled small images).
      labels: int32 `[n]` class ids of `digits`.
      photos: uint8 HWC images seen through `num_crops` random crops per pass.
      num_crops: crops of the photos per pass (0 = photos unused).
      image_size: the rendered side.
    """

    digits: np.ndarray
    labels: np.ndarray
    photos: Sequence[np.ndarray] = ()
    num_crops: int = 0
    image_size: int = 32

    def __post_init__(self):
        self.digits = check_images(self.digits, "digits").astype(np.uint8)
        self.labels = np.asarray(self.labels, np.int32)
        if len(self.labels) != len(self.digits):
            raise ValueError(f"{len(self.labels)} labels for {len(self.digits)} images")
        self.photos = [check_images(p[None], "photo")[0].astype(np.uint8) for p in self.photos]
        if self.num_crops and not self.photos:
            raise ValueError("num_crops > 0 needs photos")
        self._processor = BeitImageProcessor(
            size=self.image_size, do_center_crop=False, resample=Image.Resampling.BICUBIC
        )

    def items(self) -> np.ndarray:
        """int32 `[m, 2]` (source, index) rows: every digit, then `num_crops` photo crops."""
        digits = np.stack([np.full(len(self.digits), _DIGITS), np.arange(len(self.digits))], 1)
        crops = np.stack([np.full(self.num_crops, _PHOTO), np.arange(self.num_crops)], 1)
        return np.concatenate([digits, crops]).astype(np.int32)

    def render(self, item: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item -> float32 `[3, image_size, image_size]`, normalised (zeros for padding)."""
        source, index = int(item[0]), int(item[1])
        if source == _PAD:
            return np.zeros((3, self.image_size, self.image_size), np.float32)
        if source == _DIGITS:
            return self._processor.preprocess_image(self.digits[index])
        photo = self.photos[index % len(self.photos)]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.25, 0.75) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return self._processor.preprocess_image(np.ascontiguousarray(crop))

    def pad_items(self, count: int) -> np.ndarray:
        """`count` eval padding items (zero pixels, no label, nothing masked)."""
        return np.tile([[_PAD, 0]], (count, 1)).astype(np.int32)

    def is_pad(self, item: np.ndarray) -> bool:
        return int(item[0]) == _PAD

    def label(self, item: np.ndarray) -> int:
        """The class of a digit item; -1 for photos and padding (no class)."""
        return int(self.labels[item[1]]) if int(item[0]) == _DIGITS else -1

    def render_many(self, count: int, seed: int) -> np.ndarray:
        """The first `count` items rendered with fixed rngs: `[count, 3, S, S]` float32."""
        items = self.items()[:count]
        return np.stack(
            [self.render(it, np.random.default_rng([seed, i])) for i, it in enumerate(items)]
        )


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Digits are 0..16 intensities: scale to uint8 like any other image.
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int32)


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(x, np.uint8) for x in load_sample_images().images)


def default_images(
    split: str, image_size: int, sources: Sequence[str] = ("digits",), num_crops: int = 256
) -> ImageSet:
    """The bundled images of `split` (`'train'` 80% of the digits, `'eval'` 20%).

    Args:
      image_size: the rendered side.
      sources: any of `'digits'`, `'sample_images'`.
      num_crops: photo crops per pass (train; eval uses a quarter, fixed crops).
    """
    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise ValueError(f"data sources {list(sources)}: each must be one of {SOURCES}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    images, labels = _digits()
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    idx = order[:cut] if split == "train" else order[cut:]
    if "digits" not in sources:
        idx = idx[:0]
    photos = _photos() if "sample_images" in sources else ()
    crops = (num_crops if split == "train" else max(num_crops // 4, 1)) if photos else 0
    return ImageSet(images[idx], labels[idx], photos, crops, image_size)


def _pipeline(
    images,
    example: Callable[[np.ndarray, np.random.Generator], dict],
    *,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int,
    shard_count: int,
    read_options: grain.ReadOptions | None,
    num_workers: int = 0,
    batch_fn: Callable[[dict], dict] | None = None,
) -> grain.IterDataset:
    """`example(item, rng)` over `images.items()`, batched. With `num_workers` the examples are
    made in that many grain worker processes; `batch_fn` then runs on each batch in this process
    (a visual tokenizer that runs jitted on the accelerator)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if shard_count < 1 or not all(0 <= b < shard_count for b in block_indices(shard_index)):
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} / {shard_count}")
    if num_workers < 0:
        raise ValueError(f"num_workers: must be >= 0, got {num_workers}")
    items = images.items()
    if len(items) == 0:
        raise ValueError("the image set is empty")
    if not train:
        n_pad = -len(items) % global_batch_rows(batch_size, shard_index, shard_count)
        items = np.concatenate([items, images.pad_items(n_pad)])
    ds = sharded_stream(
        items, example, seed=seed, train=train, shard_index=shard_index, shard_count=shard_count,
        batch_size=batch_size,
    )  # fmt: skip
    it = iterate(ds, read_options)
    if num_workers:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it.map(batch_fn) if batch_fn is not None else it


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; a library caller has parsed none (defaults)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _rendered(images, item, rng: np.random.Generator) -> dict:
    """`{'pixel_values', 'label'[, 'tokenizer_pixels']}` of one item of any image source."""
    if hasattr(images, "example"):
        return images.example(item, rng)
    return {"pixel_values": images.render(item, rng), "label": np.int32(images.label(item))}


def _tokenizer_view(pixels: np.ndarray, size: int) -> np.ndarray:
    """A `[-1, 1]` `[3, S, S]` image as the `[0, 1]` `[3, size, size]` view of a tokenizer with
    its own input size (Lanczos, as BEiT's second view)."""
    x01 = np.clip((pixels.transpose(1, 2, 0) + 1) * 0.5, 0, 1)
    if x01.shape[0] == size:
        return np.ascontiguousarray(x01.transpose(2, 0, 1), np.float32)
    img = Image.fromarray(np.round(x01 * 255).astype(np.uint8))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.ascontiguousarray((np.asarray(img, np.float32) / 255).transpose(2, 0, 1))


def mim_dataset(
    images,
    tokenizer,
    masking: MaskingGenerator,
    *,
    batch_size: int,
    seed: int,
    train: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
    num_workers: int = 0,
) -> grain.IterDataset:
    """Masked-image-modelling batches.

    Examples (decoding, augmentation, masks) are made per element, in `num_workers` grain
    worker processes when > 0; the visual tokenizer then labels whole batches in this process
    (so a DALL-E encoder runs jitted on the accelerator, not in the workers).

    Args:
      images: the split's `ImageSet`, or an `image_folder.EncodedImages` (folder or records).
      tokenizer: a `VisualTokenizer` (targets of the masked patches). One with an `input_size`
        (the DALL-E encoder) reads its own `[0, 1]` view of that side (BEiT's second view).
      masking: the blockwise `MaskingGenerator` of the patch grid.
      batch_size: examples per batch of this shard (`B`).
      seed: shuffle, crop and mask seed.
      train: an infinite shuffled stream, or one padded pass.
      shard_index, shard_count: this host's slice of the global stream.
      num_workers: grain worker processes (0 = threads of this process).

    Returns:
      A `grain.IterDataset` of dicts: `pixel_values` float32 `[B, 3, S, S]`, `bool_masked_pos`
      bool `[B, n]` and `labels` int32 `[B, n]` (token ids where masked, -100 elsewhere).
    """
    n = masking.num_patches
    view = int(getattr(tokenizer, "input_size", 0) or 0)

    def example(item, rng):
        r = _rendered(images, item, rng)
        mask = np.zeros(n, bool) if images.is_pad(item) else masking(rng).reshape(-1)
        tok = r["pixel_values"]
        if view:  # the tokenizer's own view: the source's second view, or one made from tok
            second = r.get("tokenizer_pixels")
            ok = second is not None and second.shape[-1] == view
            tok = second if ok else _tokenizer_view(tok, view)
        return {"pixel_values": r["pixel_values"], "bool_masked_pos": mask, "tokenizer_input": tok}

    def label(batch):
        ids = np.asarray(tokenizer.tokenize(batch.pop("tokenizer_input")))
        if ids.shape[1:] != (n,):
            raise ValueError(f"tokenizer gave ids of shape {ids.shape[1:]} for {n} patches")
        batch["labels"] = np.where(batch["bool_masked_pos"], ids, -100).astype(np.int32)
        return batch

    return _pipeline(
        images,
        example,
        batch_size=batch_size,
        seed=seed,
        train=train,
        shard_index=shard_index,
        shard_count=shard_count,
        read_options=read_options,
        num_workers=num_workers,
        batch_fn=label,
    )


def classification_dataset(
    images,
    *,
    batch_size: int,
    seed: int,
    train: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
    num_workers: int = 0,
) -> grain.IterDataset:
    """Labelled batches: `pixel_values` float32 `[B, 3, S, S]`, `labels` int32 `[B]` (-1 = pad).

    Photos have no class: use an `ImageSet` without crops. Arguments as `mim_dataset`.
    """
    if images.num_crops:
        raise ValueError("classification needs labelled images: num_crops must be 0")

    def example(item, rng):
        r = _rendered(images, item, rng)
        return {"pixel_values": r["pixel_values"], "labels": np.int32(r["label"])}

    return _pipeline(
        images,
        example,
        batch_size=batch_size,
        seed=seed,
        train=train,
        shard_index=shard_index,
        shard_count=shard_count,
        read_options=read_options,
        num_workers=num_workers,
    )


# --------------------------------------------------------------------------------------------------
# Semantic segmentation: digits pasted on photo backgrounds, with per-pixel class maps.
# --------------------------------------------------------------------------------------------------

SEG_IGNORE_INDEX = 255  # transformers' `semantic_loss_ignore_index` default
# Stroke coverage (the upscaled digit's intensity in [0, 1]) above which a pixel is the digit's
# class; between the two thresholds it is a mixed border pixel and labelled `ignore_index`.
_STROKE, _BORDER = 0.5, 0.15
# A pasted digit's side as a fraction of the scene's: strokes a few pixels wide even on small
# scenes, so a patch-8 model can resolve them.
_DIGIT_SIZE = (0.4, 0.75)


@dataclasses.dataclass
class DigitScenes:
    """Segmentation scenes built from the bundled images, rendered at any size.

    Scene `i` pastes digit `i` and up to `max_digits - 1` other random digits of the split at
    random sizes (0.4 to 0.75 of the side), positions and bright colours onto a dark
    random crop of a sample photo. Its label map has class 0 for the background and `d + 1` for
    the pixels of digit `d`; mixed pixels at the strokes' borders get `ignore_index` (as VOC's
    void boundaries). With `reduce_labels` the map goes through `BeitImageProcessor`'s ADE20k
    reduction: the background becomes `ignore_index` and digit `d` is class `d`.

    Attributes:
      digits: uint8 `[n, h, w]` grey digits (or `[n, h, w, 3]`, the first channel is used).
      labels: int32 `[n]` their classes.
      photos: uint8 HWC background photos.
      image_size: the rendered side.
      max_digits: digits per scene (at least 1).
      ignore_index: label of the border pixels and of padding.
      reduce_labels: drop the background class (see above).
    """

    digits: np.ndarray
    labels: np.ndarray
    photos: Sequence[np.ndarray]
    image_size: int = 32
    max_digits: int = 3
    ignore_index: int = SEG_IGNORE_INDEX
    reduce_labels: bool = False

    def __post_init__(self):
        self.digits = check_images(self.digits, "digits")[..., 0].astype(np.uint8)
        self.labels = np.asarray(self.labels, np.int32)
        if len(self.labels) != len(self.digits) or not len(self.digits):
            raise ValueError(f"{len(self.labels)} labels for {len(self.digits)} digits")
        self.photos = [check_images(p[None], "photo")[0].astype(np.uint8) for p in self.photos]
        if not self.photos:
            raise ValueError("segmentation scenes need at least one background photo")
        if self.max_digits < 1 or self.image_size < 8:
            raise ValueError(
                f"need max_digits >= 1 and image_size >= 8, got "
                f"{self.max_digits}, {self.image_size}"
            )
        # Rescale and normalise only: scenes are composed at the output size.
        self._processor = BeitImageProcessor(
            do_resize=False, do_center_crop=False, do_reduce_labels=self.reduce_labels
        )

    @property
    def num_classes(self) -> int:
        """Label ids used (background + 10 digits, or 10 with `reduce_labels`)."""
        return int(self.labels.max()) + (1 if self.reduce_labels else 2)

    def items(self) -> np.ndarray:
        """int32 `[n, 2]` (source, index) rows: one scene per digit."""
        return np.stack(
            [np.full(len(self.digits), _DIGITS), np.arange(len(self.digits))], 1
        ).astype(np.int32)

    def pad_items(self, count: int) -> np.ndarray:
        """`count` eval padding items (zero pixels, labels all `ignore_index`)."""
        return np.tile([[_PAD, 0]], (count, 1)).astype(np.int32)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        photo = self.photos[int(rng.integers(len(self.photos)))]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.3, 0.9) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(photo[top : top + side, left : left + side]))
        s = self.image_size
        bg = np.asarray(crop.resize((s, s), Image.Resampling.BILINEAR), np.float32) / 255
        # Dark backgrounds keep the (bright) digits visible on any crop.
        return bg[:, ::-1] * 0.5 if rng.random() < 0.5 else bg * 0.5

    def render(self, item: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One scene -> (float32 `[3, S, S]` normalised pixels, int32 `[S, S]` labels).

        Padding items give zero pixels and labels all `ignore_index`.
        """
        s = self.image_size
        if int(item[0]) == _PAD:
            return np.zeros((3, s, s), np.float32), np.full((s, s), self.ignore_index, np.int32)
        canvas = self._background(rng)
        seg = np.zeros((s, s), np.int32)
        n = int(rng.integers(1, self.max_digits + 1))
        others = rng.integers(0, len(self.digits), n - 1)
        for index in (int(item[1]), *(int(o) for o in others)):
            size = max(int(rng.uniform(*_DIGIT_SIZE) * s), 4)
            glyph = Image.fromarray(self.digits[index]).resize(
                (size, size), Image.Resampling.BILINEAR
            )
            alpha = np.asarray(glyph, np.float32)[..., None] / 255  # [size, size, 1]
            top, left = int(rng.integers(0, s - size + 1)), int(rng.integers(0, s - size + 1))
            region = (slice(top, top + size), slice(left, left + size))
            colour = rng.uniform(0.7, 1.0, 3).astype(np.float32)
            canvas[region] = canvas[region] * (1 - alpha) + colour * alpha
            a = alpha[..., 0]
            seg[region] = np.where(
                a >= _STROKE,
                self.labels[index] + 1,
                np.where(a > _BORDER, self.ignore_index, seg[region]),
            )
        pixels = np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)
        labels = self._processor.preprocess_segmentation_map(seg).astype(np.int32)
        if self.ignore_index != 255:  # reduce_label marks the background with 255
            labels[labels == 255] = self.ignore_index
        return self._processor.preprocess_image(pixels), labels


def default_scenes(
    split: str,
    image_size: int,
    max_digits: int = 3,
    ignore_index: int = SEG_IGNORE_INDEX,
    reduce_labels: bool = False,
) -> DigitScenes:
    """`DigitScenes` of `split`'s digits (the same 80/20 split as `default_images`) on the
    sample photos."""
    digits = default_images(split, 8, ("digits",))
    return DigitScenes(
        digits.digits, digits.labels, _photos(), image_size, max_digits, ignore_index, reduce_labels
    )


def segmentation_dataset(
    scenes: DigitScenes,
    *,
    batch_size: int,
    seed: int,
    train: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Segmentation batches: `pixel_values` float32 `[B, 3, S, S]` and `labels` int32 `[B, S, S]`.

    Each training pass renders new scenes (the rng follows the global element index); eval is
    one deterministic padded pass. Arguments as `mim_dataset`.
    """

    def example(item, rng):
        pixels, labels = scenes.render(item, rng)
        return {"pixel_values": pixels, "labels": labels}

    return _pipeline(
        scenes,
        example,
        batch_size=batch_size,
        seed=seed,
        train=train,
        shard_index=shard_index,
        shard_count=shard_count,
        read_options=read_options,
    )
