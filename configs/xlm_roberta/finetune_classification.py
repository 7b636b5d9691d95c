"""XLM-R(-XL) fine-tuning: task `classification`.

The dataset is generated from the bundled corpus (see `xformers_jax/data/finetune_data.py`).
Presets (`:arg`): tiny (CPU, the default), base (xlm-roberta-base sizes). `init_from`: an HF dir
or an Orbax params export of the same head and sizes.

  xformers-jax train --config configs/xlm_roberta/finetune_classification.py:tiny \
      --workdir workdirs/classification --config.init_from=EXPORT_DIR
  xformers-jax eval --config configs/xlm_roberta/finetune_classification.py:tiny \
      --workdir workdirs/classification
"""

from xformers_jax import config_lib

# preset -> run sizes. `tiny` runs on CPU in minutes; `base` is xlm-roberta-base.
RUNS = {
    "tiny": dict(model="tiny", batch_size=32, steps=200, dtype="float32"),
    "base": dict(model="xlm-roberta-base", batch_size=32, steps=3000, dtype="bfloat16"),
}

MODEL = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
DATA = dict(tokenizer_type="sentencepiece")
OPTIM = dict(layer_decay=0.9)  # layer-wise lr decay, as is usual for fine-tuning


def get_config(arg: str | None = None, task: str = "classification"):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    return config_lib.finetune_config(task, "xlm_roberta", run, model=MODEL, data=DATA, optim=OPTIM)
