"""BEiT MIM end to end: masks, visual tokenizer, image pipelines, MIM training, fine-tuning."""

import os

import numpy as np
import pytest

from tests.helpers import assert_resumes_exactly
from xformers_jax import config_lib, train
from xformers_jax.data.images import (
    ImageSet,
    check_images,
    classification_dataset,
    default_images,
    mim_dataset,
)
from xformers_jax.data.masking import MaskingGenerator
from xformers_jax.data.visual_tokenizer import KMeansPatchTokenizer, PrecomputedTokenizer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "beit")


def test_masking_count_and_blocks():
    gen = MaskingGenerator(14, num_masking_patches=75, min_num_patches=16)
    rng = np.random.default_rng(0)
    masks = [gen(rng) for _ in range(100)]
    counts = np.array([m.sum() for m in masks])
    assert counts.max() <= 75 and counts.mean() > 72
    # Blocks, not scattered patches: most masked patches have a masked 4-neighbour.
    m = masks[0]
    padded = np.pad(m, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert (neighbours & m).sum() / m.sum() > 0.9
    # Deterministic from the generator state.
    np.testing.assert_array_equal(gen(np.random.default_rng(3)), gen(np.random.default_rng(3)))
    with pytest.raises(ValueError, match="num_masking_patches"):
        MaskingGenerator(4, 17)


def test_tokenizer_deterministic_and_save_load(tmp_path):
    x = default_images("train", 32).render_many(200, 0)
    a = KMeansPatchTokenizer.fit(x, patch_size=8, vocab_size=16, seed=1)
    b = KMeansPatchTokenizer.fit(x, patch_size=8, vocab_size=16, seed=1)
    ids = a.tokenize(x[:10])
    assert ids.shape == (10, 16) and ids.dtype == np.int32 and 0 <= ids.min() < ids.max() < 16
    np.testing.assert_array_equal(ids, b.tokenize(x[:10]))
    a.save(tmp_path / "tok.npz")
    np.testing.assert_array_equal(
        KMeansPatchTokenizer.load(tmp_path / "tok.npz").tokenize(x), a.tokenize(x)
    )
    pre = PrecomputedTokenizer(x[:10], ids)
    np.testing.assert_array_equal(pre.tokenize(x[3:5]), ids[3:5])
    with pytest.raises(KeyError, match="not among the precomputed"):
        pre.tokenize(x[20:21])
    with pytest.raises(ValueError, match=r"shape \(2, 1, 32, 32\)"):
        a.tokenize(x[:2, :1])


def test_wrong_channels_named():
    with pytest.raises(ValueError, match=r"shape \(5, 8, 8, 2\)"):
        check_images(np.zeros((5, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"shape \(5, 8, 8, 4\)"):
        ImageSet(np.zeros((5, 8, 8, 4), np.uint8), np.zeros(5))


def test_pipelines_shapes_and_exact_resume():
    images = default_images("train", 32, ("digits", "sample_images"), num_crops=16)
    tok = KMeansPatchTokenizer.fit(images.render_many(100, 0), patch_size=8, vocab_size=16)
    masking = MaskingGenerator(4, 6, 2)
    want = assert_resumes_exactly(
        lambda: mim_dataset(images, tok, masking, batch_size=4, seed=0), skip=3, n=3
    )
    b = want[0]
    assert b["pixel_values"].shape == (4, 3, 32, 32) and b["pixel_values"].dtype == np.float32
    assert b["bool_masked_pos"].shape == (4, 16) and b["bool_masked_pos"].dtype == bool
    assert ((b["labels"] != -100) == b["bool_masked_pos"]).all()
    labels = [
        np.concatenate([e["labels"] for e in classification_dataset(
            default_images("eval", 32), batch_size=8, seed=0, train=False, shard_index=i,
            shard_count=2)])
        for i in range(2)
    ]  # fmt: skip
    # 360 images padded to whole 16-row global batches: both hosts feed 23 batches, the 8 padded
    # rows (label -1) are the last block.
    assert labels[0].shape == labels[1].shape == (184,)
    assert (labels[0] >= 0).sum() == 184 and (labels[1] >= 0).sum() == 176


def _config(name, **overrides):
    c = config_lib.load_config(os.path.join(CONFIGS, name) + ":tiny")
    with c.unlocked():
        c.log.progress = False
        c.log.tensorboard = False
        c.checkpoint.async_save = False
        c.log.every_steps = 10
        for k, v in overrides.items():
            if "__" in k:
                section, key = k.split("__")
                c[section][key] = v
            else:
                c[k] = v
    return c


@pytest.mark.slow
def test_mim_pretraining_then_classification_finetuning(tmp_path):
    mim_dir, cls_dir = str(tmp_path / "mim"), str(tmp_path / "cls")
    steps = 80
    # 16 visual tokens (a 64-way head): a target the tiny model learns within these steps.
    mim = train.train_and_evaluate(
        _config("pretrain_mim.py", train__steps=steps, checkpoint__every_steps=steps,
                train__eval_steps=4, data__num_crops=64, data__tokenizer_fit_images=500,
                data__vocab_size=16, optim__lr=5e-3),
        mim_dir,
    )  # fmt: skip
    print("MIM eval", mim["first_eval"], "->", mim["final_eval"])
    assert mim["final_eval"]["loss"] < mim["first_eval"]["loss"] - 1.0
    assert os.path.exists(os.path.join(mim_dir, "visual_tokenizer.npz"))

    # The MIM workdir initialises the classification head: encoder loaded, MIM head dropped,
    # classifier and pooler LayerNorm fresh.
    cls = train.train_and_evaluate(
        _config("finetune_classification.py", train__steps=steps, init_from=mim_dir,
                checkpoint__every_steps=steps, train__eval_steps=12, optim__lr=5e-3),
        cls_dir,
    )  # fmt: skip
    print("classification eval", cls["first_eval"], "->", cls["final_eval"])
    assert cls["final_eval"]["accuracy"] > 0.2  # chance: 0.1
