"""YOSO fine-tuning: task `qa` through `YosoForQuestionAnswering`.

Data, presets, tokenizer and `init_from` as in `finetune_classification.py`.

  xformers-jax train --config configs/yoso/pretrain_mlm.py:tiny --workdir workdirs/yoso_tiny
  xformers-jax train --config configs/yoso/finetune_qa.py:tiny \
      --workdir workdirs/yoso_qa --config.init_from=workdirs/yoso_tiny
"""

from xformers_jax import config_lib

_FINETUNE = config_lib.config_module("finetune_classification.py", __file__)
RUNS = _FINETUNE.RUNS


def get_config(arg: str | None = None):
    return _FINETUNE.get_config(arg, task="qa")
