"""XLNet permutation-LM pretraining.

Presets (`:arg`): tiny (CPU, minutes), base, large (the published model sizes; the original
recipe's seq_len 512, reuse_len 256, num_predict 85, perm_size 256, bi_data).

  xformers-jax train --config configs/xlnet/pretrain_plm.py:tiny --workdir workdirs/xlnet_tiny
  launch/tpu_pod.sh TPU ZONE -- xformers-jax train --config configs/xlnet/pretrain_plm.py:large \
      --workdir gs://BUCKET/xlnet_l --config.data.train_files="['gs://BUCKET/corpus/*.txt']"
  (on a v5p-512: `xformers-jax compile ... --topology v5p-512` measures 83 GiB of 95 per chip)
"""

from xformers_jax import config_lib

RUNS = {
    "tiny": dict(model="tiny", steps=300, batch_size=16, seq_len=64, num_predict=10, perm_size=32,
                 reuse_len=32, mem_len=32, bi_data=False, lr=1e-3, warmup=30, vocab_size=8000,
                 dtype="float32", remat="none", mesh=(-1, 1, 1), every=100),
    "base": dict(model="base", steps=500_000, batch_size=2048, seq_len=512, num_predict=85,
                 perm_size=256, reuse_len=256, mem_len=384, bi_data=True, lr=4e-4, warmup=40_000,
                 vocab_size=32000, dtype="bfloat16", remat="dots", mesh=(-1, 1, 1), every=5000),
    "large": dict(model="large", steps=500_000, batch_size=8192, seq_len=512, num_predict=85,
                  perm_size=256, reuse_len=256, mem_len=384, bi_data=True, lr=4e-4,
                  warmup=40_000, vocab_size=32000, dtype="bfloat16", remat="dots",
                  mesh=(-1, 8, 1), every=5000),
}  # fmt: skip


OPTIM = dict(name="adamw", schedule="linear", weight_decay=0.01, clip_norm=1.0)


def get_config(arg: str | None = None):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    c = config_lib.preset_config("plm", "xlnet", run, optim=OPTIM, eval_steps=4)
    c.model.dropout = 0.1
    c.model.mem_len = run["mem_len"]
    c.model.reuse_len = run["reuse_len"]
    c.model.bi_data = run["bi_data"]
    c.model.attn_type = "bi"
    c.model.use_mems_train = True  # Transformer-XL mems carried across steps (TrainState.extra)

    c.data.vocab_size = min(run["vocab_size"], 8000)  # sentencepiece trained on the corpus
    c.data.num_predict = run["num_predict"]
    c.data.perm_size = run["perm_size"]
    c.data.reuse_len = run["reuse_len"]
    c.data.max_span = 5
    return c
