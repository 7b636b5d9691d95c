"""XLNet fine-tuning: task `token_classification` through `XLNetForTokenClassification`.

Data, presets, tokenizer and `init_from` as in `finetune_classification.py`.

  xformers-jax train --config configs/xlnet/pretrain_plm.py:tiny --workdir workdirs/xlnet_tiny
  xformers-jax train --config configs/xlnet/finetune_token_classification.py:tiny \
      --workdir workdirs/xlnet_token_classification --config.init_from=workdirs/xlnet_tiny
"""

from xformers_jax import config_lib

RUNS, get_config = config_lib.variant(
    "finetune_classification.py", __file__, task="token_classification"
)
