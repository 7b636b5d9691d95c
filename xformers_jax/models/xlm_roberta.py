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
        d["use_cache"] = True


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
    """Multi-head self-attention with absolute or BERT-style relative (key / key-query) scores.

    `[batch, length, embed] -> [batch, length, embed]`, plus `[batch, heads, q, k]` probs.

    Decoding: with `cache` (`k`, `v` `[batch, max_length, heads, head_dim]`) the queries sit at
    positions `index ..` of the sequence; their K/V are written there, attention runs over every
    cache slot (`mask` `[batch, 1, length, max_length]` hides the unwritten ones) and the updated
    cache is returned third.
    """

    config: XLMRobertaConfig
    deterministic: bool = True
    output_attentions: bool = False

    @nn.compact
    def __call__(self, x, mask, head_mask=None, index=None, cache=None):
        cfg = self.config
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        init = nn.initializers.normal(cfg.initializer_range)
        heads, hd = cfg.num_attention_heads, cfg.head_dim
        proj = lambda name: DenseGeneral(  # noqa: E731
            (heads, hd), ("embed", "heads", "kv"), dtype=dtype, param_dtype=pdtype,
            kernel_init=init, name=name,
        )  # fmt: skip
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_kv"))
        k = nn.with_logical_constraint(k, ("act_batch", "act_length", "act_heads", "act_kv"))
        v = nn.with_logical_constraint(v, ("act_batch", "act_length", "act_heads", "act_kv"))
        q_pos = jnp.arange(x.shape[1])
        if cache is not None:
            # Fixed-size cache: shapes never change while decoding, so one step compiles once.
            dt = cache["k"].dtype
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(dt), index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(dt), index, 1)
            # Relative distances are between sequence slots (HF: `key_length - 1` for the query).
            q_pos = q_pos + index

        bias = None
        if cfg.position_embedding_type != "absolute":
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
        if cache is not None:
            return out, probs, dict(k=k, v=v)
        return out, probs


class Layer(nn.Module):
    """One transformer block, pre-LN (XL) or post-LN (XLM-R); scanned over `layers`.

    Call signature fits `nn.scan`: `(x, (mask, head_mask)) -> (x, (x, probs))`; when decoding,
    `(x, (mask, head_mask, index, cache)) -> (x, cache)` (see `SelfAttention`).
    """

    config: XLMRobertaConfig
    deterministic: bool = True
    output_hidden_states: bool = False
    output_attentions: bool = False

    @nn.compact
    def __call__(self, x, mask, head_mask, index=None, cache=None):
        cfg = self.config
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        norm = lambda name: LayerNorm(
            cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name=name
        )  # noqa: E731
        drop = lambda h: nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=self.deterministic)  # noqa: E731
        attn = SelfAttention(cfg, self.deterministic, self.output_attentions, name="attention")
        mlp = MLP(
            cfg.intermediate_size, cfg.hidden_act, dtype=dtype, param_dtype=pdtype,
            kernel_init=nn.initializers.normal(cfg.initializer_range), name="mlp",
        )  # fmt: skip
        new_cache = None
        x = residual(x)
        if cfg.pre_ln:
            a, probs, *new_cache = attn(norm("attention_norm")(x), mask, head_mask, index, cache)
            x = residual(x + drop(a))
            x = x + drop(mlp(norm("mlp_norm")(x)))
        else:
            a, probs, *new_cache = attn(x, mask, head_mask, index, cache)
            x = residual(norm("attention_norm")(x + drop(a)))
            x = norm("mlp_norm")(x + drop(mlp(x)))
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        if cache is not None:
            return x, new_cache[0]
        ys = (
            x if self.output_hidden_states else None,
            probs if self.output_attentions else None,
        )
        return x, ys


class XLMRobertaModel(nn.Module):
    """The base model (HF `XLMRobertaModel` / `XLMRobertaXLModel`).

    Inputs `[batch, length]` ids; returns `BaseModelOutput` with `last_hidden_state`
    `[batch, length, hidden]`, `pooler_output` `[batch, hidden]` (when `add_pooling_layer`),
    and per-layer `hidden_states` / `attentions` tuples when asked.

    Decoding (`cache` given, `k`/`v` `[batch, layers, max_length, heads, head_dim]`): `input_ids`
    `[batch, n]` sit at sequence slots `cache_index ..`, `attention_mask` is the key mask over all
    `max_length` slots, `position_ids` must be given; `past_key_values` is the updated cache.
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
    ) -> outputs.BaseModelOutput:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is not None:
            return self._decode(input_ids, attention_mask, position_ids, cache, cache_index)
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        batch, length = shape
        if position_ids is None:
            if input_ids is not None:
                position_ids = position_ids_from_input_ids(input_ids, cfg.pad_token_id)
            else:  # no ids to find padding from: count up from padding_idx + 1 as HF does
                position_ids = jnp.broadcast_to(
                    jnp.arange(length) + cfg.pad_token_id + 1, (batch, length)
                )
        if cfg.position_embedding_type == "absolute" and length + cfg.pad_token_id >= (
            cfg.max_position_embeddings
        ):
            raise InputError(
                f"sequence length {length} exceeds the position table: at most "
                f"{cfg.max_position_embeddings - cfg.pad_token_id - 1} tokens"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones(shape, jnp.int32)
        mask = Mask(attention_mask, causal=cfg.is_decoder)

        x = emb = Embeddings(cfg, deterministic, name="embeddings")(
            input_ids, token_type_ids, position_ids, inputs_embeds
        )
        layer_head_mask = _layer_head_mask(head_mask, cfg)
        x, (hs, probs) = scan_layers(
            Layer,
            cfg.num_hidden_layers,
            cfg.remat_policy,
            dict(
                config=cfg,
                deterministic=deterministic,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            ),
            name="layers",
            unroll=cfg.scan_unroll,
        )(x, mask, layer_head_mask)
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
        )

    @nn.nowrap
    def _decode(self, input_ids, attention_mask, position_ids, cache, index):
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
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 1), out_axes=1,
            length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"},
        )(config=cfg, name="layers")(x, mask, None, index, cache)  # fmt: skip
        if cfg.pre_ln:
            dtype, pdtype = cfg.dtype, cfg.param_dtype
            x = LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(x)
        return outputs.BaseModelOutput(last_hidden_state=x, past_key_values=cache)


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
    ) -> outputs.MaskedLMOutput | outputs.ChunkedLMOutput:
        base = XLMRobertaModel(self.config, add_pooling_layer=False, name="model")
        out = base(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, deterministic,
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
