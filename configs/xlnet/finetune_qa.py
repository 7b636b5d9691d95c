"""XLNet fine-tuning: task `qa` through `XLNetForQuestionAnsweringSimple`.

The dataset is generated from the bundled corpus (`xformers_jax/data/finetune_data.py`) in
XLNet's layout: `A <sep> B <sep> <cls>` with the CLS token last, left padding, segment id 2 at
the CLS, by the XLNet tokenizer (`data.tokenizer_type='xlnet'`). The context comes first,
the question second, as in XLNet's SQuAD fine-tuning.
No Transformer-XL mems (`use_mems_train=False`). Presets (`:arg`): tiny (CPU, the default;
the sizes of `pretrain_plm.py:tiny`), base, large (xlnet-base-cased / xlnet-large-cased sizes,
bfloat16). `init_from`: a PLM pretraining workdir, an HF XLNet dir or an Orbax params export.
Tokenizer: `--config.data.tokenizer=SPIECE_MODEL_OR_HF_DIR` if given, else the `spiece.model`
saved with `init_from` (a PLM workdir, an HF dir), else one trained on the corpus exactly as
`pretrain_plm.py` trains it.

  xformers-jax train --config configs/xlnet/pretrain_plm.py:tiny --workdir workdirs/xlnet_tiny
  xformers-jax train --config configs/xlnet/finetune_qa.py:tiny \
      --workdir workdirs/xlnet_qa --config.init_from=workdirs/xlnet_tiny
  xformers-jax train --config configs/xlnet/finetune_qa.py:large \
      --workdir workdirs/xlnet_large_qa --config.init_from=/ckpt/xlnet-large-cased
"""

from xformers_jax.tasks.classification import FINETUNE_RUNS, finetune_config

RUNS = FINETUNE_RUNS["xlnet"]


def get_config(arg: str | None = None):
    return finetune_config("qa", arg, family="xlnet")
