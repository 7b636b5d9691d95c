"""Small shared builders for the trainer tests: a tiny MLM config on a tiny corpus."""

from __future__ import annotations

import os

from xformers_jax.data import chatterbot_texts


def tiny_corpus(directory: str, n: int = 1500) -> str:
    """A text file with `n` multilingual dialog lines (every 5th utterance of the corpus)."""
    path = os.path.join(directory, "corpus.txt")
    if not os.path.exists(path):
        lines = chatterbot_texts()[::5][:n]
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return path


def tiny_mlm_config(corpus: str, **train):
    """The `tiny` XLM-R-XL MLM config shrunk to test size (seconds per run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pretrain_mlm", os.path.join(os.path.dirname(__file__), "..", "configs", "xlm_roberta",
                                     "pretrain_mlm.py")
    )  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.model.hidden_size = 32
    c.model.num_hidden_layers = 2
    c.model.num_attention_heads = 4
    c.model.intermediate_size = 64
    c.model.vocab_size = 2000
    c.model.max_position_embeddings = 40
    c.data.vocab_size = 2000
    c.data.seq_len = 32
    c.data.train_files = [corpus]
    c.data.eval_files = [corpus]
    c.train.batch_size = 8
    c.train.steps = 6
    c.train.eval_every_steps = 1000
    c.train.eval_steps = 2
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 3
    c.log.every_steps = 1
    c.log.progress = False
    c.log.tensorboard = True
    c.mesh.data = -1
    for k, v in train.items():
        section, key = k.split("__")
        c[section][key] = v
    return c
