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


TINY_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "tiny_mlm.py")


def tiny_mlm_config(corpus: str, **overrides):
    """`tests/configs/tiny_mlm.py` on `corpus`; `section__key=value` kwargs override fields."""
    from xformers_jax import config_lib

    c = config_lib.load_config(TINY_CONFIG)
    with c.unlocked():
        c.data.train_files = [corpus]
        c.data.eval_files = [corpus]
        for k, v in overrides.items():
            section, key = k.split("__")
            c[section][key] = v
    return c
