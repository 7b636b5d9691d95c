"""BEiT: a pre-LN ViT with relative position bias, layer scale and stochastic depth.

One module covers transformers' BEiT variants: absolute position embeddings and/or a relative
position bias (per layer, stacked on the scan axis, or shared by all layers and computed once
outside the scan), each table holding 3 extra entries for CLS->patch, patch->CLS and CLS->CLS.
Any input resolution works: the relative bias table is resized bilinearly and the absolute table
bicubically, with torch's `F.interpolate` arithmetic (`resize_matrix`), so parity holds at any
size. Pooling is the mean of the patch tokens (plus a LayerNorm) or the CLS token. Inputs are HF's
`pixel_values` `[batch, channels, height, width]`; compute is NHWC inside.

Heads: `BeitModel`, `BeitForMaskedImageModeling`, `BeitForImageClassification` here;
`BeitForSemanticSegmentation` and `BeitBackbone` (FPN, UperNet, FCN, BatchNorm) live in
`beit_segmentation.py`, which imports this module (never the reverse).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xformers_jax.layers import MLP, DenseGeneral, LayerNorm, get_activation
from xformers_jax.layers.attention import attention
from xformers_jax.layers.dense import param_init, residual
from xformers_jax.layers.losses import cross_entropy_with_ignore, sequence_classification_loss
from xformers_jax.models import outputs
from xformers_jax.models.base import (
    FamilyConfig,
    InputError,
    scan_layers,
    unstack,
)

# Fields stored as tuples here (hashable) and as lists in config.json.
_TUPLE_FIELDS = ("pool_scales", "out_features", "out_indices")


@dataclasses.dataclass(frozen=True)
class BeitConfig(FamilyConfig):
    """Hyper-parameters; field names are transformers' `BeitConfig` names.

    `dtype` (compute), `param_dtype`, `remat_policy` and `hf_compat` are ours and never written to
    config.json. `hf_compat=True` makes segmentation refuse inputs off the config resolution, as
    transformers does (its reshape fails); by default any resolution works.
    """

    model_type: str = "beit"
    vocab_size: int = 8192
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    use_mask_token: bool = False
    use_absolute_position_embeddings: bool = False
    use_relative_position_bias: bool = False
    use_shared_relative_position_bias: bool = False
    layer_scale_init_value: float = 0.1
    drop_path_rate: float = 0.1
    use_mean_pooling: bool = True
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    use_auxiliary_head: bool = True
    auxiliary_loss_weight: float = 0.4
    auxiliary_channels: int = 256
    auxiliary_num_convs: int = 1
    auxiliary_concat_input: bool = False
    semantic_loss_ignore_index: int = 255
    out_features: tuple[str, ...] | None = None
    out_indices: tuple[int, ...] | None = None
    add_fpn: bool = False
    reshape_hidden_states: bool = True
    batch_norm_eps: float = 1e-5
    hf_compat: bool = False

    LOCAL_FIELDS = ("hf_compat",)

    def __post_init__(self):
        super().__post_init__()
        if self.model_type != "beit":
            raise ValueError(f"model_type must be 'beit', got {self.model_type!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.patch_size}")
        get_activation(self.hidden_act)
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        # transformers' backbone alignment: features <-> indices over the stage names.
        stages = self.stage_names
        feats, idx = self.out_features, self.out_indices
        if idx is not None and any(not 0 <= i < len(stages) for i in idx):
            raise ValueError(f"out_indices {idx} not in stages {stages}")
        if feats is None and idx is None:
            feats, idx = (stages[-1],), (len(stages) - 1,)
        elif feats is None:
            feats = tuple(stages[i] for i in idx)
        elif idx is None:
            idx = tuple(stages.index(f) for f in feats)
        if any(f not in stages for f in feats) or any(not 0 <= i < len(stages) for i in idx):
            raise ValueError(f"out_features {feats} / out_indices {idx} not in stages {stages}")
        if tuple(stages[i] for i in idx) != tuple(feats):
            raise ValueError(f"out_features {feats} and out_indices {idx} do not match")
        object.__setattr__(self, "out_features", feats)
        object.__setattr__(self, "out_indices", idx)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return ("stem", *(f"stage{i}" for i in range(1, self.num_hidden_layers + 1)))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def window_size(self) -> tuple[int, int]:
        """The patch grid at the config resolution (the relative tables are sized for it)."""
        return (self.image_size // self.patch_size,) * 2

    @classmethod
    def _from_hf(cls, kw: dict[str, Any]) -> None:
        if "segmentation_indices" in kw and kw.get("out_indices") is None:
            kw["out_indices"] = kw["segmentation_indices"]
        for key in ("image_size", "patch_size"):
            if isinstance(kw.get(key), (list, tuple)):
                a, b = kw[key]
                if a != b:
                    raise ValueError(f"non-square {key} {kw[key]} is not supported")
                kw[key] = a

    def _to_hf(self, d: dict[str, Any]) -> None:
        for name in _TUPLE_FIELDS:
            d[name] = list(d[name])
        d["stage_names"] = list(self.stage_names)


_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
)
# microsoft/beit-*-patch16-*: pretraining (pt22k) uses a shared relative bias and mask token;
# fine-tuned checkpoints a per-layer bias, mean pooling and layer scale 0.1.
_FT = dict(use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1)
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized for the default run and the tests (sklearn digits upscaled to 32 px).
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        vocab_size=64,
        use_mask_token=True,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=0.1,
        drop_path_rate=0.0,
        auxiliary_channels=32,
        out_indices=(1, 2, 3, 4),
    ),  # fmt: skip
    "base-pt22k": dict(
        _BASE,
        use_mask_token=True,
        use_shared_relative_position_bias=True,
        use_mean_pooling=False,
        layer_scale_init_value=0.1,
    ),  # fmt: skip
    "base": dict(_BASE, **_FT),
    "base-384": dict(_BASE, **_FT, image_size=384),
    "base-640-ade": dict(_BASE, **_FT, image_size=640, out_indices=(3, 5, 7, 11), num_labels=150),
    "large-pt22k": dict(
        _LARGE,
        use_mask_token=True,
        use_shared_relative_position_bias=True,
        use_mean_pooling=False,
        layer_scale_init_value=1e-5,
    ),  # fmt: skip
    "large": dict(_LARGE, **_FT),
    "large-384": dict(_LARGE, **_FT, image_size=384),
    "large-512": dict(_LARGE, **_FT, image_size=512),
    "large-640-ade": dict(
        _LARGE, **_FT, image_size=640, out_indices=(7, 11, 15, 23), num_labels=150
    ),
}


# --------------------------------------------------------------------------------------------------
# torch.nn.functional.interpolate / adaptive pooling as matrices (static shapes, exact weights).
# --------------------------------------------------------------------------------------------------


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """torch's bicubic convolution weights (A = -0.75) for taps i-1, i, i+1, i+2."""

    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """`[n_out, n_in]` weights of torch's 1-D resize along one axis (align_corners=False).

    Modes: `'bilinear'` and `'bicubic'` (`F.interpolate` with `size=`, no antialiasing) and
    `'adaptive_avg'` (`nn.AdaptiveAvgPool2d`). Separable, so 2-D resizes apply one per axis.
    """
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        if mode == "adaptive_avg":
            s, e = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, s:e] = 1.0 / (e - s)
            continue
        src = (i + 0.5) * scale - 0.5
        if mode == "bilinear":
            src = max(src, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            t = src - i0
            m[i, i0] += 1 - t
            m[i, min(i0 + 1, n_in - 1)] += t
        elif mode == "bicubic":
            i0 = int(math.floor(src))
            for k, w in zip(range(i0 - 1, i0 + 3), _cubic_weights(src - i0)):
                m[i, min(max(k, 0), n_in - 1)] += w
        else:
            raise ValueError(f"unknown resize mode {mode!r}")
    return m.astype(np.float32)


def resize_2d(x: jax.Array, size: tuple[int, int], mode: str) -> jax.Array:
    """`[batch, h, w, channels]` -> `[batch, *size, channels]` as torch resizes NCHW maps."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size) and mode != "adaptive_avg":
        return x
    mh = jnp.asarray(resize_matrix(h, size[0], mode))
    mw = jnp.asarray(resize_matrix(w, size[1], mode))
    y = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision="highest")
    y = jnp.einsum("pw,bowc->bopc", mw, y, precision="highest")
    return y.astype(x.dtype)


@functools.lru_cache(maxsize=16)
def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """`[n + 1, n + 1]` indices into a `[(2h-1)(2w-1) + 3, heads]` table for an h x w grid.

    Patch pairs index their (dy, dx) offset; the last 3 rows are CLS->patch, patch->CLS and
    CLS->CLS (transformers' layout, so tables convert unchanged).
    """
    h, w = window
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    n_dist = (2 * h - 1) * (2 * w - 1) + 3
    index = np.zeros((h * w + 1,) * 2, np.int32)
    index[1:, 1:] = (rel[0] + h - 1) * (2 * w - 1) + rel[1] + w - 1
    index[0, :] = n_dist - 3
    index[:, 0] = n_dist - 2
    index[0, 0] = n_dist - 1
    return index


class PatchEmbed(nn.Module):
    """The `patch x patch` stride-`patch` convolution as one matmul over flattened patches.

    `[b, C, H, W] -> [b, H // p, W // p, features]` (trailing rows/columns that do not fill a
    patch are dropped, as a VALID convolution does). Params as a flax `nn.Conv` (`kernel`
    `[p, p, C, features]`, `bias`): the patchify + dot form avoids a strided convolution, which
    XLA's CPU backend ran ~25x slower than the same FLOPs as a matmul.
    """

    features: int
    patch: int
    dtype: Any
    param_dtype: Any
    kernel_init: Any

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        b, c, h, w = pixels.shape
        p, gh, gw = self.patch, h // self.patch, w // self.patch
        kernel = self.param(
            "kernel", param_init(self.kernel_init, (None, None, "conv_in", "embed")),
            (p, p, c, self.features), self.param_dtype,
        )  # fmt: skip
        bias = self.param(
            "bias", param_init(nn.initializers.zeros, ("embed",)), (self.features,),
            self.param_dtype,
        )  # fmt: skip
        x = pixels[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)
        x = jnp.transpose(x, (0, 2, 4, 3, 5, 1)).reshape(b, gh, gw, p * p * c)
        y = x @ jnp.asarray(kernel, self.dtype).reshape(p * p * c, self.features)
        return y + jnp.asarray(bias, self.dtype)


class RelativePositionBias(nn.Module):
    """The learned `[(2h-1)(2w-1) + 3, heads]` table -> a `[heads, n + 1, n + 1]` score bias.

    The table is sized for the config grid; another grid resizes its patch part bilinearly.
    """

    config: BeitConfig

    @nn.compact
    def __call__(self, grid: tuple[int, int]) -> jax.Array:
        cfg = self.config
        oh, ow = (2 * s - 1 for s in cfg.window_size)
        heads = cfg.num_attention_heads
        table = self.param(
            "relative_position_bias_table", param_init(nn.initializers.zeros, ("relpos", "heads")),
            (oh * ow + 3, heads), cfg.param_dtype,
        )  # fmt: skip
        table = jnp.asarray(table, jnp.float32)
        nh, nw = 2 * grid[0] - 1, 2 * grid[1] - 1
        if (nh, nw) != (oh, ow):
            patch = resize_2d(
                table[None, : oh * ow].reshape(1, oh, ow, heads), (nh, nw), "bilinear"
            )
            table = jnp.concatenate([patch.reshape(nh * nw, heads), table[oh * ow :]], axis=0)
        bias = table[relative_position_index(tuple(grid))]  # [q, k, heads]
        return jnp.transpose(bias, (2, 0, 1))


class Embeddings(nn.Module):
    """Patch embedding (a stride-p conv), mask tokens, CLS token and absolute positions.

    `pixel_values` `[batch, channels, H, W]` -> `([batch, 1 + n, hidden], (H/p, W/p))`.
    """

    config: BeitConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, pixel_values, bool_masked_pos=None):
        cfg = self.config
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        init = nn.initializers.normal(cfg.initializer_range)
        if pixel_values.shape[1] != cfg.num_channels:
            raise InputError(
                f"pixel_values has {pixel_values.shape[1]} channels, the config "
                f"{cfg.num_channels} (layout is [batch, channels, height, width])"
            )
        p = cfg.patch_size
        x = PatchEmbed(cfg.hidden_size, p, dtype, pdtype, init, name="patch_embeddings")(
            jnp.asarray(pixel_values, dtype)
        )
        batch, gh, gw, d = x.shape
        x = x.reshape(batch, gh * gw, d)
        zeros = lambda name, shape, axes: self.param(  # noqa: E731
            name, param_init(nn.initializers.zeros, axes), shape, pdtype
        )
        if cfg.use_mask_token:
            mask_token = zeros("mask_token", (1, 1, d), (None, None, "embed"))
            if bool_masked_pos is not None:
                w = jnp.asarray(bool_masked_pos, dtype)[..., None]
                x = x * (1 - w) + jnp.asarray(mask_token, dtype) * w
        elif bool_masked_pos is not None:
            raise ValueError("bool_masked_pos needs use_mask_token=True")
        cls = jnp.asarray(zeros("cls_token", (1, 1, d), (None, None, "embed")), dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, d)), x], axis=1)
        if cfg.use_absolute_position_embeddings:
            n = (cfg.image_size // p) ** 2
            pos = zeros("position_embeddings", (1, n + 1, d), (None, None, "embed"))
            x = x + jnp.asarray(self._resize_positions(pos, (gh, gw)), dtype)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed")), (gh, gw)

    def _resize_positions(self, pos, grid):
        """transformers always resizes the absolute table to the input grid (bicubic)."""
        side = self.config.image_size // self.config.patch_size
        if tuple(grid) == (side, side):
            return pos
        patch = pos[:, 1:].reshape(1, side, side, -1)
        patch = resize_2d(patch.astype(jnp.float32), grid, "bicubic").reshape(1, -1, pos.shape[-1])
        return jnp.concatenate([pos[:, :1], patch.astype(pos.dtype)], axis=1)


def drop_path(x, rate, rng, deterministic: bool):
    """Stochastic depth: zero whole samples of a residual branch with probability `rate`.

    `rate` may be traced (each scanned layer gets its own from the linspace schedule).
    """
    if deterministic or rng is None:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jnp.floor(keep + jax.random.uniform(rng, shape, jnp.float32))
    return (x / keep * mask).astype(x.dtype)


class Layer(nn.Module):
    """One pre-LN block with layer scale and drop path; scanned over `layers`.

    Call signature fits `nn.scan`: `(x, drop_rate, head_mask, shared_bias) -> (x, (x, probs))`,
    `x` `[batch, 1 + n, hidden]`, `shared_bias` `[heads, 1 + n, 1 + n]` or None.
    """

    config: BeitConfig
    grid: tuple[int, int]
    deterministic: bool = True
    output_hidden_states: bool = False
    output_attentions: bool = False

    @nn.compact
    def __call__(self, x, drop_rate, head_mask, shared_bias):
        cfg = self.config
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        init = nn.initializers.normal(cfg.initializer_range)
        heads, hd = cfg.num_attention_heads, cfg.head_dim
        norm = lambda name: LayerNorm(
            cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name=name
        )  # noqa: E731
        proj = lambda name, bias=True: DenseGeneral(  # noqa: E731
            (heads, hd), ("embed", "heads", "kv"), use_bias=bias, dtype=dtype,
            param_dtype=pdtype, kernel_init=init, name=name,
        )  # fmt: skip
        x = residual(x)
        h = norm("layernorm_before")(x)
        # transformers adds the bias after scaling: pre-scale q, then scale=1.
        q = proj("query")(h) * jnp.asarray(hd**-0.5, dtype)
        k, v = proj("key", bias=False)(h), proj("value")(h)
        bias = shared_bias
        if cfg.use_relative_position_bias:
            own = RelativePositionBias(cfg, name="relative_position_bias")(self.grid)
            bias = own if bias is None else bias + own
        dropout_rng = None
        if not self.deterministic and cfg.attention_probs_dropout_prob > 0:
            dropout_rng = self.make_rng("dropout")
        a, probs = attention(
            q, k, v, bias=None if bias is None else bias[None], head_mask=head_mask, scale=1.0,
            dropout_rate=cfg.attention_probs_dropout_prob, dropout_rng=dropout_rng,
            deterministic=self.deterministic, dtype=dtype, kernel=cfg.attention_kernel,
            need_probs=self.output_attentions,
        )  # fmt: skip
        a = DenseGeneral(
            cfg.hidden_size, ("heads", "kv", "embed"), axis=(-2, -1), dtype=dtype,
            param_dtype=pdtype, kernel_init=init, name="out",
        )(a)  # fmt: skip
        drop = lambda y: nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=self.deterministic)  # noqa: E731
        path_rng = None if self.deterministic else self.make_rng("dropout")
        scale = self._layer_scale()
        a = drop(a)
        if scale is not None:
            a = a * jnp.asarray(scale[0], dtype)
        x = residual(x + drop_path(a, drop_rate, path_rng, self.deterministic))
        m = MLP(cfg.intermediate_size, cfg.hidden_act, dtype=dtype, param_dtype=pdtype,
                kernel_init=init, name="mlp")(norm("layernorm_after")(x))  # fmt: skip
        m = drop(m)
        if scale is not None:
            m = m * jnp.asarray(scale[1], dtype)
        if path_rng is not None:
            path_rng = jax.random.fold_in(path_rng, 1)
        x = x + drop_path(m, drop_rate, path_rng, self.deterministic)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return x, (
            x if self.output_hidden_states else None,
            probs if self.output_attentions else None,
        )

    def _layer_scale(self):
        cfg = self.config
        if cfg.layer_scale_init_value <= 0:
            return None
        init = param_init(nn.initializers.constant(cfg.layer_scale_init_value), ("embed",))
        pdtype = cfg.param_dtype
        return tuple(
            self.param(n, init, (cfg.hidden_size,), pdtype) for n in ("lambda_1", "lambda_2")
        )


def _layer_head_mask(head_mask, cfg: BeitConfig):
    """HF head_mask `[heads]` or `[layers, heads]` -> `[layers, heads]` float32, or None."""
    if head_mask is None:
        return None
    head_mask = jnp.asarray(head_mask, jnp.float32)
    if head_mask.ndim == 1:
        head_mask = jnp.broadcast_to(head_mask, (cfg.num_hidden_layers, head_mask.shape[0]))
    if head_mask.shape != (cfg.num_hidden_layers, cfg.num_attention_heads):
        raise ValueError(f"head_mask must be [heads] or [layers, heads], got {head_mask.shape}")
    return head_mask


class Encoder(nn.Module):
    """Embeddings + the scanned layers (+ the shared relative bias, computed once).

    Returns `(last [batch, 1 + n, hidden], hidden_states tuple or None, attentions or None,
    grid)`; hidden_states are HF's: the embeddings, then every layer's output.
    """

    config: BeitConfig

    @nn.compact
    def __call__(self, pixel_values, bool_masked_pos, head_mask, output_attentions,
                 output_hidden_states, deterministic):  # fmt: skip
        cfg = self.config
        x, grid = Embeddings(cfg, deterministic, name="embeddings")(pixel_values, bool_masked_pos)
        shared = None
        if cfg.use_shared_relative_position_bias:
            shared = RelativePositionBias(cfg, name="relative_position_bias")(grid)
        rates = jnp.linspace(0.0, cfg.drop_path_rate, cfg.num_hidden_layers, dtype=jnp.float32)
        emb = x
        x, (hs, probs) = scan_layers(
            Layer,
            cfg.num_hidden_layers,
            cfg.remat_policy,
            dict(
                config=cfg,
                grid=tuple(grid),
                deterministic=deterministic,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            ),  # fmt: skip
            name="layers",
            in_axes=(0, 0, nn.broadcast),
            unroll=cfg.scan_unroll,
        )(x, rates, _layer_head_mask(head_mask, cfg), shared)
        hidden = (emb, *unstack(hs)) if output_hidden_states else None
        return x, hidden, unstack(probs), grid


class BeitModel(nn.Module):
    """The base model (HF `BeitModel`).

    Inputs `pixel_values` `[batch, channels, H, W]` (any H, W divisible by the patch size),
    optional `bool_masked_pos` `[batch, n]`. Returns `BeitModelOutputWithPooling`:
    `last_hidden_state` `[batch, 1 + n, hidden]`, `pooler_output` `[batch, hidden]` (mean of the
    patch tokens + LayerNorm, or the CLS token), `hidden_states` (embeddings + every layer) and
    `attentions` `[batch, heads, 1 + n, 1 + n]` per layer when asked.
    """

    config: BeitConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(
        self,
        pixel_values,
        bool_masked_pos=None,
        head_mask=None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        deterministic: bool = True,
    ) -> outputs.BeitModelOutputWithPooling:
        # interpolate_pos_encoding: tables are always resized to the input grid (HF's result).
        del interpolate_pos_encoding
        cfg = self.config
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        x, hidden, attn, _ = Encoder(cfg, name="encoder")(
            pixel_values, bool_masked_pos, head_mask, output_attentions, output_hidden_states,
            deterministic,
        )  # fmt: skip
        norm = lambda name: LayerNorm(
            cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name=name
        )  # noqa: E731
        if not cfg.use_mean_pooling:
            x = norm("layernorm")(x)
        pooled = None
        if self.add_pooling_layer:
            pooled = norm("pooler_layernorm")(jnp.mean(x[:, 1:], axis=1)) if (
                cfg.use_mean_pooling
            ) else x[:, 0]  # fmt: skip
        return outputs.BeitModelOutputWithPooling(
            last_hidden_state=x, pooler_output=pooled, hidden_states=hidden, attentions=attn
        )


class BeitForMaskedImageModeling(nn.Module):
    """Predicts visual-token ids of every patch (HF `BeitForMaskedImageModeling`).

    Returns `MaskedLMOutput` with `logits` `[batch, n, vocab]`. `labels` gives HF's loss: either
    HF's flat `[num_masked]` ids (the masked patches in row-major order) or `[batch, n]` ids
    read at the masked positions (`-100` ignored).
    """

    config: BeitConfig

    @nn.compact
    def __call__(
        self,
        pixel_values,
        bool_masked_pos=None,
        head_mask=None,
        labels=None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        deterministic: bool = True,
    ) -> outputs.MaskedLMOutput:
        cfg = self.config
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        out = BeitModel(cfg, add_pooling_layer=False, name="beit")(
            pixel_values, bool_masked_pos, head_mask, output_attentions, output_hidden_states,
            interpolate_pos_encoding, deterministic,
        )  # fmt: skip
        x = LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="layernorm")(
            out.last_hidden_state
        )
        logits = DenseGeneral(
            cfg.vocab_size, ("embed", "vocab"), dtype=dtype, param_dtype=pdtype,
            kernel_init=nn.initializers.normal(cfg.initializer_range), name="lm_head",
        )(x[:, 1:])  # fmt: skip
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        loss = None
        if labels is not None:
            if bool_masked_pos is None:
                raise ValueError("labels need bool_masked_pos (the patches they belong to)")
            loss = masked_image_loss(logits, bool_masked_pos, labels)
        return outputs.MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


def masked_image_loss(logits, bool_masked_pos, labels):
    """Mean cross-entropy at the masked patches.

    Args:
      logits: `[batch, n, vocab]`.
      bool_masked_pos: `[batch, n]`.
      labels: `[batch, n]` (read where masked; -100 ignored) or HF's `[num_masked]`.
    """
    mask = jnp.asarray(bool_masked_pos, bool)
    labels = jnp.asarray(labels)
    if labels.shape == mask.shape:
        return cross_entropy_with_ignore(logits, jnp.where(mask, labels, -100))
    # HF's flat layout: the k-th label belongs to the k-th True of the row-major mask.
    (idx,) = jnp.nonzero(mask.reshape(-1), size=labels.shape[0])
    picked = logits.reshape(-1, logits.shape[-1])[idx]
    return cross_entropy_with_ignore(picked, labels)


class BeitForImageClassification(nn.Module):
    """A linear classifier on the pooled output (HF `BeitForImageClassification`).

    Returns `ImageClassifierOutput` with `logits` `[batch, num_labels]`; `labels` `[batch]` gives
    HF's loss (regression / single- / multi-label by `problem_type`).
    """

    config: BeitConfig

    @nn.compact
    def __call__(
        self,
        pixel_values,
        head_mask=None,
        labels=None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        deterministic: bool = True,
    ) -> outputs.ImageClassifierOutput:
        cfg = self.config
        out = BeitModel(cfg, add_pooling_layer=True, name="beit")(
            pixel_values, None, head_mask, output_attentions, output_hidden_states,
            interpolate_pos_encoding, deterministic,
        )  # fmt: skip
        logits = DenseGeneral(
            cfg.num_labels, ("embed", "classes"), dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=nn.initializers.normal(cfg.initializer_range), name="classifier",
        )(out.pooler_output)  # fmt: skip
        loss = (
            None
            if labels is None
            else sequence_classification_loss(logits, labels, cfg.num_labels, cfg.problem_type)
        )
        return outputs.ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


def architecture_name(config: BeitConfig, class_name: str) -> str:
    """transformers names BEiT's classes as we do."""
    del config
    return class_name


__all__ = [
    "PRESETS",
    "BeitConfig",
    "BeitForImageClassification",
    "BeitForMaskedImageModeling",
    "BeitModel",
]
