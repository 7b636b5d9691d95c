"""Model outputs with transformers' field names; pytrees, so they pass through jit.

Every output is a `flax.struct.dataclass` whose fields all default to None, made by `_output`
from its field names (in transformers' order, which is also the pytree order). Outputs that
transformers names apart but that hold the same fields are aliases of one class.
"""

from __future__ import annotations

from typing import Any

import flax.struct

Array = Any

_HIDDEN = "hidden_states attentions"
_SEQ2SEQ = (
    "past_key_values decoder_hidden_states decoder_attentions cross_attentions "
    "encoder_last_hidden_state encoder_hidden_states encoder_attentions"
)


def _output(name: str, fields: str, doc: str | None = None) -> type:
    """A `flax.struct.dataclass` named `name` with the space-separated `fields`, all None."""
    names = fields.split()
    namespace = {
        "__annotations__": dict.fromkeys(names, "Any"),
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": doc or f"transformers' `{name}` fields: {', '.join(names)}.",
        **dict.fromkeys(names),
    }
    return flax.struct.dataclass(type(name, (), namespace))


BaseModelOutput = _output(
    "BaseModelOutput",
    f"last_hidden_state pooler_output {_HIDDEN} past_key_values cross_attentions",
)
MaskedLMOutput = _output("MaskedLMOutput", f"loss logits {_HIDDEN}")
CausalLMOutput = _output(
    "CausalLMOutput", f"loss logits {_HIDDEN} past_key_values cross_attentions"
)
SequenceClassifierOutput = _output("SequenceClassifierOutput", f"loss logits {_HIDDEN}")
TokenClassifierOutput = SequenceClassifierOutput
MultipleChoiceModelOutput = SequenceClassifierOutput
QuestionAnsweringModelOutput = _output(
    "QuestionAnsweringModelOutput", f"loss start_logits end_logits {_HIDDEN}"
)

Seq2SeqModelOutput = _output("Seq2SeqModelOutput", f"last_hidden_state {_SEQ2SEQ}")
Seq2SeqLMOutput = _output("Seq2SeqLMOutput", f"loss logits {_SEQ2SEQ}")
Seq2SeqSequenceClassifierOutput = _output(
    "Seq2SeqSequenceClassifierOutput", f"loss logits {_SEQ2SEQ}"
)
Seq2SeqQuestionAnsweringModelOutput = _output(
    "Seq2SeqQuestionAnsweringModelOutput", f"loss start_logits end_logits {_SEQ2SEQ}"
)

# BEiT (vision) outputs, with transformers' names.
BeitModelOutputWithPooling = BaseModelOutput
ImageClassifierOutput = SequenceClassifierOutput
SemanticSegmenterOutput = _output("SemanticSegmenterOutput", f"loss logits {_HIDDEN}")
BackboneOutput = _output("BackboneOutput", f"feature_maps {_HIDDEN}")

ChunkedLMOutput = _output(
    "ChunkedLMOutput",
    f"loss token_losses predictions {_HIDDEN}",
    """An LM loss computed without logits (vocabulary-chunked cross-entropy).

    `loss` is the mean over labelled tokens; `token_losses` `[batch, P]` (0 where ignored) and
    `predictions` `[batch, P]` (argmax ids) let tasks sum metrics.
    """,
)

# XLNet: transformers' XLNet*Output classes (every head also returns `mems`).
XLNetModelOutput = _output("XLNetModelOutput", f"last_hidden_state mems {_HIDDEN}")
XLNetLMHeadModelOutput = _output("XLNetLMHeadModelOutput", f"loss logits mems {_HIDDEN}")
XLNetForSequenceClassificationOutput = XLNetLMHeadModelOutput
XLNetForTokenClassificationOutput = XLNetLMHeadModelOutput
XLNetForMultipleChoiceOutput = XLNetLMHeadModelOutput
XLNetForQuestionAnsweringSimpleOutput = _output(
    "XLNetForQuestionAnsweringSimpleOutput", f"loss start_logits end_logits mems {_HIDDEN}"
)
XLNetForQuestionAnsweringOutput = _output(
    "XLNetForQuestionAnsweringOutput",
    "loss start_top_log_probs start_top_index end_top_log_probs end_top_index cls_logits mems "
    f"{_HIDDEN}",
)
