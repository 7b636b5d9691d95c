"""Real images for BEiT: ImageNet-layout folders (local and gs://), ArrayRecord shards written by
the Beam prepare, BEiT's augmentations, and the MIM / classification runs on them."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_resumes_exactly
from xformers_jax import cli, config_lib, paths, train
from xformers_jax.data import image_folder as imf
from xformers_jax.data import image_prepare
from xformers_jax.data.corpus import DataError
from xformers_jax.data.images import classification_dataset, mim_dataset
from xformers_jax.data.masking import MaskingGenerator
from xformers_jax.data.visual_tokenizer import KMeansPatchTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ("cat", "dog", "eel")
BEAM_LOCAL = ["--runner=DirectRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]


def make_folder(root, per_class: int = 10) -> str:
    """`per_class` images of each class: JPEG and PNG, RGB, grey and RGBA, of varied sizes, each
    class tinted its own colour (so a classifier can learn it)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(36, 72, 2))
            x = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            x[..., c] += 180
            img = Image.fromarray(x)
            if i % 5 == 3:
                img = img.convert("L")
            elif i % 5 == 4:
                img = img.convert("RGBA")
            ext = "jpg" if i % 2 == 0 and img.mode != "RGBA" else "png"
            img.save(os.path.join(root, name, f"{i:03d}.{ext}"))
    with open(os.path.join(root, "README.txt"), "w") as f:  # not a class folder
        f.write("synthetic")
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"))


def _config(name: str, folder: str, **data):
    c = config_lib.load_config(os.path.join(ROOT, "configs", "beit", name) + ":tiny")
    with c.unlocked():
        c.data.image_folder = folder
        c.data.eval_percent = 20.0
        for k, v in data.items():
            c.data[k] = v
        c.train.batch_size = 8
        c.train.eval_every_steps, c.train.eval_steps = 1000, 1
        c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
        c.log.every_steps, c.log.progress, c.log.tensorboard = 1, False, False
    return c


def test_scan_labels_split_and_errors(folder, tmp_path):
    files, labels, classes = imf.scan_folder(folder)
    assert classes == list(CLASSES) and len(files) == 30
    assert [os.path.basename(os.path.dirname(f)) for f in files] == [CLASSES[i] for i in labels]
    train_set, eval_set = imf.folder_splits(_config("pretrain_mim.py", folder))
    assert len(train_set) + len(eval_set) == 30 and 0 < len(eval_set) < 15
    assert not set(train_set.files) & set(eval_set.files)

    with pytest.raises(DataError, match="no such image folder"):
        imf.scan_folder(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(DataError, match="no images"):
        imf.scan_folder(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "val" / "zebra")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "zebra" / "z.png")
    with pytest.raises(DataError, match=r"\['zebra'\] are not among the training classes"):
        imf.folder_splits(
            _config("pretrain_mim.py", folder, eval_image_folder=str(tmp_path / "val"))
        )

    bad = tmp_path / "bad"
    make_folder(bad, per_class=2)
    (bad / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    source = imf.EncodedImages(imf.ImageFolder(*imf.scan_folder(str(bad))), imf.ImageTransform(16))
    i = source.source.files.index(str(bad / "dog" / "broken.jpg"))
    with pytest.raises(DataError, match=r"broken\.jpg: cannot decode the image") as err:
        source.example(i, np.random.default_rng(0))
    assert "\n" not in str(err.value)


def test_augmentations_deterministic_and_views():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (60, 90, 3)).astype(np.uint8))
    t = imf.ImageTransform(32, 16, train=True)
    a, b = t(img, np.random.default_rng([7, 3])), t(img, np.random.default_rng([7, 3]))
    assert a["pixel_values"].shape == (3, 32, 32) and a["tokenizer_pixels"].shape == (3, 16, 16)
    assert a["pixel_values"].dtype == np.float32 and -1 <= a["pixel_values"].min()
    assert 0 <= a["tokenizer_pixels"].min() and a["tokenizer_pixels"].max() <= 1
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = t(img, np.random.default_rng([7, 4]))
    assert not np.array_equal(a["pixel_values"], c["pixel_values"])
    # Both views show the same crop: the tokenizer's view is the patch view, smaller.
    small = (
        np.asarray(
            Image.fromarray(np.uint8((a["pixel_values"].transpose(1, 2, 0) + 1) * 127.5)).resize(
                (16, 16), Image.Resampling.LANCZOS
            ),
            np.float32,
        ).transpose(2, 0, 1)
        / 255
    )
    assert np.abs(small - a["tokenizer_pixels"]).mean() < 0.06
    # Crop boxes stay inside the image and respect the scale range.
    for seed in range(200):
        left, top, right, bottom = imf._crop_box(90, 60, (0.08, 1.0), np.random.default_rng(seed))
        assert 0 <= left < right <= 90 and 0 <= top < bottom <= 60
    # Eval: the same centre crop whatever the rng; no augmentation.
    e = imf.ImageTransform(32, train=False)
    np.testing.assert_array_equal(
        e(img, np.random.default_rng(0))["pixel_values"],
        e(img, np.random.default_rng(1))["pixel_values"],
    )


def test_folder_pipelines_resume_hosts_and_workers(folder):
    c = _config("pretrain_mim.py", folder)
    train_set, eval_set = imf.image_splits(c, 32)
    tok = KMeansPatchTokenizer.fit(train_set.render_many(12, 0), patch_size=8, vocab_size=16)
    masking = MaskingGenerator(4, 6, 2)

    def make(**kw):
        return mim_dataset(train_set, tok, masking, batch_size=4, seed=3, **kw)

    want = assert_resumes_exactly(make, skip=3, n=2)
    b = want[0]
    assert b["pixel_values"].shape == (4, 3, 32, 32) and b["labels"].shape == (4, 16)
    assert ((b["labels"] != -100) == b["bool_masked_pos"]).all()
    # Two hosts' batches interleave into the one host's stream (examples by global index).
    one = iter(mim_dataset(train_set, tok, masking, batch_size=4, seed=3))
    h0 = iter(mim_dataset(train_set, tok, masking, batch_size=2, seed=3, shard_count=2))
    h1 = iter(
        mim_dataset(train_set, tok, masking, batch_size=2, seed=3, shard_index=1, shard_count=2)
    )
    for _ in range(2):
        full, a, b2 = next(one), next(h0), next(h1)
        np.testing.assert_array_equal(full["pixel_values"][:2], a["pixel_values"])
        np.testing.assert_array_equal(full["pixel_values"][2:], b2["pixel_values"])
    # A grain worker process gives the same batches, and resumes exactly.
    base = iter(make())
    expect = [next(base) for _ in range(4)]
    got = assert_resumes_exactly(lambda: make(num_workers=1), skip=2, n=2)
    for w, g in zip(expect[2:], got):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
    # Eval: one padded pass, deterministic.
    ev = list(classification_dataset(eval_set, batch_size=4, seed=0, train=False))
    labels = np.concatenate([e["labels"] for e in ev])
    assert (labels >= 0).sum() == len(eval_set) and len(labels) % 4 == 0


def test_gcs_folder_equals_local(folder, bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = bucket + "/imagenet/train"
    paths.upload_tree(folder, url)
    local_files, local_labels, classes = imf.scan_folder(folder)
    files, labels, gcs_classes = imf.scan_folder(url)
    assert gcs_classes == classes and files[0].startswith("gs://")
    np.testing.assert_array_equal(labels, local_labels)
    c_local, c_gcs = _config("pretrain_mim.py", folder), _config("pretrain_mim.py", url)
    (lt, le), (gt, ge) = imf.image_splits(c_local, 32, 16), imf.image_splits(c_gcs, 32, 16)
    assert len(lt) == len(gt) and len(le) == len(ge)  # the held-out split is path-relative
    for i in (0, 5, len(gt) - 1):
        a, b = lt.example(i, np.random.default_rng(i)), gt.example(i, np.random.default_rng(i))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # prepare reads the bucket's folder and writes the shards into the bucket; training reads
    # them through a mount (here: a local copy of the prefix).
    out = bucket + "/imagenet-ar"
    image_prepare.prepare(_config("pretrain_mim.py", url), out, BEAM_LOCAL, shard_records=8)
    with pytest.raises(DataError, match="mount the bucket"):
        imf.ImageRecords(out, "train")
    mount = tmp_path / "mnt"
    for f in paths.glob(out + "/**"):
        rel = f[len(out) + 1 :]
        os.makedirs(os.path.dirname(mount / rel), exist_ok=True)
        (mount / rel).write_bytes(paths.read_bytes(f))
    records = imf.ImageRecords(str(mount), "train")
    assert len(records) == len(lt)
    assert all(records[i][:2] == lt.source[i][:2] for i in range(len(records)))
    assert not os.path.exists(tmp_path / "gs:")


def _losses(workdir) -> list[float]:
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    by_step = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


def _prepared(folder, out) -> dict:
    """Through the command line, which packs images for an image task's config."""
    argv = ["prepare", "--config", os.path.join(ROOT, "configs/beit/pretrain_mim.py") + ":tiny"]
    argv += ["--out", out, "--shard-records", "4", f"--config.data.image_folder={folder}"]
    assert cli.main([*argv, "--config.data.eval_percent=20.0", *BEAM_LOCAL]) == 0
    return imf.read_manifest(out)


def _prepared_config(folder, out, steps):
    p = _config("pretrain_mim.py", folder, vocab_size=16, tokenizer_fit_images=12)
    p.data.image_folder, p.data.prepared_dir = "", out
    p.train.steps = steps
    return p


def test_prepare_then_mim_trains(folder, tmp_path):
    out = str(tmp_path / "prepared")
    summary = image_prepare.summary(_prepared(folder, out))
    assert summary["classes"] == 3 and summary["train_images"] + summary["eval_images"] == 30
    assert summary["train_shards"] >= 6  # >= 2 pieces of <= 4 images per class
    # The shards hold the folder's images, in the folder's order, with its labels.
    train_folder, eval_folder = imf.folder_splits(_config("pretrain_mim.py", folder))
    records = imf.ImageRecords(out, "train")
    assert len(records) == len(train_folder) and len(imf.ImageRecords(out, "eval")) == len(
        eval_folder
    )
    for i in range(len(records)):
        assert records[i][:2] == train_folder[i][:2]
    # So a run reads the same batches from the shards as from the folder, and resumes exactly.
    c = _prepared_config(folder, out, 2)
    from_records, _ = imf.image_splits(c, 32, 16)
    from_folder, _ = imf.image_splits(_config("pretrain_mim.py", folder), 32, 16)
    tok = KMeansPatchTokenizer.fit(from_records.render_many(8, 0), patch_size=8, vocab_size=16)
    masking = MaskingGenerator(4, 6, 2)
    want = assert_resumes_exactly(
        lambda: mim_dataset(from_records, tok, masking, batch_size=4, seed=1), skip=5, n=2
    )
    it = iter(mim_dataset(from_folder, tok, masking, batch_size=4, seed=1))
    for w in [next(it) for _ in range(7)][5:]:
        np.testing.assert_array_equal(w["pixel_values"], want.pop(0)["pixel_values"])
    # BEiT MIM trains on them.
    out_run = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert out_run["start_step"] == 0 and np.isfinite(out_run["final_eval"]["loss"])

    with pytest.raises(config_lib.ConfigError, match="does not read images"):
        bad = config_lib.load_config(os.path.join(ROOT, "configs/xlm_roberta/pretrain_mlm.py"))
        image_prepare.prepare(bad, str(tmp_path / "x"), BEAM_LOCAL)
    with pytest.raises(DataError, match="no manifest"):
        imf.ImageRecords(str(tmp_path), "train")


@pytest.mark.slow
def test_prepared_mim_resumes_exactly(folder, tmp_path):
    """4 steps straight == 2 steps, a restart from the checkpoint, 2 more (per-step losses)."""
    out = str(tmp_path / "prepared")
    _prepared(folder, out)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(_prepared_config(folder, out, 4), straight)
    train.train_and_evaluate(_prepared_config(folder, out, 2), resumed)
    assert train.train_and_evaluate(_prepared_config(folder, out, 4), resumed)["start_step"] == 2
    a, b = _losses(straight), _losses(resumed)
    assert len(a) == 4 and a == b


def test_prepare_names_an_undecodable_image(tmp_path):
    bad = make_folder(tmp_path / "bad", per_class=2)
    (tmp_path / "bad" / "eel" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    c = _config("pretrain_mim.py", bad, eval_percent=50.0)
    with pytest.raises(DataError, match=r"truncated\.png: cannot decode the image") as err:
        image_prepare.prepare(c, str(tmp_path / "out"), BEAM_LOCAL)
    assert "\n" not in str(err.value)


def test_folder_classification_checks_classes(folder, tmp_path):
    c = _config("finetune_classification.py", folder)
    with pytest.raises(config_lib.ConfigError, match="num_labels' is 10; the training images"):
        train.train_and_evaluate(c, str(tmp_path / "wrong"))


@pytest.mark.slow
def test_folder_classification_trains(folder, tmp_path):
    c = _config("finetune_classification.py", folder)
    c.train.steps = 2
    c.model.num_labels = 3
    out = train.train_and_evaluate(c, str(tmp_path / "cls"))
    assert np.isfinite(out["final_eval"]["loss"]) and jax.process_count() == 1
