"""BEiT masked-image-modelling pretraining (task `mim`) on the bundled images.

Presets (`:arg`): tiny (32 px, patch 8, CPU in a few minutes; the default run), base and large
(patch 16 at 224 px, the pt22k architectures), base-384 and large-384. Data: scikit-learn's
digits and random crops of its sample images, upscaled to the model's image size; targets from a
k-means patch tokenizer fitted once into the workdir (`data.tokenizer` = an .npz to use another).

  xformers-jax train --config configs/beit/pretrain_mim.py:tiny --workdir workdirs/beit_mim
  xformers-jax train --config configs/beit/pretrain_mim.py:tiny --workdir workdirs/beit_folder \
      --config.data.image_folder=DIR  # ImageNet layout DIR/<class>/<file>.jpg (docs/images.md)
  xformers-jax train --config configs/beit/pretrain_mim.py:base --workdir gs://BUCKET/beit_base \
      --config.mesh.fsdp=8
"""

from xformers_jax import config_lib

# config preset -> (model preset, image size, run sizes)
RUNS = {
    "tiny": dict(model="tiny", image_size=32, vocab_size=64, steps=300, batch_size=32, lr=2e-3,
                 warmup=20, dtype="float32", remat="none", mesh=(-1, 1, 1), every=100,
                 min_block=2),
    "base": dict(model="base-pt22k", image_size=224, vocab_size=8192, steps=800_000,
                 batch_size=2048, lr=1.5e-3, warmup=10_000, dtype="bfloat16", remat="none",
                 mesh=(-1, 1, 1), every=5000, min_block=16),
    "base-384": dict(model="base-pt22k", image_size=384, vocab_size=8192, steps=800_000,
                     batch_size=2048, lr=1.5e-3, warmup=10_000, dtype="bfloat16",
                     remat="dots", mesh=(-1, 1, 1), every=5000, min_block=16),
    "large": dict(model="large-pt22k", image_size=224, vocab_size=8192, steps=800_000,
                  batch_size=2048, lr=1.5e-3, warmup=10_000, dtype="bfloat16", remat="dots",
                  mesh=(-1, 4, 1), every=5000, min_block=16),
    "large-384": dict(model="large-pt22k", image_size=384, vocab_size=8192, steps=800_000,
                      batch_size=2048, lr=1.5e-3, warmup=10_000, dtype="bfloat16",
                      remat="full", mesh=(-1, 4, 1), every=5000, min_block=16),
}  # fmt: skip


OPTIM = dict(name="adamw", schedule="cosine", weight_decay=0.05, b2=0.999, clip_norm=3.0)


def get_config(arg: str | None = None):
    run = RUNS[config_lib.parse_arg(arg, RUNS, default="tiny")]
    c = config_lib.preset_config("mim", "beit", run, optim=OPTIM, eval_steps=8)
    c.model.image_size = run["image_size"]

    config_lib.add_image_data(c, visual_tokenizer=True)
    c.data.sources = ["digits", "sample_images"]
    c.data.num_crops = 256  # photo crops per pass over the training data
    c.data.vocab_size = run["vocab_size"]  # visual-token ids (k-means clusters)
    # '' = fit a k-means tokenizer into the workdir; or an .npz; with visual_tokenizer 'dalle',
    # the DALL-E dVAE's encoder.pkl (BEiT v1's targets; vocab_size 8192).
    c.data.tokenizer = ""
    c.data.tokenizer_dim = 32  # random-projection dimension of the patches
    c.data.tokenizer_iterations = 10
    c.data.tokenizer_fit_images = 2000
    # BEiT: 75 of 196 patches (~0.4) in blocks of >= 16 patches, aspect ratio 0.3 .. 1/0.3.
    c.data.mask_ratio = 0.4
    c.data.min_block_patches = run["min_block"]
    c.data.max_block_patches = 0  # 0 = the whole masking budget
    c.data.min_aspect = 0.3
    return c
