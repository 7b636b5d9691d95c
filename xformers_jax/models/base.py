"""What every family module builds on: the config base, dtypes, remat policies, the layer scan.

`FamilyConfig` is the base of the five frozen config dataclasses: dict and HF config.json round
trips, `replace`, the shared validation, and `dtype` / `param_dtype` held as real dtypes
(`jnp.dtype`, converted once from their config names, which they still equal:
`jnp.dtype("bfloat16") == "bfloat16"`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax.config_lib import UserError
from xformers_jax.layers.attention import check_kernel


class InputError(UserError, ValueError):
    """Inputs a model cannot take (e.g. longer than its position table); the message says why."""


# The name of each scanned layer's input (its carry) for the offloading remat policies.
LAYER_INPUT = "layer_input"

# Named remat policies (`model.remat_policy` in configs). 'none' keeps every activation.
# The `offload*` ones move what they save to host memory (`pinned_host`) after the forward pass
# and back for the backward (TPU, GPU): `offload` saves only each layer's input (as `full`,
# whose saved inputs stay in HBM); `offload_dots_no_batch` the matmul outputs `dots_no_batch`
# keeps in HBM (the layer inputs stay there). On the CPU device memory is host memory: they run
# there as `full` / `dots_no_batch` do, with the same numbers.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device",
        offload_dst="pinned_host",
    ),
    "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"
    ),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str | Any) -> Any:
    """'bfloat16' -> jnp.bfloat16 (dtypes pass through)."""
    if not isinstance(name, str):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(_DTYPES)}") from None


def as_dtype(value: str | Any) -> jnp.dtype:
    """A config's dtype name (or dtype) -> `jnp.dtype`; unknown names are a clear error."""
    return jnp.dtype(dtype_from_name(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FamilyConfig:
    """Base of the frozen family config dataclasses (field names are transformers' names).

    Holds the fields every family has: the heads' `num_labels` / `problem_type` and ours,
    `dtype` (compute), `param_dtype`, `remat_policy` (a `REMAT_POLICIES` name),
    `scan_unroll` (layers per scan iteration) and `attention_kernel` (`einsum` | `flash` |
    `auto`, see `layers.attention`); keyword-only, so a family's own fields keep their
    positions. Subclasses are `@dataclasses.dataclass(frozen=True)`; their `__post_init__` calls
    this one first. `LOCAL_FIELDS` are ours and never written to config.json (with `dtype`,
    `param_dtype`, `remat_policy`, `scan_unroll`, `attention_kernel`; `num_labels` is written
    as `id2label`).
    Hooks: `_hf_defaults` (transformers' defaults a hand-written config.json relies on),
    `_from_hf` (renamed / derived keys in) and `_to_hf` (derived keys out).
    """

    num_labels: int = 2
    problem_type: str | None = None
    dtype: jnp.dtype = "float32"
    param_dtype: jnp.dtype = "float32"
    remat_policy: str = "none"
    scan_unroll: int = 1
    attention_kernel: str = "einsum"
    # transformers' config-level output flags: a call's arguments default to them (the
    # `PretrainedModel` wrapper applies them; modules called directly take their own defaults).
    output_hidden_states: bool = False
    output_attentions: bool = False

    LOCAL_FIELDS: ClassVar[tuple[str, ...]] = ()
    _COMMON_LOCAL: ClassVar[tuple[str, ...]] = (
        "dtype", "param_dtype", "remat_policy", "scan_unroll", "num_labels", "attention_kernel",
    )  # fmt: skip

    def __post_init__(self):
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))
        check_scan_unroll(self.scan_unroll)
        check_kernel(self.attention_kernel)
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}"
            )

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Builds from a mapping, ignoring keys that are not fields (e.g. config.json extras)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]):
        """From a config.json dict; absent keys take transformers' defaults."""
        kw = {**cls._hf_defaults(hf), **hf}
        if "id2label" in kw and "num_labels" not in kw:
            kw["num_labels"] = len(kw["id2label"])
        cls._from_hf(kw)
        return cls.from_dict(kw)

    def to_hf_config(self) -> dict[str, Any]:
        skip = {*self._COMMON_LOCAL, *self.LOCAL_FIELDS}
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        self._to_hf(d)
        return d

    @classmethod
    def _hf_defaults(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
        del hf
        return {}

    @classmethod
    def _from_hf(cls, kw: dict[str, Any]) -> None:
        """Edits a config.json dict in place before `from_dict`."""

    def _to_hf(self, d: dict[str, Any]) -> None:
        """Edits the config.json dict in place after the fields and labels."""


def scan_layers(
    block: type[nn.Module],
    num_layers: int,
    remat_policy: str,
    block_kwargs: dict[str, Any],
    *,
    name: str,
    in_axes: tuple = (nn.broadcast, 0),
    unroll: int = 1,
) -> nn.Module:
    """`num_layers` copies of `block` run by `nn.scan`, params stacked on a leading `layers` axis.

    The block is called as `block(carry, *args) -> (carry, per_layer_outputs)`; `in_axes` says
    which args are shared by all layers (`nn.broadcast`) and which are sliced per layer (0).
    `unroll` layers run per loop iteration (a config's `scan_unroll`; `num_layers` unrolls the
    loop: no per-iteration stacking of the layer outputs, longer compiles).
    """
    if remat_policy == "offload":
        block = _named_input(block)
    if REMAT_POLICIES[remat_policy] is not None:
        block = nn.remat(block, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
        unroll=max(1, min(int(unroll), num_layers)),
    )
    return scanned(**block_kwargs, name=name)


def _named_input(block: type[nn.Module]) -> type[nn.Module]:
    """`block` whose carry (the layer's input) is tagged `LAYER_INPUT` for the offloading
    policies. A subclass, not a wrapper module: param paths stay the block's own."""
    from jax.ad_checkpoint import checkpoint_name

    def __call__(self, carry, *args, **kwargs):
        carry = jax.tree.map(lambda x: checkpoint_name(x, LAYER_INPUT), carry)
        return block.__call__(self, carry, *args, **kwargs)

    return type(block.__name__, (block,), {"__call__": __call__, "__module__": block.__module__})


def unstack(x: jax.Array | None) -> tuple | None:
    """`[layers, ...]` stacked scan outputs -> a tuple of per-layer arrays (HF's layout)."""
    return None if x is None else tuple(x[i] for i in range(x.shape[0]))


def check_scan_unroll(value: int) -> None:
    """A config's `scan_unroll` is a positive int (layers per scan iteration)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"scan_unroll must be an int >= 1 (layers per scan iteration), got {value!r}"
        )


def keep_from_mask(mask: jax.Array) -> jax.Array:
    """A 3D / 4D attention mask -> bool (True = attend), in either of transformers' forms: 0/1
    (1 = attend) or additive (0 = attend, a large negative = masked; all entries <= 0)."""
    m = jnp.asarray(mask)
    if m.dtype == jnp.bool_:
        return m
    return jnp.where(jnp.all(m <= 0), m == 0, m > 0)


def check_key_mask(mask, batch: int, length: int, name: str = "attention_mask") -> None:
    """Models that take only a `[batch, length]` key mask refuse other shapes in one line.

    Raises:
      InputError: `mask` is not None and not `[batch, length]`.
    """
    if mask is not None and tuple(jnp.shape(mask)) != (batch, length):
        raise InputError(
            f"{name} of shape {tuple(jnp.shape(mask))} is not supported here: expected "
            f"[batch, length] = [{batch}, {length}] (no 3D / 4D masks for this model)"
        )
