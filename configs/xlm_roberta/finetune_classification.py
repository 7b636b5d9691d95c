"""XLM-R(-XL) fine-tuning: task `classification`.

The dataset is generated from the bundled corpus (see `xformers_jax/data/finetune_data.py`).
Presets (`:arg`): tiny (CPU, the default), base (xlm-roberta-base sizes). `init_from`: an HF dir
or an Orbax params export of the same head and sizes.

  xformers-jax train --config configs/xlm_roberta/finetune_classification.py:tiny \
      --workdir workdirs/classification --config.init_from=EXPORT_DIR
  xformers-jax eval --config configs/xlm_roberta/finetune_classification.py:tiny \
      --workdir workdirs/classification
"""

from xformers_jax.tasks.classification import finetune_config


def get_config(arg: str | None = None):
    return finetune_config("classification", arg)
