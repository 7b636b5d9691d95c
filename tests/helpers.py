"""Small shared builders for the trainer and task tests: a tiny MLM config on a tiny corpus, config
overrides, and the exact-resume check of a data iterator."""

from __future__ import annotations

import os

import numpy as np

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


def finetune_run(c, task: str, tokenizer: str, steps: int):
    """The run settings the fine-tuning tests share, set on config `c` (returned): vocabulary
    1000, sequences of 32 tokens (48 for QA), batch 16, `steps` steps with a checkpoint at the
    end, one 4-batch eval only when training ends, lr 3e-3 after 2 warmup steps."""
    c.model.vocab_size, c.data.vocab_size = 1000, 1000
    c.data.tokenizer = tokenizer
    c.data.seq_len = 32 if task != "qa" else 48
    c.train.batch_size, c.train.steps = 16, steps
    c.train.eval_every_steps, c.train.eval_steps = 1000, 4
    c.optim.lr, c.optim.warmup_steps = 3e-3, 2
    c.checkpoint.every_steps = steps
    c.log.progress = False
    return c


def assert_finetune_learns(c, workdir, metric: str, capsys) -> None:
    """Trains config `c` (with an `init_from`) in `workdir`: the eval loss falls, `metric` is
    reported in [0, 1], and the log names the initialisation."""
    from xformers_jax import train

    result = train.train_and_evaluate(c, str(workdir))
    first, final = result["first_eval"], result["final_eval"]
    assert final["loss"] < first["loss"], (first, final)
    assert metric in final and 0.0 <= final[metric] <= 1.0
    out = capsys.readouterr().out
    assert "Initialised params from" in out and metric in out


def assert_resumes_exactly(make_iterator, skip: int, n: int) -> list[dict]:
    """Takes `skip` batches from `iter(make_iterator())`, saves its state, takes `n` more; a fresh
    iterator restored from that state must give the same `n` batches (every key equal). Returns
    them."""
    it = iter(make_iterator())
    for _ in range(skip):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(n)]
    again = iter(make_iterator())
    again.set_state(state)
    for w in want:
        got = next(again)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    return want
