"""Extractive QA fine-tuning: find the question's utterance inside a multilingual context.

Metrics: exact match (predicted span == gold span) and token-overlap F1 of the spans (SQuAD's
definitions over token positions). The predicted span is the best `start <= end` pair by
`start_logit + end_logit`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from xformers_jax.tasks import TaskSpec, common


def best_spans(start_logits, end_logits, max_answer_len: int = 32):
    """`[batch, length]` logits -> (start, end) `[batch]` maximising the sum with
    `0 <= end - start < max_answer_len`."""
    length = start_logits.shape[1]
    i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    ok = (j >= i) & (j - i < max_answer_len)
    score = jnp.where(ok, start_logits[:, :, None] + end_logits[:, None, :], -jnp.inf)
    flat = jnp.argmax(score.reshape(score.shape[0], -1), axis=-1)
    return flat // length, flat % length


def loss_fn(params, batch, rng, *, model, deterministic: bool = False):
    """HF's span loss; aux sums `loss_sum`, `weight`, `exact`, `f1_sum`."""
    gs, ge = batch["start_positions"], batch["end_positions"]
    out = common.apply_head(
        params, batch, rng, model, deterministic, start_positions=gs, end_positions=ge
    )
    ps, pe = best_spans(out.start_logits, out.end_logits)
    overlap = jnp.maximum(jnp.minimum(pe, ge) - jnp.maximum(ps, gs) + 1, 0)
    prec = overlap / (pe - ps + 1)
    rec = overlap / (ge - gs + 1)
    f1 = jnp.where(overlap > 0, 2 * prec * rec / jnp.maximum(prec + rec, 1e-9), 0.0)
    n = jnp.asarray(gs.shape[0], jnp.float32)
    aux = {
        "loss_sum": out.loss * n,
        "weight": n,
        "exact": jnp.sum((ps == gs) & (pe == ge)),
        "f1_sum": jnp.sum(f1),
    }
    return out.loss, aux


def metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Loss, exact match and span F1 (fractions)."""
    w = max(float(sums["weight"]), 1.0)
    return {
        "loss": float(sums["loss_sum"]) / w,
        "exact_match": float(sums["exact"]) / w,
        "f1": float(sums["f1_sum"]) / w,
    }


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.finetune_data import span_qa

    return common.build_finetune(config, workdir, "qa", span_qa, 2, loss_fn, metrics)
