"""YOSO fine-tuning: task `qa` through `YosoForQuestionAnswering`.

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
  xformers-jax train --config configs/yoso/finetune_qa.py:tiny \
      --workdir workdirs/yoso_qa --config.init_from=workdirs/yoso_tiny
"""

from xformers_jax.tasks.classification import FINETUNE_RUNS, finetune_config

RUNS = FINETUNE_RUNS["yoso"]


def get_config(arg: str | None = None):
    return finetune_config("qa", arg, family="yoso")
