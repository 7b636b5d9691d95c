"""XLNet permutation LM: the collator's masks and a few trainer steps that lower the loss."""

import importlib.util
import os

import numpy as np
import pytest

from tests.helpers import tiny_corpus
from xformers_jax import train
from xformers_jax.data.plm_examples import local_perm_mask, plm_example, sample_spans


def test_sample_spans_counts_and_candidates():
    rng = np.random.default_rng(0)
    cand = np.ones(40, bool)
    cand[[10, 20]] = False
    chosen = sample_spans(40, 8, rng, candidates=cand)
    assert chosen.sum() <= 8 and chosen.sum() >= 1 and not chosen[[10, 20]].any()


def test_perm_mask_is_a_valid_factorisation_order():
    rng = np.random.default_rng(1)
    target = np.zeros(12, bool)
    target[[2, 3, 7, 9]] = True
    special = np.zeros(12, bool)
    perm = local_perm_mask(target, special, perm_size=6, rng=rng)
    assert (perm[:, ~target] == 0).all()  # non-targets are visible to everyone
    assert (np.diag(perm)[target] == 1).all()  # a target never sees itself
    t = np.flatnonzero(target)
    sub = perm[np.ix_(t, t)]
    # Among targets: exactly one of (i sees j, j sees i) for i != j — a strict order.
    assert ((sub + sub.T)[~np.eye(len(t), dtype=bool)] == 1).all()


def test_plm_example_layout_and_reuse():
    rng = np.random.default_rng(2)
    ex = plm_example(np.arange(10, 30), np.arange(40, 49), rng, sep_id=4, cls_id=3,
                     num_predict=6, perm_size=8, reuse_len=16)  # fmt: skip
    n = 32
    assert ex["input_ids"].shape == (n,) and ex["input_ids"][-1] == 3
    assert list(ex["token_type_ids"][-3:]) == [1, 1, 2]
    assert (ex["perm_mask"][16:, :16] == 0).all() and (ex["perm_mask"][:16, 16:] == 1).all()
    k = ex["labels"] != -100
    pos = ex["target_mapping"][k].argmax(-1)
    assert (ex["input_ids"][pos] == ex["labels"][k]).all()


def _config(corpus):
    spec = importlib.util.spec_from_file_location(
        "pretrain_plm",
        os.path.join(os.path.dirname(__file__), "..", "..", "configs", "xlnet", "pretrain_plm.py"),
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for preset in ("base", "large"):
        mod.get_config(preset)  # every preset builds
    c = mod.get_config("tiny")
    c.model.d_model, c.model.n_layer, c.model.n_head, c.model.d_inner = 32, 2, 4, 64
    c.model.vocab_size = c.data.vocab_size = 2000
    c.model.bi_data = True
    c.data.seq_len, c.data.num_predict, c.data.perm_size, c.data.reuse_len = 32, 6, 16, 16
    c.data.train_files = c.data.eval_files = [corpus]
    c.train.batch_size, c.train.steps = 8, 40
    c.train.eval_every_steps, c.train.eval_steps = 1000, 2
    c.optim.lr, c.optim.warmup_steps = 1e-2, 2
    c.checkpoint.every_steps = 40
    c.log.every_steps, c.log.progress = 10, False
    c.mesh.data = -1
    return c


@pytest.mark.parametrize("seed", [0])
def test_plm_training_lowers_loss(tmp_path, seed):
    corpus = tiny_corpus(str(tmp_path))
    result = train.train_and_evaluate(_config(corpus), str(tmp_path / "work"))
    assert result["final_eval"]["loss"] < result["first_eval"]["loss"] - 0.3
    assert os.path.exists(tmp_path / "work" / "spiece.model")


@pytest.mark.slow
def test_mems_carry_across_steps_and_resume(tmp_path):
    """Mems live in the train state: nonzero after training, sharded on batch, saved and restored
    (2 + 2 steps with a restart == 4 straight steps)."""
    import json

    import jax

    from xformers_jax import checkpoint as ckpt_lib

    corpus = tiny_corpus(str(tmp_path))

    def cfg(steps):
        c = _config(corpus)
        c.model.bi_data = False
        c.train.steps, c.checkpoint.every_steps, c.log.every_steps = steps, 2, 1
        return c

    def losses(w):
        rows = [json.loads(x) for x in open(w / "metrics.jsonl")]
        return [r["loss"] for r in rows if r["split"] == "train"]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train_and_evaluate(cfg(4), str(straight))
    train.train_and_evaluate(cfg(2), str(resumed))
    assert train.train_and_evaluate(cfg(4), str(resumed))["start_step"] == 2
    assert losses(straight) == losses(resumed)

    s = train.setup(cfg(4), str(straight))
    ckpt = ckpt_lib.Checkpointer(str(straight / "checkpoints"), every_steps=0, max_to_keep=5)
    state, _ = ckpt.restore(4, ckpt_lib.abstract_with_shardings(s.abstract_state,
                                                                 s.state_shardings))  # fmt: skip
    ckpt.close()
    mems = state.extra["mems"]
    assert mems.shape == (2, 8, cfg(4).model.mem_len, 32) and float(jax.numpy.abs(mems).max()) > 0
    assert mems.sharding.spec[1] == ("data", "fsdp")
