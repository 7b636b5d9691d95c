"""Pieces every family module shares: dtype names, remat policies, the layer scan."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax.config_lib import UserError


class InputError(UserError, ValueError):
    """Inputs a model cannot take (e.g. longer than its position table); the message says why."""


# Named remat policies (`model.remat_policy` in configs). 'none' keeps every activation.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
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


def unstack(x: jax.Array | None) -> tuple | None:
    """`[layers, ...]` stacked scan outputs -> a tuple of per-layer arrays (HF's layout)."""
    return None if x is None else tuple(x[i] for i in range(x.shape[0]))


def check_scan_unroll(value: int) -> None:
    """A config's `scan_unroll` is a positive int (layers per scan iteration)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"scan_unroll must be an int >= 1 (layers per scan iteration), got {value!r}"
        )
