"""XLM-RoBERTa-XL (pre-LN) and XLM-R / XLM-V (post-LN): one module, two block variants.

`model_type` picks the block as transformers does: `xlm-roberta-xl` is pre-LN with no embedding
LayerNorm and a final LayerNorm; `xlm-roberta` (XLM-R, XLM-V) is post-LN with an embedding
LayerNorm. Layers are stacked with `nn.scan` (param axis `layers`), optionally rematerialised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax.layers import (
    MLP,
    DenseGeneral,
    Embed,
    LayerNorm,
    causal_mask,
    get_activation,
    padding_mask,
)
from xformers_jax.layers.attention import Mask, attention
from xformers_jax.layers.dense import residual
from xformers_jax.models import heads, outputs
from xformers_jax.models.base import (
    FamilyConfig,
    InputError,
    keep_from_mask,
    scan_layers,
    unstack,
)

MODEL_TYPES = ("xlm-roberta-xl", "xlm-roberta")
POSITION_TYPES = ("absolute", "relative_key", "relative_key_query")


@dataclasses.dataclass(frozen=True)
class XLMRobertaConfig(FamilyConfig):
    """Hyper-parameters; field names are transformers' config.json names.

    `dtype` (compute), `param_dtype` and `remat_policy` are ours and never written to config.json.
    """

    model_type: str = "xlm-roberta-xl"
    vocab_size: int = 250880
    hidden_size: int = 2560
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    intermediate_size: int = 10240
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None
    is_decoder: bool = False
    add_cross_attention: bool = False
    use_cache: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.position_embedding_type not in POSITION_TYPES:
            raise ValueError(
                f"position_embedding_type must be one of {POSITION_TYPES}, "
                f"got {self.position_embedding_type!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        get_activation(self.hidden_act)
        if self.add_cross_attention and not self.is_decoder:
            raise ValueError("add_cross_attention=True needs is_decoder=True (as in transformers)")

    @property
    def pre_ln(self) -> bool:
        return self.model_type == "xlm-roberta-xl"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def _hf_defaults(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
        return _HF_DEFAULTS[hf.get("model_type", "xlm-roberta-xl")]

    def _to_hf(self, d: dict[str, Any]) -> None:
        d["layer_norm_eps"] = float(self.layer_norm_eps)


# transformers' config-class defaults, which a hand-written config.json relies on.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "xlm-roberta": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
        layer_norm_eps=1e-12,
    ),
    "xlm-roberta-xl": dict(
        vocab_size=250880, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
        intermediate_size=10240, max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5,
    ),
}  # fmt: skip

_BASE = dict(
    model_type="xlm-roberta",
    vocab_size=250002,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
)
PRESETS: dict[str, dict[str, Any]] = {
    # A CPU-sized XL-style model for the default run and the tests.
    "tiny": dict(
        model_type="xlm-roberta-xl",
        vocab_size=8000,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=258,
    ),
    "xlm-roberta-base": _BASE,
    "xlm-roberta-large": dict(
        _BASE,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
    ),
    "xlm-v-base": dict(_BASE, vocab_size=901629),
    # facebook/xlm-roberta-xl and -xxl.
    "xl": dict(
        model_type="xlm-roberta-xl",
        vocab_size=250880,
        hidden_size=2560,
        num_hidden_layers=36,
        num_attention_heads=32,
        intermediate_size=10240,
    ),
    "xxl": dict(
        model_type="xlm-roberta-xl",
        vocab_size=250880,
        hidden_size=4096,
        num_hidden_layers=48,
        num_attention_heads=32,
        intermediate_size=16384,
    ),
}


def position_ids_from_input_ids(
    input_ids: jax.Array, padding_idx: int, past_length: int | jax.Array = 0
) -> jax.Array:
    """fairseq positions: real tokens count up from `padding_idx + 1`, padding keeps `padding_idx`.

    `[batch, length]` -> `[batch, length]` int32.
    """
    real = (input_ids != padding_idx).astype(jnp.int32)
    return (jnp.cumsum(real, axis=1) + past_length) * real + padding_idx


class Embeddings(nn.Module):
    """Word + token-type (+ absolute position) embeddings; post-LN models add a LayerNorm."""

    config: XLMRobertaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds=None):
        cfg = self.config
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        init = nn.initializers.normal(cfg.initializer_range)
        word = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), dtype, pdtype, init,
                     name="word_embeddings")  # fmt: skip
        x = word(input_ids) if inputs_embeds is None else jnp.asarray(inputs_embeds, dtype)
        types = Embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), dtype, pdtype, init,
                      name="token_type_embeddings")  # fmt: skip
        x = x + types(token_type_ids)
        if cfg.position_embedding_type == "absolute":
            pos = Embed(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), dtype,
                        pdtype, init, name="position_embeddings")  # fmt: skip
            x = x + pos(position_ids)
        if not cfg.pre_ln:
            x = LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="norm")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class SelfAttention(nn.Module):
    """Multi-head attention with absolute or BERT-style relative (key / key-query) scores.

    `[batch, length, embed] -> [batch, length, embed]`, plus `[batch, heads, q, k]` probs and the
    keys / values attended to (`[batch, k, heads, head_dim]` each, for caches).

    `cross`: cross-attention (transformers' `crossattention`): keys and values from `kv_x` (the
    encoder's states) or, precomputed, from `kv`; positions always absolute, as in transformers.

    Self-attention caches: with `cache` (`k`, `v` `[batch, max_length, heads, head_dim]`, the
    fixed-size decoding cache) the queries sit at positions `index ..`; their K/V are written
    there and attention runs over every slot (`mask` hides the unwritten ones). With `past`
    (`k`, `v` `[batch, P, heads, head_dim]`, a forward call's `past_key_values`) the new K/V are
    appended after the P cached positions.
    """

    config: XLMRobertaConfig
    deterministic: bool = True
    output_attentions: bool = False
    cross: bool = False

    @nn.compact
    def __call__(self, x, mask, head_mask=None, index=None, cache=None, past=None, kv_x=None,
                 kv=None):  # fmt: skip
        cfg = self.config
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        init = nn.initializers.normal(cfg.initializer_range)
        heads, hd = cfg.num_attention_heads, cfg.head_dim
        proj = lambda name: DenseGeneral(  # noqa: E731
            (heads, hd), ("embed", "heads", "kv"), dtype=dtype, param_dtype=pdtype,
            kernel_init=init, name=name,
        )  # fmt: skip
        constrain = lambda t: nn.with_logical_constraint(t, _ACT_HEADS)  # noqa: E731
        q = constrain(proj("query")(x))
        if kv is not None:
            k, v = kv
            if self.is_initializing():  # create the projections' params all the same
                proj("key")(x), proj("value")(x)
        else:
            src = kv_x if self.cross else x
            k, v = constrain(proj("key")(src)), constrain(proj("value")(src))
        q_pos = jnp.arange(x.shape[1])
        if cache is not None:
            # Fixed-size cache: shapes never change while decoding, so one step compiles once.
            dt = cache["k"].dtype
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(dt), index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(dt), index, 1)
            # Relative distances are between sequence slots (HF: `key_length - 1` for the query).
            q_pos = q_pos + index
        elif past is not None:
            q_pos = q_pos + past["k"].shape[1]
            k = jnp.concatenate([past["k"].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([past["v"].astype(v.dtype), v], axis=1)

        bias = None
        if cfg.position_embedding_type != "absolute" and not self.cross:
            n = cfg.max_position_embeddings
            dist = q_pos[:, None] - jnp.arange(k.shape[1])[None, :] + (n - 1)
            table = Embed(2 * n - 1, hd, ("relpos", "kv"), dtype, pdtype, init,
                          name="distance_embedding")  # fmt: skip
            rel = table(dist)  # [q, k, head_dim]
            bias = jnp.einsum("bqhd,qkd->bhqk", q, rel)
            if cfg.position_embedding_type == "relative_key_query":
                bias = bias + jnp.einsum("bkhd,qkd->bhqk", k, rel)

        dropout_rng = None
        if not self.deterministic and cfg.attention_probs_dropout_prob > 0:
            dropout_rng = self.make_rng("dropout")
        out, probs = attention(
            q, k, v, mask=mask, bias=bias, head_mask=head_mask,
            dropout_rate=cfg.attention_probs_dropout_prob, dropout_rng=dropout_rng,
            deterministic=self.deterministic, dtype=dtype, kernel=cfg.attention_kernel,
            need_probs=self.output_attentions,
        )  # fmt: skip
        out = DenseGeneral(
            cfg.hidden_size, ("heads", "kv", "embed"), axis=(-2, -1), dtype=dtype,
            param_dtype=pdtype, kernel_init=init, name="out",
        )(out)  # fmt: skip
        return out, probs, (k, v)


_ACT_HEADS = ("act_batch", "act_length", "act_heads", "act_kv")


class Layer(nn.Module):
    """One transformer block, pre-LN (XL) or post-LN (XLM-R); scanned over `layers`.

    Call signature fits `nn.scan`: `(x, mask, head_mask, enc, enc_mask, index, cache, past) ->
    (x, (x, probs, cross probs, present))`, `present` this layer's `past_key_values` entry
    (`k`, `v` and with cross-attention `cross_k`, `cross_v`, `[batch, k, heads, head_dim]`) when
    `use_cache`. Decoding (`cache` given, the same keys at a fixed size, see `SelfAttention`)
    returns `(x, cache)`. With `config.add_cross_attention` and encoder states `enc` (or their
    cached K/V) a cross-attention sub-block follows the self-attention.
    """

    config: XLMRobertaConfig
    deterministic: bool = True
    output_hidden_states: bool = False
    output_attentions: bool = False
    use_cache: bool = False

    @nn.compact
    def __call__(self, x, mask, head_mask, enc=None, enc_mask=None, index=None, cache=None,
                 past=None):  # fmt: skip
        cfg = self.config
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        norm = lambda name: LayerNorm(  # noqa: E731
            cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name=name
        )
        drop = lambda h: nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=self.deterministic)  # noqa: E731
        attn = SelfAttention(cfg, self.deterministic, self.output_attentions, name="attention")
        mlp = MLP(
            cfg.intermediate_size, cfg.hidden_act, dtype=dtype, param_dtype=pdtype,
            kernel_init=nn.initializers.normal(cfg.initializer_range), name="mlp",
        )  # fmt: skip
        self_cache = None if cache is None else dict(k=cache["k"], v=cache["v"])
        self_past = None if past is None else dict(k=past["k"], v=past["v"])
        x = residual(x)
        h = norm("attention_norm")(x) if cfg.pre_ln else x
        a, probs, (k, v) = attn(h, mask, head_mask, index, self_cache, self_past)
        x = residual(x + drop(a)) if cfg.pre_ln else residual(norm("attention_norm")(x + drop(a)))
        present = dict(k=k, v=v)
        cross_probs = None
        cached = cache if cache is not None else past
        kv = None
        if cached is not None and "cross_k" in cached:  # the encoder's K/V, computed once
            kv = (cached["cross_k"], cached["cross_v"])
        if cfg.add_cross_attention and enc is None and kv is None and self.is_initializing():
            enc = x  # init without encoder states: the cross-attention's params all the same
        if cfg.add_cross_attention and (enc is not None or kv is not None):
            cross = SelfAttention(
                cfg, self.deterministic, self.output_attentions, cross=True, name="crossattention"
            )
            h = norm("crossattention_norm")(x) if cfg.pre_ln else x
            c, cross_probs, (ck, cv) = cross(h, enc_mask, head_mask, kv_x=enc, kv=kv)
            x = x + drop(c) if cfg.pre_ln else norm("crossattention_norm")(x + drop(c))
            present.update(cross_k=ck, cross_v=cv)
        if cfg.pre_ln:
            x = x + drop(mlp(norm("mlp_norm")(x)))
        else:
            x = norm("mlp_norm")(x + drop(mlp(x)))
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        if cache is not None:
            return x, present
        ys = (
            x if self.output_hidden_states else None,
            probs if self.output_attentions else None,
            cross_probs if self.output_attentions else None,
            present if self.use_cache else None,
        )
        return x, ys


class XLMRobertaModel(nn.Module):
    """The base model (HF `XLMRobertaModel` / `XLMRobertaXLModel`).

    Inputs `[batch, length]` ids; returns `BaseModelOutput` with `last_hidden_state`
    `[batch, length, hidden]`, `pooler_output` `[batch, hidden]` (when `add_pooling_layer`),
    and per-layer `hidden_states` / `attentions` tuples when asked.

    As a decoder (`config.is_decoder`, with `config.add_cross_attention`):
    `encoder_hidden_states` `[batch, n, hidden]` and `encoder_attention_mask` `[batch, n]` feed
    the cross-attention (`cross_attentions` per layer when `output_attentions`);
    `past_key_values` (transformers' legacy layout: per layer `(k, v)` or `(k, v, cross_k,
    cross_v)`, each `[batch, heads, P, head_dim]`) holds the P positions before `input_ids`
    (`attention_mask` then covers all `P + length` positions); `use_cache` returns the updated
    `past_key_values`.

    Decoding (`cache` given, `k`/`v` `[batch, layers, max_length, heads, head_dim]`, cross K/V
    `cross_k`/`cross_v` `[batch, layers, n, heads, head_dim]`): `input_ids` `[batch, n]` sit at
    sequence slots `cache_index ..`, `attention_mask` is the key mask over all `max_length`
    slots, `position_ids` must be given; `past_key_values` is the updated cache.
    """

    config: XLMRobertaConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        cache=None,
        cache_index=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        use_cache: bool = False,
    ) -> outputs.BaseModelOutput:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if (encoder_hidden_states is not None or past_key_values is not None) and not (
            cfg.is_decoder
        ):
            raise ValueError("encoder_hidden_states / past_key_values need config.is_decoder=True")
        if encoder_hidden_states is not None and not cfg.add_cross_attention:
            raise ValueError(
                "encoder_hidden_states given, but the model has no cross-attention layers "
                "(config.add_cross_attention=False)"
            )
        enc_mask = _encoder_mask(encoder_hidden_states, encoder_attention_mask)
        if cache is not None:
            return self._decode(input_ids, attention_mask, position_ids, cache, cache_index,
                                encoder_hidden_states, enc_mask)  # fmt: skip
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        batch, length = shape
        past = _past_from_legacy(past_key_values, cfg)
        past_len = 0 if past is None else past["k"].shape[2]
        if position_ids is None:
            if input_ids is not None:
                position_ids = position_ids_from_input_ids(input_ids, cfg.pad_token_id, past_len)
            else:  # no ids to find padding from: count up from padding_idx + 1 as HF does
                position_ids = jnp.broadcast_to(
                    jnp.arange(past_len, past_len + length) + cfg.pad_token_id + 1,
                    (batch, length),
                )
        if cfg.position_embedding_type == "absolute" and past_len + length + cfg.pad_token_id >= (
            cfg.max_position_embeddings
        ):
            raise InputError(
                f"sequence length {past_len + length} exceeds the position table: at most "
                f"{cfg.max_position_embeddings - cfg.pad_token_id - 1} tokens"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        if past_len == 0 and (attention_mask is None or jnp.ndim(attention_mask) == 2):
            # The structured mask: what the fused kernels take as segment ids / causal mode.
            if attention_mask is None:
                attention_mask = jnp.ones(shape, jnp.int32)
            attention_4d(attention_mask, (batch, length, length), "attention_mask")  # checks
            mask = Mask(jnp.asarray(attention_mask), causal=cfg.is_decoder)
        else:
            mask = attention_4d(
                attention_mask, (batch, length, past_len + length), "attention_mask"
            )
            if cfg.is_decoder:
                mask = mask & causal_mask(length, past_len + length, past_len)

        x = emb = Embeddings(cfg, deterministic, name="embeddings")(
            input_ids, token_type_ids, position_ids, inputs_embeds
        )
        layer_head_mask = _layer_head_mask(head_mask, cfg)
        use_cache = bool(use_cache) and cfg.is_decoder
        x, (hs, probs, cross, present) = scan_layers(
            Layer,
            cfg.num_hidden_layers,
            cfg.remat_policy,
            dict(
                config=cfg,
                deterministic=deterministic,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                use_cache=use_cache,
            ),
            name="layers",
            in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            unroll=cfg.scan_unroll,
        )(x, mask, layer_head_mask, encoder_hidden_states, enc_mask, None, None, past)
        if cfg.pre_ln:
            dtype, pdtype = cfg.dtype, cfg.param_dtype
            x = LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(x)

        hidden_states = None
        if output_hidden_states:
            # HF's tuple: the embeddings, every layer's input, then the final output (which for
            # pre-LN is the normed last layer, replacing its raw output).
            hidden_states = (emb, *unstack(hs)[:-1], x)
        pooled = Pooler(cfg, name="pooler")(x) if self.add_pooling_layer else None
        return outputs.BaseModelOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=hidden_states,
            attentions=unstack(probs),
            cross_attentions=unstack(cross) if encoder_hidden_states is not None else None,
            past_key_values=_legacy_from_present(present) if use_cache else None,
        )

    @nn.nowrap
    def _decode(self, input_ids, attention_mask, position_ids, cache, index, enc, enc_mask):
        """The cached path of `__call__` (called from inside it, so submodule names are shared)."""
        cfg = self.config
        n, max_length = input_ids.shape[1], cache["k"].shape[2]
        mask = padding_mask(jnp.ones_like(input_ids), attention_mask)
        mask = mask & causal_mask(n, max_length, index)
        x = Embeddings(cfg, True, name="embeddings")(
            input_ids, jnp.zeros_like(input_ids), position_ids
        )
        # Caches are batch-major `[b, layers, ...]` so that beam search reorders them on axis 0.
        x, cache = nn.scan(
            Layer, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 5 + (1,), out_axes=1,
            length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"},
        )(config=cfg, name="layers")(x, mask, None, enc, enc_mask, index, cache)  # fmt: skip
        if cfg.pre_ln:
            dtype, pdtype = cfg.dtype, cfg.param_dtype
            x = LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(x)
        return outputs.BaseModelOutput(last_hidden_state=x, past_key_values=cache)


def attention_4d(attention_mask, shape: tuple[int, int, int], name: str) -> jax.Array:
    """An HF attention mask -> boolean `[batch, 1, q, k]` (True = attend).

    Accepts `[batch, k]` (1 = token, 0 = padding; None: all ones), and `[batch, q, k]` /
    `[batch, 1, q, k]` masks, 0/1 or additive (0 / large negative; see `keep_from_mask`).

    Raises:
      InputError: any other shape, naming it and the shapes expected.
    """
    batch, q, k = shape
    if attention_mask is None:
        return jnp.ones((batch, 1, q, k), bool)
    m = jnp.asarray(attention_mask)
    if m.ndim == 2 and m.shape[1] == k:
        return padding_mask(jnp.ones((batch, q), jnp.int32), m)
    if m.ndim == 3 and m.shape[1:] == (q, k):
        return keep_from_mask(m[:, None])
    if m.ndim == 4 and m.shape[1] == 1 and m.shape[2:] == (q, k):
        return keep_from_mask(m)
    raise InputError(
        f"{name} of shape {tuple(m.shape)} does not fit: expected [batch, {k}], "
        f"[batch, {q}, {k}] or [batch, 1, {q}, {k}]"
    )


def _encoder_mask(encoder_hidden_states, encoder_attention_mask):
    """`[batch, n]` encoder mask -> `[batch, 1, 1, n]` bool (all ones when None)."""
    if encoder_hidden_states is None:
        return None if encoder_attention_mask is None else (
            jnp.asarray(encoder_attention_mask)[:, None, None, :] > 0
        )  # fmt: skip
    b, n = encoder_hidden_states.shape[:2]
    if encoder_attention_mask is None:
        return jnp.ones((b, 1, 1, n), bool)
    m = jnp.asarray(encoder_attention_mask)
    if m.ndim == 2 and m.shape == (b, n):
        return m[:, None, None, :] > 0
    if m.ndim == 4 and m.shape[-1] == n:
        return m > 0
    raise InputError(
        f"encoder_attention_mask of shape {tuple(m.shape)} does not fit encoder_hidden_states "
        f"{tuple(encoder_hidden_states.shape)}: expected [{b}, {n}]"
    )


def _past_from_legacy(past_key_values, cfg: XLMRobertaConfig):
    """transformers' legacy cache (per layer `(k, v[, cross_k, cross_v])`, `[b, heads, P, d]`)
    -> our scanned layout: a dict of `[layers, b, P, heads, d]` arrays (None when None)."""
    if past_key_values is None:
        return None
    if len(past_key_values) != cfg.num_hidden_layers:
        raise InputError(
            f"past_key_values has {len(past_key_values)} layers, the model {cfg.num_hidden_layers}"
        )
    names = ("k", "v", "cross_k", "cross_v")[: len(past_key_values[0])]
    return {
        name: jnp.stack([jnp.swapaxes(layer[i], 1, 2) for layer in past_key_values])
        for i, name in enumerate(names)
    }


def _legacy_from_present(present) -> tuple:
    """Stacked `[layers, b, k, heads, d]` K/V dict -> transformers' legacy per-layer tuples."""
    names = [n for n in ("k", "v", "cross_k", "cross_v") if n in present]
    n_layers = present["k"].shape[0]
    return tuple(
        tuple(jnp.swapaxes(present[name][i], 1, 2) for name in names) for i in range(n_layers)
    )


def _layer_head_mask(head_mask, cfg: XLMRobertaConfig):
    """HF head_mask `[heads]` or `[layers, heads]` (1 keep, 0 drop) -> `[layers, heads]` or None."""
    if head_mask is None:
        return None
    head_mask = jnp.asarray(head_mask, jnp.float32)
    if head_mask.ndim == 1:
        head_mask = jnp.broadcast_to(head_mask, (cfg.num_hidden_layers, head_mask.shape[0]))
    if head_mask.shape != (cfg.num_hidden_layers, cfg.num_attention_heads):
        raise ValueError(
            f"head_mask must be [heads] or [layers, heads] = "
            f"[{cfg.num_hidden_layers}, {cfg.num_attention_heads}], got {head_mask.shape}"
        )
    return head_mask


class Pooler(nn.Module):
    """tanh(dense(first token)). `[batch, length, hidden] -> [batch, hidden]`."""

    config: XLMRobertaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = DenseGeneral(
            cfg.hidden_size, ("embed", "mlp"), dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=nn.initializers.normal(cfg.initializer_range), name="dense",
        )  # fmt: skip
        return jnp.tanh(dense(x[:, 0]))


class XLMRobertaForMaskedLM(nn.Module):
    """Masked LM head over the tied word embeddings (HF `XLMRobertaXLForMaskedLM` /
    `XLMRobertaForMaskedLM`). Returns `MaskedLMOutput` with `logits` `[batch, length, vocab]`;
    `labels` (`-100` = ignore) gives HF's mean cross-entropy as `loss`.

    Two options for large vocabularies (ours, not HF's):

    * `masked_positions` `[batch, P]` int (`-1` = padding): the LM head runs only on the hidden
      states gathered at those positions (gather first, then project); `logits` are then
      `[batch, P, vocab]` and `labels` must be given per position, `[batch, P]`.
    * `vocab_chunk_size > 0` with `labels`: the loss comes from `chunked_cross_entropy`, no
      logits at all; returns `ChunkedLMOutput` (`loss`, per-token `token_losses`, argmax
      `predictions`).
    """

    config: XLMRobertaConfig

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        masked_positions=None,
        vocab_chunk_size: int = 0,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
    ) -> outputs.MaskedLMOutput | outputs.ChunkedLMOutput:
        base = XLMRobertaModel(self.config, add_pooling_layer=False, name="model")
        out = base(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, deterministic,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )  # fmt: skip
        head = heads.LMHead(self.config, exact_gelu, name="lm_head")
        return heads.masked_lm_output(
            out, head, heads.word_embeddings(base), labels, masked_positions, vocab_chunk_size
        )


def exact_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


# transformers names the XL variant's classes apart; the modules are the same.
XLMRobertaXLModel = XLMRobertaModel
XLMRobertaXLForMaskedLM = XLMRobertaForMaskedLM


def architecture_name(config: XLMRobertaConfig, class_name: str) -> str:
    """The transformers class name of head `class_name` for this variant (XL or not)."""
    return class_name.replace("XLMRoberta", "XLMRobertaXL", 1) if config.pre_ln else class_name


__all__ = [
    "PRESETS",
    "XLMRobertaConfig",
    "XLMRobertaForMaskedLM",
    "XLMRobertaModel",
    "XLMRobertaXLForMaskedLM",
    "XLMRobertaXLModel",
    "architecture_name",
    "position_ids_from_input_ids",
]
