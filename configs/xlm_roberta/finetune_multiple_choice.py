"""XLM-R(-XL) fine-tuning: task `multiple_choice`; data, presets and `init_from` as in
`finetune_classification.py`.

  xformers-jax train --config configs/xlm_roberta/finetune_multiple_choice.py:tiny \
      --workdir workdirs/multiple_choice --config.init_from=EXPORT_DIR
"""

from xformers_jax import config_lib

_FINETUNE = config_lib.config_module("finetune_classification.py", __file__)
RUNS = _FINETUNE.RUNS


def get_config(arg: str | None = None):
    return _FINETUNE.get_config(arg, task="multiple_choice")
