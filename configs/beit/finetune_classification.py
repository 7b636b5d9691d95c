"""BEiT image classification fine-tuning (task `image_classification`) on scikit-learn's digits.

Presets (`:arg`): tiny (32 px, patch 8; CPU, the default), base and large (patch 16, 224 px),
base-384 and large-384. `init_from`: a MIM workdir (its encoder is loaded; the classifier and
pooler LayerNorm start fresh), an HF dir or an Orbax params export of a BEiT model:

  xformers-jax train --config configs/beit/pretrain_mim.py:tiny --workdir workdirs/beit_mim
  xformers-jax train --config configs/beit/finetune_classification.py:tiny \
      --workdir workdirs/beit_cls --config.init_from=workdirs/beit_mim
"""

from xformers_jax import config_lib

# config preset -> (model preset, image size, run sizes)
RUNS = {
    "tiny": dict(model="tiny", image_size=32, steps=300, batch_size=32, lr=2e-3, warmup=20,
                 dtype="float32", every=100, layer_decay=1.0),
    "base": dict(model="base", image_size=224, steps=20_000, batch_size=1024, lr=4e-3,
                 warmup=1000, dtype="bfloat16", every=2000, layer_decay=0.65),
    "base-384": dict(model="base-384", image_size=384, steps=20_000, batch_size=512,
                     lr=2e-3, warmup=1000, dtype="bfloat16", every=2000, layer_decay=0.65),
    "large": dict(model="large", image_size=224, steps=20_000, batch_size=1024, lr=2e-3,
                  warmup=1000, dtype="bfloat16", every=2000, layer_decay=0.75),
    "large-384": dict(model="large-384", image_size=384, steps=20_000, batch_size=512,
                      lr=1e-3, warmup=1000, dtype="bfloat16", every=2000, layer_decay=0.75),
}  # fmt: skip


OPTIM = dict(name="adamw", schedule="cosine", weight_decay=0.05, b2=0.999)


def get_config(arg: str | None = None):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    c = config_lib.preset_config(
        "image_classification", "beit", run, optim=OPTIM, eval_steps=100, max_to_keep=2
    )
    c.optim.layer_decay = run["layer_decay"]
    c.model.image_size = run["image_size"]
    c.model.num_labels = 10  # the digits; the class folders of data.image_folder otherwise
    config_lib.add_image_data(c)
    return c
