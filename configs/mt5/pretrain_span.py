"""mT5 span-corruption pretraining (T5's objective: 15% noise, mean span 3, sentinels at the end
of the vocabulary), Adafactor as in the mT5 paper.

Presets (`:arg`): tiny (CPU, minutes; the default run), small, base, large, xl, xxl.

  xformers-jax train --config configs/mt5/pretrain_span.py:tiny --workdir workdirs/mt5_tiny
  xformers-jax train --config configs/mt5/pretrain_span.py:xl --workdir gs://BUCKET/mt5_xl \
      --config.mesh.fsdp=16 --config.mesh.tensor=4 --config.data.train_files="['/data/mc4.txt']"
"""

from xformers_jax import config_lib

NUM_SENTINELS = 100

# config preset -> (model preset, run sizes). mT5 used 1M steps of batch 1024 x 1024 tokens;
# seq_len is the encoder inputs' length, the targets get T5's matching length.
RUNS = {
    "tiny": dict(model="tiny", steps=300, batch_size=32, seq_len=64, lr=1e-2, warmup=30,
                 vocab_size=8000, dtype="float32", remat="none", mesh=(-1, 1, 1), every=100),
    "small": dict(model="small", steps=1_000_000, batch_size=1024, seq_len=1024, lr=1e-2,
                  warmup=10_000, vocab_size=250112, dtype="bfloat16", remat="none",
                  mesh=(-1, 1, 1), every=5000),
    "base": dict(model="base", steps=1_000_000, batch_size=1024, seq_len=1024, lr=1e-2,
                 warmup=10_000, vocab_size=250112, dtype="bfloat16", remat="dots",
                 mesh=(-1, 4, 1), every=5000),
    "large": dict(model="large", steps=1_000_000, batch_size=1024, seq_len=1024, lr=1e-2,
                  warmup=10_000, vocab_size=250112, dtype="bfloat16", remat="dots",
                  mesh=(-1, 8, 1), every=5000),
    "xl": dict(model="xl", steps=1_000_000, batch_size=1024, seq_len=1024, lr=1e-2,
               warmup=10_000, vocab_size=250112, dtype="bfloat16", remat="dots",
               mesh=(-1, 16, 4), every=2000),
    "xxl": dict(model="xxl", steps=1_000_000, batch_size=1024, seq_len=1024, lr=1e-2,
                warmup=10_000, vocab_size=250112, dtype="bfloat16", remat="full",
                mesh=(-1, 32, 8), every=2000),
}  # fmt: skip


OPTIM = dict(name="adafactor", weight_decay=0.0, clip_norm=1.0)


def get_config(arg: str | None = None):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    c = config_lib.preset_config("span_corruption", "mt5", run, optim=OPTIM, eval_steps=8)
    c.optim.schedule = "rsqrt" if run["model"] != "tiny" else "linear"
    c.model.dropout_rate = 0.0  # mT5 pretrained without dropout
    # Our sentencepiece layout (<s>=0, <pad>=1, </s>=2); T5 starts decoding with <pad>.
    c.model.pad_token_id = 1
    c.model.eos_token_id = 2
    c.model.decoder_start_token_id = 1

    # sentencepiece trained on the corpus, leaving the last ids of the vocab to the sentinels.
    c.data.vocab_size = min(run["vocab_size"], 8000) - NUM_SENTINELS
    c.data.noise_density = 0.15
    c.data.mean_noise_span_length = 3.0
    c.data.num_sentinels = NUM_SENTINELS
    return c
