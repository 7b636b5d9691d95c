"""The optax chain built from `config.optim`: schedule, clipping, AdamW/Adafactor, wd mask,
layer-wise lr decay and the first moment's dtype.

The chain, in order (each piece only when enabled):

    clip_by_global_norm(clip_norm)                      # clip_norm > 0
    AdamW:      scale_by_adam(b1, b2, eps, mu_dtype)
                add_decayed_weights(weight_decay, mask=decay_mask)
                scale_by_layer_decay(layer_decay)       # layer_decay < 1
                scale_by_learning_rate(schedule)
    Adafactor:  optax.adafactor(schedule, weight_decay_rate=weight_decay, mask=decay_mask)
                scale_by_layer_decay(layer_decay)       # layer_decay < 1

Gradient accumulation (`grad_accum_steps`) is not part of the chain: the trainer's step splits its
batch into micro-batches and calls the chain once per step with the accumulated gradient
(`train.make_train_step`), so every call is an optimizer step and the schedule counts them.

`mu_dtype` ('' = the params' dtype, 'float32', 'bfloat16') stores AdamW's first moment in that
dtype (computed in float32, rounded when stored), as MaxText and t5x offer: a bfloat16 `mu` takes
half the bytes of a float32 one. The second moment stays in the params' dtype.

Decoupled weight decay is scaled by the (layer-decayed) learning rate, as in PyTorch's AdamW with
per-layer param groups (BEiT, ELECTRA). The optimizer is built for *unboxed* params (plain arrays
in nested dicts, after `flax.linen.meta.unbox`); boxed `LogicallyPartitioned` trees also work for
the masks since the box's `value` attribute is ignored in paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "decay_mask",
    "layer_decay_factors",
    "learning_rate",
    "make_optimizer",
    "make_schedule",
    "param_path_names",
    "scale_by_layer_decay",
]

_DEFAULTS = {
    "name": "adamw",
    "lr": 1e-4,
    "warmup_steps": 0,
    "schedule": "cosine",
    "end_lr_factor": 0.0,
    "b1": 0.9,
    "b2": 0.98,
    "eps": 1e-6,
    "weight_decay": 0.01,
    "clip_norm": 1.0,
    "grad_accum_steps": 1,
    "layer_decay": 1.0,
    "mu_dtype": "",
}

# `optim.mu_dtype` names; '' keeps the params' dtype.
MU_DTYPES = {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The path component holding nn.scan-stacked layers (the `layers` logical axis, axis 0).
LAYERS = "layers"


def _opt(cfg: Any, key: str) -> Any:
    """Reads `cfg.key` from a ConfigDict or a mapping, falling back to the base default."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, _DEFAULTS[key])
    try:
        return cfg[key] if key in cfg else _DEFAULTS[key]
    except TypeError:  # A plain object with attributes.
        return getattr(cfg, key, _DEFAULTS[key])


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def make_schedule(
    name: str,
    lr: float,
    warmup_steps: int,
    total_steps: int,
    end_lr_factor: float = 0.0,
) -> optax.Schedule:
    """Learning rate as a jit-friendly function of the optimizer step (0-based).

    With `w = warmup_steps`, `T = total_steps`, `end = lr * end_lr_factor` and
    `p = clip((step - w) / max(T - w, 1), 0, 1)`:

    - cosine:   step < w: `lr * step / w`; then `end + (lr - end) * 0.5 * (1 + cos(pi * p))`.
    - linear:   step < w: `lr * step / w`; then `lr + (end - lr) * p`.
    - constant: step < w: `lr * step / w`; then `lr`.
    - rsqrt:    `lr * sqrt(W / max(step, W))` with `W = max(w, 1)`: constant `lr` for the first
      `W` steps, then inverse-square-root decay (no linear ramp, `end_lr_factor` unused). This is
      t5x's `constant * rsqrt_decay` normalised so `lr` is the peak: lr=0.01, warmup_steps=10000
      gives T5's `1 / sqrt(max(step, 10000))` exactly.

    Args:
        name: 'cosine' | 'linear' | 'constant' | 'rsqrt'.
        lr: peak learning rate.
        warmup_steps: linear warmup length from 0 (the rsqrt plateau length for 'rsqrt').
        total_steps: the step at which decaying schedules reach `end`.
        end_lr_factor: final lr as a fraction of `lr`.

    Returns:
        `schedule(step) -> float32 scalar`.
    """
    if name not in ("cosine", "linear", "constant", "rsqrt"):
        raise ValueError(f"unknown schedule {name!r}")
    lr, end = float(lr), float(lr) * float(end_lr_factor)
    w, total = int(warmup_steps), int(total_steps)
    decay_len = float(max(total - w, 1))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if name == "rsqrt":
            plateau = float(max(w, 1))
            return jnp.asarray(lr * jnp.sqrt(plateau / jnp.maximum(step, plateau)), jnp.float32)
        p = jnp.clip((step - w) / decay_len, 0.0, 1.0)
        if name == "cosine":
            main = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        elif name == "linear":
            main = lr + (end - lr) * p
        else:
            main = jnp.full_like(p, lr)
        if w > 0:
            main = jnp.where(step < w, lr * step / w, main)
        return jnp.asarray(main, jnp.float32)

    return schedule


def learning_rate(schedule: optax.Schedule, step: int | jax.Array) -> float:
    """The schedule's value at `step` as a python float (for logging)."""
    return float(jax.device_get(schedule(step)))


# --------------------------------------------------------------------------------------------------
# Masks and per-param factors
# --------------------------------------------------------------------------------------------------


def param_path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The names along a `tree_map_with_path` key path, box attributes (`.value`) dropped."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":  # flax.linen.Partitioned boxes flatten to `.value`.
                names.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    return tuple(names)


def _decays(names: tuple[str, ...]) -> bool:
    if not names:
        return True
    leaf = names[-1]
    if leaf.endswith("bias") or leaf == "scale":
        return False
    return not any("norm" in n.lower() for n in names)


def decay_mask(params: Any) -> Any:
    """Which params get weight decay (True) — everything but biases and norm params, as BERT does.

    Excluded: a leaf whose name ends in `bias` (dense biases, XLNet's `r_w_bias`), a leaf named
    `scale` (LayerNorm / RMSNorm scales), and anything under a path component containing `norm`
    in any case (`LayerNorm`, `final_norm`, `layernorm_before`). Kernels, embeddings and every
    other param decay.

    Args:
        params: a pytree of arrays (nested dicts from Flax; boxed values also work).

    Returns:
        A pytree of python bools with the structure of `params`.
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: _decays(param_path_names(p)), params)


def _num_layers(params: Any) -> int:
    """The largest leading dim of any param under a `layers` component (0 if none)."""
    sizes = [0]

    def visit(path, x):
        if LAYERS in param_path_names(path) and np.ndim(x) > 0:
            sizes.append(int(np.shape(x)[0]))

    jax.tree_util.tree_map_with_path(visit, params)
    return max(sizes)


def layer_decay_factors(params: Any, layer_decay: float, num_layers: int | None = None) -> Any:
    """Per-param lr multipliers for layer-wise lr decay (BEiT / ELECTRA style).

    With `L` layers and `d = layer_decay`: params under a `layers` component (nn.scan layout, layer
    index on axis 0, shape `[L, ...]`) get `d ** (L - i)` for layer `i` (0-based), as a
    `[L, 1, ..., 1]` array that broadcasts along axis 0; params outside `layers` with a path
    component containing `embed` (`embeddings/word_embeddings/embedding`, `pos_embed`) get
    `d ** (L + 1)`; everything else (heads, final norms, pooler) gets 1. The top layer thus
    learns at `d * lr` and the embeddings at `d ** (L + 1) * lr`.

    Args:
        params: a pytree of arrays (or of `jax.ShapeDtypeStruct`).
        layer_decay: `d` in (0, 1].
        num_layers: `L`; defaults to the largest leading dim of any `layers` param. A stack
            with fewer layers `n` (e.g. a shallower decoder) is aligned to the top: its layer
            `j` counts as layer `i = j + L - n`.

    Returns:
        A pytree with the structure of `params` of python floats or float32 numpy arrays.
    """
    total = _num_layers(params) if num_layers is None else int(num_layers)

    def factor(path, x):
        names = param_path_names(path)
        if LAYERS in names:
            if np.ndim(x) == 0:
                raise ValueError(f"param {'/'.join(names)} under 'layers' has no layer axis")
            n = int(np.shape(x)[0])
            # Stacks shorter than `total` are aligned to the top: their last layer gets d ** 1.
            idx = np.arange(n) + (total - n)
            f = np.asarray(layer_decay, np.float64) ** (total - idx)
            return f.astype(np.float32).reshape((n,) + (1,) * (np.ndim(x) - 1))
        if any("embed" in n.lower() for n in names):
            return float(layer_decay ** (total + 1))
        return 1.0

    return jax.tree_util.tree_map_with_path(factor, params)


class ScaleByLayerDecayState(NamedTuple):
    """Stateless: factors are recomputed from the (static) tree structure and shapes at trace."""


def scale_by_layer_decay(layer_decay: float, num_layers: int | None = None):
    """An optax transformation multiplying each update by its `layer_decay_factors` factor.

    Factors depend only on param paths and shapes, so they are python constants at trace time:
    nothing is stored in the optimizer state.

    Args:
        layer_decay: `d` in (0, 1]; 1 makes this the identity.
        num_layers: see `layer_decay_factors`.

    Returns:
        An `optax.GradientTransformation`.
    """

    def init_fn(params):
        del params
        return ScaleByLayerDecayState()

    def update_fn(updates, state, params=None):
        del params
        factors = layer_decay_factors(updates, layer_decay, num_layers)
        updates = jax.tree_util.tree_map(
            lambda u, f: u if isinstance(f, float) and f == 1.0 else (u * f).astype(u.dtype),
            updates,
            factors,
        )
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


def make_optimizer(
    optim_cfg: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax chain described in the module docstring from `config.optim`.

    Args:
        optim_cfg: `config.optim` (a ConfigDict or mapping; missing keys take the base defaults).
        total_steps: optimizer steps of the run (`config.train.steps`), the end of decay.

    Returns:
        `(tx, schedule)`: every `tx.update` is one optimizer step, and the schedule is a function
        of that step count (`grad_accum_steps` is the trainer's: it accumulates inside its step
        and calls `tx.update` once per step).

    Raises:
        ValueError: an unknown optimizer or `mu_dtype`, or a `mu_dtype` with adafactor (which
        keeps no first moment).
    """
    name = _opt(optim_cfg, "name")
    schedule = make_schedule(
        _opt(optim_cfg, "schedule"),
        _opt(optim_cfg, "lr"),
        _opt(optim_cfg, "warmup_steps"),
        total_steps,
        _opt(optim_cfg, "end_lr_factor"),
    )
    clip_norm = float(_opt(optim_cfg, "clip_norm"))
    weight_decay = float(_opt(optim_cfg, "weight_decay"))
    layer_decay = float(_opt(optim_cfg, "layer_decay"))
    mu_name = str(_opt(optim_cfg, "mu_dtype") or "")
    if mu_name not in MU_DTYPES:
        raise ValueError(f"unknown optim.mu_dtype {mu_name!r}; expected one of {sorted(MU_DTYPES)}")
    if mu_name and name == "adafactor":
        raise ValueError(
            f"optim.mu_dtype={mu_name!r} is AdamW's first-moment dtype; adafactor keeps no first "
            "moment (set optim.mu_dtype='')"
        )

    parts = []
    if clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if name == "adamw":
        parts.append(
            optax.scale_by_adam(
                b1=float(_opt(optim_cfg, "b1")),
                b2=float(_opt(optim_cfg, "b2")),
                eps=float(_opt(optim_cfg, "eps")),
                mu_dtype=MU_DTYPES[mu_name],
            )
        )
        if weight_decay > 0:
            parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
        if layer_decay < 1.0:
            parts.append(scale_by_layer_decay(layer_decay))
        parts.append(optax.scale_by_learning_rate(schedule))
    elif name == "adafactor":
        # Factored second moments for >=2-D params of size >= 128, t5x defaults otherwise;
        # b1/b2/eps are Adam's and unused here.
        parts.append(
            optax.adafactor(
                learning_rate=schedule,
                weight_decay_rate=weight_decay if weight_decay > 0 else None,
                weight_decay_mask=decay_mask if weight_decay > 0 else None,
            )
        )
        if layer_decay < 1.0:  # Linear in the update, so applying it after the lr is the same.
            parts.append(scale_by_layer_decay(layer_decay))
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected adamw or adafactor")

    return optax.chain(*parts), schedule
