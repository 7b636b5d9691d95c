"""Multiple-choice fine-tuning: pick the true reply of a dialog turn among 4 candidates.

Batches are `[batch, choices, length]`; the metric is accuracy.
"""

from __future__ import annotations

from xformers_jax.tasks import TaskSpec
from xformers_jax.tasks.classification import build_finetune
from xformers_jax.tasks.classification import loss_fn as loss_fn
from xformers_jax.tasks.classification import metrics as metrics


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.finetune_data import reply_choice

    make = lambda tok, seq_len, train: reply_choice(tok, seq_len, train)  # noqa: E731
    # The multiple-choice head scores each choice with one logit: num_labels is unused by it
    # and kept at 1 in the config.
    return build_finetune(config, workdir, "multiple_choice", make, 1, loss_fn, metrics)
