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

# preset -> run sizes
RUNS = {
    "tiny": dict(model="tiny", batch_size=32, steps=200, dtype="float32", lr=1e-3),
    "small": dict(model="small", batch_size=128, steps=3000, dtype="bfloat16", lr=1e-3),
    "base": dict(model="base", batch_size=128, steps=3000, dtype="bfloat16", lr=1e-3),
    "large": dict(model="large", batch_size=128, steps=3000, dtype="bfloat16", lr=1e-3),
    "xl": dict(model="xl", batch_size=128, steps=3000, dtype="bfloat16", lr=3e-4),
    "xxl": dict(model="xxl", batch_size=128, steps=3000, dtype="bfloat16", lr=3e-4),
}


def get_config(arg: str | None = None):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    return config_lib.finetune_config(
        "classification",
        "mt5",
        run,
        # Our sentencepiece layout (<s>=0, <pad>=1, </s>=2); T5 starts decoding with <pad>.
        model=dict(
            dropout_rate=0.1,
            classifier_dropout=0.0,
            pad_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
        data=dict(vocab_size=8000 - NUM_SENTINELS),  # as in pretrain_span: checkpoints carry over
        optim=dict(name="adafactor", weight_decay=0.0, clip_norm=1.0),
    )
