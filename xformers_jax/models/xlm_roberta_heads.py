"""XLM-R(-XL) task heads, named and behaving as transformers' classes (both variants).

`XLMRobertaForCausalLM`, `...ForSequenceClassification`, `...ForMultipleChoice`,
`...ForTokenClassification`, `...ForQuestionAnswering`; the base model and the masked LM live in
`xlm_roberta.py`, which re-exports these. Every head takes HF's argument names, returns HF's
output fields, and with `labels` (`start_positions` / `end_positions` for QA) gives HF's loss:

* causal LM: labels shifted left by one inside (token t predicts label t+1), `-100` ignored;
* sequence classification: `problem_type` as transformers infers it (1 label -> regression (MSE);
  integer labels -> single-label cross-entropy; float labels -> multi-label BCE-with-logits);
* token classification: cross-entropy over tokens; the XL variant also ignores tokens where
  `attention_mask != 1` (as `XLMRobertaXLForTokenClassification` does, XLM-R does not);
* QA: positions clamped to `[0, length]`, `length` ignored, mean of start and end losses;
* multiple choice: cross-entropy over the choices.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from xformers_jax.layers import DenseGeneral
from xformers_jax.models import outputs
from xformers_jax.models.common import cross_entropy_with_ignore, dtype_from_name
from xformers_jax.models.xlm_roberta import (
    LMHead,
    XLMRobertaConfig,
    XLMRobertaModel,
    word_embeddings,
)


def _dense(cfg: XLMRobertaConfig, features: int, axes: tuple[str, str], name: str) -> DenseGeneral:
    return DenseGeneral(
        features, axes, dtype=dtype_from_name(cfg.dtype),
        param_dtype=dtype_from_name(cfg.param_dtype),
        kernel_init=nn.initializers.normal(cfg.initializer_range), name=name,
    )  # fmt: skip


def _run_base(module: nn.Module, pooler: bool, kw: dict[str, Any]) -> outputs.BaseModelOutput:
    base = XLMRobertaModel(module.config, add_pooling_layer=pooler, name="model")
    return base(**kw)


def _classifier_dropout(cfg: XLMRobertaConfig) -> float:
    return cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout


def sequence_classification_loss(
    logits: jax.Array, labels: jax.Array, num_labels: int, problem_type: str | None
) -> jax.Array:
    """transformers' loss for `*ForSequenceClassification`, `problem_type` inferred as HF does.

    Args:
      logits: `[batch, num_labels]`.
      labels: `[batch]` ints (single-label), `[batch]` / `[batch, num_labels]` floats (regression),
        `[batch, num_labels]` floats (multi-label).
    """
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    logits = logits.astype(jnp.float32)
    if problem_type == "regression":
        labels = labels.astype(jnp.float32)
        if num_labels == 1:
            return jnp.mean(jnp.square(jnp.squeeze(logits) - jnp.squeeze(labels)))
        return jnp.mean(jnp.square(logits - labels))
    if problem_type == "single_label_classification":
        return cross_entropy_with_ignore(logits.reshape(-1, num_labels), labels.reshape(-1))
    if problem_type == "multi_label_classification":
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))
    raise ValueError(f"unknown problem_type {problem_type!r}")


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """HF's causal-LM loss: position t predicts `labels[t + 1]`; `-100` (and the last) ignored."""
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], -100)], axis=1)
    return cross_entropy_with_ignore(logits, shifted)


def span_loss(
    start_logits: jax.Array, end_logits: jax.Array, start_positions, end_positions
) -> jax.Array:
    """HF's extractive-QA loss: positions clamped to `[0, length]`, `length` itself ignored."""
    length = start_logits.shape[1]
    start = jnp.clip(jnp.asarray(start_positions).reshape(-1), 0, length)
    end = jnp.clip(jnp.asarray(end_positions).reshape(-1), 0, length)
    start_loss = cross_entropy_with_ignore(start_logits, start, ignore_index=length)
    end_loss = cross_entropy_with_ignore(end_logits, end, ignore_index=length)
    return (start_loss + end_loss) / 2


class XLMRobertaForCausalLM(nn.Module):
    """Left-to-right LM (HF `XLMRobertaForCausalLM` / `XLMRobertaXLForCausalLM`).

    As in transformers, the mask is causal only when `config.is_decoder` (set it for LM use; a
    checkpoint's config.json carries it). Returns `CausalLMOutput` with `logits`
    `[batch, length, vocab]`; `labels` `[batch, length]` (unshifted, `-100` = ignore) give
    HF's shifted mean cross-entropy.

    Generation (`xformers_jax.decoding`, through `init_decoding` / `decode_step`) uses a
    fixed-size K/V cache (`cache` / `cache_index`, see `XLMRobertaModel`) and position ids as
    transformers' `generate` makes them, which differ between the variants:

    * XL: from the ids (`create_position_ids_from_input_ids`), so padding (and a generated pad
      token) keeps `padding_idx` and real tokens count up from `padding_idx + 1`;
    * XLM-R: transformers' generic rule from the attention mask, `cumsum(mask) - 1` (padding
      gets 1), i.e. positions start at 0, not at `padding_idx + 1` as in a plain forward pass.
    """

    config: XLMRobertaConfig
    can_generate = True
    decoder_only = True

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, labels=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True, cache=None,
        cache_index=None,
    ) -> outputs.CausalLMOutput:  # fmt: skip
        base = XLMRobertaModel(self.config, add_pooling_layer=False, name="model")
        out = base(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, deterministic, cache=cache,
            cache_index=cache_index,
        )  # fmt: skip
        logits = LMHead(self.config, name="lm_head")(out.last_hidden_state, word_embeddings(base))
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return outputs.CausalLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
            past_key_values=out.past_key_values,
        )  # fmt: skip

    def init_decoding(self, input_ids, attention_mask, max_length: int) -> dict[str, Any]:
        """Prefills the cache with the (left-padded) prompt.

        Args:
          input_ids / attention_mask: `[b, p]` prompt, padding on the left as transformers wants.
          max_length: sequence slots to cache (prompt included).

        Returns:
          Batch-major context: `cache` (`k`, `v` `[b, layers, max_length, heads, head_dim]`),
          `attention_mask` `[b, max_length]` (prompt mask, then ones as transformers extends it)
          and `count` `[b]`, the position counter before the last prompt token (which the first
          `decode_step` runs again).
        """
        cfg = self.config
        b, p = input_ids.shape
        shape = (b, cfg.num_hidden_layers, max_length, cfg.num_attention_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, dtype_from_name(cfg.dtype))
        mask = jnp.ones((b, max_length), jnp.int32).at[:, :p].set(attention_mask.astype(jnp.int32))
        if cfg.pre_ln:
            real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
        else:
            real = attention_mask.astype(jnp.int32)
            positions = jnp.where(real > 0, jnp.cumsum(real, axis=1) - 1, 1)
        out = self(input_ids, mask, position_ids=positions, cache=dict(k=zeros, v=zeros),
                   cache_index=0)  # fmt: skip
        count = jnp.sum(real[:, :-1], axis=1)
        return dict(cache=out.past_key_values, attention_mask=mask, count=count)

    def decode_step(self, tokens, index, context):
        """One position for every row.

        Args:
          tokens: `[b]` the token at sequence slot `index`.
          index: scalar int slot.
          context: from `init_decoding` (or a previous step).

        Returns:
          `(logits [b, vocab] float32 for slot index + 1, updated context)`.
        """
        cfg = self.config
        mask, count = context["attention_mask"], context["count"]
        if cfg.pre_ln:
            real = (tokens != cfg.pad_token_id).astype(jnp.int32)
            positions = (count + real) * real + cfg.pad_token_id
        else:
            real = jax.lax.dynamic_index_in_dim(mask, index, 1, keepdims=False)
            positions = jnp.where(real > 0, count, 1)
        out = self(tokens[:, None], mask, position_ids=positions[:, None],
                   cache=context["cache"], cache_index=index)  # fmt: skip
        logits = out.logits[:, 0].astype(jnp.float32)
        return logits, dict(cache=out.past_key_values, attention_mask=mask, count=count + real)


class ClassificationHead(nn.Module):
    """HF's sentence head: dropout, dense + tanh on `<s>`, dropout, `out_proj`.

    `[batch, length, hidden] -> [batch, num_labels]`.
    """

    config: XLMRobertaConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        drop = nn.Dropout(_classifier_dropout(cfg))
        x = drop(x[:, 0], deterministic=deterministic)
        x = jnp.tanh(_dense(cfg, cfg.hidden_size, ("embed", "mlp"), "dense")(x))
        x = drop(x, deterministic=deterministic)
        return _dense(cfg, cfg.num_labels, ("mlp", "classes"), "out_proj")(x)


class XLMRobertaForSequenceClassification(nn.Module):
    """Sequence classification / regression (HF `XLMRoberta(XL)ForSequenceClassification`).

    Returns `SequenceClassifierOutput` with `logits` `[batch, num_labels]`; `labels` give the
    loss of `config.problem_type` (inferred as transformers does when None).
    """

    config: XLMRobertaConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, labels=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True,
    ) -> outputs.SequenceClassifierOutput:  # fmt: skip
        cfg = self.config
        out = _run_base(self, False, dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            deterministic=deterministic,
        ))  # fmt: skip
        logits = ClassificationHead(cfg, name="classifier")(out.last_hidden_state, deterministic)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(
                logits, jnp.asarray(labels), cfg.num_labels, cfg.problem_type
            )
        return outputs.SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class XLMRobertaForMultipleChoice(nn.Module):
    """Multiple choice (HF `XLMRoberta(XL)ForMultipleChoice`): every choice is encoded alone,
    its pooled `<s>` scored by a `[hidden, 1]` classifier.

    Inputs `[batch, choices, length]` (`inputs_embeds` `[batch, choices, length, hidden]`);
    returns `MultipleChoiceModelOutput` with `logits` `[batch, choices]`; `labels` `[batch]`
    give the cross-entropy over choices. `hidden_states` / `attentions` are per flattened
    `[batch * choices]` row, as in transformers.
    """

    config: XLMRobertaConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, labels=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True,
    ) -> outputs.MultipleChoiceModelOutput:  # fmt: skip
        cfg = self.config
        ref = input_ids if input_ids is not None else inputs_embeds
        num_choices = ref.shape[1]

        def flat(x, trailing=1):
            return None if x is None else x.reshape((-1, *x.shape[-trailing:]))

        out = _run_base(self, True, dict(
            input_ids=flat(input_ids), attention_mask=flat(attention_mask),
            token_type_ids=flat(token_type_ids), position_ids=flat(position_ids),
            head_mask=head_mask, inputs_embeds=flat(inputs_embeds, 2),
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            deterministic=deterministic,
        ))  # fmt: skip
        pooled = nn.Dropout(cfg.hidden_dropout_prob)(out.pooler_output, deterministic=deterministic)
        logits = _dense(cfg, 1, ("embed", "classes"), "classifier")(pooled)
        logits = logits.reshape(-1, num_choices)
        loss = None if labels is None else cross_entropy_with_ignore(logits, jnp.asarray(labels))
        return outputs.MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class XLMRobertaForTokenClassification(nn.Module):
    """Per-token classification (HF `XLMRoberta(XL)ForTokenClassification`).

    Returns `TokenClassifierOutput` with `logits` `[batch, length, num_labels]`; `labels`
    `[batch, length]` (`-100` = ignore) give the mean token cross-entropy.
    """

    config: XLMRobertaConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, labels=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True,
    ) -> outputs.TokenClassifierOutput:  # fmt: skip
        cfg = self.config
        out = _run_base(self, False, dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            deterministic=deterministic,
        ))  # fmt: skip
        x = nn.Dropout(_classifier_dropout(cfg))(out.last_hidden_state, deterministic=deterministic)
        logits = _dense(cfg, cfg.num_labels, ("embed", "classes"), "classifier")(x)
        loss = None
        if labels is not None:
            labels = jnp.asarray(labels)
            if cfg.pre_ln and attention_mask is not None:
                # transformers' XL head (only) drops padding tokens from the loss itself.
                labels = jnp.where(jnp.asarray(attention_mask) == 1, labels, -100)
            loss = cross_entropy_with_ignore(logits.reshape(-1, cfg.num_labels), labels.reshape(-1))
        return outputs.TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class XLMRobertaForQuestionAnswering(nn.Module):
    """Extractive QA (HF `XLMRoberta(XL)ForQuestionAnswering`): a `[hidden, 2]` span scorer.

    Returns `QuestionAnsweringModelOutput` with `start_logits`, `end_logits` `[batch, length]`;
    `start_positions` / `end_positions` `[batch]` give HF's clamped span loss.
    """

    config: XLMRobertaConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, start_positions=None, end_positions=None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True,
    ) -> outputs.QuestionAnsweringModelOutput:  # fmt: skip
        cfg = self.config
        if cfg.num_labels != 2:
            raise ValueError(f"question answering needs num_labels=2, got {cfg.num_labels}")
        out = _run_base(self, False, dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            deterministic=deterministic,
        ))  # fmt: skip
        logits = _dense(cfg, 2, ("embed", "classes"), "qa_outputs")(out.last_hidden_state)
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        return outputs.QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )  # fmt: skip


# transformers' XL class names; the modules are the same (the config picks the block).
XLMRobertaXLForCausalLM = XLMRobertaForCausalLM
XLMRobertaXLForSequenceClassification = XLMRobertaForSequenceClassification
XLMRobertaXLForMultipleChoice = XLMRobertaForMultipleChoice
XLMRobertaXLForTokenClassification = XLMRobertaForTokenClassification
XLMRobertaXLForQuestionAnswering = XLMRobertaForQuestionAnswering
