"""YOSO fine-tuning: task `multiple_choice` through `YosoForMultipleChoice`.

Data, presets, tokenizer and `init_from` as in `finetune_classification.py`.

  xformers-jax train --config configs/yoso/pretrain_mlm.py:tiny --workdir workdirs/yoso_tiny
  xformers-jax train --config configs/yoso/finetune_multiple_choice.py:tiny \
      --workdir workdirs/yoso_multiple_choice --config.init_from=workdirs/yoso_tiny
"""

from xformers_jax import config_lib

RUNS, get_config = config_lib.variant(
    "finetune_classification.py", __file__, task="multiple_choice"
)
