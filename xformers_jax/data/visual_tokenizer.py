"""Visual tokenizers: the discrete per-patch targets of BEiT's masked image modelling.

BEiT predicts the ids a DALL-E dVAE gives each patch (`data/dalle.py`: `DalleTokenizer`, from
the published encoder.pkl, `data.visual_tokenizer = 'dalle'`). Its weights are a download, so the
offline default here is a `KMeansPatchTokenizer`: patches are flattened, randomly projected to a
few dimensions and assigned to the nearest of `vocab_size` k-means centroids fitted on patches
of the training images. It is fitted once and saved as an `.npz` in the workdir, so a resumed
run (or another host) tokenises identically. `PrecomputedTokenizer` serves ids computed
elsewhere (e.g. by a real dVAE) for a fixed set of images.

Any object with `vocab_size` and `tokenize(pixel_values [b, C, H, W]) -> int32 [b, n]` (patches in
row-major order, as BEiT's patch embedding flattens them) is a `VisualTokenizer`; one with an
`input_size` reads its own `[0, 1]` view of that side instead of the model's pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class VisualTokenizer(Protocol):
    """Maps images to one discrete id per patch."""

    vocab_size: int

    def tokenize(self, pixel_values: np.ndarray) -> np.ndarray:
        """`[batch, channels, height, width]` float -> int32 `[batch, num_patches]`."""
        ...


def _check_nchw(pixel_values: np.ndarray, channels: int, patch_size: int) -> np.ndarray:
    x = np.asarray(pixel_values, np.float32)
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(
            f"pixel_values has shape {x.shape}; expected [batch, {channels}, height, width]"
        )
    if x.shape[2] % patch_size or x.shape[3] % patch_size:
        raise ValueError(
            f"pixel_values has shape {x.shape}: height and width must be multiples of the "
            f"patch size {patch_size}"
        )
    return x


def patchify(pixel_values: np.ndarray, patch_size: int) -> np.ndarray:
    """`[b, C, H, W]` -> `[b, (H/p) * (W/p), C * p * p]`, patches in row-major grid order."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def _nearest(vectors: np.ndarray, centroids: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Index of the nearest centroid of each row (squared Euclidean), in row chunks."""
    c2 = np.sum(centroids * centroids, axis=1)
    out = np.empty(len(vectors), np.int32)
    for i in range(0, len(vectors), chunk):
        v = vectors[i : i + chunk]
        # |v - c|^2 = |v|^2 - 2 v.c + |c|^2; |v|^2 does not change the argmin.
        out[i : i + chunk] = np.argmin(c2[None] - 2.0 * v @ centroids.T, axis=1)
    return out


class KMeansPatchTokenizer:
    """Nearest k-means centroid of each randomly projected patch.

    Attributes:
      projection: float32 `[C * p * p, dim]`, Gaussian with std `1 / sqrt(dim)`.
      centroids: float32 `[vocab_size, dim]`.
      patch_size, num_channels: the patch geometry it was fitted for.
    """

    def __init__(
        self, projection: np.ndarray, centroids: np.ndarray, patch_size: int, num_channels: int = 3
    ):
        self.projection = np.asarray(projection, np.float32)
        self.centroids = np.asarray(centroids, np.float32)
        self.patch_size = int(patch_size)
        self.num_channels = int(num_channels)
        want = num_channels * patch_size * patch_size
        if self.projection.shape[0] != want:
            raise ValueError(
                f"projection has shape {self.projection.shape}; patches of {num_channels} x "
                f"{patch_size} x {patch_size} need {want} rows"
            )
        if self.centroids.shape[1] != self.projection.shape[1]:
            raise ValueError(
                f"centroids {self.centroids.shape} and projection {self.projection.shape} differ "
                "in dimension"
            )

    @property
    def vocab_size(self) -> int:
        return int(self.centroids.shape[0])

    def __repr__(self) -> str:
        return (
            f"KMeansPatchTokenizer(vocab_size={self.vocab_size}, patch_size={self.patch_size}, "
            f"dim={self.projection.shape[1]})"
        )

    @classmethod
    def fit(
        cls,
        pixel_values: np.ndarray,
        *,
        patch_size: int,
        vocab_size: int,
        dim: int = 32,
        iterations: int = 10,
        max_patches: int = 50_000,
        seed: int = 0,
    ) -> KMeansPatchTokenizer:
        """Lloyd's k-means on projected patches of `pixel_values` `[n, C, H, W]`.

        Args:
          patch_size: the model's patch size.
          vocab_size: clusters (ids `0 .. vocab_size - 1`).
          dim: the random projection's output dimension.
          iterations: Lloyd iterations (a few suffice for training targets).
          max_patches: patches sampled for fitting (bounds memory and time).
          seed: projection, sampling and initialisation seed.
        """
        channels = np.shape(pixel_values)[1] if np.ndim(pixel_values) == 4 else 3
        x = _check_nchw(pixel_values, channels, patch_size)
        rng = np.random.default_rng(seed)
        patches = patchify(x, patch_size).reshape(-1, x.shape[1] * patch_size * patch_size)
        if len(patches) > max_patches:
            patches = patches[np.sort(rng.choice(len(patches), max_patches, replace=False))]
        if len(patches) < vocab_size:
            raise ValueError(f"{len(patches)} patches cannot fit {vocab_size} clusters")
        projection = rng.normal(0, 1 / np.sqrt(dim), (patches.shape[1], dim)).astype(np.float32)
        v = patches @ projection
        centroids = v[rng.choice(len(v), vocab_size, replace=False)].copy()
        for _ in range(iterations):
            assign = _nearest(v, centroids)
            sums = np.zeros_like(centroids)
            np.add.at(sums, assign, v)
            counts = np.bincount(assign, minlength=vocab_size)
            # An empty cluster keeps its centroid (it stays a valid, if unused, id).
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None]
        return cls(projection, centroids, patch_size, x.shape[1])

    def tokenize(self, pixel_values: np.ndarray) -> np.ndarray:
        """`[b, C, H, W]` -> int32 `[b, (H/p) * (W/p)]` centroid ids."""
        x = _check_nchw(pixel_values, self.num_channels, self.patch_size)
        patches = patchify(x, self.patch_size)
        b, n, d = patches.shape
        return _nearest(patches.reshape(b * n, d) @ self.projection, self.centroids).reshape(b, n)

    def save(self, path: str | os.PathLike) -> None:
        """Writes an `.npz`, local or gs:// (whole: readers never see half a file)."""
        from xformers_jax import paths

        buf = io.BytesIO()
        np.savez(
            buf,
            projection=self.projection,
            centroids=self.centroids,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
        )
        paths.write_bytes(path, buf.getvalue())

    @classmethod
    def from_arrays(cls, z) -> KMeansPatchTokenizer:
        return cls(z["projection"], z["centroids"], int(z["patch_size"]), int(z["num_channels"]))

    @classmethod
    def load(cls, path: str | os.PathLike) -> KMeansPatchTokenizer:
        return cls.from_arrays(_load_npz(os.fspath(path)))


def _key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()


class PrecomputedTokenizer:
    """Token ids computed elsewhere for a fixed set of images, looked up by image content.

    Only images seen at construction can be tokenised (no augmentation of those images).

    Args:
      pixel_values: `[n, C, H, W]` the images, exactly as the pipeline yields them.
      ids: int `[n, num_patches]` their token ids.
      vocab_size: the id range (default: `max(ids) + 1`).
    """

    def __init__(self, pixel_values: np.ndarray, ids: np.ndarray, vocab_size: int | None = None):
        ids = np.asarray(ids, np.int32)
        if ids.ndim != 2 or len(ids) != len(pixel_values):
            raise ValueError(
                f"ids has shape {ids.shape}; expected [{len(pixel_values)}, num_patches]"
            )
        self.vocab_size = int(vocab_size if vocab_size is not None else ids.max() + 1)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"ids must be in [0, {self.vocab_size}); got {ids.min()}..{ids.max()}")
        self._ids = {_key(x): row for x, row in zip(np.asarray(pixel_values), ids)}

    def tokenize(self, pixel_values: np.ndarray) -> np.ndarray:
        """`[b, C, H, W]` (each image one of the precomputed) -> int32 `[b, num_patches]`."""
        out = []
        for i, x in enumerate(np.asarray(pixel_values)):
            row = self._ids.get(_key(x))
            if row is None:
                raise KeyError(
                    f"image {i} of the batch (shape {x.shape}) is not among the precomputed "
                    "images (random crops or augmentation cannot use precomputed ids)"
                )
            out.append(row)
        return np.stack(out)


TOKENIZER_FILE = "visual_tokenizer.npz"


def dalle_view_size(grid: int) -> int:
    """The side of the view the DALL-E encoder reads for a `grid x grid` patch grid (it
    downsamples 8x: BEiT v1's 112 px for 14 x 14 patches of a 224 px image)."""
    from xformers_jax.data.dalle import DOWNSAMPLE

    return DOWNSAMPLE * grid


def _load_npz(path: str) -> dict[str, np.ndarray]:
    from xformers_jax import paths

    with np.load(io.BytesIO(paths.read_bytes(path))) as z:
        return {k: z[k] for k in z.files}


def visual_tokenizer_for(
    config, workdir: str, train_images, eval_images, patch_size: int, grid: int | None = None
):
    """(train tokenizer, eval tokenizer) of a MIM run.

    `data.visual_tokenizer = 'dalle'`: the DALL-E encoder of `data.tokenizer` (an encoder.pkl,
    local or gs://, read by a restricted unpickler), reading a view of side `8 * grid`.
    Otherwise (k-means, the default) `data.tokenizer`'s `.npz` (a fitted k-means tokenizer, or
    precomputed `train` / `eval` ids aligned with the items of the fixed images), or a k-means
    tokenizer fitted on the training images once and saved in the workdir (`TOKENIZER_FILE`),
    so a resumed run has the same targets. Workdir and files may be local or gs://.
    """
    from xformers_jax import paths
    from xformers_jax.config_lib import ConfigError

    d = config.data
    if d.get("visual_tokenizer", "kmeans") == "dalle":
        from xformers_jax.data.dalle import DalleTokenizer

        if grid is None:
            raise ValueError("the DALL-E tokenizer needs the patch grid")
        tok = DalleTokenizer.load(d.tokenizer, dalle_view_size(grid))
        return tok, tok
    path = d.tokenizer or paths.join(workdir, TOKENIZER_FILE)
    if d.tokenizer and not paths.exists(path):
        raise ConfigError(f"config key 'data.tokenizer': no such file {path}")
    if paths.exists(path):
        z = _load_npz(path)
        if "train" not in z:
            tok = KMeansPatchTokenizer.from_arrays(z)
            return tok, tok
        if getattr(train_images, "num_crops", 0) or not hasattr(train_images, "digits"):
            raise ConfigError(
                "precomputed visual tokens need the fixed bundled images: set "
                "data.sources=['digits'] and no image folder"
            )
        vocab = int(max(z["train"].max(), z["eval"].max())) + 1
        render = lambda s: s.render_many(len(s.items()), 0)  # noqa: E731
        return (
            PrecomputedTokenizer(render(train_images), z["train"], vocab),
            PrecomputedTokenizer(render(eval_images), z["eval"], vocab),
        )
    pixels = train_images.render_many(d.tokenizer_fit_images, config.train.seed)
    tok = KMeansPatchTokenizer.fit(
        pixels,
        patch_size=patch_size,
        vocab_size=d.vocab_size,
        dim=d.tokenizer_dim,
        iterations=d.tokenizer_iterations,
        seed=config.train.seed,
    )
    tok.save(path)
    return tok, tok
