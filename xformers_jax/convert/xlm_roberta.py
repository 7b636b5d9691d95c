"""HF <-> ours names for XLM-RoBERTa-XL (`xlm-roberta-xl`) and XLM-R / XLM-V (`xlm-roberta`).

Both HF families keep the base model under `roberta.` in head models and at the top level in the
bare model. Pre-LN XL blocks name their norms `attention.self_attn_layer_norm` and `LayerNorm` and
end with `encoder.LayerNorm`; post-LN blocks name them `attention.output.LayerNorm` and
`output.LayerNorm` and start with `embeddings.LayerNorm`. Our names are the same for both:
`attention_norm`, `mlp_norm`, `final_norm` (pre-LN), `embeddings/norm` (post-LN). Decoders with
cross-attention (`add_cross_attention`) add `crossattention.self.{query,key,value}`,
`crossattention.output.dense` and its norm (`crossattention.self_attn_layer_norm` pre-LN,
`crossattention.output.LayerNorm` post-LN): ours `crossattention/*`, `crossattention_norm`.
"""

from __future__ import annotations

from typing import Any

from xformers_jax.convert.param_map import (
    ParamMap,
    Rule,
    dense_rules,
    embed_rule,
    encoder_map,
    norm_rules,
)

BASE_PREFIX = "roberta."

_BASE_ARCHS = ("XLMRobertaModel", "XLMRobertaXLModel")

# Non-persistent buffers that older transformers versions saved.
_BUFFERS = (r"(roberta\.)?embeddings\.position_ids", r"(roberta\.)?embeddings\.token_type_ids")


def head_kind(architecture: str) -> str:
    """`'XLMRobertaXLForQuestionAnswering'` -> `'ForQuestionAnswering'` (`'Model'` for the base)."""
    for prefix in ("XLMRobertaXL", "XLMRoberta"):
        if architecture.startswith(prefix):
            return architecture[len(prefix) :]
    raise ValueError(f"not an XLM-RoBERTa architecture: {architecture!r}")


# Head-model tensors by head kind. Classifier-style heads are initialised fresh when a checkpoint
# lacks them (fine-tuning from a pretraining checkpoint), as transformers does; LM heads are not.
def _head_rules(kind: str) -> list[Rule]:
    fresh = dict(init="normal")
    zero = dict(init="zeros")

    def linear(path: tuple[str, ...], hf: str) -> list[Rule]:
        return [
            Rule((*path, "kernel"), f"{hf}.weight", "linear", **fresh),
            Rule((*path, "bias"), f"{hf}.bias", "bias", **zero),
        ]

    if kind in ("ForMaskedLM", "ForCausalLM"):
        return [
            *dense_rules(("lm_head", "dense"), "lm_head.dense"),
            *norm_rules(("lm_head", "norm"), "lm_head.layer_norm"),
            # The decoder's bias is tied to lm_head.bias, its weight to the word embeddings.
            Rule(("lm_head", "bias"), "lm_head.bias", aliases=("lm_head.decoder.bias",)),
        ]
    if kind == "ForSequenceClassification":
        return [
            *linear(("classifier", "dense"), "classifier.dense"),
            *linear(("classifier", "out_proj"), "classifier.out_proj"),
        ]
    if kind in ("ForMultipleChoice", "ForTokenClassification"):
        return linear(("classifier",), "classifier")
    if kind == "ForQuestionAnswering":
        return linear(("qa_outputs",), "qa_outputs")
    raise ValueError(f"unknown XLM-RoBERTa head {kind!r}")


# Tensors of *other* heads in a checkpoint (an MLM checkpoint loaded for fine-tuning): dropped, as
# transformers drops unexpected keys. A head's own tensors are matched by its rules first.
_OTHER_HEADS = r"(lm_head|classifier|qa_outputs)\..*"


def param_map(config: Any, architecture: str) -> ParamMap:
    """The name map of `architecture` (an HF class name) for `config` (an XLMRobertaConfig)."""
    kind = head_kind(architecture)
    bare = kind == "Model"
    root: tuple[str, ...] = () if bare else ("model",)
    p = "" if bare else BASE_PREFIX
    # Only the bare model and multiple choice (which classifies the pooled <s>) have a pooler.
    pooler = kind in ("Model", "ForMultipleChoice")
    rules = _base_rules(config, root, p, pooler=pooler)
    ignore = list(_BUFFERS)
    if not bare:
        if not pooler:
            # HF head models have no pooler; pretraining checkpoints often do (transformers
            # ignores it too, via `_keys_to_ignore_on_load_unexpected`).
            ignore.append(r"roberta\.pooler\..*")
        ignore.append(_OTHER_HEADS)
        rules += _head_rules(kind)
        if kind in ("ForMaskedLM", "ForCausalLM"):
            word = rules[0]
            rules[0] = Rule(word.path, word.hf, aliases=("lm_head.decoder.weight",))
    rows = config.max_position_embeddings
    return encoder_map(config, rules, p, BASE_PREFIX, root, ignore, position_rows=rows)


def _base_rules(config: Any, root: tuple[str, ...], p: str, pooler: bool) -> list[Rule]:
    """The base model's rules; the word embeddings come first (head models tie them)."""
    emb, lay = (*root, "embeddings"), (*root, "layers")
    layer = f"{p}encoder.layer.{{i}}"
    rules = [
        embed_rule((*emb, "word_embeddings"), f"{p}embeddings.word_embeddings"),
        embed_rule((*emb, "token_type_embeddings"), f"{p}embeddings.token_type_embeddings"),
    ]
    if config.position_embedding_type == "absolute":
        rules.append(
            embed_rule((*emb, "position_embeddings"), f"{p}embeddings.position_embeddings")
        )
    else:
        rules.append(
            embed_rule(
                (*lay, "attention", "distance_embedding"),
                f"{layer}.attention.self.distance_embedding",
            )
        )
    for name in ("query", "key", "value"):
        rules += dense_rules((*lay, "attention", name), f"{layer}.attention.self.{name}")
    rules += dense_rules((*lay, "attention", "out"), f"{layer}.attention.output.dense", n_in=2)
    rules += dense_rules((*lay, "mlp", "wi"), f"{layer}.intermediate.dense")
    rules += dense_rules((*lay, "mlp", "wo"), f"{layer}.output.dense")
    if config.add_cross_attention:  # decoders of encoder-decoders; absolute positions only
        cross = f"{layer}.crossattention"
        for name in ("query", "key", "value"):
            rules += dense_rules((*lay, "crossattention", name), f"{cross}.self.{name}")
        rules += dense_rules((*lay, "crossattention", "out"), f"{cross}.output.dense", n_in=2)
        norm = "self_attn_layer_norm" if config.model_type == "xlm-roberta-xl" else (
            "output.LayerNorm"
        )  # fmt: skip
        rules += norm_rules((*lay, "crossattention_norm"), f"{cross}.{norm}")
    if config.model_type == "xlm-roberta-xl":
        rules += norm_rules((*lay, "attention_norm"), f"{layer}.attention.self_attn_layer_norm")
        rules += norm_rules((*lay, "mlp_norm"), f"{layer}.LayerNorm")
        rules += norm_rules((*root, "final_norm"), f"{p}encoder.LayerNorm")
    else:
        rules += norm_rules((*emb, "norm"), f"{p}embeddings.LayerNorm")
        rules += norm_rules((*lay, "attention_norm"), f"{layer}.attention.output.LayerNorm")
        rules += norm_rules((*lay, "mlp_norm"), f"{layer}.output.LayerNorm")
    if pooler:
        # Missing from checkpoints saved by head models: initialised fresh, as transformers does.
        pool = (*root, "pooler", "dense")
        rules += [
            Rule((*pool, "kernel"), f"{p}pooler.dense.weight", "linear", init="normal"),
            Rule((*pool, "bias"), f"{p}pooler.dense.bias", "bias", init="zeros"),
        ]
    return rules
