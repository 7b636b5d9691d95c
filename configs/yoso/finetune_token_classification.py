"""YOSO fine-tuning: task `token_classification` through `YosoForTokenClassification`.

Data, presets, tokenizer and `init_from` as in `finetune_classification.py`.

  xformers-jax train --config configs/yoso/pretrain_mlm.py:tiny --workdir workdirs/yoso_tiny
  xformers-jax train --config configs/yoso/finetune_token_classification.py:tiny \
      --workdir workdirs/yoso_token_classification --config.init_from=workdirs/yoso_tiny
"""

from xformers_jax import config_lib

RUNS, get_config = config_lib.variant(
    "finetune_classification.py", __file__, task="token_classification"
)
