"""XLNet fine-tuning: task `qa` through `XLNetForQuestionAnsweringSimple`. The context comes
first, the question second, as in XLNet's SQuAD fine-tuning.

Data, presets, tokenizer and `init_from` as in `finetune_classification.py`.

  xformers-jax train --config configs/xlnet/pretrain_plm.py:tiny --workdir workdirs/xlnet_tiny
  xformers-jax train --config configs/xlnet/finetune_qa.py:tiny \
      --workdir workdirs/xlnet_qa --config.init_from=workdirs/xlnet_tiny
"""

from xformers_jax import config_lib

RUNS, get_config = config_lib.variant("finetune_classification.py", __file__, task="qa")
