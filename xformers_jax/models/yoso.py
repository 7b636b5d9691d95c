"""YOSO (Zeng et al. 2021, "You Only Sample (Almost) Once"): a post-LN BERT with LSH attention.

Each head's attention weights are the collision probabilities of `hash_code_len`-bit (tau) LSH
codes of the L2-normalised query and key, never a softmax:

* expectation mode (`use_expectation=True`, transformers' default): the exact expectation
  `(1 - acos(q . k) / pi) ** tau`, dense `O(L^2)`, with YOSO's surrogate backward
  (`kernels.yoso.ops.yoso_expectation_attention`);
* sampled mode: the average over `num_hash` Hadamard hash functions of the collision indicator,
  linear in `L` (`yoso_lsh_attention`; `attention_impl='pallas'` runs the Pallas kernels, in the
  interpreter on CPU), backward through the LSH (`lsh_backward=True`) or the dense expectation.

As in the reference the per-head output is L2-normalised, then a depthwise convolution over the
(masked) values along the sequence is added when `conv_window` is set.

The hash's random diagonals come from the `lsh` rng collection (`rngs={"lsh": key}`), folded with
the layer index so layers hash independently and a run is reproducible. Without an `lsh` rng a
training call draws them from the `dropout` rng; a deterministic call without one uses the fixed
key `jax.random.key(0)` (so eval is reproducible, but every eval call samples the same hashes).

transformers ignores the padding mask in the attention (it turns `attention_mask` into all ones)
and only uses it to zero the values of the convolution. Ours masks padded keys and queries, so
padding never changes the outputs at real positions; `hf_compat=True` reproduces transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax.kernels.yoso import yoso_expectation_attention, yoso_lsh_attention
from xformers_jax.layers import MLP, DenseGeneral, Embed, LayerNorm, get_activation
from xformers_jax.layers.dense import param_init
from xformers_jax.models import heads, outputs
from xformers_jax.models.base import (
    FamilyConfig,
    InputError,
    check_key_mask,
    scan_layers,
    unstack,
)

ATTENTION_IMPLS = ("xla", "pallas")
POSITION_TYPES = ("absolute", "relative_key", "relative_key_query")
# transformers offsets YOSO's position ids by 2 (its table has max_position_embeddings + 2 rows).
POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class YosoConfig(FamilyConfig):
    """Hyper-parameters; field names are transformers' `YosoConfig` (config.json) names.

    Ours, never written to config.json: `attention_impl` (`'xla'` | `'pallas'`, the sampled
    mode's kernels), `hf_compat` (ignore the padding mask in the attention as transformers does),
    `dtype` (compute), `param_dtype`, `remat_policy`. `use_fast_hash` is kept for round trips;
    we always hash with the fast Hadamard transform.
    """

    model_type: str = "yoso"
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 4096
    type_vocab_size: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"
    use_expectation: bool = True
    hash_code_len: int = 9
    num_hash: int = 64
    conv_window: int | None = None
    use_fast_hash: bool = True
    lsh_backward: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    attention_impl: str = "xla"
    hf_compat: bool = False

    LOCAL_FIELDS = ("attention_impl", "hf_compat")

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        if self.position_embedding_type not in POSITION_TYPES:
            raise ValueError(
                f"position_embedding_type must be one of {POSITION_TYPES}, "
                f"got {self.position_embedding_type!r}"
            )
        if self.conv_window is not None and (self.conv_window < 1 or self.conv_window % 2 == 0):
            # transformers pads by conv_window // 2: an even window lengthens the sequence.
            raise ValueError(f"conv_window must be a positive odd int, got {self.conv_window}")
        get_activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def use_conv(self) -> bool:
        return self.conv_window is not None

    def _to_hf(self, d: dict[str, Any]) -> None:
        d["layer_norm_eps"] = float(self.layer_norm_eps)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized, sampled mode (the linear-cost attention YOSO is for); the default run and tests.
    "tiny": dict(
        vocab_size=8000,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=4096,
        use_expectation=False,
        hash_code_len=8,
        num_hash=32,
    ),
    # uw-madison/yoso-4096.
    "base": dict(
        vocab_size=50265,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=4096,
    ),
}


def _l2_normalize(x: jax.Array) -> jax.Array:
    """torch's `F.normalize(x, dim=-1)`: `x / max(|x|, 1e-12)`, in float32."""
    x = x.astype(jnp.float32)
    # sqrt(max(s, eps^2)) == max(sqrt(s), eps) without sqrt's infinite gradient at 0: a sampled
    # query with no collision (or a masked one) has a zero context.
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-24))
    return x / norm


def _init(cfg: YosoConfig):
    return nn.initializers.normal(cfg.initializer_range)


def _dense(cfg: YosoConfig, features, axes: tuple, name: str, axis=-1) -> DenseGeneral:
    return DenseGeneral(
        features, axes, axis=axis, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, kernel_init=_init(cfg), name=name,
    )  # fmt: skip


def _norm(cfg: YosoConfig, name: str) -> LayerNorm:
    return LayerNorm(
        cfg.layer_norm_eps, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, name=name,
    )  # fmt: skip


class Embeddings(nn.Module):
    """Word + token-type (+ absolute position) embeddings, LayerNorm, dropout.

    `[batch, length]` ids -> `[batch, length, hidden]`.
    """

    config: YosoConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds=None):
        cfg = self.config
        dtype, pdtype = cfg.dtype, cfg.param_dtype
        embed = lambda n, axes, name: Embed(n, cfg.hidden_size, axes, dtype, pdtype, _init(cfg),
                                            name=name)  # fmt: skip  # noqa: E731
        word = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")
        x = word(input_ids) if inputs_embeds is None else jnp.asarray(inputs_embeds, dtype)
        x = x + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        if cfg.position_embedding_type == "absolute":
            table = embed(
                cfg.max_position_embeddings + POSITION_OFFSET, (None, "embed"),
                "position_embeddings",
            )  # fmt: skip
            x = x + table(position_ids)
        x = _norm(cfg, "norm")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class SelfAttention(nn.Module):
    """YOSO attention: normalised q/k, expectation or LSH collisions, normalised output (+ conv).

    `[batch, length, hidden]`, `[batch, length]` 0/1 mask, scalar layer index ->
    `[batch, length, hidden]` (the per-head contexts, before the output projection).
    """

    config: YosoConfig
    deterministic: bool = True

    def _hash_key(self, layer_id: jax.Array) -> jax.Array:
        # 'lsh' (and 'dropout') rngs are broadcast to every scanned layer: the layer index makes
        # the layers' hash functions independent.
        if self.has_rng("lsh"):
            key = self.make_rng("lsh")
        elif not self.deterministic and self.has_rng("dropout"):
            key = self.make_rng("dropout")
        else:  # deterministic eval without an lsh rng: fixed, documented in the module docstring
            key = jax.random.key(0)
        return jax.random.fold_in(key, layer_id)

    def _conv(self, v: jax.Array) -> jax.Array:
        """Depthwise conv over length, one `[window]` filter per head (HF's Conv2d `(w, 1)`).

        `[batch, length, heads, head_dim]` -> same shape. The kernel is stored HWIO as
        `[window, 1, 1, heads]` (torch: `[heads, 1, window, 1]`).
        """
        cfg = self.config
        w, heads = cfg.conv_window, cfg.num_attention_heads
        kernel = self.param(
            "conv", param_init(_init(cfg), (None, None, None, "heads")), (w, 1, 1, heads),
            cfg.param_dtype,
        )  # fmt: skip
        kernel = jnp.asarray(kernel[:, 0, 0, :], jnp.float32)  # [window, heads]
        length, pad = v.shape[1], w // 2
        vp = jnp.pad(v.astype(jnp.float32), ((0, 0), (pad, pad), (0, 0), (0, 0)))
        # Cross-correlation, as torch's conv: out[t] = sum_j kernel[j] * v[t + j - pad].
        return sum(kernel[j][None, None, :, None] * vp[:, j : j + length] for j in range(w))

    @nn.compact
    def __call__(self, x, attention_mask, layer_id):
        cfg = self.config
        heads, hd = cfg.num_attention_heads, cfg.head_dim
        q, k, v = (_dense(cfg, (heads, hd), ("embed", "heads", "kv"), n)(x)
                   for n in ("query", "key", "value"))  # fmt: skip
        axes = ("act_batch", "act_length", "act_heads", "act_kv")
        q, k, v = (nn.with_logical_constraint(t, axes) for t in (q, k, v))
        mask = attention_mask.astype(jnp.float32)  # [batch, length]
        conv = self._conv(v * mask[:, :, None, None]) if cfg.use_conv else None

        # The kernels take [*batch, length, dim]: heads become a batch axis.
        to_heads = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
        qh, kh = _l2_normalize(to_heads(q)), _l2_normalize(to_heads(k))
        vh = to_heads(v).astype(jnp.float32)
        # transformers attends to padding too (its mask becomes all ones).
        att_mask = jnp.ones_like(mask) if cfg.hf_compat else mask
        att_mask = jnp.broadcast_to(att_mask[:, None, :], qh.shape[:-1])
        if cfg.use_expectation:
            ctx = yoso_expectation_attention(qh, kh, vh, att_mask, att_mask, cfg.hash_code_len)
        else:
            ctx = yoso_lsh_attention(
                qh, kh, vh, att_mask, att_mask, self._hash_key(layer_id),
                num_hash=cfg.num_hash, hash_code_len=cfg.hash_code_len,
                lsh_backward=cfg.lsh_backward, impl=cfg.attention_impl,
                interpret=cfg.attention_impl == "pallas" and jax.default_backend() == "cpu",
            )  # fmt: skip
        ctx = to_heads(_l2_normalize(ctx))  # [batch, length, heads, head_dim]
        if conv is not None:
            ctx = ctx + conv
        ctx = nn.with_logical_constraint(ctx.astype(cfg.dtype), axes)
        return ctx


class Layer(nn.Module):
    """One post-LN block: `norm(x + out(attention))`, `norm(h + mlp(h))`; scanned over `layers`.

    Call signature fits `nn.scan`: `(x, mask, layer_id) -> (x, (x, context))`.
    """

    config: YosoConfig
    deterministic: bool = True
    output_hidden_states: bool = False
    output_attentions: bool = False

    @nn.compact
    def __call__(self, x, mask, layer_id):
        cfg = self.config
        drop = lambda h: nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=self.deterministic)  # noqa: E731
        ctx = SelfAttention(cfg, self.deterministic, name="attention")(x, mask, layer_id)
        a = _dense(cfg, cfg.hidden_size, ("heads", "kv", "embed"), "out", axis=(-2, -1))(ctx)
        x = _norm(cfg, "attention_norm")(x + drop(a))
        mlp = MLP(
            cfg.intermediate_size, cfg.hidden_act, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, kernel_init=_init(cfg), name="mlp",
        )  # fmt: skip
        x = _norm(cfg, "mlp_norm")(x + drop(mlp(x)))
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        # HF's "attentions" of YOSO are the per-head contexts, flattened to [batch, length, hidden].
        ctx = ctx.reshape(*ctx.shape[:2], -1) if self.output_attentions else None
        return x, (x if self.output_hidden_states else None, ctx)


class YosoModel(nn.Module):
    """The base model (HF `YosoModel`, no pooler).

    Inputs `[batch, length]` ids (or `inputs_embeds` `[batch, length, hidden]`); returns
    `BaseModelOutput` with `last_hidden_state` `[batch, length, hidden]` and, when asked,
    `hidden_states` (embeddings + every layer) and `attentions` (per layer the attention context
    `[batch, length, hidden]`, which is what transformers returns under that name). `head_mask`
    is accepted and ignored, as transformers does for YOSO.
    """

    config: YosoConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True,
    ) -> outputs.BaseModelOutput:  # fmt: skip
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        batch, length = shape
        if length > cfg.max_position_embeddings:
            raise InputError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length) + POSITION_OFFSET, shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        check_key_mask(attention_mask, *shape)
        if attention_mask is None:
            attention_mask = jnp.ones(shape, jnp.int32)
        x = emb = Embeddings(cfg, deterministic, name="embeddings")(
            input_ids, token_type_ids, position_ids, inputs_embeds
        )
        x, (hs, ctx) = scan_layers(
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
            in_axes=(nn.broadcast, 0),
            unroll=cfg.scan_unroll,
        )(x, jnp.asarray(attention_mask), jnp.arange(cfg.num_hidden_layers))
        hidden_states = (emb, *unstack(hs)) if output_hidden_states else None
        return outputs.BaseModelOutput(
            last_hidden_state=x, hidden_states=hidden_states, attentions=unstack(ctx)
        )


class YosoForMaskedLM(nn.Module):
    """Masked LM over the tied word embeddings (HF `YosoForMaskedLM`).

    Returns `MaskedLMOutput` with `logits` `[batch, length, vocab]`; `labels` (`-100` = ignore)
    give HF's mean cross-entropy. As in `XLMRobertaForMaskedLM`, `masked_positions`
    `[batch, P]` (`-1` = none) runs the head only there and `vocab_chunk_size > 0` with `labels`
    returns a `ChunkedLMOutput` without logits.
    """

    config: YosoConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, labels=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True, masked_positions=None,
        vocab_chunk_size: int = 0,
    ) -> outputs.MaskedLMOutput | outputs.ChunkedLMOutput:  # fmt: skip
        base = YosoModel(self.config, name="model")
        out = base(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, deterministic,
        )  # fmt: skip
        head = heads.LMHead(self.config, get_activation(self.config.hidden_act), name="lm_head")
        return heads.masked_lm_output(
            out, head, heads.word_embeddings(base), labels, masked_positions, vocab_chunk_size
        )


def _choice_logits(dense: heads.Dense, out, cfg: YosoConfig, deterministic: bool):
    """HF's YOSO scorer: `pre_classifier` + ReLU on `<s>`, a `[hidden, 1]` `classifier`, no
    dropout (as in transformers)."""
    del deterministic
    pooled = dense(cfg.hidden_size, ("embed", "mlp"), "pre_classifier")(out.last_hidden_state[:, 0])
    return dense(1, ("mlp", "classes"), "classifier")(jax.nn.relu(pooled))


# HF's YOSO heads are XLM-R's but for the classifier's activation (`hidden_act`), its dropout
# (`hidden_dropout_prob`), the multiple-choice scorer and the token loss, which always drops
# padding tokens; QA forces num_labels = 2.
ENCODER = heads.Encoder(
    model=lambda cfg, pooler: YosoModel(cfg, name="model"),
    dense=lambda cfg: heads.dense_factory(cfg, _init(cfg)),
    classifier_dropout=lambda cfg: cfg.hidden_dropout_prob,
    classifier_activation=lambda cfg: get_activation(cfg.hidden_act),
    choice_pooler=False,
    choice_logits=_choice_logits,
    token_mask_padding=lambda cfg: True,
)


class YosoForSequenceClassification(heads.SequenceClassification):
    """HF `YosoForSequenceClassification`: dropout, dense + `hidden_act` on `<s>`, dropout,
    `out_proj` (in `classifier`); see `heads.SequenceClassification`."""

    encoder = ENCODER


class YosoForMultipleChoice(heads.MultipleChoice):
    """HF `YosoForMultipleChoice`: each choice's `<s>` scored by `pre_classifier` + ReLU + a
    `[hidden, 1]` `classifier`; see `heads.MultipleChoice`."""

    encoder = ENCODER


class YosoForTokenClassification(heads.TokenClassification):
    """HF `YosoForTokenClassification`: the loss is over tokens with `attention_mask == 1` (as
    transformers) and labels != -100; see `heads.TokenClassification`."""

    encoder = ENCODER


class YosoForQuestionAnswering(heads.QuestionAnswering):
    """HF `YosoForQuestionAnswering` (transformers forces num_labels = 2 for it); see
    `heads.QuestionAnswering`."""

    encoder = ENCODER


def architecture_name(config: YosoConfig, class_name: str) -> str:
    """The transformers class name of head `class_name` (YOSO has one variant)."""
    del config
    return class_name


__all__ = [
    "PRESETS",
    "YosoConfig",
    "YosoForMaskedLM",
    "YosoForMultipleChoice",
    "YosoForQuestionAnswering",
    "YosoForSequenceClassification",
    "YosoForTokenClassification",
    "YosoModel",
    "architecture_name",
]
