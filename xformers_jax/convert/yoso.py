"""HF <-> ours names for YOSO (`yoso`).

transformers keeps the base model under `yoso.` in head models (at the top level in the bare
`YosoModel`), with BERT's layout: `attention.self.{query,key,value}` (+ `conv`, a depthwise
Conv2d `[heads, 1, window, 1]`, when `conv_window` is set), `attention.output.{dense,LayerNorm}`,
`intermediate.dense`, `output.{dense,LayerNorm}`, and the MLM head under `cls.predictions`.
Ours: `attention/{query,key,value,conv}`, `out`, `attention_norm`, `mlp/{wi,wo}`, `mlp_norm`,
`lm_head/{dense,norm,bias}`.
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

BASE_PREFIX = "yoso."

# Non-persistent buffers that some transformers versions saved.
_BUFFERS = (r"(yoso\.)?embeddings\.position_ids", r"(yoso\.)?embeddings\.token_type_ids")
# Tensors of *other* heads (an MLM checkpoint fine-tuned as a classifier): dropped, as
# transformers drops unexpected keys. A head's own tensors are matched by its rules first.
_OTHER_HEADS = r"(cls|classifier|pre_classifier|qa_outputs)\..*"


def head_kind(architecture: str) -> str:
    """`'YosoForQuestionAnswering'` -> `'ForQuestionAnswering'` (`'Model'` for the base)."""
    if not architecture.startswith("Yoso"):
        raise ValueError(f"not a YOSO architecture: {architecture!r}")
    return architecture[len("Yoso") :]


def _linear(path: tuple[str, ...], hf: str) -> list[Rule]:
    # Classifier-style heads are initialised fresh when a checkpoint lacks them, as in HF.
    return [
        Rule((*path, "kernel"), f"{hf}.weight", "linear", init="normal"),
        Rule((*path, "bias"), f"{hf}.bias", "bias", init="zeros"),
    ]


def _head_rules(kind: str) -> list[Rule]:
    if kind == "ForMaskedLM":
        return [
            *dense_rules(("lm_head", "dense"), "cls.predictions.transform.dense"),
            *norm_rules(("lm_head", "norm"), "cls.predictions.transform.LayerNorm"),
            Rule(
                ("lm_head", "bias"),
                "cls.predictions.bias",
                aliases=("cls.predictions.decoder.bias",),
            ),
        ]
    if kind == "ForSequenceClassification":
        return [
            *_linear(("classifier", "dense"), "classifier.dense"),
            *_linear(("classifier", "out_proj"), "classifier.out_proj"),
        ]
    if kind == "ForMultipleChoice":
        return [
            *_linear(("pre_classifier",), "pre_classifier"),
            *_linear(("classifier",), "classifier"),
        ]
    if kind == "ForTokenClassification":
        return _linear(("classifier",), "classifier")
    if kind == "ForQuestionAnswering":
        return _linear(("qa_outputs",), "qa_outputs")
    raise ValueError(f"unknown YOSO head {kind!r}")


def _base_rules(config: Any, root: tuple[str, ...], p: str) -> list[Rule]:
    """The base model's rules; the word embeddings come first (the MLM head ties them)."""
    emb, lay = (*root, "embeddings"), (*root, "layers")
    layer = f"{p}encoder.layer.{{i}}"
    rules = [
        embed_rule((*emb, "word_embeddings"), f"{p}embeddings.word_embeddings"),
        embed_rule((*emb, "token_type_embeddings"), f"{p}embeddings.token_type_embeddings"),
        *norm_rules((*emb, "norm"), f"{p}embeddings.LayerNorm"),
    ]
    if config.position_embedding_type == "absolute":
        rules.append(
            embed_rule((*emb, "position_embeddings"), f"{p}embeddings.position_embeddings")
        )
    for name in ("query", "key", "value"):
        rules += dense_rules((*lay, "attention", name), f"{layer}.attention.self.{name}")
    if config.conv_window is not None:
        rules.append(
            Rule((*lay, "attention", "conv"), f"{layer}.attention.self.conv.weight", "conv")
        )
    rules += dense_rules((*lay, "out"), f"{layer}.attention.output.dense", n_in=2)
    rules += norm_rules((*lay, "attention_norm"), f"{layer}.attention.output.LayerNorm")
    rules += dense_rules((*lay, "mlp", "wi"), f"{layer}.intermediate.dense")
    rules += dense_rules((*lay, "mlp", "wo"), f"{layer}.output.dense")
    rules += norm_rules((*lay, "mlp_norm"), f"{layer}.output.LayerNorm")
    return rules


def param_map(config: Any, architecture: str) -> ParamMap:
    """The name map of `architecture` (an HF class name) for `config` (a YosoConfig)."""
    kind = head_kind(architecture)
    bare = kind == "Model"
    root: tuple[str, ...] = () if bare else ("model",)
    p = "" if bare else BASE_PREFIX
    rules = _base_rules(config, root, p)
    ignore = list(_BUFFERS)
    if not bare:
        ignore.append(_OTHER_HEADS)
        rules += _head_rules(kind)
        if kind == "ForMaskedLM":
            word = rules[0]
            rules[0] = Rule(word.path, word.hf, aliases=("cls.predictions.decoder.weight",))
    rows = config.max_position_embeddings + 2  # YOSO's table has two extra rows
    return encoder_map(config, rules, p, BASE_PREFIX, root, ignore, position_rows=rows)
