"""Sequence classification fine-tuning (language identification on the bundled corpus).

The head's loss over one label per example, accuracy from sums; the dataset, tokenizer and
batching are the fine-tuning tasks' (`common.build_finetune`).

  xformers-jax train --config configs/xlm_roberta/finetune_classification.py:tiny \
      --workdir workdirs/cls --config.init_from=HF_OR_ORBAX_DIR
"""

from __future__ import annotations

from xformers_jax.tasks import TaskSpec, common

loss_fn = common.label_loss
metrics = common.accuracy_metrics


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.finetune_data import LANGUAGES, language_id

    return common.build_finetune(
        config, workdir, "classification", language_id, len(LANGUAGES), loss_fn, metrics
    )
