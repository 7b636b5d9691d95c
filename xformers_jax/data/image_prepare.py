"""`xformers-jax prepare` for an image config (BEiT MIM, image classification): an Apache Beam
pipeline that packs an ImageNet-layout folder into ArrayRecord shards of encoded images.

    xformers-jax prepare --config configs/beit/pretrain_mim.py:base --out gs://b/imagenet-ar \\
        --config.data.image_folder=gs://b/imagenet/train \\
        --config.data.eval_image_folder=gs://b/imagenet/val \\
        [--runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp ...]

Pipeline (one element per class folder, so no worker ever holds the file list):

    Create(classes) -> Reshuffle -> ListClass: the class folder's images, each put in the train
    or eval split (the eval folder's, or those `image_folder.is_held_out`) -> Reshuffle ->
    ReadImage: the bytes, decoded once to refuse a broken image here rather than mid-training
    -> GroupByKey((split, class, piece)) -> WriteShard: one ArrayRecord file of at most
    `shard_records` images, in file-name order -> ToList -> the manifest, written last.

Records are the original encoded bytes (JPEG stays JPEG) behind a small header with the label
(`image_folder.encode_record`); decoding and augmentation happen at training time in grain
workers. The shards of a split, in the manifest's (name) order, list the images in the order
`image_folder.scan_folder` gives them, so training from the shards sees the same examples as
training from the folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from xformers_jax import config_lib, paths
from xformers_jax.data import image_folder as imf
from xformers_jax.data.corpus import DataError

IMAGE_TASKS = ("mim", "image_classification")
# ~100 MB of ImageNet JPEGs per shard.
SHARD_RECORDS = 1024


def is_image_config(config) -> bool:
    """Whether `prepare` for this config packs images (its task reads images)."""
    return config.task in IMAGE_TASKS


def list_class(element: tuple, percent: float) -> Iterator[tuple]:
    """`(rule, root, label, class name)` -> `(split, label, position, file)` for each image of
    the class folder; `rule` is 'train' / 'eval' (the whole folder) or 'holdout' (split by
    `is_held_out`). Positions count within (split, class) in file-name order."""
    rule, root, label, name = element
    counts = {"train": 0, "eval": 0}
    base = paths.resolve(root)
    for f in imf.class_images(base, name):
        split = rule
        if rule == "holdout":
            split = "eval" if imf.is_held_out(f[len(base) + 1 :], percent) else "train"
        yield split, label, counts[split], f
        counts[split] += 1


def read_image(element: tuple, shard_records: int) -> tuple:
    """`(split, label, position, file)` -> `((split, label, piece), (position, record))`; the
    image is decoded once here so that a broken file stops `prepare`, named."""
    split, label, position, f = element
    label_, data, where = imf.ImageFolder([f], [label], [""])[0]
    imf.decode_image(data, where)
    return (split, label, position // shard_records), (position, imf.encode_record(label_, data))


def write_shard(out_dir: str, keyed) -> dict[str, Any]:
    """One `((split, label, piece), [(position, record)])` group -> an ArrayRecord file (records
    in position order); returns its manifest entry."""
    from array_record.python.array_record_module import ArrayRecordWriter

    (split, label, piece), values = keyed
    values = sorted(values, key=lambda v: v[0])
    name = f"{split}/{label:05d}-{piece:05d}.array_record"
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "shard.array_record")
        writer = ArrayRecordWriter(local, "group_size:1")
        for _, record in values:
            writer.write(record)
        writer.close()
        target = paths.join(out_dir, name)
        if paths.is_remote(target):
            with open(local, "rb") as src, paths.open_file(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(local, target)
    size = sum(len(r) for _, r in values)
    return {"split": split, "file": name, "records": len(values), "bytes": size}


def make_manifest(shards: Sequence[dict], base: dict[str, Any]) -> dict[str, Any]:
    """`base` + per split: the shard files in name order, the image count and bytes."""
    splits: dict[str, Any] = {}
    for s in sorted(shards, key=lambda s: s["file"]):
        entry = splits.setdefault(s["split"], {"count": 0, "bytes": 0, "shards": []})
        entry["count"] += s["records"]
        entry["bytes"] += s["bytes"]
        entry["shards"].append(s["file"])
    return {**base, "splits": splits}


def _write_manifest(out_dir: str, shards: list[dict], base: dict[str, Any]) -> dict[str, Any]:
    manifest = make_manifest(shards, base)
    for split in ("train", "eval"):
        if split not in manifest["splits"]:
            raise DataError(
                f"{base['image_folder']}: no {split} images (set data.eval_image_folder or change "
                "data.eval_percent)"
            )
    paths.write_text(paths.join(out_dir, imf.MANIFEST), json.dumps(manifest, indent=1) + "\n")
    return manifest


def default_beam_args() -> list[str]:
    """The local runner on every core."""
    return [
        "--runner=DirectRunner",
        "--direct_num_workers=0",
        "--direct_running_mode=multi_processing",
    ]


_WRAPPED = re.compile(r"DataError: (.+)")


def prepare(
    config, out_dir: str, beam_args: Sequence[str] = (), shard_records: int | None = None
) -> dict[str, Any]:
    """Packs `data.image_folder` (and `data.eval_image_folder`) into `out_dir`; returns the
    manifest. `out_dir` is what `--config.data.prepared_dir` then names.

    Args:
      config: an image config (`is_image_config`) naming `data.image_folder`.
      out_dir: local or gs:// directory (`train/`, `eval/` shards and `manifest.json`).
      beam_args: Beam pipeline options (default: the DirectRunner on every core).
      shard_records: images per shard at most (default `SHARD_RECORDS`).

    Raises:
      ConfigError: not an image config, or no image folder.
      DataError: a folder without images, or an unreadable / undecodable image (named).
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    config_lib.validate(config)
    if not is_image_config(config):
        raise config_lib.ConfigError(
            f"task {config.task!r} does not read images (image tasks: {', '.join(IMAGE_TASKS)})"
        )
    d = config.data
    if not d.get("image_folder"):
        raise config_lib.ConfigError("config key 'data.image_folder' must name the image folder")
    shard_records = int(shard_records or SHARD_RECORDS)
    if shard_records < 1:
        raise config_lib.ConfigError(f"shard_records must be >= 1, got {shard_records}")
    out_dir = paths.resolve(out_dir)
    classes = imf.list_classes(d.image_folder)
    rule = "train" if d.eval_image_folder else "holdout"
    elements = [(rule, d.image_folder, i, c) for i, c in enumerate(classes)]
    if d.eval_image_folder:
        index = {c: i for i, c in enumerate(classes)}
        for c in imf.list_classes(d.eval_image_folder):
            if c not in index:
                raise DataError(
                    f"{d.eval_image_folder}: class folder {c!r} is not among the training classes"
                )
            elements.append(("eval", d.eval_image_folder, index[c], c))
    base = {
        "format": imf.RECORD_FORMAT,
        "version": imf.RECORD_VERSION,
        "classes": classes,
        "image_folder": paths.resolve(d.image_folder),
        "eval_from": (
            paths.resolve(d.eval_image_folder)
            if d.eval_image_folder
            else f"holdout {d.eval_percent}%"
        ),
        "shard_records": shard_records,
    }
    percent = float(d.eval_percent)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    opts = PipelineOptions(list(beam_args) or default_beam_args(), pipeline_type_check=False)
    try:
        with beam.Pipeline(options=opts) as p:
            _ = (
                p
                | "Classes" >> beam.Create(elements)
                | "SpreadClasses" >> beam.Reshuffle()
                | "List" >> beam.FlatMap(list_class, percent)
                | "SpreadFiles" >> beam.Reshuffle()
                | "Read" >> beam.Map(read_image, shard_records)
                | "Group" >> beam.GroupByKey()
                | "Write" >> beam.Map(lambda kv: write_shard(out_dir, kv))
                | "Collect" >> beam.combiners.ToList()
                | "Manifest" >> beam.Map(lambda shards: _write_manifest(out_dir, shards, base))
            )
    except DataError:
        raise
    except Exception as e:  # runners wrap worker errors; surface ours on one line
        found = _WRAPPED.search(str(e))
        if found:
            raise DataError(found.group(1).strip()) from None
        raise
    return imf.read_manifest(out_dir)


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What `xformers-jax prepare` prints: classes and per split images, shards and MB."""
    out: dict[str, Any] = {"classes": len(manifest["classes"])}
    for split, entry in manifest["splits"].items():
        out[f"{split}_images"] = entry["count"]
        out[f"{split}_shards"] = len(entry["shards"])
        out[f"{split}_mb"] = round(entry["bytes"] / 1e6, 2)
    return out
