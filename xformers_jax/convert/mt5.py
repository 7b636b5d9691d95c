"""HF <-> ours names for mT5 (`model_type: mt5`), every head transformers has.

transformers keeps `shared`, `encoder`, `decoder` at the top level of `MT5Model`,
`MT5ForConditionalGeneration` and `MT5ForQuestionAnswering`, and under `transformer.` in the
sequence / token classification heads. The relative-position table lives in block 0 only
(`block.0.layer.0.SelfAttention.relative_attention_bias`); ours is one table per stack outside
the scan (`encoder/relative_attention_bias/embedding`). Decoder blocks number their sub-layers
0 self-attention, 1 cross-attention, 2 FFN; encoder blocks 0 self-attention, 1 FFN.
`encoder.embed_tokens` / `decoder.embed_tokens` (and `lm_head` when tied) alias `shared`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from xformers_jax.convert import param_map as pm
from xformers_jax.convert.param_map import ParamMap, Rule, flatten, unflatten

log = logging.getLogger(__name__)

_BARE = ("MT5Model", "MT5EncoderModel")
_ENCODER_ONLY = ("MT5EncoderModel", "MT5ForTokenClassification")
_PREFIXED = ("MT5ForSequenceClassification", "MT5ForTokenClassification")


def param_map(config: Any, architecture: str) -> ParamMap:
    """The name map of `architecture` (an HF class name) for `config` (an MT5Config)."""
    root: tuple[str, ...] = () if architecture in _BARE else ("model",)
    p = "transformer." if architecture in _PREFIXED else ""
    encoder_only = architecture in _ENCODER_ONLY
    aliases = [f"{p}encoder.embed_tokens.weight"]
    if not encoder_only:
        aliases.append(f"{p}decoder.embed_tokens.weight")
    tied_head = architecture == "MT5ForConditionalGeneration" and config.tie_word_embeddings
    if tied_head:
        aliases.append("lm_head.weight")
    rules = [Rule((*root, "shared", "embedding"), f"{p}shared.weight", aliases=tuple(aliases))]
    rules += _stack_rules(config, (*root, "encoder"), f"{p}encoder", decoder=False)
    if not encoder_only:
        rules += _stack_rules(config, (*root, "decoder"), f"{p}decoder", decoder=True)
    rules += _head_rules(config, architecture)
    # transformers' own _keys_to_ignore_on_load_unexpected: an unused table some checkpoints have,
    # and (encoder-only heads) the decoder of a full checkpoint.
    pe = re.escape(p)
    ignore = [rf"{pe}decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"]
    if encoder_only:
        ignore += [rf"{pe}decoder\..*", r"lm_head\.weight"]
    return ParamMap(
        rules=tuple(rules),
        num_layers=config.num_layers,
        prefix=p,
        base_prefix=p,
        ignore=tuple(ignore),
        init_std=config.initializer_factor * config.d_model**-0.5,
        root=root,
    )


def _stack_rules(config: Any, root: tuple[str, ...], hf: str, decoder: bool) -> list[Rule]:
    block = f"{hf}.block.{{i}}.layer"
    lay = (*root, "layers")
    rules = [
        Rule(
            (*root, "relative_attention_bias", "embedding"),
            f"{hf}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        Rule((*root, "final_norm", "scale"), f"{hf}.final_layer_norm.weight"),
    ]
    subs = [("self_attention", "SelfAttention", 0)]
    if decoder:
        subs.append(("cross_attention", "EncDecAttention", 1))
    for ours, theirs, j in subs:
        for name in ("q", "k", "v"):
            rules.append(
                Rule((*lay, ours, name, "kernel"), f"{block}.{j}.{theirs}.{name}.weight", "linear")
            )
        rules.append(
            Rule((*lay, ours, "o", "kernel"), f"{block}.{j}.{theirs}.o.weight", "linear", n_in=2)
        )
        rules.append(Rule((*lay, f"{ours}_norm", "scale"), f"{block}.{j}.layer_norm.weight"))
    f = len(subs)
    names = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    for name in names:
        hf_name = f"{block}.{f}.DenseReluDense.{name}.weight"
        rules.append(Rule((*lay, "mlp", name, "kernel"), hf_name, "linear"))
    rules.append(Rule((*lay, "mlp_norm", "scale"), f"{block}.{f}.layer_norm.weight"))
    return rules


def _linear(path: tuple[str, ...], hf: str) -> list[Rule]:
    # Heads transformers initialises fresh when a checkpoint lacks them.
    return [
        Rule((*path, "kernel"), f"{hf}.weight", "linear", init="normal"),
        Rule((*path, "bias"), f"{hf}.bias", "bias", init="zeros"),
    ]


def _head_rules(config: Any, architecture: str) -> list[Rule]:
    if architecture == "MT5ForConditionalGeneration" and not config.tie_word_embeddings:
        return [Rule(("lm_head", "kernel"), "lm_head.weight", "linear", init="normal")]
    if architecture == "MT5ForSequenceClassification":
        return [
            *_linear(("dense",), "classification_head.dense"),
            *_linear(("out_proj",), "classification_head.out_proj"),
        ]
    if architecture == "MT5ForTokenClassification":
        return _linear(("classifier",), "classifier")
    if architecture == "MT5ForQuestionAnswering":
        return _linear(("qa_outputs",), "qa_outputs")
    return []


def example_inputs(config: Any, architecture: str) -> dict[str, Any]:
    """Inputs that `init` the head: seq2seq heads without a default decoder input need one."""
    ids = np.zeros((1, 2), np.int32)
    if architecture in ("MT5Model", "MT5ForConditionalGeneration"):
        return {"input_ids": ids, "decoder_input_ids": ids}
    return {"input_ids": ids}


def _maps(config: Any, architecture: str) -> list[tuple[ParamMap, tuple[str, ...] | None]]:
    """The map, split in two when the decoder has its own depth (one scan length per map).

    Returns `(map, decoder root)` pairs: the decoder's map owns the params under the root, the
    other map every other param (root None: the whole tree).
    """
    full = param_map(config, architecture)
    if architecture in _ENCODER_ONLY or config.num_decoder_layers == config.num_layers:
        return [(full, None)]
    root = (() if architecture in _BARE else ("model",)) + ("decoder",)
    pe = re.escape(full.prefix)
    mine = lambda r: r.path[: len(root)] == root  # noqa: E731
    rest = dataclasses.replace(
        full,
        rules=tuple(r for r in full.rules if not mine(r)),
        ignore=(*full.ignore, rf"{pe}decoder\..*"),
    )
    dec = dataclasses.replace(
        full,
        rules=tuple(r for r in full.rules if mine(r)),
        num_layers=config.num_decoder_layers,
        ignore=(*full.ignore, rf"(?!{pe}decoder\.).*", rf"{pe}decoder\.embed_tokens\.weight"),
    )
    return [(rest, root), (dec, root)]


def _subtree(tree: Mapping[str, Any], root: tuple[str, ...] | None, inside: bool) -> dict:
    flat = flatten(tree)
    if root is None:
        return dict(tree)
    keep = {p: v for p, v in flat.items() if (p[: len(root)] == root) == inside}
    return unflatten(keep)


# transformers' tie_encoder_decoder pairs encoder block i's sub-layer 0 (self-attention) with the
# decoder's sub-layer 0 and the encoder's 1 (FFN) with the decoder's 2 (after cross-attention).
_TIED = re.compile(r"(?P<p>.*)decoder\.(?:block\.(?P<i>\d+)\.layer\.(?P<j>[02])\.)?(?P<rest>.*)")


def tied_encoder_names(state_names, prefix: str = "") -> dict[str, str]:
    """`{encoder name: decoder name}` of the tensors a `tie_encoder_decoder` checkpoint stores
    once, under the decoder, for the decoder names in `state_names`."""
    out = {}
    for name in state_names:
        m = _TIED.fullmatch(name)
        if not m or m["p"] != prefix or m["rest"].startswith(("embed_tokens", "layer.")):
            continue
        if m["rest"].startswith("block."):  # a cross-attention sub-layer (1): the encoder has none
            continue
        if m["i"] is None:
            out[f"{prefix}encoder.{m['rest']}"] = name
        else:
            j = {"0": "0", "2": "1"}[m["j"]]
            out[f"{prefix}encoder.block.{m['i']}.layer.{j}.{m['rest']}"] = name
    return out


def _retie(state_dict: Mapping, config: Any, architecture: str) -> Mapping:
    """A `tie_encoder_decoder` checkpoint with its encoder tensors filled in from the decoder's."""
    if not getattr(config, "tie_encoder_decoder", False):
        return state_dict
    prefix = "transformer." if architecture in _PREFIXED else ""
    twins = tied_encoder_names(state_dict, prefix)
    missing = {enc: dec for enc, dec in twins.items() if enc not in state_dict}
    return (
        {**state_dict, **{enc: state_dict[dec] for enc, dec in missing.items()}}
        if missing
        else (state_dict)
    )


def hf_to_params(state_dict: Mapping, config: Any, architecture: str, shapes: Mapping) -> dict:
    """`param_map.hf_to_params` once per map of `_maps` (tied encoder tensors filled in)."""
    state_dict = _retie(state_dict, config, architecture)
    flat: dict[tuple[str, ...], Any] = {}
    for i, (pmap, root) in enumerate(_maps(config, architecture)):
        part = _subtree(shapes, root, inside=i == 1)
        flat.update(flatten(pm.hf_to_params(state_dict, pmap, part)))
    return unflatten(flat)


def params_to_hf(params: Mapping, config: Any, architecture: str) -> dict[str, np.ndarray]:
    """`param_map.params_to_hf` once per map of `_maps`; with `tie_encoder_decoder` the encoder's
    tensors are left out (transformers stores them once, as the decoder's) while they equal the
    decoder's. Trained apart they differ: then both are written and `adjust_hf_config` saves the
    config untied."""
    out: dict[str, np.ndarray] = {}
    for i, (pmap, root) in enumerate(_maps(config, architecture)):
        out.update(pm.params_to_hf(_subtree(params, root, inside=i == 1), pmap))
    if getattr(config, "tie_encoder_decoder", False) and architecture not in _ENCODER_ONLY:
        prefix = "transformer." if architecture in _PREFIXED else ""
        twins = tied_encoder_names(out, prefix)
        if all(np.array_equal(out[enc], out[dec]) for enc, dec in twins.items()):
            for enc in twins:
                del out[enc]
        else:
            log.warning(
                "tie_encoder_decoder: the encoder's weights no longer equal the decoder's; "
                "saving both, with tie_encoder_decoder=false in config.json"
            )
    return out


def adjust_hf_config(
    hf_config: dict[str, Any], state: Mapping[str, Any], config: Any, architecture: str
) -> None:
    """config.json for `state`: untied when the encoder's tensors had to be written apart."""
    del config
    prefix = "transformer." if architecture in _PREFIXED else ""
    if hf_config.get("tie_encoder_decoder") and architecture not in _ENCODER_ONLY:
        if any(enc in state for enc in tied_encoder_names(state, prefix)):
            hf_config["tie_encoder_decoder"] = False
