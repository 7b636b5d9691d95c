"""XLM-R(-XL) fine-tuning: task `qa`; data, presets and `init_from` as in
`finetune_classification.py`.

  xformers-jax train --config configs/xlm_roberta/finetune_qa.py:tiny \
      --workdir workdirs/qa --config.init_from=EXPORT_DIR
"""

from xformers_jax import config_lib

RUNS, get_config = config_lib.variant("finetune_classification.py", __file__, task="qa")
