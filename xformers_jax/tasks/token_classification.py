"""Token classification fine-tuning: tag each token of a mixed-language sentence by language.

Metrics: token accuracy and macro F1 over the label classes, from per-class sums (true
positives, predicted and gold counts) so they reduce exactly across steps and hosts.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from xformers_jax.tasks import TaskSpec, common


def loss_fn(params, batch, rng, *, model, deterministic: bool = False):
    """Token cross-entropy over `labels` `[batch, length]` (-100 = ignore) and per-class sums."""
    out = common.apply_head(params, batch, rng, model, deterministic, labels=batch["labels"])
    labels = batch["labels"]
    valid = labels != -100
    pred = jnp.argmax(out.logits, -1)
    n = jnp.sum(valid).astype(jnp.float32)
    aux = {
        "loss_sum": out.loss * n,
        "weight": n,
        "correct": jnp.sum(valid & (pred == labels)),
    }
    # One scalar per class and count: the trainer sums aux values as scalars.
    for c in range(out.logits.shape[-1]):
        aux[f"tp_{c}"] = jnp.sum(valid & (pred == c) & (labels == c))
        aux[f"pred_{c}"] = jnp.sum(valid & (pred == c))
        aux[f"gold_{c}"] = jnp.sum(valid & (labels == c))
    return out.loss, aux


def metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Loss, token accuracy and macro F1 (classes that occur in gold or predictions)."""
    w = max(float(sums["weight"]), 1.0)
    n = sum(1 for k in sums if k.startswith("tp_"))
    tp, p, g = (
        np.array([float(sums[f"{k}_{c}"]) for c in range(n)]) for k in ("tp", "pred", "gold")
    )
    present = (p + g) > 0
    f1 = np.where(present, 2 * tp / np.maximum(p + g, 1), 0.0)
    return {
        "loss": float(sums["loss_sum"]) / w,
        "accuracy": float(sums["correct"]) / w,
        "f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.finetune_data import LANGUAGES, mixed_language_tags

    return common.build_finetune(
        config,
        workdir,
        "token_classification",
        mixed_language_tags,
        len(LANGUAGES),
        loss_fn,
        metrics,
    )
