"""YOSO fine-tuning: task `classification` through `YosoForSequenceClassification`.

The dataset is generated from the bundled corpus (`xformers_jax/data/finetune_data.py`) with the
XLM-R-style sentencepiece tokenizer YOSO pretraining uses (`<s>`=0 `<pad>`=1 `</s>`=2, right
padding, so positions count from 2 at `<s>` as in transformers). Presets (`:arg`): tiny (CPU,
the default; sampled LSH attention, as `pretrain_mlm.py:tiny`), base (uw-madison/yoso-4096
sizes, bfloat16, expectation attention as that checkpoint and `pretrain_mlm.py:base`;
`--config.model.use_expectation=False` samples). `init_from`: a YOSO MLM pretraining workdir
(its `tokenizer.model` comes along), or an HF dir / Orbax export whose vocabulary is the
sentencepiece model given as `--config.data.tokenizer` (uw-madison/yoso-4096 itself was trained
with RoBERTa's BPE vocabulary, which this pipeline does not tokenise).

  xformers-jax train --config configs/yoso/pretrain_mlm.py:tiny --workdir workdirs/yoso_tiny
  xformers-jax train --config configs/yoso/finetune_classification.py:tiny \
      --workdir workdirs/yoso_classification --config.init_from=workdirs/yoso_tiny
"""

from xformers_jax import config_lib

# preset -> run sizes. YOSO's attention as its pretraining (`pretrain_mlm.py`) runs it: sampled
# (LSH) in `tiny`; `base` keeps uw-madison/yoso-4096's expectation mode: the attention that
# checkpoint was trained with, and at fine-tuning lengths (tens to hundreds of tokens) the dense
# expectation costs no more than 64 hashes of 9 bits (512 buckets each).
RUNS = {
    "tiny": dict(model="tiny", batch_size=32, steps=200, dtype="float32", expectation=False),
    "base": dict(
        model="base", batch_size=32, steps=3000, dtype="bfloat16", lr=2e-5, expectation=True
    ),
}

MODEL = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attention_impl="xla")
DATA = dict(tokenizer_type="sentencepiece")
OPTIM = dict(layer_decay=0.9)  # layer-wise lr decay, as is usual for fine-tuning


def get_config(arg: str | None = None, task: str = "classification"):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    model = {**MODEL, "use_expectation": run["expectation"]}
    return config_lib.finetune_config(task, "yoso", run, model=model, data=DATA, optim=OPTIM)
