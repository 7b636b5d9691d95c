"""BEiT semantic segmentation fine-tuning (task `segmentation`: UperNet + auxiliary FCN head).

Data: digit scenes (scikit-learn's digits pasted on dark crops of its sample photos, per-pixel
classes background + 10 digits, stroke borders ignored) rendered at `data.image_size`, which may
differ from `model.image_size` (the position tables are resized to the input grid, as the BEiT
paper fine-tunes 224 px pretraining at 640 px). BatchNorm running statistics are trained, saved in
every checkpoint and exported with the params.

Presets (`:arg`): tiny (CPU, the default: a 32 px model trained on 48 px scenes, patch 8), base
and large (ADE20k sizes: 640 px inputs, 150 classes, patch 16, the pt22k MIM architecture at
224 px, BEiT's UperNet recipe: AdamW b2 0.999, weight decay 0.05, linear decay after warmup,
layer decay 0.65 / 0.9, batch 16, 160k steps, bfloat16).

From a MIM run (its encoder is loaded, the segmentation heads start fresh):

  xformers-jax train --config configs/beit/pretrain_mim.py:tiny --workdir workdirs/beit_mim
  xformers-jax train --config configs/beit/segmentation.py:tiny --workdir workdirs/beit_seg \
      --config.init_from=workdirs/beit_mim
  xformers-jax train --config configs/beit/segmentation.py:base --workdir gs://BUCKET/beit_seg \
      --config.init_from=gs://BUCKET/beit_base

From a fine-tuned HF checkpoint instead (per-layer relative bias, 640 px tables):
`--config.model.preset=base-640-ade --config.model.image_size=640 --config.init_from=HF_DIR`.
Export with `xformers-jax export --checkpoint WORKDIR --hf-out HF_DIR`.
"""

from xformers_jax import config_lib

# config preset -> (model preset, sizes, run)
RUNS = {
    "tiny": dict(model="tiny", model_size=32, image_size=48, labels=11, out=(1, 2, 3, 4),
                 drop_path=0.0, steps=300, batch_size=16, lr=2e-3, warmup=20, layer_decay=1.0,
                 dtype="float32", remat="none", mesh=(-1, 1, 1), every=100),
    "base": dict(model="base-pt22k", model_size=224, image_size=640, labels=150,
                 out=(3, 5, 7, 11), drop_path=0.1, steps=160_000, batch_size=16, lr=7e-4,
                 warmup=1500, layer_decay=0.65, dtype="bfloat16", remat="dots",
                 mesh=(-1, 1, 1), every=16_000),
    "large": dict(model="large-pt22k", model_size=224, image_size=640, labels=150,
                  out=(7, 11, 15, 23), drop_path=0.2, steps=160_000, batch_size=16, lr=2e-5,
                  warmup=3000, layer_decay=0.9, dtype="bfloat16", remat="full",
                  mesh=(-1, 4, 1), every=16_000),
}  # fmt: skip


# BEiT's UperNet recipe; mmseg's poly schedule with power 1 is linear.
OPTIM = dict(name="adamw", schedule="linear", weight_decay=0.05, b2=0.999, eps=1e-8, clip_norm=0.0)


def get_config(arg: str | None = None):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    eval_steps = 12 if run["model"] == "tiny" else 125  # 2000 scenes for base / large
    c = config_lib.preset_config(
        "segmentation", "beit", run, optim=OPTIM, eval_steps=eval_steps, max_to_keep=2
    )
    c.optim.layer_decay = run["layer_decay"]
    c.model.image_size = run["model_size"]  # the position tables' resolution
    c.model.num_labels = run["labels"]
    c.model.out_indices = run["out"]
    c.model.drop_path_rate = run["drop_path"]

    c.data.image_size = run["image_size"]  # 0 = model.image_size
    c.data.max_digits = 3  # digits per scene
    c.data.reduce_labels = False  # True: background ignored, digit d -> class d (ADE20k-style)
    return c
