"""XLM-R(-XL) fine-tuning: task `token_classification`; data, presets and `init_from` as in
`finetune_classification.py`.

  xformers-jax train --config configs/xlm_roberta/finetune_token_classification.py:tiny \
      --workdir workdirs/token_classification --config.init_from=EXPORT_DIR
"""

from xformers_jax import config_lib

RUNS, get_config = config_lib.variant(
    "finetune_classification.py", __file__, task="token_classification"
)
