"""XLNet fine-tuning: task `classification` through `XLNetForSequenceClassification`.

The dataset is generated from the bundled corpus (`xformers_jax/data/finetune_data.py`) in
XLNet's layout: `A <sep> B <sep> <cls>` with the CLS token last, left padding, segment id 2 at
the CLS, by the XLNet tokenizer (`data.tokenizer_type='xlnet'`).
No Transformer-XL mems (`use_mems_train=False`). Presets (`:arg`): tiny (CPU, the default;
the sizes of `pretrain_plm.py:tiny`), base, large (xlnet-base-cased / xlnet-large-cased sizes,
bfloat16). `init_from`: a PLM pretraining workdir, an HF XLNet dir or an Orbax params export.
Tokenizer: `--config.data.tokenizer=SPIECE_MODEL_OR_HF_DIR` if given, else the `spiece.model`
saved with `init_from` (a PLM workdir, an HF dir), else one trained on the corpus exactly as
`pretrain_plm.py` trains it.

  xformers-jax train --config configs/xlnet/pretrain_plm.py:tiny --workdir workdirs/xlnet_tiny
  xformers-jax train --config configs/xlnet/finetune_classification.py:tiny \
      --workdir workdirs/xlnet_classification --config.init_from=workdirs/xlnet_tiny
  xformers-jax train --config configs/xlnet/finetune_classification.py:large \
      --workdir workdirs/xlnet_large_classification --config.init_from=/ckpt/xlnet-large-cased
"""

from xformers_jax import config_lib

# preset -> run sizes. `tiny` runs on CPU in minutes (the sizes of `pretrain_plm.py:tiny`); the
# others are the published xlnet-base-cased / xlnet-large-cased sizes.
RUNS = {
    "tiny": dict(model="tiny", batch_size=32, steps=200, dtype="float32"),
    "base": dict(model="base", batch_size=32, steps=3000, dtype="bfloat16", lr=2e-5),
    "large": dict(model="large", batch_size=32, steps=3000, dtype="bfloat16", lr=2e-5),
}

# No Transformer-XL mems: fine-tuning batches are unrelated examples. The XLNet tokenizer (spm
# model `spiece.model`) is the one PLM pretraining trains, so its checkpoints carry over.
MODEL = dict(dropout=0.1, use_mems_train=False, use_mems_eval=False, bi_data=False)
DATA = dict(tokenizer_type="xlnet")
OPTIM = dict(layer_decay=0.9)  # layer-wise lr decay, as is usual for fine-tuning


def get_config(arg: str | None = None, task: str = "classification"):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    return config_lib.finetune_config(task, "xlnet", run, model=MODEL, data=DATA, optim=OPTIM)
