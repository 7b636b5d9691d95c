"""Exact resume for one pretraining objective of every family: 4 steps straight == 2 steps, a
restart from the checkpoint, 2 more steps (bit-identical per-step losses and final params)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from tests.helpers import TINY_CONFIG, tiny_corpus
from xformers_jax import checkpoint as ckpt_lib
from xformers_jax import config_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(path: str, corpus: str, **fields):
    c = config_lib.load_config(os.path.join(ROOT, path))
    with c.unlocked():
        for key, value in fields.items():
            section, name = key.split("__")
            c[section][name] = value
        if c.task != "mim":
            c.data.train_files = c.data.eval_files = [corpus]
        c.train.eval_every_steps, c.train.eval_steps = 1000, 1
        c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
        c.log.every_steps, c.log.progress, c.log.tensorboard = 1, False, False
        c.mesh.data = -1
    return c


def _text(**model):
    return {f"model__{k}": v for k, v in model.items()} | {
        "data__vocab_size": 2000, "model__vocab_size": 2000, "data__seq_len": 32,
        "train__batch_size": 8,
    }  # fmt: skip


FAMILIES = {
    "xlm_roberta": lambda corpus: _load(TINY_CONFIG, corpus),
    "xlnet": lambda corpus: _load(
        "configs/xlnet/pretrain_plm.py",
        corpus,
        data__num_predict=6,
        data__perm_size=16,
        data__reuse_len=16,
        **_text(d_model=32, n_layer=2, n_head=4, d_inner=64, mem_len=16),
    ),  # fmt: skip
    "yoso": lambda corpus: _load(
        "configs/yoso/pretrain_mlm.py",
        corpus,
        model__max_position_embeddings=40,
        **_text(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hash_code_len=4,
            num_hash=8,
        ),
    ),  # fmt: skip
    "mt5": lambda corpus: _load(
        "configs/mt5/pretrain_span.py",
        corpus,
        **{**_text(d_model=32, d_ff=64, d_kv=8, num_heads=4), "data__vocab_size": 1900},
    ),  # fmt: skip
    "beit": lambda corpus: _load(
        "configs/beit/pretrain_mim.py", corpus, train__batch_size=8, data__vocab_size=16
    ),
}


def _losses(workdir) -> list[float]:
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    by_step = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


def _params(cfg, workdir, step):
    s = train.setup(cfg, str(workdir))
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=0,
                                 max_to_keep=5)  # fmt: skip
    state, _ = ckpt.restore(step, ckpt_lib.abstract_with_shardings(s.abstract_state,
                                                                   s.state_shardings))  # fmt: skip
    ckpt.close()
    return jax.device_get(state)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_resume(family, tmp_path):
    corpus = tiny_corpus(str(tmp_path))
    make = FAMILIES[family]

    def cfg(steps):
        c = make(corpus)
        c.train.steps = steps
        return c

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train_and_evaluate(cfg(4), str(straight))
    train.train_and_evaluate(cfg(2), str(resumed))
    assert train.train_and_evaluate(cfg(4), str(resumed))["start_step"] == 2
    a, b = _losses(straight), _losses(resumed)
    assert len(a) == 4 and a == b
    jax.tree.map(np.testing.assert_array_equal, _params(cfg(4), straight, 4),
                 _params(cfg(4), resumed, 4))  # fmt: skip
