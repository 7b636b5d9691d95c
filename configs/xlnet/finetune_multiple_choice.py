"""XLNet fine-tuning: task `multiple_choice` through `XLNetForMultipleChoice`.

Data, presets, tokenizer and `init_from` as in `finetune_classification.py`.

  xformers-jax train --config configs/xlnet/pretrain_plm.py:tiny --workdir workdirs/xlnet_tiny
  xformers-jax train --config configs/xlnet/finetune_multiple_choice.py:tiny \
      --workdir workdirs/xlnet_multiple_choice --config.init_from=workdirs/xlnet_tiny
"""

from xformers_jax import config_lib

RUNS, get_config = config_lib.variant(
    "finetune_classification.py", __file__, task="multiple_choice"
)
