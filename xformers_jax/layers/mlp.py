"""The transformer feed-forward block and the activation table shared by all families."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax.layers.dense import DenseGeneral, Initializer

_SQRT_2_OVER_PI = 0.7978845608028654
_SQRT_2_OVER_PI_E = 0.7978845608028654 * 0.044715


@jax.custom_jvp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (`gelu_new`), with a one-residual derivative.

    Autodiff of the formula keeps several intermediates per element for the backward pass; the
    closed-form derivative keeps one array (`f'(x)`), so the backward fusion reads 1 input
    instead of ~6.
    """
    return 0.5 * x * (1.0 + jnp.tanh(x * (_SQRT_2_OVER_PI + _SQRT_2_OVER_PI_E * x * x)))


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    th = jnp.tanh(x * (_SQRT_2_OVER_PI + _SQRT_2_OVER_PI_E * x * x))
    dinner = _SQRT_2_OVER_PI + 3.0 * _SQRT_2_OVER_PI_E * x * x
    grad = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dinner
    return 0.5 * x * (1.0 + th), grad * t


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Activation by its transformers name (`hidden_act`)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


class MLP(nn.Module):
    """`wi` (embed -> mlp), activation, `wo` (mlp -> embed). `[b, t, embed] -> [b, t, embed]`.

    `gated=True` gives the gated variant used by T5 v1.1 (`wi_0` activated times `wi_1`).
    """

    intermediate_size: int
    activation: str = "gelu"
    use_bias: bool = True
    gated: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        act = get_activation(self.activation)
        dense = lambda feats, axes, name: DenseGeneral(  # noqa: E731
            feats,
            kernel_axes=axes,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            name=name,
        )
        if self.gated:
            h = act(dense(self.intermediate_size, ("embed", "mlp"), "wi_0")(x))
            h = h * dense(self.intermediate_size, ("embed", "mlp"), "wi_1")(x)
        else:
            h = act(dense(self.intermediate_size, ("embed", "mlp"), "wi")(x))
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(x.shape[-1], ("mlp", "embed"), "wo")(h)
