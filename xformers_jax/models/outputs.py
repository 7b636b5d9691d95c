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
