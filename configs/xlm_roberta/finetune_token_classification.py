"""XLM-R(-XL) fine-tuning: task `token_classification`; data, presets and `init_from` as in
`finetune_classification.py`.

  xformers-jax train --config configs/xlm_roberta/finetune_token_classification.py:tiny \
      --workdir workdirs/token_classification --config.init_from=EXPORT_DIR
"""

from xformers_jax import config_lib

_FINETUNE = config_lib.config_module("finetune_classification.py", __file__)
RUNS = _FINETUNE.RUNS


def get_config(arg: str | None = None):
    return _FINETUNE.get_config(arg, task="token_classification")
