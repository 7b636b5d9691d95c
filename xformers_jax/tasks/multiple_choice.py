"""Multiple-choice fine-tuning: pick the true reply of a dialog turn among 4 candidates.

Batches are `[batch, choices, length]`; the loss is the head's over the true choice, the metric
accuracy.
"""

from __future__ import annotations

from xformers_jax.tasks import TaskSpec, common

loss_fn = common.label_loss
metrics = common.accuracy_metrics


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.finetune_data import reply_choice

    # The multiple-choice head scores each choice with one logit: num_labels is unused by it
    # and kept at 1 in the config.
    return common.build_finetune(
        config, workdir, "multiple_choice", reply_choice, 1, loss_fn, metrics
    )
