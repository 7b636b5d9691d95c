"""mT5 fine-tuning on the generated tasks of the bundled corpus (`data/finetune_data.py`).

Presets (`:arg`): tiny (CPU, the default), small, base, large, xl, xxl. The task is
`classification` (language id, `MT5ForSequenceClassification`); `--config.task=qa
--config.model.num_labels=2` or `--config.task=token_classification` pick the other heads.
`init_from`: an HF mT5 dir (e.g. a `save_pretrained` of google/mt5-small) or an Orbax export.

  xformers-jax train --config configs/mt5/finetune.py:tiny --workdir workdirs/mt5_cls
  xformers-jax train --config configs/mt5/finetune.py:base --workdir workdirs/mt5_cls \
      --config.init_from=/ckpt/mt5-base --config.data.tokenizer=/ckpt/mt5-base/spiece.model
"""

from xformers_jax import config_lib

NUM_SENTINELS = 100

# preset -> (model preset, batch size, steps, compute dtype, learning rate)
RUNS = {
    "tiny": ("tiny", 32, 200, "float32", 1e-3),
    "small": ("small", 128, 3000, "bfloat16", 1e-3),
    "base": ("base", 128, 3000, "bfloat16", 1e-3),
    "large": ("large", 128, 3000, "bfloat16", 1e-3),
    "xl": ("xl", 128, 3000, "bfloat16", 3e-4),
    "xxl": ("xxl", 128, 3000, "bfloat16", 3e-4),
}


def get_config(arg: str | None = None):
    model, batch_size, steps, dtype, lr = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    c = config_lib.base_config()
    c.task = "classification"
    c.model.family = "mt5"
    c.model.preset = model
    c.model.num_labels = 4
    c.model.dtype = dtype
    c.model.dropout_rate = 0.1
    c.model.classifier_dropout = 0.0
    # Our sentencepiece layout (<s>=0, <pad>=1, </s>=2); T5 starts decoding with <pad>.
    c.model.pad_token_id = 1
    c.model.eos_token_id = 2
    c.model.decoder_start_token_id = 1
    c.data.seq_len = 48
    c.data.vocab_size = 8000 - NUM_SENTINELS  # as in pretrain_span, so checkpoints carry over
    c.optim.name = "adafactor"
    c.optim.lr = lr
    c.optim.warmup_steps = steps // 10
    c.optim.schedule = "linear"
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.train.steps = steps
    c.train.batch_size = batch_size
    c.train.eval_every_steps = max(steps // 4, 1)
    c.train.eval_steps = 10
    c.checkpoint.every_steps = steps
    c.log.every_steps = 10
    return c
