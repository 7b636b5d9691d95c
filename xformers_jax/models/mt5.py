"""mT5: the T5 v1.1 encoder-decoder (RMSNorm, no biases, gated-GELU, bucketed relative positions).

One bucketed relative-position table per stack, computed once before the layers and shared by all
of them (transformers computes it in layer 0 and passes it on: the same thing). Scores are not
scaled by `1/sqrt(d_kv)` (mesh-tf folds that into the query init). Layers are stacked with
`nn.scan` (param axis `layers`). Norms, softmax, logits and losses are float32 whatever `dtype`.

Besides the HF-style `__call__`s, `MT5ForConditionalGeneration` has the two hooks
`xformers_jax.decoding` drives: `init_decoding` (encoder once, cross-attention K/V once, an empty
fixed-size self-attention cache) and `decode_step` (one token for every row). Decoding caches are
layer-major and head-major (`[layers, rows, heads, positions, d_kv]`: a layer's slice is contiguous
and feeds the score matmul without a transpose); a step attends over the cache plus its own key,
and the new keys / values of all layers are written once after the layers. The cross-attention
K/V keep one row per input: beams of an input share it (`decoding_batch_axes`); beam search never
moves the self-attention cache, a step reads each slot from the row that wrote it
(`decoding_slot_caches`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax import decoding
from xformers_jax.layers import (
    DEFAULT_MASK_VALUE,
    MLP,
    DenseGeneral,
    Embed,
    RMSNorm,
    param_init,
)
from xformers_jax.layers.attention import Mask, attention
from xformers_jax.layers.losses import (
    cross_entropy_with_ignore,
    sequence_classification_loss,
    span_loss,
    token_classification_loss,
)
from xformers_jax.models import heads, outputs
from xformers_jax.models.base import (
    FamilyConfig,
    InputError,
    keep_from_mask,
    scan_layers,
    unstack,
)

_ACT = ("act_batch", "act_length", "act_embed")
_ACT_HEADS = ("act_batch", "act_length", "act_heads", "act_kv")


@dataclasses.dataclass(frozen=True)
class MT5Config(FamilyConfig):
    """Hyper-parameters; field names are transformers' `MT5Config` names.

    `dtype` (compute), `param_dtype` and `remat_policy` are ours and never written to config.json.
    `num_decoder_layers=None` means as many as the encoder (as in transformers).
    """

    model_type: str = "mt5"
    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int | None = None
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    classifier_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    # transformers' tie_encoder_decoder: the encoder's weights are the decoder's (self-attention,
    # FFN, norms, position table); checkpoints store them once, under decoder.*. Ours are loaded
    # as two equal copies and saved once again while they stay equal.
    tie_encoder_decoder: bool = False
    use_cache: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.tie_encoder_decoder and self.num_decoder_layers != self.num_layers:
            raise ValueError(
                f"tie_encoder_decoder needs as many decoder layers as encoder layers, got "
                f"num_layers={self.num_layers}, num_decoder_layers={self.num_decoder_layers}"
            )
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                "feed_forward_proj must be '<act>' or 'gated-<act>', "
                f"got {self.feed_forward_proj!r}"
            )

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation (gelu_new), as mesh-tf did.
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @property
    def hidden_size(self) -> int:
        return self.d_model

    def _to_hf(self, d: dict[str, Any]) -> None:
        d.update(is_encoder_decoder=True, tokenizer_class="T5Tokenizer")


_MT5 = dict(vocab_size=250112, d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: the default run and the tests.
    "tiny": dict(_MT5, vocab_size=8000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    # google/mt5-{small,base,large,xl,xxl}.
    "small": dict(_MT5, d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "base": dict(_MT5, d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "large": dict(_MT5, d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "xl": dict(_MT5, d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "xxl": dict(_MT5, d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
}


def architecture_name(config: MT5Config, class_name: str) -> str:
    """The transformers class name of head `class_name` (the same for every mT5 variant)."""
    return class_name


def _dtypes(cfg: MT5Config):
    return cfg.dtype, cfg.param_dtype


def _fan_in(cfg: MT5Config, in_axis, out_axis, extra: float = 1.0):
    """mesh-tf's init: normal with std `factor * sqrt(extra / fan_in)` (no truncation)."""
    return nn.initializers.variance_scaling(
        cfg.initializer_factor**2 * extra, "fan_in", "normal", in_axis=in_axis, out_axis=out_axis
    )


def shift_right(labels: jax.Array, start_id: int, pad_id: int) -> jax.Array:
    """Decoder inputs from labels: `[start, y_0, ..., y_{n-2}]`, -100 -> pad. `[b, n] -> [b, n]`."""
    labels = jnp.asarray(labels)
    shifted = jnp.concatenate(
        [jnp.full(labels.shape[:-1] + (1,), start_id, labels.dtype), labels[..., :-1]], axis=-1
    )
    return jnp.where(shifted == -100, pad_id, shifted)


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's buckets of `key_pos - query_pos`: exact for small distances, log-spaced up to
    `max_distance`, one bucket beyond. Bidirectional stacks give half the buckets to each sign;
    causal ones map every future position to bucket 0. Int array -> same-shape int32 buckets.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        n = jnp.abs(relative_position)
    else:
        n = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 log as in transformers: the bucket boundaries must match it exactly.
    safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return (buckets + jnp.where(is_small, n, large)).astype(jnp.int32)


class RelativePositionBias(nn.Module):
    """The `[buckets, heads]` table -> an additive score bias `[1, heads, q, k]` (float32)."""

    config: MT5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_positions: jax.Array, k_len: int) -> jax.Array:
        cfg = self.config
        rel = jnp.arange(k_len)[None, :] - q_positions[:, None]
        buckets = relative_position_bucket(
            rel, self.bidirectional, cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )  # fmt: skip
        init = nn.initializers.normal(cfg.initializer_factor * cfg.d_model**-0.5)
        table = self.param(
            "embedding", param_init(init, ("relpos", "heads")),
            (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.param_dtype,
        )  # fmt: skip
        values = jnp.take(jnp.asarray(table, jnp.float32), buckets, axis=0)  # [q, k, heads]
        return jnp.transpose(values, (2, 0, 1))[None]


class Attention(nn.Module):
    """T5 attention: bias-free projections, no score scaling, optional precomputed K/V.

    `[b, q, d_model]` queries over `[b, k, d_model]` keys -> `[b, q, d_model]` and probs.
    """

    config: MT5Config

    def setup(self):
        cfg = self.config
        dtype, pdtype = _dtypes(cfg)
        proj = lambda init: DenseGeneral(  # noqa: E731
            (cfg.num_heads, cfg.d_kv), ("embed", "heads", "kv"), use_bias=False, dtype=dtype,
            param_dtype=pdtype, kernel_init=init,
        )  # fmt: skip
        # mesh-tf folds 1/sqrt(d_kv) into the query init instead of scaling the scores.
        self.q = proj(_fan_in(cfg, 0, (1, 2), 1.0 / cfg.d_kv))
        self.k = proj(_fan_in(cfg, 0, (1, 2)))
        self.v = proj(_fan_in(cfg, 0, (1, 2)))
        self.o = DenseGeneral(cfg.d_model, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=False,
                              dtype=dtype, param_dtype=pdtype,
                              kernel_init=_fan_in(cfg, (0, 1), 2))  # fmt: skip

    def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`[b, k, d_model]` -> keys and values `[b, k, heads, d_kv]` (for caches)."""
        k = nn.with_logical_constraint(self.k(x), _ACT_HEADS)
        return k, nn.with_logical_constraint(self.v(x), _ACT_HEADS)

    def step(self, x, k_cache, v_cache, mask, bias=None, own_bias=None, slot_rows=None):
        """One query position per row against a head-major cache (decoding).

        Args:
          x: `[rows, 1, d_model]`.
          k_cache / v_cache: `[cache_rows, heads, n, d_kv]`; `rows = cache_rows * r`: r
            consecutive rows (the beams of an input) share a cache row.
          mask: bool, broadcastable to `[cache_rows, heads, r, n]`, True = attend.
          bias: `[1, heads, 1, n]` float32 relative-position bias, or None.
          own_bias: `[1, heads, 1, 1]` (self-attention): this position's own key and value, which
            are not in the cache yet, join the keys with this bias.
          slot_rows: `[rows, n]` int (beam search, see `xformers_jax.decoding`): slot s of row r
            is read from cache row `slot_rows[r, s]`.

        Returns:
          `([rows, 1, d_model], (k, v) [rows, heads, d_kv] of this position, or None)`.
        """
        dtype = self.config.dtype
        q = self.q(x)[:, 0]
        rows, heads, d = q.shape
        n = k_cache.shape[2]
        if slot_rows is not None:
            at = (slot_rows[:, None, :], jnp.arange(heads)[:, None], jnp.arange(n))
            k_cache, v_cache = k_cache[at], v_cache[at]
        r = rows // k_cache.shape[0]
        qg = q.reshape(-1, r, heads, d).transpose(0, 2, 1, 3)  # [cache_rows, heads, r, d]
        scores = jnp.einsum("bhrd,bhnd->bhrn", qg, k_cache, preferred_element_type=jnp.float32)
        if bias is not None:
            scores = scores + bias
        scores = jnp.where(mask, scores, DEFAULT_MASK_VALUE)
        own = None
        if own_bias is not None:
            k, v = (t[:, 0] for t in self.kv(x))
            own = (k, v)
            s_own = jnp.einsum("bhd,bhd->bh", q, k, preferred_element_type=jnp.float32)
            scores = jnp.concatenate([scores, s_own[:, :, None, None] + own_bias], axis=-1)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bhrn,bhnd->bhrd", probs[..., :n], v_cache.astype(dtype))
        if own is not None:
            out = out + probs[..., n:] * own[1][:, :, None, :].astype(dtype)
        out = out.transpose(0, 2, 1, 3).reshape(rows, 1, heads, d)
        return self.o(out), own

    def __call__(self, x, kv_x, mask, bias, deterministic: bool, kv=None, past=None,
                 head_mask=None, need_probs=False):  # fmt: skip
        """Full-sequence attention; `kv` precomputed keys / values (a cross-attention cache),
        `past` `(k, v)` `[b, P, heads, d_kv]` earlier positions the new keys are appended to,
        `head_mask` `[heads]` on the probabilities, `need_probs` the probabilities returned (else
        they may be None: a fused kernel). Returns `(out, probs, (k, v))`."""
        cfg = self.config
        q = nn.with_logical_constraint(self.q(x), _ACT_HEADS)
        k, v = self.kv(kv_x) if kv is None else kv
        if past is not None:
            k = jnp.concatenate([past[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([past[1].astype(v.dtype), v], axis=1)
        rng = None
        if not deterministic and cfg.dropout_rate > 0:
            rng = self.make_rng("dropout")
        out, probs = attention(
            q, k, v, mask=mask, bias=bias, head_mask=head_mask, scale=1.0,
            dropout_rate=cfg.dropout_rate, dropout_rng=rng, deterministic=deterministic,
            dtype=cfg.dtype, kernel=cfg.attention_kernel, need_probs=need_probs,
        )  # fmt: skip
        return self.o(out), probs, (k, v)


class Block(nn.Module):
    """One pre-norm block: self-attention, (decoder) cross-attention, gated FFN; scanned.

    `mode` picks what a call computes: `'full'` (a whole sequence), `'step'` (one token against
    the fixed-size caches, which it returns updated) or `'cross_kv'` (only the cross-attention
    K/V of the encoder output, for the cache).
    """

    config: MT5Config
    is_decoder: bool
    mode: str = "full"
    deterministic: bool = True
    output_hidden_states: bool = False
    output_attentions: bool = False

    use_cache: bool = False

    @nn.compact
    def __call__(self, x, mask, bias, enc, enc_mask, cache, head_mask=None, cross_head_mask=None):
        """`cache`: the decoding caches (`'step'`), or in `'full'` mode this layer's
        `past_key_values` (`self_k`, `self_v`, `cross_k`, `cross_v` `[b, P, heads, d_kv]`) or
        None; `head_mask` / `cross_head_mask` `[heads]` (transformers' per-layer head masks)."""
        cfg = self.config
        dtype, pdtype = _dtypes(cfg)
        norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, dtype, pdtype, name=name)  # noqa: E731
        drop = lambda h: nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)  # noqa: E731
        self_attn = Attention(cfg, name="self_attention")
        cross_attn = Attention(cfg, name="cross_attention") if self.is_decoder else None
        if self.mode == "cross_kv":  # head-major, for `Attention.step`
            return x, tuple(t.transpose(0, 2, 1, 3) for t in cross_attn.kv(enc))
        if self.mode == "step":
            return self._step(x, mask, bias, enc_mask, cache, norm, self_attn, cross_attn)

        past = cache
        h = norm("self_attention_norm")(x)
        self_past = None if past is None else (past["self_k"], past["self_v"])
        a, probs, (k, v) = self_attn(h, h, mask, bias, self.deterministic, past=self_past,
                                     head_mask=head_mask,
                                     need_probs=self.output_attentions)  # fmt: skip
        present = dict(self_k=k, self_v=v)
        x = x + drop(a)
        cross_probs = None
        if self.is_decoder:
            h = norm("cross_attention_norm")(x)
            kv = None if past is None or "cross_k" not in past else (
                past["cross_k"], past["cross_v"]
            )  # fmt: skip
            a, cross_probs, (ck, cv) = cross_attn(h, enc, enc_mask, None, self.deterministic,
                                                  kv=kv, head_mask=cross_head_mask,
                                                  need_probs=self.output_attentions)  # fmt: skip
            present.update(cross_k=ck, cross_v=cv)
            x = x + drop(a)
        x = x + drop(self._mlp()(norm("mlp_norm")(x), deterministic=self.deterministic))
        x = nn.with_logical_constraint(x, _ACT)
        ys = (
            x if self.output_hidden_states else None,
            probs if self.output_attentions else None,
            cross_probs if self.output_attentions else None,
            present if self.use_cache else None,
        )
        return x, ys

    def _mlp(self):
        cfg = self.config
        dtype, pdtype = _dtypes(cfg)
        return MLP(cfg.d_ff, cfg.activation, use_bias=False, gated=cfg.is_gated,
                   dropout_rate=cfg.dropout_rate, dtype=dtype, param_dtype=pdtype,
                   kernel_init=_fan_in(cfg, -2, -1), name="mlp")  # fmt: skip

    def _step(self, x, mask, bias, enc_mask, cache, norm, self_attn, cross_attn):
        """Decoding: `x` `[rows, 1, d_model]` against this layer's caches (head-major); returns
        `(x, (k, v))`, this position's self-attention key and value for the cache."""
        a, own = self_attn.step(norm("self_attention_norm")(x), cache["self_k"], cache["self_v"],
                                mask, *bias)  # fmt: skip
        x = x + a
        h = norm("cross_attention_norm")(x)
        x = x + cross_attn.step(h, cache["cross_k"], cache["cross_v"], enc_mask)[0]
        x = x + self._mlp()(norm("mlp_norm")(x), deterministic=True)
        return x, own


class Stack(nn.Module):
    """The encoder or the decoder: shared relative-position bias, scanned blocks, final norm.

    Takes embedded inputs `[b, n, d_model]`; see `Block` for `mode`.
    """

    config: MT5Config
    is_decoder: bool

    @nn.compact
    def __call__(
        self, x, attention_mask=None, enc=None, enc_mask=None, *, deterministic=True,
        output_hidden_states=False, output_attentions=False, mode="full", index=None, cache=None,
        slot_rows=None, past=None, use_cache=False, head_mask=None, cross_head_mask=None,
    ):  # fmt: skip
        """`past`: the decoder's `past_key_values` in our layout (`self_k`, ... `[layers, b, P,
        heads, d_kv]`, see `past_from_legacy`); `use_cache` returns the updated ones fifth;
        `head_mask` / `cross_head_mask` as transformers takes them (`[heads]` or
        `[layers, heads]`)."""
        cfg = self.config
        dtype, pdtype = _dtypes(cfg)
        n_layers = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        relpos = RelativePositionBias(cfg, not self.is_decoder, name="relative_attention_bias")
        kw = dict(config=cfg, is_decoder=self.is_decoder, mode=mode, deterministic=deterministic)
        cross_mask = None
        if enc_mask is not None:
            q_enc = enc_mask.shape[-2] if enc_mask.ndim > 2 else 1
            cross_mask = key_mask_4d(enc_mask, enc_mask.shape[0], q_enc, enc_mask.shape[-1],
                                     "encoder attention_mask")  # fmt: skip
            # A 3D / 4D encoder mask: the decoder attends to the keys some encoder query sees.
            cross_mask = jnp.any(cross_mask, axis=2, keepdims=True)
        if mode != "full":
            # Decoding: caches are layer-major `[layers, rows, heads, n, d_kv]`.
            scanned = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 4 + (0,), out_axes=0, length=n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(**kw, name="layers")  # fmt: skip
            if mode == "cross_kv":
                return scanned(x, None, None, enc, None, None)[1]
            length = cache["self_k"].shape[3]
            # Cache slots before `index` hold the earlier positions; this one joins as `own`.
            mask = (jnp.arange(length) < index)[None, None, None, :]
            bias = relpos(jnp.reshape(index, (1,)), length)
            own_bias = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=3)
            x, (k, v) = scanned(x, mask, (bias, own_bias, slot_rows), None, cross_mask, cache)
            at = (0, 0, 0, index, 0)
            cache = dict(
                cache,
                self_k=jax.lax.dynamic_update_slice(cache["self_k"], k[:, :, :, None], at),
                self_v=jax.lax.dynamic_update_slice(cache["self_v"], v[:, :, :, None], at),
            )  # fmt: skip
            return RMSNorm(cfg.layer_norm_epsilon, dtype, pdtype, name="final_norm")(x), cache

        batch, length = x.shape[:2]
        past_len = 0 if past is None else past["self_k"].shape[2]
        total = past_len + length
        name = "decoder_attention_mask" if self.is_decoder else "attention_mask"
        if past is None and (attention_mask is None or jnp.ndim(attention_mask) == 2):
            # The structured mask: what the fused kernels take as segment ids / causal mode.
            key = None if attention_mask is None else jnp.asarray(attention_mask)
            if key is not None and key.shape != (batch, length):
                key_mask_4d(key, batch, length, total, name)  # raises, naming the shape
            mask = Mask(key, causal=self.is_decoder)
        else:
            mask = key_mask_4d(attention_mask, batch, length, total, name)
            if self.is_decoder:
                causal = jnp.arange(total)[None, :] <= jnp.arange(length)[:, None] + past_len
                mask = mask & causal
        bias = relpos(jnp.arange(past_len, total), total)
        full_cross = cross_mask
        if enc_mask is not None and jnp.ndim(enc_mask) == 2:
            full_cross = Mask(jnp.asarray(enc_mask))  # structured, for the fused kernels
        x = emb = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        kw.update(output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                  use_cache=use_cache)  # fmt: skip
        heads_ = layer_head_mask(head_mask, n_layers, cfg.num_heads, "head_mask")
        cross_heads = layer_head_mask(
            cross_head_mask, n_layers, cfg.num_heads, "cross_attn_head_mask"
        )
        x, (hs, probs, cross, present) = scan_layers(
            Block,
            n_layers,
            cfg.remat_policy,
            kw,
            name="layers",
            in_axes=(nn.broadcast,) * 4 + (0, 0, 0),
            unroll=cfg.scan_unroll,
        )(x, mask, bias, enc, full_cross, past, heads_, cross_heads)
        x = RMSNorm(cfg.layer_norm_epsilon, dtype, pdtype, name="final_norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        hidden_states = (emb, *unstack(hs)[:-1], x) if output_hidden_states else None
        if use_cache:
            return x, hidden_states, unstack(probs), unstack(cross), present
        return x, hidden_states, unstack(probs), unstack(cross)


def key_mask_4d(mask, batch: int, q: int, k: int, name: str) -> jax.Array:
    """An HF attention mask -> boolean `[batch, 1, q or 1, k]` (True = attend).

    `[batch, k]` 0/1 (None: all ones), or 3D / 4D masks `[batch, q, k]`, `[batch, 1, q, k]`,
    0/1 or additive (0 / large negative, as transformers' 4D decoder masks; `keep_from_mask`).

    Raises:
      InputError: any other shape, naming it and the shapes expected.
    """
    if mask is None:
        return jnp.ones((batch, 1, 1, k), bool)
    m = jnp.asarray(mask)
    if m.ndim == 2 and m.shape[1] == k:
        return m[:, None, None, :] > 0
    if m.ndim == 3 and m.shape[1:] in ((q, k), (1, k)):
        return keep_from_mask(m[:, None])
    if m.ndim == 4 and m.shape[1] == 1 and m.shape[2:] in ((q, k), (1, k)):
        return keep_from_mask(m)
    raise InputError(
        f"{name} of shape {tuple(m.shape)} does not fit: expected [batch, {k}], "
        f"[batch, {q}, {k}] or [batch, 1, {q}, {k}]"
    )


def layer_head_mask(head_mask, num_layers: int, num_heads: int, name: str):
    """HF head mask `[heads]` or `[layers, heads]` (1 keep, 0 drop) -> `[layers, heads]` or None.

    Raises:
      InputError: another shape, naming it.
    """
    if head_mask is None:
        return None
    m = jnp.asarray(head_mask, jnp.float32)
    if m.ndim == 1 and m.shape[0] == num_heads:
        m = jnp.broadcast_to(m, (num_layers, num_heads))
    if m.shape != (num_layers, num_heads):
        raise InputError(
            f"{name} must be [heads] or [layers, heads] = [{num_layers}, {num_heads}], "
            f"got {tuple(m.shape)}"
        )
    return m


def past_from_legacy(past_key_values, num_layers: int):
    """transformers' legacy cache (per layer `(self_k, self_v[, cross_k, cross_v])`, each
    `[b, heads, P, d_kv]`) -> a dict of `[layers, b, P, heads, d_kv]` arrays (None for None)."""
    if past_key_values is None:
        return None
    if len(past_key_values) != num_layers:
        raise InputError(
            f"past_key_values has {len(past_key_values)} layers, the decoder {num_layers}"
        )
    names = ("self_k", "self_v", "cross_k", "cross_v")[: len(past_key_values[0])]
    return {
        name: jnp.stack([jnp.swapaxes(jnp.asarray(layer[i]), 1, 2) for layer in past_key_values])
        for i, name in enumerate(names)
    }


def legacy_from_present(present) -> tuple:
    """Stacked `[layers, b, n, heads, d_kv]` K/V dict -> transformers' legacy per-layer tuples."""
    names = [n for n in ("self_k", "self_v", "cross_k", "cross_v") if n in present]
    return tuple(
        tuple(jnp.swapaxes(present[name][i], 1, 2) for name in names)
        for i in range(present["self_k"].shape[0])
    )


def _shared(cfg: MT5Config) -> Embed:
    dtype, pdtype = _dtypes(cfg)
    init = nn.initializers.normal(cfg.initializer_factor)
    return Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), dtype, pdtype, init)


class MT5EncoderModel(nn.Module):
    """The encoder alone (HF `MT5EncoderModel`): `[b, n]` ids -> `BaseModelOutput`."""

    config: MT5Config

    def setup(self):
        self.shared = _shared(self.config)
        self.encoder = Stack(self.config, is_decoder=False)

    def __call__(
        self, input_ids=None, attention_mask=None, inputs_embeds=None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True, head_mask=None,
    ) -> outputs.BaseModelOutput:  # fmt: skip
        x = _embed(self.shared, input_ids, inputs_embeds, "input_ids")
        x, hs, probs, _ = self.encoder(
            x, attention_mask, deterministic=deterministic,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            head_mask=head_mask,
        )  # fmt: skip
        return outputs.BaseModelOutput(last_hidden_state=x, hidden_states=hs, attentions=probs)


def _embed(shared, ids, embeds, name: str):
    if (ids is None) == (embeds is None):
        raise ValueError(f"pass exactly one of {name} and {name.replace('_ids', '')}_embeds")
    return shared(ids) if embeds is None else jnp.asarray(embeds)


def _encoder_states(encoder_outputs):
    """`encoder_outputs` as transformers takes them (a tuple / output whose first entry is the
    last hidden state, or that array) -> `[b, n, d_model]`."""
    if hasattr(encoder_outputs, "last_hidden_state"):
        return encoder_outputs.last_hidden_state
    if isinstance(encoder_outputs, (tuple, list)):
        return encoder_outputs[0]
    return encoder_outputs


class MT5Model(nn.Module):
    """Encoder + decoder over one shared embedding (HF `MT5Model`).

    `input_ids` `[b, n]`, `decoder_input_ids` `[b, m]` -> `Seq2SeqModelOutput` with
    `last_hidden_state` `[b, m, d_model]` and `encoder_last_hidden_state` `[b, n, d_model]`.
    As transformers: `encoder_outputs` (then the encoder does not run), `head_mask` /
    `decoder_head_mask` / `cross_attn_head_mask` (`[heads]` or `[layers, heads]`), and
    `past_key_values` (legacy per-layer `(self_k, self_v, cross_k, cross_v)`,
    `[b, heads, P, d_kv]`; the decoder inputs are then the positions after P) with `use_cache`
    returning the updated ones.
    """

    config: MT5Config

    def setup(self):
        self.shared = _shared(self.config)
        self.encoder = Stack(self.config, is_decoder=False)
        self.decoder = Stack(self.config, is_decoder=True)

    def encode(self, input_ids, attention_mask=None, inputs_embeds=None, *, deterministic=True,
               output_attentions=False, output_hidden_states=False, head_mask=None):  # fmt: skip
        """`[b, n]` ids -> (`[b, n, d_model]`, hidden states, attentions)."""
        x = _embed(self.shared, input_ids, inputs_embeds, "input_ids")
        x, hs, probs, _ = self.encoder(
            x, attention_mask, deterministic=deterministic,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            head_mask=head_mask,
        )  # fmt: skip
        return x, hs, probs

    def decode(self, decoder_input_ids, enc, enc_mask, decoder_attention_mask=None,
               decoder_inputs_embeds=None, *, deterministic=True, output_attentions=False,
               output_hidden_states=False, past=None, use_cache=False, head_mask=None,
               cross_head_mask=None):  # fmt: skip
        """`[b, m]` ids over encoder states `[b, n, d_model]` -> (`[b, m, d_model]`, hs, attn,
        cross attn[, present K/V when use_cache])."""
        x = _embed(self.shared, decoder_input_ids, decoder_inputs_embeds, "decoder_input_ids")
        return self.decoder(
            x, decoder_attention_mask, enc, enc_mask, deterministic=deterministic,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            past=past, use_cache=use_cache, head_mask=head_mask, cross_head_mask=cross_head_mask,
        )  # fmt: skip

    def __call__(
        self, input_ids=None, attention_mask=None, decoder_input_ids=None,
        decoder_attention_mask=None, inputs_embeds=None, decoder_inputs_embeds=None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True, head_mask=None, decoder_head_mask=None,
        cross_attn_head_mask=None, encoder_outputs=None, past_key_values=None,
        use_cache: bool = False,
    ) -> outputs.Seq2SeqModelOutput:  # fmt: skip
        cfg = self.config
        flags = dict(deterministic=deterministic, output_attentions=output_attentions,
                     output_hidden_states=output_hidden_states)  # fmt: skip
        if encoder_outputs is not None:
            enc, enc_hs, enc_attn = _encoder_states(encoder_outputs), None, None
        else:
            enc, enc_hs, enc_attn = self.encode(input_ids, attention_mask, inputs_embeds,
                                                head_mask=head_mask, **flags)  # fmt: skip
        if attention_mask is None:
            attention_mask = jnp.ones(enc.shape[:2], jnp.int32)
        past = past_from_legacy(past_key_values, cfg.num_decoder_layers)
        x, hs, attn, cross, *present = self.decode(
            decoder_input_ids, enc, attention_mask, decoder_attention_mask, decoder_inputs_embeds,
            past=past, use_cache=use_cache, head_mask=decoder_head_mask,
            cross_head_mask=cross_attn_head_mask, **flags,
        )  # fmt: skip
        return outputs.Seq2SeqModelOutput(
            last_hidden_state=x, decoder_hidden_states=hs, decoder_attentions=attn,
            cross_attentions=cross, encoder_last_hidden_state=enc, encoder_hidden_states=enc_hs,
            encoder_attentions=enc_attn,
            past_key_values=legacy_from_present(present[0]) if use_cache else None,
        )  # fmt: skip


@decoding.generator
class MT5ForConditionalGeneration(nn.Module):
    """mT5 with its LM head (HF `MT5ForConditionalGeneration`): logits `[b, m, vocab]` (float32).

    `labels` `[b, m]` (-100 = ignore) gives HF's mean cross-entropy and, without
    `decoder_input_ids`, the decoder inputs (labels shifted right). The head is untied unless
    `tie_word_embeddings`, in which case the decoder output is scaled by `d_model ** -0.5` first.
    """

    config: MT5Config

    def setup(self):
        cfg = self.config
        self.model = MT5Model(cfg)
        if not cfg.tie_word_embeddings:
            dtype, pdtype = _dtypes(cfg)
            self.lm_head = DenseGeneral(
                cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype,
                param_dtype=pdtype, kernel_init=_fan_in(cfg, -2, -1),
            )  # fmt: skip

    def logits(self, x: jax.Array) -> jax.Array:
        """Decoder output `[..., d_model]` -> float32 logits `[..., vocab]`."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            logits = self.model.shared.attend(x * cfg.d_model**-0.5)
        else:
            logits = self.lm_head(x)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        return logits.astype(jnp.float32)

    def __call__(
        self, input_ids=None, attention_mask=None, decoder_input_ids=None,
        decoder_attention_mask=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True, head_mask=None, decoder_head_mask=None,
        cross_attn_head_mask=None, encoder_outputs=None, past_key_values=None,
        use_cache: bool = False,
    ) -> outputs.Seq2SeqLMOutput:  # fmt: skip
        cfg = self.config
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
        out = self.model(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, inputs_embeds,
            decoder_inputs_embeds, output_attentions, output_hidden_states, deterministic,
            head_mask, decoder_head_mask, cross_attn_head_mask, encoder_outputs, past_key_values,
            use_cache,
        )  # fmt: skip
        logits = self.logits(out.last_hidden_state)
        loss = None if labels is None else cross_entropy_with_ignore(logits, labels)
        return outputs.Seq2SeqLMOutput(loss=loss, logits=logits, **_seq2seq_fields(out))

    # ---- generation hooks (see xformers_jax.decoding) -------------------------------------------

    def init_decoding(self, input_ids, attention_mask, max_length: int) -> dict[str, Any]:
        """Runs the encoder once and builds the decoding context.

        Args:
          input_ids / attention_mask: `[b, n]` encoder inputs.
          max_length: decoder positions to cache (including the start token).

        Returns:
          `encoder_attention_mask` `[b, n]` and `cache` with `self_k`/`self_v`
          `[layers, b, heads, max_length, d_kv]` (zeros) and `cross_k`/`cross_v`
          `[layers, b, heads, n, d_kv]` (rows on axis 1; the encoder's leaves are per input,
          see `decoding_batch_axes`).
        """
        cfg = self.config
        enc, _, _ = self.model.encode(input_ids, attention_mask)
        cross_k, cross_v = self.model.decoder(enc, enc=enc, mode="cross_kv")
        b = input_ids.shape[0]
        shape = (cfg.num_decoder_layers, b, cfg.num_heads, max_length, cfg.d_kv)
        zeros = jnp.zeros(shape, cfg.dtype)
        cache = dict(self_k=zeros, self_v=zeros, cross_k=cross_k, cross_v=cross_v)
        return dict(encoder_attention_mask=attention_mask, cache=cache)

    @staticmethod
    def decoding_batch_axes(context: dict[str, Any]) -> dict[str, Any]:
        """Row axes of the decoding context (see `xformers_jax.decoding`): the self-attention
        cache per sequence on axis 1; the encoder mask and cross-attention K/V per input."""
        del context
        cache = dict(self_k=1, self_v=1, cross_k=None, cross_v=None)
        return dict(encoder_attention_mask=None, cache=cache)

    @staticmethod
    def decoding_slot_caches(context: dict[str, Any]) -> dict[str, Any]:
        """A step writes the self-attention cache at its own slot only, so beam search leaves it
        in place and a step reads it through `slot_rows` (see `xformers_jax.decoding`)."""
        del context
        cache = dict(self_k=True, self_v=True, cross_k=False, cross_v=False)
        return dict(encoder_attention_mask=False, cache=cache)

    def decode_step(self, tokens, index, context):
        """One decoder position for every row.

        Args:
          tokens: `[b]` the token at position `index`.
          index: scalar int, the position (0 = the start token).
          context: from `init_decoding` (or a previous step).

        Returns:
          `(logits [b, vocab] float32 for position index + 1, updated context)`.
        """
        x = self.model.shared(tokens[:, None])
        x, cache = self.model.decoder(
            x, enc_mask=context["encoder_attention_mask"], mode="step", index=index,
            cache=context["cache"], slot_rows=context.get("slot_rows"),
        )  # fmt: skip
        return self.logits(x)[:, 0], dict(context, cache=cache)


def _seq2seq_fields(out: outputs.Seq2SeqModelOutput) -> dict[str, Any]:
    return dict(
        past_key_values=out.past_key_values,
        decoder_hidden_states=out.decoder_hidden_states, decoder_attentions=out.decoder_attentions,
        cross_attentions=out.cross_attentions, encoder_last_hidden_state=(
            out.encoder_last_hidden_state),
        encoder_hidden_states=out.encoder_hidden_states,
        encoder_attentions=out.encoder_attentions,
    )  # fmt: skip


def _encoder_decoder(
    cfg: MT5Config, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, *flags,
    **kw,
) -> outputs.Seq2SeqModelOutput:  # fmt: skip
    """`MT5Model` (named `model`) in the caller's scope, decoder inputs defaulting to
    `input_ids` shifted right (transformers' rule for the classification and QA heads)."""
    if decoder_input_ids is None and kw.get("decoder_inputs_embeds") is None:
        if input_ids is None:
            raise ValueError(
                "with inputs_embeds, pass decoder_input_ids or decoder_inputs_embeds (there are "
                "no input_ids to shift right)"
            )
        decoder_input_ids = shift_right(input_ids, cfg.decoder_start_token_id, cfg.pad_token_id)
    return MT5Model(cfg, name="model")(
        input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
        kw.pop("inputs_embeds", None), kw.pop("decoder_inputs_embeds", None), *flags, **kw,
    )  # fmt: skip


def _dense(cfg: MT5Config, features: int, axes, name: str) -> DenseGeneral:
    dtype, pdtype = _dtypes(cfg)
    init = nn.initializers.normal(cfg.initializer_factor * cfg.d_model**-0.5)
    return DenseGeneral(features, axes, dtype=dtype, param_dtype=pdtype, kernel_init=init,
                        name=name)  # fmt: skip


class MT5ForSequenceClassification(nn.Module):
    """Classifies with the decoder state at the last EOS of `input_ids` (HF's rule).

    Decoder inputs default to `input_ids` shifted right. Rows without an EOS use position 0.
    Returns `Seq2SeqSequenceClassifierOutput` with `logits` `[b, num_labels]` (float32).
    """

    config: MT5Config

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, decoder_input_ids=None,
        decoder_attention_mask=None, labels=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True, head_mask=None,
        decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
        inputs_embeds=None, decoder_inputs_embeds=None, use_cache: bool = False,
    ) -> outputs.Seq2SeqSequenceClassifierOutput:  # fmt: skip
        cfg = self.config
        if input_ids is None:  # transformers too: the EOS positions come from the ids
            raise NotImplementedError(
                "MT5ForSequenceClassification needs input_ids (it pools at their last EOS); "
                "inputs_embeds alone are not supported, as in transformers"
            )
        out = _encoder_decoder(
            cfg, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
            output_attentions, output_hidden_states, deterministic, head_mask=head_mask,
            decoder_head_mask=decoder_head_mask, cross_attn_head_mask=cross_attn_head_mask,
            encoder_outputs=encoder_outputs, inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds, use_cache=use_cache,
        )  # fmt: skip
        n = input_ids.shape[1]
        last_eos = n - 1 - jnp.argmax((input_ids == cfg.eos_token_id)[:, ::-1], axis=1)
        last_eos = jnp.where(jnp.any(input_ids == cfg.eos_token_id, axis=1), last_eos, 0)
        x = jnp.take_along_axis(out.last_hidden_state, last_eos[:, None, None], axis=1)[:, 0]
        logits = heads.classification_head(
            functools.partial(_dense, cfg), x, cfg.d_model, cfg.num_labels,
            cfg.classifier_dropout, jnp.tanh, deterministic,
        ).astype(jnp.float32)  # fmt: skip
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(logits, labels, cfg.num_labels, cfg.problem_type)
        return outputs.Seq2SeqSequenceClassifierOutput(
            loss=loss, logits=logits, **_seq2seq_fields(out)
        )


class MT5ForTokenClassification(nn.Module):
    """Encoder + dropout + linear per token (HF `MT5ForTokenClassification`).

    Returns `TokenClassifierOutput` with `logits` `[b, n, num_labels]`; `labels` (-100 = ignore).
    """

    config: MT5Config

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True, head_mask=None,
    ) -> outputs.TokenClassifierOutput:  # fmt: skip
        cfg = self.config
        out = MT5EncoderModel(cfg, name="model")(
            input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states,
            deterministic, head_mask,
        )  # fmt: skip
        x = nn.Dropout(cfg.classifier_dropout)(out.last_hidden_state, deterministic=deterministic)
        logits = _dense(cfg, cfg.num_labels, ("embed", "classes"), "classifier")(x)
        logits = logits.astype(jnp.float32)
        loss = None
        if labels is not None:
            loss = token_classification_loss(logits, heads.token_labels(labels, logits))
        return outputs.TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class MT5ForQuestionAnswering(nn.Module):
    """Span start/end logits `[b, m]` from the decoder states (HF `MT5ForQuestionAnswering`).

    Decoder inputs default to `input_ids` shifted right. `start_positions` / `end_positions`
    `[b]` give HF's loss (positions outside `[0, m)` are ignored).
    """

    config: MT5Config

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, decoder_input_ids=None,
        decoder_attention_mask=None, start_positions=None, end_positions=None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True, head_mask=None, decoder_head_mask=None,
        cross_attn_head_mask=None, encoder_outputs=None, inputs_embeds=None,
        decoder_inputs_embeds=None, use_cache: bool = False,
    ) -> outputs.Seq2SeqQuestionAnsweringModelOutput:  # fmt: skip
        cfg = self.config
        out = _encoder_decoder(
            cfg, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
            output_attentions, output_hidden_states, deterministic, head_mask=head_mask,
            decoder_head_mask=decoder_head_mask, cross_attn_head_mask=cross_attn_head_mask,
            encoder_outputs=encoder_outputs, inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds, use_cache=use_cache,
        )  # fmt: skip
        # transformers' qa_outputs has num_labels outputs; start and end are the first two.
        start, end = heads.span_logits(
            functools.partial(_dense, cfg), out.last_hidden_state, cfg.num_labels
        )
        start, end = start.astype(jnp.float32), end.astype(jnp.float32)
        loss = None
        if start_positions is not None and end_positions is not None:
            # HF clamps to [0, m] and ignores m: out-of-range positions add no loss.
            loss = span_loss(start, end, start_positions, end_positions)
        return outputs.Seq2SeqQuestionAnsweringModelOutput(
            loss=loss, start_logits=start, end_logits=end, **_seq2seq_fields(out)
        )
