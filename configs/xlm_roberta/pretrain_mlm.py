"""XLM-RoBERTa-XL / XLM-R / XLM-V masked-LM pretraining.

Presets (`:arg`): tiny (CPU, minutes; the default run), base, large, xlm-v-base, xl, xxl.

  xformers-jax train --config configs/xlm_roberta/pretrain_mlm.py:tiny --workdir workdirs/xlmr_tiny
  xformers-jax train --config configs/xlm_roberta/pretrain_mlm.py:xl --workdir gs://BUCKET/xlmr_xl \
      --config.mesh.fsdp=16 --config.mesh.tensor=4 --config.data.train_files="['/data/cc100.txt']"
"""

import ml_collections

from xformers_jax import config_lib

# config preset -> (model preset, run sizes)
RUNS = {
    "tiny": dict(model="tiny", steps=300, batch_size=32, seq_len=64, lr=2e-3, warmup=30,
                 vocab_size=8000, dtype="float32", remat="none", mesh=(-1, 1, 1), every=100,
                 max_pred=0, vocab_chunk=0),
    "base": dict(model="xlm-roberta-base", steps=500_000, batch_size=2048, seq_len=512, lr=6e-4,
                 warmup=10_000, vocab_size=250002, dtype="bfloat16", remat="none",
                 mesh=(-1, 1, 1), every=5000,
                 max_pred=80, vocab_chunk=0),
    "large": dict(model="xlm-roberta-large", steps=500_000, batch_size=8192, seq_len=512,
                  lr=4e-4, warmup=24_000, vocab_size=250002, dtype="bfloat16", remat="dots",
                  mesh=(-1, 4, 1), every=5000,
                  max_pred=80, vocab_chunk=0),
    "xlm-v-base": dict(model="xlm-v-base", steps=1_500_000, batch_size=8192, seq_len=512,
                       lr=6e-4, warmup=15_000, vocab_size=901629, dtype="bfloat16",
                       remat="dots", mesh=(-1, 1, 4), every=5000,
                       max_pred=80, vocab_chunk=32768),
    "xl": dict(model="xl", steps=500_000, batch_size=2048, seq_len=512, lr=1e-4, warmup=10_000,
               vocab_size=250880, dtype="bfloat16", remat="dots", mesh=(-1, 16, 4), every=2000,
               max_pred=80, vocab_chunk=32768),
    "xxl": dict(model="xxl", steps=500_000, batch_size=2048, seq_len=512, lr=1e-4,
                warmup=10_000, vocab_size=250880, dtype="bfloat16", remat="full",
                mesh=(-1, 32, 8), every=2000,
                max_pred=80, vocab_chunk=32768),
}  # fmt: skip


OPTIM = dict(name="adamw", schedule="linear", weight_decay=0.01, b2=0.98, clip_norm=1.0)


def get_config(arg: str | None = None):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    c = config_lib.preset_config("mlm", "xlm_roberta", run, optim=OPTIM, eval_steps=8)
    c.model.hidden_dropout_prob = 0.1
    c.model.attention_probs_dropout_prob = 0.1
    c.model.max_position_embeddings = run["seq_len"] + 2 if run["model"] == "tiny" else 514

    c.data.vocab_size = min(run["vocab_size"], 8000)  # sentencepiece trained on the corpus
    c.data.mask_prob = 0.15
    # Large vocabularies: LM head only at (at most this many) masked positions per row; 0 = all
    # positions. And the cross-entropy chunked over the vocabulary (0 = full logits).
    c.data.max_predictions = run["max_pred"]
    c.loss = ml_collections.ConfigDict()
    c.loss.vocab_chunk_size = run["vocab_chunk"]
    return c
