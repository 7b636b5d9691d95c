"""XLNet fine-tuning: task `token_classification` through `XLNetForTokenClassification`.

Data, presets, tokenizer and `init_from` as in `finetune_classification.py`.

  xformers-jax train --config configs/xlnet/pretrain_plm.py:tiny --workdir workdirs/xlnet_tiny
  xformers-jax train --config configs/xlnet/finetune_token_classification.py:tiny \
      --workdir workdirs/xlnet_token_classification --config.init_from=workdirs/xlnet_tiny
"""

from xformers_jax import config_lib

_FINETUNE = config_lib.config_module("finetune_classification.py", __file__)
RUNS = _FINETUNE.RUNS


def get_config(arg: str | None = None):
    return _FINETUNE.get_config(arg, task="token_classification")
