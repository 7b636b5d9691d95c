"""`xformers-jax bench --suite data`: the input pipeline's memory and throughput.

For synthetic multilingual `.jsonl.gz` corpora of two sizes (10 and 100 MB of text by default):

* prepare MB/s: `xformers-jax prepare` (Beam DirectRunner, every core) of the corpus;
* peak RSS (the whole process tree, grain workers included) of `xformers-jax train` on the
  tiny MLM preset for 4 steps, from the prepared shards and streaming the raw files: memory must
  stay flat (within ~150 MB) as the corpus grows 10x;
* MLM tokens/s delivered to the trainer (the data iterator alone, seq 512, batch 64) from the
  shards and streaming, next to what a v5p host consumes training the base and XL presets
  (analytic FLOPs per token, `flops.text_flops`, at 4 chips x 459 TFLOP/s x 50% MFU).

Writes `data.json` and `data.md` into the output directory.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "xlm_roberta", "pretrain_mlm.py") + ":tiny"
SIZES_MB = (10, 100)
FILE_MB = 10
SEQ_LEN, BATCH = 512, 64
TRAIN_STEPS = 4
V5P_HOST_FLOPS = 4 * 459e12 * 0.5
PRESETS = {
    "base": dict(hidden=768, ffn=3072, layers=12, vocab=250002),
    "xl": dict(hidden=2560, ffn=10240, layers=36, vocab=250880),
}


def synthetic_corpus(directory: str, megabytes: int, seed: int = 0) -> tuple[list[str], int]:
    """`.jsonl.gz` files of ~`FILE_MB` MB of text each: documents of 3-12 random utterances of
    one of the 28 bundled languages. Returns (files, bytes of text)."""
    from xformers_jax.data import chatterbot_languages, chatterbot_texts

    rng = np.random.default_rng(seed)
    langs = chatterbot_languages()
    pools = {lang: chatterbot_texts([lang]) for lang in langs}
    os.makedirs(directory, exist_ok=True)
    files, total, i = [], 0, 0
    while total < megabytes << 20:
        path = os.path.join(directory, f"part-{i:04d}.jsonl.gz")
        size = 0
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
            while size < FILE_MB << 20 and total + size < megabytes << 20:
                pool = pools[langs[int(rng.integers(len(langs)))]]
                picks = rng.integers(len(pool), size=int(rng.integers(3, 13)))
                text = " ".join(pool[j] for j in picks)
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                size += len(text.encode())
        files.append(path)
        total, i = total + size, i + 1
    return files, total


def _peak_rss(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """(peak RSS MB of the process tree, seconds, exit code) of a command."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, parent = 0, psutil.Process(proc.pid)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    reader.join(5)
    if proc.returncode:
        tail = b"".join(err).decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{tail}")
    return peak / 2**20, time.perf_counter() - start, proc.returncode


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "xformers_jax.cli", *args]


def _common_overrides(tokenizer: str) -> list[str]:
    return [
        f"--config.data.tokenizer={tokenizer}",
        "--config.data.vocab_size=8000",
        "--config.model.vocab_size=8000",
        f"--config.data.seq_len={SEQ_LEN}",
        f"--config.model.max_position_embeddings={SEQ_LEN + 2}",
    ]


def _train_overrides(tokenizer: str) -> list[str]:
    # The tiny preset: the memory that grows with the corpus is the input pipeline's.
    return [
        *_common_overrides(tokenizer),
        "--config.train.batch_size=8",
        f"--config.train.steps={TRAIN_STEPS}",
        "--config.train.eval_every_steps=1000",
        "--config.train.eval_steps=2",
        f"--config.checkpoint.every_steps={TRAIN_STEPS}",
        "--config.log.every_steps=5",
        "--config.log.progress=false",
        "--config.log.tensorboard=false",
    ]


def _delivered(config_overrides: list[str], workdir: str, batches: int = 150) -> float:
    """MLM tokens/s the training iterator delivers (seq 512, batch 64), after 3 warm-up batches."""
    from xformers_jax import config_lib, tasks

    over = [o.removeprefix("--config.") for o in config_overrides]
    over += ["train.batch_size=64"]
    spec = tasks.build_task(config_lib.load_config(CONFIG, over), workdir)
    it = iter(spec.train_data(0, 1))
    for _ in range(3):
        next(it)
    t0, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += int(np.sum(next(it)["attention_mask"]))
    return tokens / (time.perf_counter() - t0)


def consumption() -> dict[str, float]:
    """Tokens/s a v5p host (4 chips) consumes training each preset at 50% MFU."""
    from xformers_jax.flops import text_flops

    out = {}
    for name, dims in PRESETS.items():
        per_token = text_flops({**dims, "seq": SEQ_LEN, "batch": 1}) / SEQ_LEN
        out[name] = V5P_HOST_FLOPS / per_token
    return out


def run(out_dir: str, sizes=SIZES_MB) -> dict:
    """Every measurement for each corpus size; returns the results (also written to out_dir)."""
    from xformers_jax.data import chatterbot_texts
    from xformers_jax.data.tokenizer import SentencePieceTokenizer

    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, "data_work")
    tok = SentencePieceTokenizer.train(
        chatterbot_texts()[::3], os.path.join(work, "spm"), vocab_size=8000, seed=0
    )
    evaluation = os.path.join(work, "eval.txt")
    with open(evaluation, "w", encoding="utf-8") as f:
        f.write("\n".join(chatterbot_texts()[1::40]) + "\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results: dict = {"consumption_tokens_per_s": consumption(), "sizes": {}}
    for mb in sizes:
        corpus = os.path.join(work, f"corpus{mb}")
        files, nbytes = synthetic_corpus(corpus, mb)
        files_arg = f"--config.data.train_files={json.dumps([corpus + '/*.jsonl.gz'])}"
        prepared = os.path.join(work, f"prepared{mb}")
        rss, secs, _ = _peak_rss(
            _cli("prepare", "--config", CONFIG, "--out", prepared, files_arg,
                 *_common_overrides(tok.path), "--direct_num_workers=0"), env,
        )  # fmt: skip
        row = {"text_mb": nbytes / 2**20, "files": len(files), "prepare_s": secs,
               "prepare_mb_per_s": nbytes / 2**20 / secs, "prepare_rss_mb": rss}  # fmt: skip
        train_over = _train_overrides(tok.path)
        row["train_prepared_rss_mb"], row["train_prepared_s"], _ = _peak_rss(
            _cli("train", "--config", CONFIG, "--workdir", os.path.join(work, f"run_p{mb}"),
                 f"--config.data.prepared_dir={prepared}", *train_over), env,
        )  # fmt: skip
        stream_over = [
            files_arg, f"--config.data.eval_files={json.dumps([evaluation])}",
            "--config.data.streaming=true", "--config.data.num_workers=1",
        ]  # fmt: skip
        row["train_streaming_rss_mb"], row["train_streaming_s"], _ = _peak_rss(
            _cli("train", "--config", CONFIG, "--workdir", os.path.join(work, f"run_s{mb}"),
                 *stream_over, *train_over), env,
        )  # fmt: skip
        common = _common_overrides(tok.path)
        row["prepared_tokens_per_s"] = _delivered(
            [*common, f"--config.data.prepared_dir={prepared}"], os.path.join(work, "d")
        )
        row["streaming_tokens_per_s"] = _delivered(
            [*common, *stream_over[:3], "--config.data.num_workers=2"], os.path.join(work, "d")
        )
        results["sizes"][str(mb)] = row
        _write(out_dir, results)
    return results


def _write(out_dir: str, results: dict) -> None:
    with open(os.path.join(out_dir, "data.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "data.md"), "w") as f:
        f.write(table(results))


def table(results: dict) -> str:
    cols = [
        ("text MB", "text_mb", "{:.0f}"),
        ("prepare MB/s", "prepare_mb_per_s", "{:.2f}"),
        ("train RSS, prepared (MB)", "train_prepared_rss_mb", "{:.0f}"),
        ("train RSS, streaming (MB)", "train_streaming_rss_mb", "{:.0f}"),
        ("MLM tok/s, prepared", "prepared_tokens_per_s", "{:,.0f}"),
        ("MLM tok/s, streaming", "streaming_tokens_per_s", "{:,.0f}"),
    ]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in results["sizes"].values():
        lines.append("| " + " | ".join(fmt.format(row[k]) for _, k, fmt in cols) + " |")
    lines.append("")
    for name, v in results["consumption_tokens_per_s"].items():
        lines.append(f"- a v5p host (4 chips, 50% MFU) training `{name}` at seq 512 consumes "
                     f"{v:,.0f} tokens/s")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(out_dir: str | None = None, sizes=SIZES_MB) -> dict:
    return run(out_dir or "bench_results", sizes)
