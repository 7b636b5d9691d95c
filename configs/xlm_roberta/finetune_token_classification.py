"""XLM-R(-XL) fine-tuning: task `token_classification`.

The dataset is generated from the bundled corpus (see `xformers_jax/data/finetune_data.py`).
Presets (`:arg`): tiny (CPU, the default), base (xlm-roberta-base sizes). `init_from`: an HF dir
or an Orbax params export of the same head and sizes.

  xformers-jax train --config configs/xlm_roberta/finetune_token_classification.py:tiny \
      --workdir workdirs/token_classification --config.init_from=EXPORT_DIR
  xformers-jax eval --config configs/xlm_roberta/finetune_token_classification.py:tiny \
      --workdir workdirs/token_classification
"""

from xformers_jax.tasks.classification import finetune_config


def get_config(arg: str | None = None):
    return finetune_config("token_classification", arg)
