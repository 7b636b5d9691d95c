"""mT5 dialog-reply fine-tuning on the bundled chatterbot conversations (8 languages by default):
prompt -> reply pairs, teacher-forced cross-entropy, then replies to held-out prompts generated
with the trained model and printed at the end of the run (task `seq2seq`).

Presets (`:arg`): tiny (CPU, a few minutes; the default run), small, base. The tokenizer is T5's
(`data.tokenizer_type='t5'`: ids as `transformers.T5Tokenizer`), trained on the dialog text into
`<workdir>/t5_tokenizer/` unless `data.tokenizer` or `init_from` provide one; the model's
pad/eos/decoder-start ids must be the tokenizer's (T5's 0, 1, 0 here).

  xformers-jax train --config configs/mt5/dialog.py:tiny --workdir workdirs/mt5_dialog

From a span-corruption run of the same sizes, with its fairseq-layout tokenizer and ids:

  xformers-jax train --config configs/mt5/pretrain_span.py:tiny --workdir workdirs/mt5_tiny
  xformers-jax train --config configs/mt5/dialog.py:tiny --workdir workdirs/mt5_tiny_dialog \
      --config.init_from=workdirs/mt5_tiny \
      --config.data.tokenizer=workdirs/mt5_tiny/tokenizer.model --config.model.pad_token_id=1 \
      --config.model.eos_token_id=2 --config.model.decoder_start_token_id=1

From google/mt5-small saved by transformers with its tokenizer (model + `spiece.model` in one
dir, found through `init_from`):

  xformers-jax train --config configs/mt5/dialog.py:small --workdir workdirs/mt5_small_dialog \
      --config.init_from=/ckpt/mt5-small
"""

import ml_collections

from xformers_jax import config_lib

NUM_SENTINELS = 100
LANGUAGES = ["english", "spanish", "italian", "portuguese", "german", "french", "russian",
             "japanese"]  # fmt: skip

# preset -> run sizes (seq_len: prompt </s>; targets_length: reply </s>). mT5 fine-tuning:
# Adafactor, constant 1e-3, dropout 0.1.
RUNS = {
    "tiny": dict(model="tiny", steps=400, batch_size=32, seq_len=32, targets_length=32,
                 lr=1e-2, warmup=30, dtype="float32", dropout=0.0, every=200),
    "small": dict(model="small", steps=3000, batch_size=64, seq_len=64, targets_length=64,
                  lr=1e-3, warmup=0, dtype="bfloat16", dropout=0.1, every=500),
    "base": dict(model="base", steps=3000, batch_size=64, seq_len=64, targets_length=64,
                 lr=1e-3, warmup=0, dtype="bfloat16", dropout=0.1, every=500),
}  # fmt: skip


OPTIM = dict(name="adafactor", weight_decay=0.0, clip_norm=1.0)


def get_config(arg: str | None = None):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    c = config_lib.preset_config(
        "seq2seq", "mt5", run, optim=OPTIM, eval_steps=16, param_dtype=None
    )
    c.optim.schedule = "linear" if run["model"] == "tiny" else "constant"
    c.model.dropout_rate = run["dropout"]
    # T5's tokenizer ids (<pad>=0, </s>=1) and decoding starts with <pad>; the task checks them.
    c.model.pad_token_id = 0
    c.model.eos_token_id = 1
    c.model.decoder_start_token_id = 0

    c.data.languages = LANGUAGES  # ignored when data.train_files (prompt<TAB>reply lines) is set
    c.data.targets_length = run["targets_length"]  # decoder: reply </s>
    c.data.tokenizer_type = "t5"
    # spm pieces of a tokenizer trained here; the 100 sentinels come on top (8000 = tiny's vocab).
    c.data.vocab_size = 8000 - NUM_SENTINELS

    c.report = ml_collections.ConfigDict()
    c.report.num_prompts = 8  # held-out prompts answered at the end (0 = no report)
    c.report.num_beams = 1  # 1 = greedy
    c.report.max_new_tokens = run["targets_length"]
    return c
