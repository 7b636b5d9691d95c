"""transformers' task heads over a BERT-style encoder, shared by the families that have them.

A family gets `*ForSequenceClassification`, `*ForTokenClassification`, `*ForMultipleChoice` and
`*ForQuestionAnswering` by subclassing `SequenceClassification`, `TokenClassification`,
`MultipleChoice` and `QuestionAnswering` with its HF class name and its `Encoder` (what really
differs between families: the base model, the dense layers' init, dropouts, the classifier's
activation, the multiple-choice scorer). Param names are HF's module names (`classifier`,
`dense`, `out_proj`, `qa_outputs`), so the converters' name maps hold for every family.

The masked LM of the BERT-style families is shared too: `LMHead` (dense, activation, LayerNorm,
tied decoder + bias) and `masked_lm_output` (masked positions, vocabulary-chunked loss).

The building blocks (`classification_head`, `span_logits`) create their layers in the calling
module's scope, so heads that do not fit the encoder mould (XLNet's summary, MT5's decoder
states) use them with the same param names. The losses live in `layers/losses.py`.

Every head takes HF's argument names, returns HF's output fields, and with `labels`
(`start_positions` / `end_positions` for QA) gives HF's loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax.layers import DenseGeneral, LayerNorm
from xformers_jax.layers.dense import add_bias, param_init
from xformers_jax.layers.losses import (
    chunked_cross_entropy,
    cross_entropy_with_ignore,
    gather_positions,
    sequence_classification_loss,
    span_loss,
    token_classification_loss,
)
from xformers_jax.models import outputs

Dense = Callable[[int, tuple, str], nn.Module]


def dense_factory(config: Any, kernel_init: Any) -> Dense:
    """`(features, logical axes, name) -> DenseGeneral` in the config's dtypes."""

    def dense(features: int, axes: tuple, name: str) -> nn.Module:
        return DenseGeneral(
            features, axes, dtype=config.dtype,
            param_dtype=config.param_dtype,
            kernel_init=kernel_init, name=name,
        )  # fmt: skip

    return dense


def classification_head(
    dense: Dense,
    x: jax.Array,
    hidden_size: int,
    num_labels: int,
    dropout_rate: float,
    activation: Callable[[jax.Array], jax.Array],
    deterministic: bool,
) -> jax.Array:
    """HF's `*ClassificationHead`: dropout, `dense` + activation, dropout, `out_proj`.

    `[batch, hidden] -> [batch, num_labels]`; the layers are created in the caller's scope.
    """
    drop = nn.Dropout(dropout_rate)
    x = drop(x, deterministic=deterministic)
    x = activation(dense(hidden_size, ("embed", "mlp"), "dense")(x))
    x = drop(x, deterministic=deterministic)
    return dense(num_labels, ("mlp", "classes"), "out_proj")(x)


def token_labels(labels, logits: jax.Array) -> jax.Array:
    """Token-classification labels as `[batch, length]` for `[batch, length, classes]` logits:
    `[batch, length]` or flattened `[batch * length]` (transformers flattens them itself).

    Raises:
      InputError: any other shape, naming it.
    """
    from xformers_jax.models.base import InputError

    labels = jnp.asarray(labels)
    shape = logits.shape[:-1]
    if labels.shape == shape:
        return labels
    if labels.ndim == 1 and labels.shape[0] == shape[0] * shape[1]:
        return labels.reshape(shape)
    raise InputError(
        f"token labels of shape {tuple(labels.shape)} do not fit logits {tuple(logits.shape)}: "
        f"expected [{shape[0]}, {shape[1]}] or [{shape[0] * shape[1]}]"
    )


def span_logits(dense: Dense, x: jax.Array, features: int = 2, name: str = "qa_outputs"):
    """A `[hidden, features]` span scorer (HF's `qa_outputs`; start and end are the first two):
    `[batch, length, hidden]` -> start, end `[batch, length]`."""
    logits = dense(features, ("embed", "classes"), name)(x)
    return logits[..., 0], logits[..., 1]


class LMHead(nn.Module):
    """dense -> `activation` -> LayerNorm -> tied decoder (+ bias). `[..., hidden] -> [..., vocab]`.

    With `chunk_size > 0` and `labels`, the decoder is never applied as a whole: returns
    `chunked_cross_entropy`'s `(token losses, predictions)` instead of logits.
    """

    config: Any
    activation: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x, embedding: jax.Array, labels=None, chunk_size: int = 0):
        cfg = self.config
        dtype = cfg.dtype
        dense = dense_factory(cfg, nn.initializers.normal(cfg.initializer_range))
        x = self.activation(dense(cfg.hidden_size, ("embed", "mlp"), "dense")(x))
        x = LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=cfg.param_dtype, name="norm")(x)
        bias = self.param(
            "bias", param_init(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
            cfg.param_dtype,
        )  # fmt: skip
        if chunk_size > 0 and labels is not None:
            return chunked_cross_entropy(
                x, jnp.asarray(embedding, dtype), bias, labels, chunk_size=chunk_size
            )
        logits = jnp.einsum("...d,vd->...v", x, jnp.asarray(embedding, dtype))
        logits = add_bias(logits, jnp.asarray(bias, dtype))
        return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))


def word_embeddings(base: nn.Module) -> jax.Array:
    """The `[vocab, hidden]` word embedding table of a called base model (for tied heads)."""
    table = base.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
    return nn.meta.unbox(table)


def masked_lm_output(
    out: outputs.BaseModelOutput,
    head: LMHead,
    table: jax.Array,
    labels=None,
    masked_positions=None,
    vocab_chunk_size: int = 0,
) -> outputs.MaskedLMOutput | outputs.ChunkedLMOutput:
    """The masked-LM tail over a base output: `head` on every position, or only at
    `masked_positions` `[batch, P]` (`-1` = padding; `labels` then `[batch, P]`); with
    `vocab_chunk_size > 0` and `labels` a `ChunkedLMOutput` (no logits), else `MaskedLMOutput`
    with HF's mean cross-entropy (`-100` ignored)."""
    x = out.last_hidden_state
    if labels is not None:
        labels = jnp.asarray(labels)
    if masked_positions is not None:
        x = gather_positions(x, masked_positions)
        if labels is not None:
            labels = jnp.where(masked_positions >= 0, labels, -100)
    if vocab_chunk_size > 0 and labels is not None:
        losses, predictions = head(x, table, labels, vocab_chunk_size)
        loss = jnp.sum(losses) / jnp.maximum(jnp.sum(labels != -100), 1)
        return outputs.ChunkedLMOutput(
            loss=loss, token_losses=losses, predictions=predictions,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )  # fmt: skip
    logits = head(x, table)
    loss = None if labels is None else cross_entropy_with_ignore(logits, labels)
    return outputs.MaskedLMOutput(
        loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
    )


class ClassificationHead(nn.Module):
    """`classification_head` on the first token, as a module (HF's `classifier` submodule).

    `[batch, length, hidden] -> [batch, num_labels]`.
    """

    config: Any
    dense: Dense
    dropout_rate: float
    activation: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        return classification_head(
            self.dense, x[:, 0], cfg.hidden_size, cfg.num_labels, self.dropout_rate,
            self.activation, deterministic,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Encoder:
    """What the shared heads need to know about a BERT-style family.

    Attributes:
      model: `(config, with_pooler) -> base module` (named `model`), called as HF's base model
        with `input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
        output_attentions, output_hidden_states, deterministic`.
      dense: `config -> Dense`, the family's dense layers (dtypes, init).
      classifier_dropout: `config -> rate` of the sequence and token classifiers.
      classifier_activation: `config -> fn` between the sequence classifier's two layers.
      choice_pooler: whether multiple choice runs the base model with its pooler.
      choice_logits: `(dense, base output, config, deterministic) -> [rows, 1]`, the
        multiple-choice scorer (created in the head's scope).
      token_mask_padding: `config -> bool`, whether the token loss also drops
        `attention_mask != 1` tokens (as some of transformers' heads do).
      qa_requires_two_labels: QA refuses `num_labels != 2` (else it ignores `num_labels`, as
        transformers' heads that force 2 do).
    """

    model: Callable[[Any, bool], nn.Module]
    dense: Callable[[Any], Dense]
    classifier_dropout: Callable[[Any], float]
    classifier_activation: Callable[[Any], Callable]
    choice_pooler: bool
    choice_logits: Callable[[Dense, Any, Any, bool], jax.Array]
    token_mask_padding: Callable[[Any], bool]
    qa_requires_two_labels: bool = False


class EncoderHead(nn.Module):
    """Base of the shared heads: runs the family's `encoder.model` on HF's inputs."""

    config: Any
    encoder: ClassVar[Encoder]

    def _encode(self, pooler: bool, kw: dict[str, Any]) -> outputs.BaseModelOutput:
        return self.encoder.model(self.config, pooler)(**kw)


def _inputs(input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, deterministic) -> dict[str, Any]:  # fmt: skip
    return dict(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
        position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        deterministic=deterministic,
    )  # fmt: skip


class SequenceClassification(EncoderHead):
    """Sequence classification / regression: the classification head on the first token.

    Returns `SequenceClassifierOutput` with `logits` `[batch, num_labels]`; `labels` give the loss
    of `config.problem_type` (inferred as transformers does when None).
    """

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, labels=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True,
    ) -> outputs.SequenceClassifierOutput:  # fmt: skip
        cfg, enc = self.config, self.encoder
        out = self._encode(False, _inputs(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, deterministic,
        ))  # fmt: skip
        head = ClassificationHead(
            cfg, enc.dense(cfg), enc.classifier_dropout(cfg), enc.classifier_activation(cfg),
            name="classifier",
        )  # fmt: skip
        logits = head(out.last_hidden_state, deterministic)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(logits, labels, cfg.num_labels, cfg.problem_type)
        return outputs.SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class MultipleChoice(EncoderHead):
    """Multiple choice: every choice is encoded alone and scored by the family's scorer.

    Inputs `[batch, choices, length]` (`inputs_embeds` `[batch, choices, length, hidden]`);
    returns `MultipleChoiceModelOutput` with `logits` `[batch, choices]`; `labels` `[batch]`
    give the cross-entropy over choices. `hidden_states` / `attentions` are per flattened
    `[batch * choices]` row, as in transformers.
    """

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, labels=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True,
    ) -> outputs.MultipleChoiceModelOutput:  # fmt: skip
        cfg, enc = self.config, self.encoder
        num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]

        def flat(x, trailing=1):
            return None if x is None else jnp.asarray(x).reshape((-1, *x.shape[-trailing:]))

        out = self._encode(enc.choice_pooler, _inputs(
            flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids),
            head_mask, flat(inputs_embeds, 2), output_attentions, output_hidden_states,
            deterministic,
        ))  # fmt: skip
        logits = enc.choice_logits(enc.dense(cfg), out, cfg, deterministic)
        logits = logits.reshape(-1, num_choices)
        loss = None if labels is None else cross_entropy_with_ignore(logits, labels)
        return outputs.MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class TokenClassification(EncoderHead):
    """Per-token classification: dropout and a `[hidden, num_labels]` `classifier`.

    Returns `TokenClassifierOutput` with `logits` `[batch, length, num_labels]`; `labels`
    `[batch, length]` (`-100` = ignore) give the mean token cross-entropy.
    """

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, labels=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True,
    ) -> outputs.TokenClassifierOutput:  # fmt: skip
        cfg, enc = self.config, self.encoder
        out = self._encode(False, _inputs(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, deterministic,
        ))  # fmt: skip
        x = nn.Dropout(enc.classifier_dropout(cfg))(
            out.last_hidden_state, deterministic=deterministic
        )
        logits = enc.dense(cfg)(cfg.num_labels, ("embed", "classes"), "classifier")(x)
        loss = None
        if labels is not None:
            mask = attention_mask if enc.token_mask_padding(cfg) else None
            loss = token_classification_loss(logits, token_labels(labels, logits), mask)
        return outputs.TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class QuestionAnswering(EncoderHead):
    """Extractive QA: a `[hidden, 2]` span scorer (`qa_outputs`).

    Returns `QuestionAnsweringModelOutput` with `start_logits`, `end_logits` `[batch, length]`;
    `start_positions` / `end_positions` `[batch]` give HF's clamped span loss.
    """

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, start_positions=None, end_positions=None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True,
    ) -> outputs.QuestionAnsweringModelOutput:  # fmt: skip
        cfg, enc = self.config, self.encoder
        if enc.qa_requires_two_labels and cfg.num_labels != 2:
            raise ValueError(f"question answering needs num_labels=2, got {cfg.num_labels}")
        out = self._encode(False, _inputs(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, deterministic,
        ))  # fmt: skip
        start_logits, end_logits = span_logits(enc.dense(cfg), out.last_hidden_state)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return outputs.QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )  # fmt: skip
