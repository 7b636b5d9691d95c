"""Real image data for BEiT: ImageNet-layout folders and ArrayRecord shards of encoded images,
decoded and augmented per example (in grain workers when `data.num_workers > 0`).

Sources (both random access, so grain shuffles, shards and resumes them by index):

* `ImageFolder`: `root/<class>/<file>.jpg|.png|...`, local or gs:// (listed once through
  `xformers_jax.paths`); the label of an image is the index of its class folder among the
  sorted class names.
* `ImageRecords`: the shards `xformers-jax prepare` writes for an image config
  (`data/image_prepare.py`): each record is `encode_record(label, encoded image bytes)`, and a
  `manifest.json` names the classes and the shards of each split.

`ImageTransform` turns encoded bytes into model inputs with BEiT's augmentations (training):
colour jitter (brightness, contrast, saturation in random order), a horizontal flip, and one
random resized crop box (scale `min_crop_scale..1`, aspect 3/4..4/3) resized to the model's side
(bicubic) and, for a visual tokenizer that reads its own view, to the tokenizer's side (Lanczos;
BEiT v1: 224 px patches, 112 px for the DALL-E encoder). Evaluation resizes the shorter side to
`size / 0.875` and takes the centre crop. Every random draw comes from the rng grain hands the
example (seeded by the run seed and the example's global index), so a resumed run, or a run on
another number of hosts, sees the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance

from xformers_jax import paths
from xformers_jax.data.corpus import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST = "manifest.json"
RECORD_FORMAT = "xformers_jax.images"
RECORD_VERSION = 1
_HEADER = struct.Struct("<4sq")  # magic, label
_MAGIC = b"XJI1"
# ImageNet evaluation: resize the shorter side to size / 0.875, then centre crop (224 of 256).
EVAL_CROP_FRACTION = 0.875


# ------------------------------------------------------------------------------ records


def encode_record(label: int, data: bytes) -> bytes:
    """One ArrayRecord record: a 12-byte header (magic, int64 label) and the encoded image."""
    return _HEADER.pack(_MAGIC, int(label)) + bytes(data)


def decode_record(record: bytes, where: str = "record") -> tuple[int, bytes]:
    """`encode_record`'s inverse: `(label, encoded image bytes)`.

    Raises:
      DataError: the record is not one of ours (the message names `where`).
    """
    if len(record) < _HEADER.size or record[:4] != _MAGIC:
        raise DataError(f"{where}: not an image record written by `xformers-jax prepare`")
    _, label = _HEADER.unpack_from(record)
    return int(label), bytes(record[_HEADER.size :])


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded bytes -> an RGB PIL image (grey, palette and alpha images converted).

    Raises:
      DataError: the bytes are not a readable image (the message names `where`).
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where}: cannot decode the image ({msg})") from None


# ------------------------------------------------------------------------------ sources


def list_classes(root: str) -> list[str]:
    """The sorted names of the class folders directly under `root` (local or gs://).

    Raises:
      DataError: no such folder, or no sub-folders.
    """
    base = paths.resolve(root)
    if not paths.isdir(base):
        raise DataError(f"{root}: no such image folder")
    classes = [c for c in paths.listdir(base) if paths.isdir(paths.join(base, c))]
    if not classes:
        raise DataError(
            f"{root}: no class folders (expected the ImageNet layout root/<class>/<file>)"
        )
    return classes


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters bracketed, so it matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def class_images(root: str, name: str) -> list[str]:
    """The image files of class folder `root/name`, sorted."""
    found = paths.glob(paths.join(root, glob_escape(name), "*"))
    return sorted(f for f in found if f.lower().endswith(IMAGE_EXTENSIONS))


def scan_folder(
    root: str, classes: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """The images of an ImageNet-layout folder `root/<class>/<file>`, local or gs://.

    Args:
      classes: the class names labels index (default: the folder's own, sorted); a folder of
        another name is an error.

    Returns:
      `(files, labels, classes)`: the image paths / URLs sorted by (class, name), int32 labels
      (index into the class names) and the class names.

    Raises:
      DataError: no such folder, no images one level below its class folders, or a class folder
        not among `classes`.
    """
    base = paths.resolve(root)
    own = list_classes(base)
    classes = own if classes is None else list(classes)
    unknown = sorted(set(own) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folders {unknown[:3]} are not among the training classes")
    index = {c: i for i, c in enumerate(classes)}
    pairs = []
    for f in paths.glob(paths.join(base, "*", "*")):
        name = f[len(base) + 1 :].split("/", 1)[0]
        if name in index and f.lower().endswith(IMAGE_EXTENSIONS):
            pairs.append((index[name], f))
    if not pairs:
        raise DataError(
            f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders "
            "(expected the ImageNet layout root/<class>/<file>)"
        )
    pairs.sort()
    files = [f for _, f in pairs]
    labels = np.asarray([label for label, _ in pairs], np.int32)
    return files, labels, classes


def is_held_out(relative_path: str, percent: float) -> bool:
    """Whether an image is in the eval split when no eval folder is given: its `class/file`
    path's hash falls in the lowest `percent` of 10000 buckets (stable as the folder grows,
    the same for a local and a gs:// copy, and the same in `prepare`)."""
    key = int.from_bytes(hashlib.sha1(relative_path.encode()).digest()[:4], "little")
    return key % 10_000 < percent * 100


class ImageFolder:
    """Encoded images listed in a folder: item `i` is `(label, bytes)` read on access.

    Args:
      files: image paths or gs:// URLs.
      labels: int32 `[len(files)]`.
      classes: the class names (`labels` index them).
    """

    def __init__(self, files: Sequence[str], labels: np.ndarray, classes: Sequence[str]):
        self.files = list(files)
        self.labels = np.asarray(labels, np.int32)
        self.classes = list(classes)
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.labels)} labels for {len(self.files)} files")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, bytes, str]:
        f = self.files[i]
        try:
            data = paths.read_bytes(f)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{f}: cannot read the image ({msg})") from None
        return int(self.labels[i]), data, f


class ImageRecords:
    """The ArrayRecord shards of one split written by `xformers-jax prepare`.

    Args:
      prepared_dir: the directory holding `manifest.json` and the shards: a local path or a
        mounted bucket (gcsfuse); `prepare` writes it to gs:// directly.
      split: `'train'` or `'eval'`.
    """

    def __init__(self, prepared_dir: str, split: str):
        import grain

        if paths.is_remote(prepared_dir):
            # array_record opens local files only (as MaxText's grain input, which mounts the
            # bucket); failing here beats a reader stuck on an unreachable store.
            raise DataError(
                f"{prepared_dir}: ArrayRecord shards are read from a filesystem: mount the bucket "
                "(gcsfuse --implicit-dirs BUCKET /mnt/BUCKET) and set data.prepared_dir to the "
                "mounted path"
            )
        self.manifest = read_manifest(prepared_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{prepared_dir}: the manifest has no split {split!r} ({list(splits)})")
        self.where = paths.join(prepared_dir, split)
        shards = [paths.join(prepared_dir, s) for s in splits[split]["shards"]]
        missing = [s for s in shards if not paths.exists(s)]
        if missing:
            raise DataError(f"{missing[0]}: shard named in {MANIFEST} is missing")
        self.classes = list(self.manifest["classes"])
        self._source = grain.sources.ArrayRecordDataSource(shards)
        if len(self._source) != splits[split]["count"]:
            raise DataError(
                f"{prepared_dir}: {len(self._source)} {split} records, the manifest says "
                f"{splits[split]['count']}"
            )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> tuple[int, bytes, str]:
        where = f"{self.where} record {i}"
        label, data = decode_record(self._source[i], where)
        return label, data, where


def read_manifest(prepared_dir: str) -> dict:
    """The `manifest.json` of an image prepare, checked.

    Raises:
      DataError: missing, not JSON, or not an image manifest of a known version.
    """
    path = paths.join(prepared_dir, MANIFEST)
    if not paths.exists(path):
        raise DataError(f"{path}: no manifest (run `xformers-jax prepare` for this config)")
    try:
        manifest = json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != RECORD_FORMAT:
        raise DataError(f"{path}: not an image manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != RECORD_VERSION:
        raise DataError(
            f"{path}: format version {manifest.get('version')!r}, this code reads {RECORD_VERSION}"
        )
    return manifest


# ------------------------------------------------------------------------------ transforms


def _jitter(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """torchvision's ColorJitter(strength, strength, strength) on a PIL image: brightness,
    contrast and saturation factors in [1 - s, 1 + s], applied in a random order."""
    ops = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    factors = rng.uniform(max(0.0, 1 - strength), 1 + strength, 3)
    for k in rng.permutation(3):
        img = ops[k](img).enhance(float(factors[k]))
    return img


def _crop_box(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A random resized crop box `(left, top, right, bottom)`: area fraction in `scale`, aspect
    ratio log-uniform in 3/4..4/3 (10 tries, then the centre crop of the clamped ratio)."""
    area = width * height
    log_ratio = np.log(3 / 4), np.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(*log_ratio))
        w = int(round(np.sqrt(target * ratio)))
        h = int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of side `0.875 * min(width, height)` (resize-then-crop in one box)."""
    side = max(1, int(round(min(width, height) * EVAL_CROP_FRACTION)))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def normalise(img: Image.Image) -> np.ndarray:
    """uint8 RGB -> float32 `[3, H, W]` scaled to [-1, 1] (BEiT's mean = std = 0.5)."""
    x = np.asarray(img, np.float32) * (2 / 255) - 1
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def unit(img: Image.Image) -> np.ndarray:
    """uint8 RGB -> float32 `[3, H, W]` in [0, 1] (what the DALL-E encoder maps itself)."""
    return np.ascontiguousarray((np.asarray(img, np.float32) / 255).transpose(2, 0, 1))


class ImageTransform:
    """Decoded image -> model inputs, with BEiT's augmentations when training.

    Args:
      size: the model's image side.
      second_size: the visual tokenizer's own view side (0 = none).
      train: augment (else the deterministic centre crop).
      augment: with `train`, apply the random crop / flip / jitter (else the centre crop).
      min_crop_scale: the smallest crop area fraction (BEiT: 0.08).
      color_jitter: the jitter strength (0 = off; BEiT: 0.4).
    """

    def __init__(
        self,
        size: int,
        second_size: int = 0,
        *,
        train: bool = True,
        augment: bool = True,
        min_crop_scale: float = 0.08,
        color_jitter: float = 0.4,
    ):
        if size < 1 or second_size < 0:
            raise ValueError(f"image sizes must be positive, got {size}, {second_size}")
        if not 0 < min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}")
        self.size, self.second_size = size, second_size
        self.random = train and augment
        self.min_crop_scale, self.color_jitter = min_crop_scale, color_jitter

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`{'pixel_values': [3, size, size] in [-1, 1]}` and, with a second view,
        `'tokenizer_pixels': [3, second_size, second_size] in [0, 1]` (same crop box)."""
        if self.random:
            if self.color_jitter:
                img = _jitter(img, self.color_jitter, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            box = _crop_box(*img.size, (self.min_crop_scale, 1.0), rng)
        else:
            box = _centre_box(*img.size)
        s = self.size
        out = {"pixel_values": normalise(img.resize((s, s), Image.Resampling.BICUBIC, box=box))}
        if self.second_size:
            t = self.second_size
            out["tokenizer_pixels"] = unit(img.resize((t, t), Image.Resampling.LANCZOS, box=box))
        return out


class EncodedImages:
    """A random-access image source (`ImageFolder` / `ImageRecords`) with its transform: the
    `images` argument of `images.mim_dataset` / `classification_dataset` for real data.

    Items are indices; `-1` is an eval padding item (zero pixels, no label).
    """

    num_crops = 0  # no bundled photo crops (`visual_tokenizer_for` checks it)

    def __init__(self, source, transform: ImageTransform):
        self.source, self.transform = source, transform
        self.classes = list(source.classes)
        self.image_size = transform.size

    def __len__(self) -> int:
        return len(self.source)

    def items(self) -> np.ndarray:
        return np.arange(len(self.source), dtype=np.int64)

    def pad_items(self, count: int) -> np.ndarray:
        return np.full(count, -1, np.int64)

    def is_pad(self, item) -> bool:
        return int(item) < 0

    def example(self, item, rng: np.random.Generator) -> dict:
        """`pixel_values` (+ `tokenizer_pixels`) and `label` (int32, -1 for padding)."""
        s, t = self.transform.size, self.transform.second_size
        if self.is_pad(item):
            out = {"pixel_values": np.zeros((3, s, s), np.float32), "label": np.int32(-1)}
            if t:
                out["tokenizer_pixels"] = np.zeros((3, t, t), np.float32)
            return out
        label, data, where = self.source[int(item)]
        out = self.transform(decode_image(data, where), rng)
        out["label"] = np.int32(label)
        return out

    def render_many(self, count: int, seed: int) -> np.ndarray:
        """`count` images spread over the source, centre-cropped: float32 `[count, 3, S, S]` in
        [-1, 1] (what a k-means visual tokenizer is fitted on)."""
        plain = ImageTransform(self.transform.size, train=False)
        rng = np.random.default_rng(seed)
        out = []
        # Evenly spaced over the (class-sorted) source, so every class is represented.
        picks = np.unique(np.linspace(0, len(self.source) - 1, max(count, 1)).astype(np.int64))
        for i in picks[:count]:
            _, data, where = self.source[int(i)]
            out.append(plain(decode_image(data, where), rng)["pixel_values"])
        return np.stack(out)


# ------------------------------------------------------------------------------ from a config


def uses_real_images(config) -> bool:
    """Whether the config names an image folder or prepared image shards (else: bundled data)."""
    d = config.data
    return bool(d.get("image_folder") or d.get("prepared_dir"))


def folder_splits(config) -> tuple[ImageFolder, ImageFolder]:
    """(train, eval) `ImageFolder`s of `data.image_folder` and `data.eval_image_folder` (or the
    images of the training folder that `is_held_out` at `data.eval_percent`). Labels index the
    training folder's sorted class names.

    Raises:
      DataError: a folder is missing or empty, the eval folder has a class the training one
        lacks, or nothing is held out.
    """
    d = config.data
    files, labels, classes = scan_folder(d.image_folder)
    if d.eval_image_folder:
        ev_files, ev_labels, _ = scan_folder(d.eval_image_folder, classes)
        return ImageFolder(files, labels, classes), ImageFolder(ev_files, ev_labels, classes)
    base = paths.resolve(d.image_folder)
    out = np.asarray([is_held_out(f[len(base) + 1 :], d.eval_percent) for f in files], bool)
    if not out.any() or out.all():
        raise DataError(
            f"{d.image_folder}: data.eval_percent={d.eval_percent} holds out {int(out.sum())} of "
            f"{len(files)} images; change it or set data.eval_image_folder"
        )
    keep, hold = np.flatnonzero(~out), np.flatnonzero(out)
    return (
        ImageFolder([files[i] for i in keep], labels[keep], classes),
        ImageFolder([files[i] for i in hold], labels[hold], classes),
    )


def image_splits(config, size: int, second_size: int = 0) -> tuple[EncodedImages, EncodedImages]:
    """(train, eval) `EncodedImages` of a config: `data.prepared_dir`'s shards when set, else
    `data.image_folder`; training augmented as `data.augment` / `min_crop_scale` /
    `color_jitter` say, eval centre-cropped.

    Args:
      size: the model's image side.
      second_size: the visual tokenizer's view side (0 = none).
    """
    d = config.data
    if d.get("prepared_dir"):
        train, evaluation = (
            ImageRecords(d.prepared_dir, "train"),
            ImageRecords(d.prepared_dir, "eval"),
        )
    else:
        train, evaluation = folder_splits(config)
    kwargs = dict(augment=d.augment, min_crop_scale=d.min_crop_scale, color_jitter=d.color_jitter)
    return (
        EncodedImages(train, ImageTransform(size, second_size, train=True, **kwargs)),
        EncodedImages(evaluation, ImageTransform(size, second_size, train=False, **kwargs)),
    )


def throughput(
    root: str, count: int = 256, size: int = 224, second_size: int = 112
) -> dict[str, float]:
    """How fast one process reads, decodes and augments images of the folder `root` (BEiT's
    training transform, both views): what one grain worker delivers.

    Returns:
      `{'images_per_s': wall-clock rate, 'images_per_cpu_s': rate per CPU second of this
      process (the per-core figure, unaffected by other processes on the machine)}`.

      python -c "from xformers_jax.data.image_folder import throughput; print(throughput('DIR'))"
    """
    import time

    files, labels, classes = scan_folder(root)
    source = EncodedImages(
        ImageFolder(files, labels, classes), ImageTransform(size, second_size, train=True)
    )
    n = min(count, len(source))
    source.example(0, np.random.default_rng(0))  # warm caches
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        source.example(i, np.random.default_rng([0, i]))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1)}
