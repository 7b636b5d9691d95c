"""YOSO masked-LM pretraining, sampled (LSH) attention in `tiny`, expectation mode in `base`.

Presets (`:arg`): tiny (CPU, minutes; sampled mode, 32 hashes of 8 bits), base
(uw-madison/yoso-4096 sizes: 4096 positions, sequences of 4096 tokens).

  xformers-jax train --config configs/yoso/pretrain_mlm.py:tiny --workdir workdirs/yoso_tiny
  xformers-jax train --config configs/yoso/pretrain_mlm.py:base --workdir gs://BUCKET/yoso_base \
      --config.model.use_expectation=False --config.model.attention_impl=pallas \
      --config.mesh.fsdp=8 --config.data.train_files="['/data/corpus.txt']"

The hash functions of the sampled mode come from the task's `lsh` rng (folded from the step's
rng), so a run is reproducible and resumes exactly.
"""

from xformers_jax import config_lib

# config preset -> (model preset, run sizes)
RUNS = {
    "tiny": dict(model="tiny", steps=300, batch_size=16, seq_len=128, lr=2e-3, warmup=30,
                 vocab_size=8000, dtype="float32", remat="none", mesh=(-1, 1, 1), every=100),
    "base": dict(model="base", steps=500_000, batch_size=256, seq_len=4096, lr=1e-4,
                 warmup=10_000, vocab_size=50265, dtype="bfloat16", remat="dots",
                 mesh=(-1, 1, 1), every=5000),
}  # fmt: skip


OPTIM = dict(name="adamw", schedule="linear", weight_decay=0.01, b2=0.98, clip_norm=1.0)


def get_config(arg: str | None = None):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    c = config_lib.preset_config("mlm", "yoso", run, optim=OPTIM, eval_steps=8)
    c.model.hidden_dropout_prob = 0.1
    c.model.max_position_embeddings = 4096
    c.model.attention_impl = "xla"

    c.data.vocab_size = min(run["vocab_size"], 8000)  # sentencepiece trained on the corpus
    c.data.mask_prob = 0.15
    return c
