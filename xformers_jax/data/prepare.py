"""`xformers-jax prepare`: an Apache Beam pipeline that tokenises a config's corpus into
ArrayRecord shards of token ids plus a manifest, for `data.prepared_dir`.

    xformers-jax prepare --config configs/xlm_roberta/pretrain.py:base --out gs://b/cc100 \\
        --config.data.train_files='["gs://b/raw/**/*.txt.zst"]' \\
        [--runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp ...]

Pipeline (one element per input file; a file is read lazily by one worker):

    Create(files) -> Reshuffle -> ChunkFile: stream the file's documents, tokenise them in
    batches, split train / held-out eval by a content hash, cut each split's stream into
    fixed-length chunks -> GroupByKey((split, source, shard)) -> WriteShard: one ArrayRecord file
    per key -> ToList -> the manifest (written last: its presence marks a finished directory).

Packing happens here, objective by objective: each record is one chunk of the document stream
(`int32` ids), `seq_len - 1` ids joined by `</s>` for MLM (the trainer adds `<s>`), `seq_len - 3`
ids joined by `<eod>` for XLNet (the trainer adds `<sep> <sep> <cls>`), T5's raw `tokens_length`
for span corruption. Masking, permutations and noise are drawn at training time, from the seed
and the chunk's global position. Beam's options pass through (the local default is the
DirectRunner on every core; `--runner=DataflowRunner ...` runs the same pipeline on a cluster).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from xformers_jax import config_lib, paths
from xformers_jax.data.corpus import DataError
from xformers_jax.data.sources import is_holdout

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OBJECTIVES = ("mlm", "plm", "span_corruption")
# Documents tokenised per spm call.
_ENCODE_BATCH = 512
# Chunks per shard file (~32M ids at 512 per chunk: a few hundred MB).
SHARD_RECORDS = 65536


# ------------------------------------------------------------------------------ tokenizers


def tokenizer_spec(tokenizer) -> dict[str, Any]:
    """How to load `tokenizer` again (kind, file name under `tokenizer/`, flags)."""
    from xformers_jax.data.t5_tokenizer import T5Tokenizer
    from xformers_jax.data.tokenizer import SentencePieceTokenizer
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    if isinstance(tokenizer, T5Tokenizer):
        return {"kind": "t5", "file": "t5_tokenizer"}
    if isinstance(tokenizer, XLNetTokenizer):
        flags = {
            k: getattr(tokenizer, k) for k in ("do_lower_case", "remove_space", "keep_accents")
        }
        return {"kind": "xlnet", "file": "spiece.model", "flags": flags}
    if isinstance(tokenizer, SentencePieceTokenizer):
        return {
            "kind": "sentencepiece",
            "file": "tokenizer.model",
            "convention": tokenizer.convention,
        }
    raise TypeError(f"prepare: cannot save a tokenizer of type {type(tokenizer).__name__}")


def save_tokenizer(tokenizer, out_dir: str) -> dict[str, Any]:
    """Copies the tokenizer into `out_dir/tokenizer/`; returns its `tokenizer_spec`."""
    spec = tokenizer_spec(tokenizer)
    target = paths.join(out_dir, "tokenizer", spec["file"])
    if spec["kind"] == "t5":
        with paths.local_dir_for_writing(target) as local:
            tokenizer.save_pretrained(local)
    else:
        paths.copy(tokenizer.path, target)
    return spec


def load_tokenizer(directory: str, spec: dict[str, Any]):
    """The tokenizer saved by `save_tokenizer` in `directory` (local or gs://)."""
    from xformers_jax.data.t5_tokenizer import T5Tokenizer
    from xformers_jax.data.tokenizer import SentencePieceTokenizer
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    source = paths.join(directory, "tokenizer", spec["file"])
    if spec["kind"] == "t5":
        local = tempfile.mkdtemp(prefix="t5_tokenizer")
        for name in paths.listdir(source):
            paths.copy(paths.join(source, name), os.path.join(local, name))
        return T5Tokenizer.load(local)
    # The loaders keep the path and read it once; a gs:// file is copied to a lasting local file.
    if paths.is_remote(source):
        local = os.path.join(tempfile.mkdtemp(prefix="tokenizer"), spec["file"])
        paths.copy(source, local)
        source = local
    if spec["kind"] == "xlnet":
        return XLNetTokenizer.load(source, **spec.get("flags", {}))
    return SentencePieceTokenizer.load(source, convention=spec.get("convention", "native"))


# ------------------------------------------------------------------------------ layout


def layout(config, tokenizer) -> dict[str, Any]:
    """The objective's chunking: `{"objective", "chunk_len", "separator" (-1: none)}`."""
    task, seq_len = config.task, int(config.data.seq_len)
    if task == "mlm":
        return {"objective": task, "chunk_len": seq_len - 1, "separator": int(tokenizer.eos_id)}
    if task == "plm":
        sep = int(tokenizer.eod_token_id)
        return {"objective": task, "chunk_len": seq_len - 3, "separator": sep}
    if task == "span_corruption":
        from xformers_jax.data.span_corruption_examples import random_spans_helper

        d = config.data
        tokens_length, _ = random_spans_helper(seq_len, d.noise_density, d.mean_noise_span_length)
        return {"objective": task, "chunk_len": int(tokens_length), "separator": -1}
    raise config_lib.ConfigError(
        f"config key 'task' is {task!r}: prepare writes shards for {', '.join(OBJECTIVES)}"
    )


def input_sources(config, staging: str) -> tuple[dict[str, list[str]], list[str] | None]:
    """`({source name: files}, eval files or None = held-out slice)` of the config.

    Sources: `data.mixture` (`{name: {"files": [...]}}`), else `data.train_files` as `"train"`,
    else the bundled corpus (written into `staging`) with its own eval split.
    """
    from xformers_jax.data.corpus import default_corpus
    from xformers_jax.data.sources import expand_files

    d = config.data
    eval_files = list(d.eval_files) if d.get("eval_files") else None
    mixture = d.get("mixture")
    if mixture:
        sources = {str(name): _mixture_files(name, spec) for name, spec in dict(mixture).items()}
    elif d.get("train_files"):
        sources = {"train": list(d.train_files)}
    else:
        train, evaluation = default_corpus(os.path.join(staging, "corpus"))
        sources, eval_files = {"train": [train]}, eval_files or [evaluation]
    expanded = {name: expand_files(files) for name, files in sources.items()}
    return expanded, (expand_files(eval_files) if eval_files else None)


def _mixture_files(name: str, spec: Any) -> list[str]:
    files = spec.get("files") if hasattr(spec, "get") else spec
    if isinstance(files, str):
        files = [files]
    if not files or not all(isinstance(f, str) for f in files):
        raise config_lib.ConfigError(
            f"config key 'data.mixture.{name}' needs 'files': a list of paths or globs"
        )
    return list(files)


# ------------------------------------------------------------------------------ beam stages


class ChunkFile:
    """`(split_rule, source, file_index, path)` -> `((split, source, shard), (order, ids bytes,
    tokens))` for each chunk of the file's document stream (a Beam DoFn body)."""

    def __init__(self, out_dir, tok_spec, lay, text_field, shard_records, pad_tail):
        self.out_dir, self.tok_spec, self.lay = out_dir, tok_spec, lay
        self.text_field, self.shard_records, self.pad_tail = text_field, shard_records, pad_tail
        self.tokenizer = None

    def setup(self):
        self.tokenizer = load_tokenizer(self.out_dir, self.tok_spec)

    def process(self, element) -> Iterator[tuple]:
        from xformers_jax.data.sources import iter_texts

        rule, source, file_index, path = element
        if self.tokenizer is None:
            self.setup()
        n, sep = self.lay["chunk_len"], self.lay["separator"]
        streams: dict[str, list[np.ndarray]] = {"train": [], "eval": []}
        held: dict[str, int] = {"train": 0, "eval": 0}
        counters = {"train": 0, "eval": 0}

        def emit(split: str, final: bool):
            if not streams[split]:
                return
            flat = np.concatenate(streams[split])
            whole = flat.size // n
            for i in range(whole):
                yield self._record(
                    split, source, file_index, counters[split], flat[i * n : (i + 1) * n]
                )
                counters[split] += 1
            rest = flat[whole * n :]
            streams[split], held[split] = ([rest] if rest.size else []), rest.size
            if final and rest.size and self.pad_tail:
                yield self._record(split, source, file_index, counters[split], rest)

        batch: list[str] = []
        texts = iter_texts(path, self.text_field)
        while True:
            batch.clear()
            for text in texts:
                batch.append(text)
                if len(batch) == _ENCODE_BATCH:
                    break
            if not batch:
                break
            ids = _encode_many(self.tokenizer, batch)
            for text, doc in zip(batch, ids):
                split = "eval" if rule == "all_eval" else "train"
                if rule == "holdout" and is_holdout(text):
                    split = "eval"
                if sep >= 0:
                    doc = [*doc, sep]
                streams[split].append(np.asarray(doc, np.int32))
                held[split] += len(doc)
            for split in streams:
                if held[split] >= n:
                    yield from emit(split, final=False)
        for split in streams:
            yield from emit(split, final=True)

    def _record(self, split, source, file_index, index, ids):
        # One shard per `shard_records` consecutive chunks of a file: shards sorted by name list
        # the chunks in text order (XLNet's contiguous streams rely on it).
        shard = (file_index, index // self.shard_records)
        return (split, source, shard), (index, ids.astype(np.int32).tobytes(), int(ids.size))


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_many"):
        return tokenizer.encode_many(texts, add_special_tokens=False)
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def write_shard(out_dir: str, keyed) -> dict[str, Any]:
    """Writes one `(split, source, (file, piece))` group as an ArrayRecord file (records in text
    order); returns its manifest entry."""
    from array_record.python.array_record_module import ArrayRecordWriter

    (split, source, (file_index, piece)), values = keyed
    values = sorted(values, key=lambda v: v[0])
    name = f"{split}/{source}-{file_index:06d}-{piece:05d}.array_record"
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "shard.array_record")
        writer = ArrayRecordWriter(local, "group_size:1")
        for _, data, _ in values:
            writer.write(data)
        writer.close()
        target = paths.join(out_dir, name)
        if paths.is_remote(target):
            with open(local, "rb") as src, paths.open_file(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(local, target)
    tokens = sum(v[2] for v in values)
    return {
        "split": split,
        "source": source,
        "file": name,
        "records": len(values),
        "tokens": tokens,
    }


def make_manifest(shards: Sequence[dict], base: dict[str, Any]) -> dict[str, Any]:
    """The manifest: `base` (objective, layout, tokenizer, inputs) + shards and counts."""
    splits: dict[str, Any] = {}
    for s in sorted(shards, key=lambda s: s["file"]):
        split = splits.setdefault(s["split"], {"records": 0, "tokens": 0, "sources": {}})
        src = split["sources"].setdefault(s["source"], {"records": 0, "tokens": 0, "shards": []})
        for entry in (split, src):
            entry["records"] += s["records"]
            entry["tokens"] += s["tokens"]
        src["shards"].append({"file": s["file"], "records": s["records"]})
    return {**base, "splits": splits}


def _write_manifest(out_dir: str, shards: list[dict], base: dict[str, Any]) -> dict[str, Any]:
    manifest = make_manifest(shards, base)
    if "train" not in manifest["splits"]:
        raise DataError(
            f"{', '.join(base['inputs'])}: no training chunk of {base['chunk_len']} ids"
        )
    paths.write_text(paths.join(out_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    return manifest


# ------------------------------------------------------------------------------ entry point


def default_beam_args() -> list[str]:
    """The local runner on every core."""
    return [
        "--runner=DirectRunner",
        "--direct_num_workers=0",
        "--direct_running_mode=multi_processing",
    ]


def prepare(
    config, out_dir: str, beam_args: Sequence[str] = (), shard_records: int = SHARD_RECORDS
) -> dict:
    """Runs the pipeline for `config` into `out_dir`; returns the manifest.

    Args:
      config: a training config (task, data, model); its tokenizer is loaded, or trained on a
        shuffled sample of at most `input_sentence_size` sentences of the training files.
      out_dir: local or gs:// directory (shards, `tokenizer/`, `manifest.json`).
      beam_args: Beam pipeline options (`--runner=...` and the runner's own).
      shard_records: chunks per shard at most (a shard holds consecutive chunks of one file).
    """
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise config_lib.UserError(
            "prepare needs Apache Beam: pip install 'xformers_jax[prepare]' && "
            "pip install 'protobuf>=7,<8'"
        ) from None

    config_lib.validate(config)
    if config.task not in OBJECTIVES:
        raise config_lib.ConfigError(
            f"config key 'task' is {config.task!r}: prepare writes shards for "
            f"{', '.join(OBJECTIVES)}"
        )
    out_dir = paths.resolve(out_dir)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(tempfile.TemporaryDirectory(prefix="prepare"))
        sources, eval_files = input_sources(config, staging)
        tokenizer = _tokenizer(config, staging, sources)
        lay = layout(config, tokenizer)
        tok_spec = save_tokenizer(tokenizer, out_dir)
        rule = "holdout" if eval_files is None else "train"
        elements = [
            (rule, name, i, f)
            for i, (name, f) in enumerate((n, f) for n, fs in sources.items() for f in fs)
        ]
        elements += [
            ("all_eval", "eval", len(elements) + i, f) for i, f in enumerate(eval_files or [])
        ]
        base = {
            "format_version": FORMAT_VERSION,
            **lay,
            "dtype": "int32",
            "seq_len": int(config.data.seq_len),
            "tokenizer": tok_spec,
            "vocab_size": int(tokenizer.vocab_size),
            "text_field": config.data.get("text_field", "text"),
            "eval_from": "holdout" if eval_files is None else "eval_files",
            "inputs": [f for fs in sources.values() for f in fs],
            "source_files": sources,
            "eval_files": eval_files or [],
        }
        chunker = ChunkFile(
            out_dir, tok_spec, lay, base["text_field"], shard_records, lay["objective"] == "mlm"
        )
        args = list(beam_args) or default_beam_args()
        opts = PipelineOptions(args, pipeline_type_check=False)
        with beam.Pipeline(options=opts) as p:
            _ = (
                p
                | "Files" >> beam.Create(elements)
                | "Spread" >> beam.Reshuffle()
                | "Chunk" >> beam.ParDo(_ChunkDoFn(chunker))
                | "Group" >> beam.GroupByKey()
                | "Write" >> beam.Map(lambda kv: write_shard(out_dir, kv))
                | "Collect" >> beam.combiners.ToList()
                | "Manifest" >> beam.Map(lambda shards: _write_manifest(out_dir, shards, base))
            )
    return json.loads(paths.read_text(paths.join(out_dir, MANIFEST)))


def _tokenizer(config, staging: str, sources: dict[str, list[str]]):
    """The config's tokenizer; one is trained (on a sample: spm's `input_sentence_size`,
    shuffled, streamed from the files) where the config names none."""
    import copy

    from xformers_jax.data.tokenizers import seq2seq_tokenizer, text_tokenizer

    cfg = copy.deepcopy(config)
    with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
        cfg.data.train_files = [f for fs in sources.values() for f in fs]
    if config.task == "span_corruption":
        return seq2seq_tokenizer(cfg, staging)
    return text_tokenizer(
        cfg, staging, default_type="xlnet" if config.task == "plm" else "sentencepiece"
    )


def _ChunkDoFn(chunker: ChunkFile):
    import apache_beam as beam

    class ChunkDoFn(beam.DoFn):
        def setup(self):
            chunker.setup()

        def process(self, element):
            yield from chunker.process(element)

    return ChunkDoFn()


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What `xformers-jax prepare` prints: records and tokens per split and source."""
    return {
        split: {
            name: {"records": s["records"], "tokens": s["tokens"]}
            for name, s in v["sources"].items()
        }
        for split, v in manifest["splits"].items()
    }
