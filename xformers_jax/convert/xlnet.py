"""HF <-> ours names for XLNet (`xlnet`).

HF head models keep the base model under `transformer.`; the bare `XLNetModel` at the top level.
The attention projections `rel_attn.{q,k,v,o,r}` are plain `[d_model, heads, head_dim]` parameters
(not Linear layers), stored exactly as our params, so they are `copy` rules, as are the relative
biases, `seg_embed` and `mask_emb`. The feed-forward `ff.layer_1` / `ff.layer_2` are Linears.

`untie_r=False`: our model holds one set of relative biases (`transformer/biases/*`) shared by all
layers, while transformers keeps a copy per layer. On load every layer's copy must be equal (as in
checkpoints converted from the original TF ones); on save the shared tensor is written to every
layer, so transformers loads the export unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from xformers_jax.convert import param_map as pm
from xformers_jax.convert.param_map import ConversionError, ParamMap, Rule, dense_rules, norm_rules

BASE_PREFIX = "transformer."
_BIASES = ("r_w_bias", "r_r_bias", "r_s_bias")


def _fresh_dense(path: tuple[str, ...], hf: str, bias: bool = True) -> list[Rule]:
    """A head Linear that transformers initialises fresh when a checkpoint lacks it."""
    rules = [Rule((*path, "kernel"), f"{hf}.weight", "linear", init="normal")]
    if bias:
        rules.append(Rule((*path, "bias"), f"{hf}.bias", "bias", init="zeros"))
    return rules


def _fresh_norm(path: tuple[str, ...], hf: str) -> list[Rule]:
    return [
        Rule((*path, "scale"), f"{hf}.weight", init="ones"),
        Rule((*path, "bias"), f"{hf}.bias", init="zeros"),
    ]


def _base_rules(config: Any, root: tuple[str, ...], p: str) -> list[Rule]:
    """The base model's rules; the word embedding comes first (the LM head ties it)."""
    lay = (*root, "layers")
    attn = (*lay, "rel_attn")
    layer = f"{p}layer.{{i}}"
    rules = [
        Rule((*root, "word_embedding"), f"{p}word_embedding.weight"),
        Rule((*root, "mask_emb"), f"{p}mask_emb"),
    ]
    rules += [Rule((*attn, n), f"{layer}.rel_attn.{n}") for n in ("q", "k", "v", "o", "r")]
    rules.append(Rule((*attn, "seg_embed"), f"{layer}.rel_attn.seg_embed"))
    if config.untie_r:
        rules += [Rule((*attn, "biases", n), f"{layer}.rel_attn.{n}") for n in _BIASES]
    else:
        for n in _BIASES:
            keys = [f"{p}layer.{i}.rel_attn.{n}" for i in range(config.n_layer)]
            rules.append(Rule((*root, "biases", n), keys[0], aliases=tuple(keys[1:])))
    rules += norm_rules((*attn, "layer_norm"), f"{layer}.rel_attn.layer_norm")
    rules += dense_rules((*lay, "ff", "wi"), f"{layer}.ff.layer_1")
    rules += dense_rules((*lay, "ff", "wo"), f"{layer}.ff.layer_2")
    rules += norm_rules((*lay, "ff_norm"), f"{layer}.ff.layer_norm")
    return rules


def _summary_rules(config: Any) -> list[Rule]:
    s = ("sequence_summary",)
    rules = []
    if config.summary_type == "attn":
        # Ours only (transformers has no attention summary): stored under our own names.
        rules += [Rule((*s, n), f"sequence_summary.attn.{n}", init="normal") for n in "qkvo"]
        rules.append(
            Rule((*s, "summary_bias"), "sequence_summary.attn.summary_bias", init="normal")
        )
        rules += _fresh_norm((*s, "attn_norm"), "sequence_summary.attn.layer_norm")
    if config.summary_use_proj:
        rules += _fresh_dense((*s, "summary"), "sequence_summary.summary")
    return rules


def _head_rules(config: Any, architecture: str) -> list[Rule]:
    if architecture == "XLNetLMHeadModel":
        return [Rule(("lm_loss", "bias"), "lm_loss.bias", init="zeros")]
    if architecture in ("XLNetForSequenceClassification", "XLNetForMultipleChoice"):
        return _summary_rules(config) + _fresh_dense(("logits_proj",), "logits_proj")
    if architecture == "XLNetForTokenClassification":
        return _fresh_dense(("classifier",), "classifier")
    if architecture == "XLNetForQuestionAnsweringSimple":
        return _fresh_dense(("qa_outputs",), "qa_outputs")
    if architecture == "XLNetForQuestionAnswering":
        return [
            *_fresh_dense(("start_logits",), "start_logits.dense"),
            *_fresh_dense(("end_logits", "dense_0"), "end_logits.dense_0"),
            *_fresh_norm(("end_logits", "norm"), "end_logits.LayerNorm"),
            *_fresh_dense(("end_logits", "dense_1"), "end_logits.dense_1"),
            *_fresh_dense(("answer_class", "dense_0"), "answer_class.dense_0"),
            *_fresh_dense(("answer_class", "dense_1"), "answer_class.dense_1", bias=False),
        ]
    raise ValueError(f"unknown XLNet architecture {architecture!r}")


def param_map(config: Any, architecture: str) -> ParamMap:
    """The name map of `architecture` (an HF class name) for `config` (an XLNetConfig)."""
    bare = architecture == "XLNetModel"
    root: tuple[str, ...] = () if bare else ("transformer",)
    p = "" if bare else BASE_PREFIX
    rules = _base_rules(config, root, p)
    if not bare:
        rules += _head_rules(config, architecture)
    if architecture == "XLNetLMHeadModel":
        # lm_loss.weight is tied to the word embedding (transformers does not save it).
        rules[0] = Rule(rules[0].path, rules[0].hf, aliases=("lm_loss.weight",))
    return ParamMap(
        rules=tuple(rules),
        num_layers=config.n_layer,
        prefix=p,
        base_prefix=BASE_PREFIX,
        init_std=config.initializer_range,
        root=root,
    )


def _check_shared_biases(state_dict: Mapping[str, np.ndarray], config: Any) -> None:
    """With `untie_r=False` every layer's relative biases must be one tensor (clear error)."""
    if config.untie_r:
        return
    for n in _BIASES:
        for prefix in ("", BASE_PREFIX):
            keys = [f"{prefix}layer.{i}.rel_attn.{n}" for i in range(config.n_layer)]
            found = [np.asarray(state_dict[k]) for k in keys if k in state_dict]
            if any(not np.array_equal(found[0], x) for x in found[1:]):
                raise ConversionError(
                    f"config has untie_r=False (one {n} shared by all layers) but the "
                    f"checkpoint's per-layer {prefix}layer.*.rel_attn.{n} differ; load it with "
                    "untie_r=True"
                )


def hf_to_params(state_dict: Mapping, config: Any, architecture: str, shapes: Mapping) -> dict:
    """`param_map.hf_to_params`, after checking that shared (untie_r=False) biases are shared."""
    _check_shared_biases(state_dict, config)
    return pm.hf_to_params(state_dict, param_map(config, architecture), shapes)


def params_to_hf(params: Mapping, config: Any, architecture: str) -> dict[str, np.ndarray]:
    """`param_map.params_to_hf`; shared (untie_r=False) biases written to every layer."""
    pmap = param_map(config, architecture)
    out = pm.params_to_hf(params, pmap)
    for rule in pmap.rules:
        for alias in rule.aliases:
            if ".rel_attn.r_" in alias:
                out[alias] = out[rule.hf].copy()
    return out


def example_inputs(config: Any, architecture: str) -> dict[str, Any]:
    """Smallest inputs that initialise the head: an even batch (bi_data splits it in two) and
    `[batch, choices, length]` ids for multiple choice."""
    shape = (2, 1, 2) if architecture == "XLNetForMultipleChoice" else (2, 2)
    return {"input_ids": np.zeros(shape, np.int32)}
