"""XLM-R(-XL) task heads, named and behaving as transformers' classes (both variants).

`XLMRobertaForCausalLM` (with generation) here; `...ForSequenceClassification`,
`...ForMultipleChoice`, `...ForTokenClassification` and `...ForQuestionAnswering` are the shared
heads of `heads.py` over XLM-R's encoder. The base model and the masked LM live in
`xlm_roberta.py` (which never imports this module). With `labels` (`start_positions` /
`end_positions` for QA) every head gives HF's loss:

* causal LM: labels shifted left by one inside (token t predicts label t+1), `-100` ignored;
* sequence classification: `problem_type` as transformers infers it (1 label -> regression (MSE);
  integer labels -> single-label cross-entropy; float labels -> multi-label BCE-with-logits);
* token classification: cross-entropy over tokens; the XL variant also ignores tokens where
  `attention_mask != 1` (as `XLMRobertaXLForTokenClassification` does, XLM-R does not);
* QA: positions clamped to `[0, length]`, `length` ignored, mean of start and end losses;
* multiple choice: the pooled `<s>` of every choice scored by a `[hidden, 1]` classifier,
  cross-entropy over the choices.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax import decoding
from xformers_jax.layers.losses import causal_lm_loss
from xformers_jax.models import heads, outputs
from xformers_jax.models.xlm_roberta import XLMRobertaConfig, XLMRobertaModel, exact_gelu


@decoding.generator(decoder_only=True)
class XLMRobertaForCausalLM(nn.Module):
    """Left-to-right LM (HF `XLMRobertaForCausalLM` / `XLMRobertaXLForCausalLM`).

    As in transformers, the mask is causal only when `config.is_decoder` (set it for LM use; a
    checkpoint's config.json carries it). Returns `CausalLMOutput` with `logits`
    `[batch, length, vocab]`; `labels` `[batch, length]` (unshifted, `-100` = ignore) give
    HF's shifted mean cross-entropy. With `config.add_cross_attention` it is the decoder of an
    encoder-decoder: `encoder_hidden_states` / `encoder_attention_mask` feed its
    cross-attention; `past_key_values` / `use_cache` as in `XLMRobertaModel`.

    Generation (`xformers_jax.decoding`, through `init_decoding` / `decode_step`) uses a
    fixed-size K/V cache (`cache` / `cache_index`, see `XLMRobertaModel`; the cross-attention
    K/V of `encoder_hidden_states` computed once) and position ids as transformers' `generate`
    makes them, which differ between the variants:

    * XL: from the ids (`create_position_ids_from_input_ids`), so padding (and a generated pad
      token) keeps `padding_idx` and real tokens count up from `padding_idx + 1`;
    * XLM-R: transformers' generic rule from the attention mask, `cumsum(mask) - 1` (padding
      gets 1), i.e. positions start at 0, not at `padding_idx + 1` as in a plain forward pass.
    """

    config: XLMRobertaConfig
    decoding_inputs = ("encoder_hidden_states", "encoder_attention_mask")

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
        head_mask=None, inputs_embeds=None, labels=None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True, cache=None,
        cache_index=None, encoder_hidden_states=None, encoder_attention_mask=None,
        past_key_values=None, use_cache: bool = False,
    ) -> outputs.CausalLMOutput:  # fmt: skip
        base = XLMRobertaModel(self.config, add_pooling_layer=False, name="model")
        out = base(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions, output_hidden_states, deterministic, cache=cache,
            cache_index=cache_index, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values,
            use_cache=use_cache,
        )  # fmt: skip
        head = heads.LMHead(self.config, exact_gelu, name="lm_head")
        logits = head(out.last_hidden_state, heads.word_embeddings(base))
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return outputs.CausalLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
            past_key_values=out.past_key_values, cross_attentions=out.cross_attentions,
        )  # fmt: skip

    def init_decoding(
        self, input_ids, attention_mask, max_length: int, encoder_hidden_states=None,
        encoder_attention_mask=None,
    ) -> dict[str, Any]:  # fmt: skip
        """Prefills the cache with the (left-padded) prompt.

        Args:
          input_ids / attention_mask: `[b, p]` prompt, padding on the left as transformers wants.
          max_length: sequence slots to cache (prompt included).
          encoder_hidden_states / encoder_attention_mask: `[b, n, hidden]` / `[b, n]`, what the
            cross-attention attends to (decoders with `config.add_cross_attention`).

        Returns:
          Batch-major context: `cache` (`k`, `v` `[b, layers, max_length, heads, head_dim]`;
          `cross_k`, `cross_v` `[b, layers, n, heads, head_dim]` with encoder states),
          `attention_mask` `[b, max_length]` (prompt mask, then ones as transformers extends it),
          `count` `[b]`, the position counter before the last prompt token (which the first
          `decode_step` runs again), and `encoder_attention_mask` with encoder states.
        """
        cfg = self.config
        b, p = input_ids.shape
        shape = (b, cfg.num_hidden_layers, max_length, cfg.num_attention_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, cfg.dtype)
        mask = jnp.ones((b, max_length), jnp.int32).at[:, :p].set(attention_mask.astype(jnp.int32))
        if cfg.pre_ln:
            real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
        else:
            real = attention_mask.astype(jnp.int32)
            positions = jnp.where(real > 0, jnp.cumsum(real, axis=1) - 1, 1)
        out = self(input_ids, mask, position_ids=positions, cache=dict(k=zeros, v=zeros),
                   cache_index=0, encoder_hidden_states=encoder_hidden_states,
                   encoder_attention_mask=encoder_attention_mask)  # fmt: skip
        count = jnp.sum(real[:, :-1], axis=1)
        context = dict(cache=out.past_key_values, attention_mask=mask, count=count)
        if encoder_hidden_states is not None:
            n = encoder_hidden_states.shape[1]
            enc_mask = jnp.ones((b, n), jnp.int32) if encoder_attention_mask is None else (
                jnp.asarray(encoder_attention_mask, jnp.int32)
            )  # fmt: skip
            context["encoder_attention_mask"] = enc_mask
        return context

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
                   cache=context["cache"], cache_index=index,
                   encoder_attention_mask=context.get("encoder_attention_mask"))  # fmt: skip
        logits = out.logits[:, 0].astype(jnp.float32)
        return logits, dict(context, cache=out.past_key_values, count=count + real)


def _choice_logits(dense: heads.Dense, out, cfg: XLMRobertaConfig, deterministic: bool):
    """HF's multiple-choice scorer: dropout on the pooled `<s>`, a `[hidden, 1]` classifier."""
    pooled = nn.Dropout(cfg.hidden_dropout_prob)(out.pooler_output, deterministic=deterministic)
    return dense(1, ("embed", "classes"), "classifier")(pooled)


ENCODER = heads.Encoder(
    model=lambda cfg, pooler: XLMRobertaModel(cfg, add_pooling_layer=pooler, name="model"),
    dense=lambda cfg: heads.dense_factory(cfg, nn.initializers.normal(cfg.initializer_range)),
    classifier_dropout=lambda cfg: (
        cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
    ),
    classifier_activation=lambda cfg: jnp.tanh,
    choice_pooler=True,
    choice_logits=_choice_logits,
    # transformers' XL token head (only) drops padding tokens from the loss itself.
    token_mask_padding=lambda cfg: cfg.pre_ln,
    qa_requires_two_labels=True,
)


class XLMRobertaForSequenceClassification(heads.SequenceClassification):
    """HF `XLMRoberta(XL)ForSequenceClassification`: dropout, dense + tanh on `<s>`, dropout,
    `out_proj` (in `classifier`); see `heads.SequenceClassification`."""

    encoder = ENCODER


class XLMRobertaForMultipleChoice(heads.MultipleChoice):
    """HF `XLMRoberta(XL)ForMultipleChoice`: every choice's pooled `<s>` scored by a
    `[hidden, 1]` `classifier`; see `heads.MultipleChoice`."""

    encoder = ENCODER


class XLMRobertaForTokenClassification(heads.TokenClassification):
    """HF `XLMRoberta(XL)ForTokenClassification`; see `heads.TokenClassification`."""

    encoder = ENCODER


class XLMRobertaForQuestionAnswering(heads.QuestionAnswering):
    """HF `XLMRoberta(XL)ForQuestionAnswering`; see `heads.QuestionAnswering`."""

    encoder = ENCODER


# transformers' XL class names; the modules are the same (the config picks the block).
XLMRobertaXLForCausalLM = XLMRobertaForCausalLM
XLMRobertaXLForSequenceClassification = XLMRobertaForSequenceClassification
XLMRobertaXLForMultipleChoice = XLMRobertaForMultipleChoice
XLMRobertaXLForTokenClassification = XLMRobertaForTokenClassification
XLMRobertaXLForQuestionAnswering = XLMRobertaForQuestionAnswering
