"""Model outputs with transformers' field names; pytrees, so they pass through jit."""

from __future__ import annotations

from typing import Any

import flax.struct

Array = Any


@flax.struct.dataclass
class BaseModelOutput:
    last_hidden_state: Array = None
    pooler_output: Array = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    past_key_values: Any = None


@flax.struct.dataclass
class MaskedLMOutput:
    loss: Array = None
    logits: Array = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@flax.struct.dataclass
class CausalLMOutput:
    loss: Array = None
    logits: Array = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    past_key_values: Any = None


@flax.struct.dataclass
class SequenceClassifierOutput:
    loss: Array = None
    logits: Array = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


TokenClassifierOutput = SequenceClassifierOutput
MultipleChoiceModelOutput = SequenceClassifierOutput


@flax.struct.dataclass
class QuestionAnsweringModelOutput:
    loss: Array = None
    start_logits: Array = None
    end_logits: Array = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@flax.struct.dataclass
class Seq2SeqModelOutput:
    last_hidden_state: Array = None
    past_key_values: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: Array = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


@flax.struct.dataclass
class Seq2SeqLMOutput:
    loss: Array = None
    logits: Array = None
    past_key_values: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: Array = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


@flax.struct.dataclass
class Seq2SeqSequenceClassifierOutput:
    loss: Array = None
    logits: Array = None
    past_key_values: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: Array = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


@flax.struct.dataclass
class Seq2SeqQuestionAnsweringModelOutput:
    loss: Array = None
    start_logits: Array = None
    end_logits: Array = None
    past_key_values: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: Array = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


# BEiT (vision) outputs, with transformers' names.
BeitModelOutputWithPooling = BaseModelOutput
ImageClassifierOutput = SequenceClassifierOutput


@flax.struct.dataclass
class SemanticSegmenterOutput:
    loss: Array = None
    logits: Array = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@flax.struct.dataclass
class BackboneOutput:
    feature_maps: tuple | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@flax.struct.dataclass
class ChunkedLMOutput:
    """An LM loss computed without logits (vocabulary-chunked cross-entropy).

    `loss` is the mean over labelled tokens; `token_losses` `[batch, P]` (0 where ignored) and
    `predictions` `[batch, P]` (argmax ids) let tasks sum metrics.
    """

    loss: Array = None
    token_losses: Array = None
    predictions: Array = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


# XLNet: transformers' XLNet*Output classes (every head also returns `mems`).
@flax.struct.dataclass
class XLNetModelOutput:
    last_hidden_state: Array = None
    mems: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@flax.struct.dataclass
class XLNetLMHeadModelOutput:
    loss: Array = None
    logits: Array = None
    mems: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


XLNetForSequenceClassificationOutput = XLNetLMHeadModelOutput
XLNetForTokenClassificationOutput = XLNetLMHeadModelOutput
XLNetForMultipleChoiceOutput = XLNetLMHeadModelOutput


@flax.struct.dataclass
class XLNetForQuestionAnsweringSimpleOutput:
    loss: Array = None
    start_logits: Array = None
    end_logits: Array = None
    mems: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@flax.struct.dataclass
class XLNetForQuestionAnsweringOutput:
    loss: Array = None
    start_top_log_probs: Array = None
    start_top_index: Array = None
    end_top_log_probs: Array = None
    end_top_index: Array = None
    cls_logits: Array = None
    mems: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
