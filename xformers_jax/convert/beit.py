"""HF <-> ours names for BEiT (`beit`): every head, conv kernels and BatchNorm statistics.

Head models keep the base model under `beit.`; `BeitModel` and `BeitBackbone` at the top level.
Our encoder nests the embeddings (`encoder/embeddings`) and scans the layers (`encoder/layers`);
the shared relative bias sits at `encoder/relative_position_bias`. Conv kernels are HWIO here
(torch OIHW for Conv2d, IOHW for ConvTranspose2d). BatchNorm running statistics live in the
`batch_stats` collection (`hf_to_collections` / `collections_to_hf`); `num_batches_tracked`
is dropped on load and written as 0.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from xformers_jax.convert.param_map import (
    ParamMap,
    Rule,
    adapt_prefix,
    dense_rules,
    flatten,
    norm_rules,
    unflatten,
)

log = logging.getLogger(__name__)

BASE_PREFIX = "beit."
_STATS = (r".*\.running_mean", r".*\.running_var", r".*\.num_batches_tracked")
_IGNORE = (r".*relative_position_index.*", *_STATS)


def example_inputs(config: Any, architecture: str) -> dict[str, Any]:
    """A one-image batch at the config resolution (enough to `init` any head)."""
    del architecture
    size = config.image_size
    return {"pixel_values": np.zeros((1, config.num_channels, size, size), np.float32)}


def _encoder_rules(cfg: Any, enc: tuple[str, ...], p: str) -> list[Rule]:
    emb, lay, layer = (*enc, "embeddings"), (*enc, "layers"), f"{p}encoder.layer.{{i}}"
    rules = [
        Rule((*emb, "cls_token"), f"{p}embeddings.cls_token"),
        Rule(
            (*emb, "patch_embeddings", "kernel"),
            f"{p}embeddings.patch_embeddings.projection.weight",
            "conv",
        ),
        Rule((*emb, "patch_embeddings", "bias"), f"{p}embeddings.patch_embeddings.projection.bias"),
    ]
    if cfg.use_mask_token:
        rules.append(Rule((*emb, "mask_token"), f"{p}embeddings.mask_token"))
    if cfg.use_absolute_position_embeddings:
        rules.append(Rule((*emb, "position_embeddings"), f"{p}embeddings.position_embeddings"))
    table = "relative_position_bias.relative_position_bias_table"
    if cfg.use_shared_relative_position_bias:
        path = (*enc, "relative_position_bias", "relative_position_bias_table")
        rules.append(Rule(path, f"{p}encoder.{table}"))
    if cfg.use_relative_position_bias:
        path = (*lay, "relative_position_bias", "relative_position_bias_table")
        rules.append(Rule(path, f"{layer}.attention.attention.{table}"))
    attn = f"{layer}.attention.attention"
    rules += dense_rules((*lay, "query"), f"{attn}.query")
    rules.append(Rule((*lay, "key", "kernel"), f"{attn}.key.weight", "linear"))
    rules += dense_rules((*lay, "value"), f"{attn}.value")
    rules += dense_rules((*lay, "out"), f"{layer}.attention.output.dense", n_in=2)
    rules += dense_rules((*lay, "mlp", "wi"), f"{layer}.intermediate.dense")
    rules += dense_rules((*lay, "mlp", "wo"), f"{layer}.output.dense")
    rules += norm_rules((*lay, "layernorm_before"), f"{layer}.layernorm_before")
    rules += norm_rules((*lay, "layernorm_after"), f"{layer}.layernorm_after")
    if cfg.layer_scale_init_value > 0:
        rules += [Rule((*lay, n), f"{layer}.{n}") for n in ("lambda_1", "lambda_2")]
    return rules


def _conv_rules(path: tuple[str, ...], hf: str, bias: bool, transpose: bool = False) -> list:
    kind = "conv_transpose" if transpose else "conv"
    rules = [Rule((*path, "kernel"), f"{hf}.weight", kind)]
    return rules + ([Rule((*path, "bias"), f"{hf}.bias")] if bias else [])


def _bn_rules(path: tuple[str, ...], hf: str) -> list[Rule]:
    return norm_rules(path, hf)


def _conv_module(path: tuple[str, ...], hf: str) -> list[Rule]:
    return _conv_rules((*path, "conv"), f"{hf}.conv", False) + _bn_rules((*path, "bn"), f"{hf}.bn")


def _fpn_rules(root: tuple[str, ...]) -> list[Rule]:
    fpn = (*root, "fpn")
    return [
        *_conv_rules((*fpn, "fpn1_0"), "fpn1.0", True, transpose=True),
        *_bn_rules((*fpn, "fpn1_1"), "fpn1.1"),
        *_conv_rules((*fpn, "fpn1_3"), "fpn1.3", True, transpose=True),
        *_conv_rules((*fpn, "fpn2_0"), "fpn2.0", True, transpose=True),
    ]


def _segmentation_rules(cfg: Any) -> list[Rule]:
    rules = _fpn_rules(())
    dh = ("decode_head",)
    rules += _conv_rules((*dh, "classifier"), "decode_head.classifier", True)
    for j in range(len(cfg.pool_scales)):
        rules += _conv_module((*dh, f"psp_modules_{j}"), f"decode_head.psp_modules.{j}.1")
    rules += _conv_module((*dh, "bottleneck"), "decode_head.bottleneck")
    for i in range(3):
        rules += _conv_module((*dh, f"lateral_convs_{i}"), f"decode_head.lateral_convs.{i}")
        rules += _conv_module((*dh, f"fpn_convs_{i}"), f"decode_head.fpn_convs.{i}")
    rules += _conv_module((*dh, "fpn_bottleneck"), "decode_head.fpn_bottleneck")
    if cfg.use_auxiliary_head:
        ah = ("auxiliary_head",)
        for j in range(cfg.auxiliary_num_convs):
            rules += _conv_module((*ah, f"convs_{j}"), f"auxiliary_head.convs.{j}")
        if cfg.auxiliary_concat_input:
            rules += _conv_module((*ah, "conv_cat"), "auxiliary_head.conv_cat")
        rules += _conv_rules((*ah, "classifier"), "auxiliary_head.classifier", True)
    return rules


def param_map(config: Any, architecture: str) -> ParamMap:
    """The name map of `architecture` (an HF class name) for `config` (a BeitConfig)."""
    bare = architecture in ("BeitModel", "BeitBackbone")
    root: tuple[str, ...] = () if bare else ("beit",)
    p = "" if bare else BASE_PREFIX
    rules = _encoder_rules(config, (*root, "encoder"), p)
    if architecture != "BeitBackbone":
        if not config.use_mean_pooling:
            rules += norm_rules((*root, "layernorm"), f"{p}layernorm")
        if config.use_mean_pooling and architecture in ("BeitModel", "BeitForImageClassification"):
            # Absent from pretraining (MIM) checkpoints: fresh, as transformers initialises it.
            pool = (*root, "pooler_layernorm")
            rules += [
                Rule((*pool, "scale"), f"{p}pooler.layernorm.weight", init="ones"),
                Rule((*pool, "bias"), f"{p}pooler.layernorm.bias", init="zeros"),
            ]
    if architecture == "BeitForMaskedImageModeling":
        rules += norm_rules(("layernorm",), "layernorm")
        rules += dense_rules(("lm_head",), "lm_head")
    elif architecture == "BeitForImageClassification":
        # Fine-tuning from a pretraining checkpoint: a fresh classifier, as transformers does.
        rules += [
            Rule(("classifier", "kernel"), "classifier.weight", "linear", init="normal"),
            Rule(("classifier", "bias"), "classifier.bias", "bias", init="zeros"),
        ]
    elif architecture == "BeitForSemanticSegmentation":
        rules += _segmentation_rules(config)
    elif architecture == "BeitBackbone" and config.add_fpn:
        rules += _fpn_rules(())
    ignore = _IGNORE
    if architecture == "BeitForImageClassification":
        # A MIM checkpoint's head (top-level `layernorm`, `lm_head`) is dropped, as transformers.
        ignore = (*ignore, r"layernorm\..*", r"lm_head\..*")
    return ParamMap(
        rules=tuple(rules),
        num_layers=config.num_hidden_layers,
        prefix=p,
        base_prefix=BASE_PREFIX if architecture != "BeitBackbone" else "",
        ignore=ignore,
        init_std=config.initializer_range,
        root=root,
    )


def _stat_pairs(config: Any, architecture: str) -> list[tuple[tuple[str, ...], str]]:
    """(our batch_stats path, HF tensor) for every BatchNorm running statistic of the head."""
    pairs = []
    for rule in param_map(config, architecture).rules:
        # BatchNorm scales are the `scale` params whose module is a `bn` or an fpn BatchNorm.
        if rule.path[-1] == "scale" and (rule.path[-2] == "bn" or rule.path[-2] == "fpn1_1"):
            hf = rule.hf[: -len(".weight")]
            pairs += [
                ((*rule.path[:-1], "mean"), f"{hf}.running_mean"),
                ((*rule.path[:-1], "var"), f"{hf}.running_var"),
            ]
    return pairs


def hf_to_collections(
    state_dict: Mapping[str, np.ndarray], config: Any, architecture: str
) -> dict[str, Any]:
    """`{'batch_stats': ...}` from HF running statistics (init values where missing)."""
    pairs = _stat_pairs(config, architecture)
    if not pairs:
        return {}
    pmap = param_map(config, architecture)
    sd = adapt_prefix(state_dict, pmap)
    flat, missing = {}, []
    for path, key in pairs:
        if key in sd:
            flat[path] = np.asarray(sd[key], np.float32)
        else:
            missing.append(key)
            channels = config.hidden_size if path[-2] == "fpn1_1" else _channels(config, path)
            init = np.zeros if path[-1] == "mean" else np.ones
            flat[path] = init((channels,), np.float32)
    if missing and state_dict:
        log.warning("BatchNorm statistics not in the checkpoint, initialised: %d", len(missing))
    return {"batch_stats": unflatten(flat)}


def _channels(config: Any, path: tuple[str, ...]) -> int:
    head = path[0]
    return config.auxiliary_channels if head == "auxiliary_head" else config.hidden_size


def collections_to_hf(
    collections: Mapping[str, Any], config: Any, architecture: str
) -> dict[str, np.ndarray]:
    """HF running statistics (+ `num_batches_tracked` = 0) from `batch_stats`."""
    flat = flatten(collections.get("batch_stats", {}))
    out = {}
    for path, key in _stat_pairs(config, architecture):
        out[key] = np.asarray(flat[path], np.float32)
        out[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0, np.int64)
    return out
