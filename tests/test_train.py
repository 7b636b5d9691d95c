"""The trainer end to end on a tiny model: loss goes down, checkpoints, resume, outputs."""

import json
import os

import numpy as np
import pytest

from tests.helpers import tiny_mlm_config
from xformers_jax import train


def _train_losses(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_train_writes_outputs_and_lowers_loss(corpus, tmp_path, capsys):
    cfg = tiny_mlm_config(corpus, train__steps=40, optim__lr=1e-2, checkpoint__every_steps=20)
    cfg.log.every_steps = 5
    result = train.train_and_evaluate(cfg, str(tmp_path))
    assert result["final_eval"]["loss"] < result["first_eval"]["loss"] - 0.3
    for name in ("metrics.jsonl", "loss.png", "config.json", "tokenizer.model"):
        assert os.path.exists(tmp_path / name), name
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))
    row = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")][1]
    for key in ("loss", "learning_rate", "grad_norm", "param_norm", "tokens_per_sec", "accuracy"):
        assert key in row
    out = capsys.readouterr().out
    assert "Starting from scratch" in out and "eval loss: first" in out


def test_resume_continues_exactly(corpus, tmp_path):
    straight = tmp_path / "straight"
    train.train_and_evaluate(tiny_mlm_config(corpus), str(straight))

    resumed = tmp_path / "resumed"
    first = train.train_and_evaluate(tiny_mlm_config(corpus, train__steps=3), str(resumed))
    assert first["step"] == 3
    second = train.train_and_evaluate(tiny_mlm_config(corpus), str(resumed))
    assert second["start_step"] == 3 and second["step"] == 6

    a, b = _train_losses(straight), _train_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([a[s] for s in range(1, 7)], [b[s] for s in range(1, 7)])


def test_nonfinite_loss_stops_and_keeps_checkpoint(corpus, tmp_path):
    cfg = tiny_mlm_config(corpus, train__steps=3)
    train.train_and_evaluate(cfg, str(tmp_path))
    # An absurd learning rate blows the params up within a few steps.
    cfg = tiny_mlm_config(corpus, train__steps=12, optim__lr=1e30)
    cfg.optim.warmup_steps = 0
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss at step"):
        train.train_and_evaluate(cfg, str(tmp_path))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert steps[-1] <= 6


def test_profile_window_writes_a_trace(corpus, tmp_path):
    cfg = tiny_mlm_config(corpus, train__steps=4)
    cfg.profile.steps = [2, 4]
    train.train_and_evaluate(cfg, str(tmp_path))
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and all(t.stat().st_size > 0 for t in traces)


@pytest.mark.parametrize("steps", [[3], [0, 2], [4, 4], [1, 2, 3]])
def test_bad_profile_steps_are_one_line(corpus, steps):
    from xformers_jax import config_lib

    cfg = tiny_mlm_config(corpus)
    cfg.profile.steps = steps
    with pytest.raises(config_lib.ConfigError, match="profile.steps"):
        config_lib.validate(cfg)


@pytest.mark.slow
def test_second_start_loads_the_step_from_the_compilation_cache(corpus, tmp_path):
    """Two starts of a run with `train.compilation_cache_dir`: the second compiles nothing that
    the first compiled (every compile a cache hit)."""
    import subprocess

    from tests.test_reliability import _cli, _env

    env = _env()
    env.pop("JAX_COMPILATION_CACHE_DIR")
    cache = tmp_path / "cache"
    args = [f"--config.train.compilation_cache_dir={cache}", "--config.train.steps=2"]
    first = subprocess.run(_cli(tmp_path / "a", corpus, *args), env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    assert "0 hits" in first.stdout and os.listdir(cache)
    second = subprocess.run(_cli(tmp_path / "b", corpus, *args), env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    line = next(x for x in second.stdout.splitlines() if "compilation cache:" in x)
    assert " 0 misses" in line and " 0 hits" not in line, line


# ------------------------------------------------------------------ gradient accumulation


def _no_dropout(c):
    """Every dropout / drop-path rate of the model config set to 0 (the step stays stochastic)."""
    with c.unlocked():
        for key in list(c.model.keys()):
            if "dropout" in key or "drop_path" in key:
                if isinstance(c.model[key], float):
                    c.model[key] = 0.0
    return c


def _rows(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def test_grad_accum_equals_the_batch_at_once_and_counts_optimizer_steps(corpus, tmp_path):
    """k=4 micro-batches of 8 rows == the 32-row batch at once: same losses and learning rates
    at every step, `train.steps` optimizer updates, checkpoints at optimizer steps."""

    def cfg(k):
        c = tiny_mlm_config(corpus, train__batch_size=32, train__steps=5, optim__lr=3e-3)
        c.optim.grad_accum_steps = k
        c.optim.warmup_steps, c.optim.schedule = 2, "linear"
        return _no_dropout(c)

    once = train.train_and_evaluate(cfg(1), str(tmp_path / "once"))
    accum = train.train_and_evaluate(cfg(4), str(tmp_path / "accum"))
    assert once["step"] == accum["step"] == 5
    a, b = _rows(tmp_path / "once"), _rows(tmp_path / "accum")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([b[s]["loss"] for s in b], [a[s]["loss"] for s in a], rtol=2e-5)
    np.testing.assert_allclose([b[s]["grad_norm"] for s in b], [a[s]["grad_norm"] for s in a],
                               rtol=1e-4)  # fmt: skip
    # The schedule runs on optimizer steps: warmup 2 then linear decay to 0 at step 5.
    lr = [b[s]["learning_rate"] for s in sorted(b)]
    np.testing.assert_allclose(lr, [a[s]["learning_rate"] for s in sorted(a)], rtol=1e-7)
    np.testing.assert_allclose(lr, [0.0, 1.5e-3, 3e-3, 2e-3, 1e-3], rtol=1e-6)
    assert sorted(os.listdir(tmp_path / "accum" / "checkpoints")) == ["3", "5"]
    assert accum["final_eval"]["loss"] == pytest.approx(once["final_eval"]["loss"], rel=1e-4)


def test_grad_accum_micro_batches_keep_the_batch_sharding(corpus, tmp_path):
    """Data parallel on 8 devices: the accumulating step moves no batch rows between devices
    (no all-to-all / all-gather / permute in the compiled step), only the gradient all-reduce."""
    import jax

    c = tiny_mlm_config(corpus, train__batch_size=32)
    c.optim.grad_accum_steps = 4
    s = train.setup(c, str(tmp_path))
    batch = {k: jax.ShapeDtypeStruct((32, 32), np.int32) for k in s.task.init_batch}
    from xformers_jax import sharding

    with sharding.use_mesh(s.mesh, s.rules):
        hlo = s.train_step.lower(s.abstract_state, batch, s.rng).compile().as_text()
    assert "all-reduce" in hlo
    for op in ("all-to-all", "all-gather", "collective-permute"):
        assert op not in hlo, op


def test_grad_accum_rejects_a_batch_it_cannot_split(corpus, tmp_path):
    from xformers_jax import config_lib

    c = tiny_mlm_config(corpus, train__batch_size=6)
    c.optim.grad_accum_steps = 4
    with pytest.raises(config_lib.ConfigError, match="per-host batch of 6 .* into 4 micro-batches"):
        train.setup(c, str(tmp_path))


def _steps(s, state, batches):
    from xformers_jax import sharding

    losses, lrs = [], []
    with sharding.use_mesh(s.mesh, s.rules):
        for batch in batches:
            state, m = s.train_step(state, s.to_global(batch), s.rng)
            losses.append(float(m["loss"]))
            lrs.append(float(m["learning_rate"]))
    return losses, lrs, state


def _accum_vs_once(c, workdir, steps=3, k=4):
    """Per-step losses, lrs and the final state of `steps` steps with k micro-batches and at once,
    from the same init on the same batches (one task built once)."""
    import copy

    import jax

    s1 = train.setup(c, str(workdir))
    it = iter(s1.task.train_data(0, 1))
    batches = [next(it) for _ in range(steps)]
    ck = copy.deepcopy(c)
    ck.optim.grad_accum_steps = k
    sk = train.setup_for_task(ck, s1.task, s1.mesh)
    out = []
    for s in (s1, sk):
        state = s.init_state(s.rng)
        out.append(_steps(s, state, batches))
    (l1, lr1, st1), (lk, lrk, stk) = out
    np.testing.assert_allclose(lk, l1, rtol=2e-5)
    np.testing.assert_array_equal(lrk, lr1)
    assert int(stk.step) == int(st1.step) == steps
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)  # noqa: E731
    jax.tree.map(close, jax.device_get(stk.params), jax.device_get(st1.params))
    jax.tree.map(close, jax.device_get(stk.extra), jax.device_get(st1.extra))
    return st1, stk


# XLNet's carried mems run in the default suite; the other families (about a minute each on two
# cores) are `slow`.
ACCUM_FAMILIES = [
    pytest.param("xlm_roberta", marks=pytest.mark.slow),
    "xlnet",
    pytest.param("mt5", marks=pytest.mark.slow),
    pytest.param("beit", marks=pytest.mark.slow),
    pytest.param("yoso", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family", ACCUM_FAMILIES)
def test_grad_accum_equals_at_once_for_every_pretraining_task(family, corpus, tmp_path):
    """MLM, PLM with carried mems (each micro-batch reads and writes its own rows), span
    corruption, MIM, and YOSO (expectation mode: no hash draws)."""
    from tests.tasks.test_resume_families import FAMILIES

    c = _no_dropout(FAMILIES[family](corpus))
    c.train.batch_size = 16
    if family == "yoso":
        with c.unlocked():
            c.model.use_expectation = True
    st1, stk = _accum_vs_once(c, tmp_path)
    if family == "xlnet":
        assert float(np.abs(np.asarray(st1.extra["mems"])).max()) > 0


@pytest.mark.slow
def test_grad_accum_equals_at_once_for_fine_tuning(tmp_path):
    """Token classification: the labelled tokens (the loss weights) differ per micro-batch."""
    from tests.helpers import finetune_run
    from tests.tasks.test_finetune import load_config
    from xformers_jax.data import SentencePieceTokenizer, chatterbot_texts, finetune_data

    prefix = str(tmp_path / "spm")
    SentencePieceTokenizer.train(chatterbot_texts(list(finetune_data.LANGUAGES)), prefix, 1000)
    c = load_config("token_classification")
    c.model.hidden_size, c.model.num_hidden_layers = 32, 2
    c.model.num_attention_heads, c.model.intermediate_size = 4, 64
    c = _no_dropout(finetune_run(c, "token_classification", prefix + ".model", 3))
    _accum_vs_once(c, tmp_path / "run")


@pytest.mark.slow
def test_mu_dtype_bfloat16_trains_and_resumes_exactly(corpus, tmp_path):
    """AdamW's first moment in bfloat16: stored as such in the checkpoint, and 3 + 3 steps with a
    restart == 6 straight steps."""
    import jax
    import optax

    from xformers_jax import checkpoint as ckpt_lib

    def cfg(steps):
        c = tiny_mlm_config(corpus, train__steps=steps, optim__lr=1e-2)
        c.optim.mu_dtype = "bfloat16"
        c.checkpoint.async_save = False
        return c

    straight = train.train_and_evaluate(cfg(6), str(tmp_path / "straight"))
    assert straight["final_eval"]["loss"] < straight["first_eval"]["loss"]
    train.train_and_evaluate(cfg(3), str(tmp_path / "resumed"))
    assert train.train_and_evaluate(cfg(6), str(tmp_path / "resumed"))["start_step"] == 3
    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    assert [a[s]["loss"] for s in range(1, 7)] == [b[s]["loss"] for s in range(1, 7)]

    s = train.setup(cfg(6), str(tmp_path / "resumed"))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "resumed" / "checkpoints"), every_steps=0,
                                 max_to_keep=5)  # fmt: skip
    state, _ = ckpt.restore(6, ckpt_lib.abstract_with_shardings(s.abstract_state,
                                                                s.state_shardings))  # fmt: skip
    ckpt.close()
    adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(x, optax.ScaleByAdamState)]  # fmt: skip
    assert adam and {x.dtype for x in jax.tree.leaves(adam[0].mu)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(adam[0].nu)} == {np.dtype("float32")}


@pytest.mark.parametrize("policy", ["offload", "offload_dots_no_batch"])
def test_offload_remat_policies_train_as_without_remat_on_cpu(policy, corpus, tmp_path):
    """On the CPU (device memory is host memory) the offloading policies run with the numbers of
    `none`: the same step, loss and params."""
    import jax

    def one_step(remat):
        c = _no_dropout(tiny_mlm_config(corpus))
        c.model.remat_policy = remat
        s = train.setup(c, str(tmp_path))
        batch = next(iter(s.task.train_data(0, 1)))
        losses, _, state = _steps(s, s.init_state(s.rng), [batch, batch])
        return losses, jax.device_get(state.params)

    (l0, p0), (l1, p1) = one_step("none"), one_step(policy)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p0)
