"""BEiT semantic segmentation training: digit scenes, metrics, BatchNorm statistics as trainer
state (trained, used by eval, checkpointed, resumed exactly, exported to transformers), init from
pretraining checkpoints, and BEiT's layer-wise lr decay."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import assert_resumes_exactly
from xformers_jax import checkpoint as ckpt_lib
from xformers_jax import config_lib, convert, hub, models, optim, sharding, tasks, train
from xformers_jax.data.images import default_scenes, segmentation_dataset
from xformers_jax.tasks import segmentation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "beit", "segmentation.py")
STEPS = 20


def _config(**overrides):
    c = config_lib.load_config(CONFIG + ":tiny")
    with c.unlocked():
        c.train.batch_size = 8
        c.train.eval_steps = 2
        c.log.every_steps = 1
        c.log.progress = c.log.tensorboard = c.checkpoint.async_save = False
        for key, value in overrides.items():
            section, name = key.split("__")
            c[section][name] = value
    return c


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _restore(cfg, workdir, step):
    """(Setup, TrainState) of `workdir`'s checkpoint `step` on `cfg`'s mesh."""
    s = train.setup(cfg, str(workdir))
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=0,
                                 max_to_keep=100, async_save=False)  # fmt: skip
    with sharding.use_mesh(s.mesh, s.rules):
        abstract = ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
        state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    return s, state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """20 steps on 48 px scenes of the 32 px tiny model; checkpoints every 4 steps."""
    workdir = tmp_path_factory.mktemp("seg")
    cfg = _config(train__steps=STEPS, checkpoint__every_steps=4, checkpoint__max_to_keep=10)
    result = train.train_and_evaluate(cfg, str(workdir))
    return cfg, workdir, result


# ------------------------------------------------------------------------------------------ data


def test_scenes_shapes_ignore_and_determinism():
    scenes = default_scenes("train", 40)
    want = assert_resumes_exactly(
        lambda: segmentation_dataset(scenes, batch_size=4, seed=0), skip=2, n=2
    )
    b = want[0]
    assert b["pixel_values"].shape == (4, 3, 40, 40) and b["pixel_values"].dtype == np.float32
    assert b["labels"].shape == (4, 40, 40) and b["labels"].dtype == np.int32
    labels = np.concatenate([w["labels"] for w in want])
    ids = set(np.unique(labels).tolist())
    assert 0 in ids and 255 in ids and ids <= set(range(11)) | {255}
    assert len(ids - {0, 255}) >= 2  # several digit classes
    border = labels == 255
    assert 0 < border.mean() < 0.2
    # Eval: one deterministic padded pass; padding is all ignored.
    ev = default_scenes("eval", 32)
    a = list(segmentation_dataset(ev, batch_size=16, seed=1, train=False, shard_count=2))
    b2 = list(segmentation_dataset(ev, batch_size=16, seed=1, train=False, shard_count=2))
    assert len(a) == len(b2) == 12  # 360 scenes padded to 384, half per shard
    for x, y in zip(a, b2):
        np.testing.assert_array_equal(x["labels"], y["labels"])
        np.testing.assert_array_equal(x["pixel_values"], y["pixel_values"])
    assert (a[-1]["labels"][-1] == 255).all() and not a[-1]["pixel_values"][-1].any()


def test_reduce_labels_drops_background():
    item = np.array([0, 5], np.int32)
    plain = default_scenes("eval", 32).render(item, np.random.default_rng(3))[1]
    reduced_scenes = default_scenes("eval", 32, reduce_labels=True)
    reduced = reduced_scenes.render(item, np.random.default_rng(3))[1]
    np.testing.assert_array_equal(reduced, np.where((plain == 0) | (plain == 255), 255, plain - 1))


def test_pixel_counts_and_metrics():
    # 1 image, 2 x 2 labels, 3 classes; logits at the label size (no resize).
    labels = jnp.array([[[0, 1], [2, 255]]])
    pred = jnp.array([[[0, 2], [2, 1]]])
    logits = jnp.transpose(jax.nn.one_hot(pred, 3), (0, 3, 1, 2))
    c = segmentation.pixel_counts(logits, labels, 3, 255)
    np.testing.assert_array_equal(c["intersection"], [1, 0, 1])
    # class 0: {0} ; class 1: label px 1 ; class 2: pred px 1,2 + label px 2 (the ignored pixel
    # predicted 1 does not count).
    np.testing.assert_array_equal(c["union"], [1, 1, 2])
    assert int(c["correct"]) == 2
    m = segmentation.metrics({"loss_sum": 3.0, "weight": 3, **c})
    assert m["pixel_accuracy"] == pytest.approx(2 / 3) and m["loss"] == pytest.approx(1.0)
    assert m["mean_iou"] == pytest.approx((1 + 0 + 0.5) / 3)


# ------------------------------------------- the trainer's model state on a toy BatchNorm task


def _killed_after(steps: int):
    """A stand-in for the SIGTERM flag that is raised on the `steps`-th step of a run."""
    calls = iter(range(1, 1 << 30))
    return lambda step=None: next(calls) >= steps


class _ToyBatchNorm(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dense: params and a `batch_stats` collection."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kernel = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        h = nn.Dense(16, kernel_init=kernel)(x)
        h = nn.BatchNorm(use_running_average=deterministic, momentum=0.8)(h)
        return nn.Dense(3)(jax.nn.relu(h))


def _toy_loss(params, batch, rng, *, model, deterministic=False, model_state=None):
    del rng
    variables = {"params": params, **model_state}
    if deterministic:
        logits, new = model.apply(variables, batch["x"], True), None
    else:
        logits, new = model.apply(variables, batch["x"], False, mutable=["batch_stats"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    aux = {"loss_sum": jnp.sum(losses), "weight": jnp.float32(losses.size)}
    if new is not None:
        aux["model_state"] = new
    return jnp.mean(losses), aux


class _ToyStream:
    """Batch `i` of a fixed random problem; `get_state` / `set_state` resume exactly."""

    def __init__(self, seed: int, batches: int | None = None):
        self.seed, self.i, self.batches = seed, 0, batches

    def __iter__(self):
        return self

    def __next__(self):
        if self.batches is not None and self.i >= self.batches:
            raise StopIteration
        rng = np.random.default_rng([self.seed, self.i])
        self.i += 1
        x = rng.normal(2.0, 3.0, (8, 4)).astype(np.float32)  # far from BatchNorm's init stats
        return {"x": x, "labels": (x[:, 0] > 2.0).astype(np.int32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


REPORTS: list = []


def build(config, workdir):
    """The toy task (registered under `toy_batch_norm` by the test below)."""
    del workdir

    def report(params, model_state):
        REPORTS.append(jax.device_get(model_state))
        return "toy report"

    return tasks.TaskSpec(
        model=_ToyBatchNorm(), model_config=None, architecture="ToyBatchNorm",
        loss_fn=_toy_loss,
        metrics=lambda sums: {"loss": float(sums["loss_sum"]) / float(sums["weight"])},
        train_data=lambda i, n: _ToyStream(config.train.seed),
        eval_data=lambda i, n: _ToyStream(config.train.seed + 1, batches=2),
        init_batch=next(_ToyStream(0)), count_tokens=lambda b: 8,
        report=report, mutable=("batch_stats",),
    )  # fmt: skip


def _toy_config(**mesh):
    c = config_lib.base_config()
    c.task = "toy_batch_norm"
    c.optim.lr, c.optim.warmup_steps = 0.05, 0
    c.train.steps, c.train.eval_steps = 4, 2
    c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
    c.log.every_steps, c.log.progress, c.log.tensorboard = 1, False, False
    for k, v in mesh.items():
        c.mesh[k] = v
    return c


def test_model_state_trained_evaluated_checkpointed_and_resumed(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tasks.TASKS, "toy_batch_norm", __name__)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    REPORTS.clear()
    done = train.train_and_evaluate(_toy_config(), str(straight))
    assert "toy report" in capsys.readouterr().out
    monkeypatch.setattr(train, "_install_sigterm", lambda: _killed_after(2))
    assert train.train_and_evaluate(_toy_config(), str(resumed))["preempted"]
    monkeypatch.undo()
    monkeypatch.setitem(tasks.TASKS, "toy_batch_norm", __name__)
    assert train.train_and_evaluate(_toy_config(), str(resumed))["start_step"] == 2
    assert _losses(straight) == _losses(resumed) and sorted(_losses(straight)) == [1, 2, 3, 4]

    s, want = _restore(_toy_config(), straight, 4)
    _, got = _restore(_toy_config(), resumed, 4)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
    # Updated by the steps (no gradient), what eval and the report read.
    init = jax.device_get(s.init_state(s.rng).model_state)
    stats = jax.device_get(want.model_state)
    assert not np.allclose(stats["batch_stats"]["BatchNorm_0"]["mean"],
                           init["batch_stats"]["BatchNorm_0"]["mean"])  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, REPORTS[-1], stats)
    assert train._run_eval(s, want.params, 2, want.model_state) == done["final_eval"]
    assert train._run_eval(s, want.params, 2, init) != done["final_eval"]
    # Onto another mesh: same values; model state by its logical axes (unboxed: replicated).
    s2, moved = _restore(_toy_config(data=4, fsdp=2), straight, 4)
    kernel = moved.params["Dense_0"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp" and s2.mesh.shape["fsdp"] == 2
    assert moved.model_state["batch_stats"]["BatchNorm_0"]["var"].sharding.is_fully_replicated
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(moved), jax.device_get(want))


# ------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_trains_at_another_resolution_with_batch_stats(trained, tmp_path):
    cfg, workdir, result = trained
    assert cfg.data.image_size == 48 and cfg.model.image_size == 32
    first, final = result["first_eval"], result["final_eval"]
    print("segmentation eval", first, "->", final)
    assert np.isfinite(final["loss"]) and final["loss"] < first["loss"] - 0.1
    assert set(final) == {"loss", "pixel_accuracy", "mean_iou"}
    assert all(np.isfinite(v) for v in _losses(workdir).values())

    s, state = _restore(cfg, workdir, STEPS)
    init = jax.device_get(s.init_state(s.rng).model_state)
    stats = jax.device_get(state.model_state)
    assert set(stats) == {"batch_stats"}
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(stats),
                                                      jax.tree.leaves(init))]  # fmt: skip
    assert len(changed) == 28 and all(changed)  # every BatchNorm's mean and var moved
    # Eval reads the trained statistics: the final eval again, and with the init ones.
    again = train._run_eval(s, state.params, cfg.train.eval_steps, state.model_state)
    assert again == final
    other = train._run_eval(s, state.params, cfg.train.eval_steps, s.init_state(s.rng).model_state)
    assert abs(other["loss"] - final["loss"]) > 1e-3

    model = train.load_trained_model(str(workdir))
    x = np.zeros((2, 3, 48, 48), np.float32)
    assert model(pixel_values=x).logits.shape == (2, 11, 24, 24)

    # The trained model (running statistics included) in transformers.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ckpt_lib.export_orbax_to_hf(str(workdir), str(tmp_path / "hf"))
    ref = transformers.BeitForSemanticSegmentation.from_pretrained(str(tmp_path / "hf")).eval()
    np.testing.assert_array_equal(
        ref.fpn1[1].running_var.numpy(), model.collections["batch_stats"]["fpn"]["fpn1_1"]["var"]
    )
    _assert_hf_parity(model, ref, torch)


@pytest.mark.slow
def test_killed_and_resumed_is_exact_with_batch_stats(trained, tmp_path, monkeypatch):
    cfg, straight, _ = trained
    resumed = tmp_path / "resumed"
    # The same run killed after step 2 and again after step 4 (no evals: they do not touch the
    # train state).
    monkeypatch.setattr(train, "_install_sigterm", lambda: _killed_after(2))
    again = _config(train__steps=STEPS, checkpoint__every_steps=4, train__eval_steps=0)
    first = train.train_and_evaluate(again, str(resumed))
    assert first["preempted"] and first["step"] == 2
    second = train.train_and_evaluate(again, str(resumed))
    assert second["preempted"] and second["start_step"] == 2 and second["step"] == 4
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [1, 2, 3, 4]
    assert [a[i] for i in range(1, 5)] == [b[i] for i in range(1, 5)]
    _, want = _restore(cfg, straight, 4)
    _, got = _restore(cfg, resumed, 4)
    want, got = jax.device_get(want), jax.device_get(got)
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)
    jax.tree.map(np.testing.assert_array_equal, got.model_state, want.model_state)
    jax.tree.map(np.testing.assert_array_equal, got.opt_state, want.opt_state)
    # Onto another mesh: the same values, the new layout.
    s2, moved = _restore(_config(mesh__data=4, mesh__fsdp=2), straight, 4)
    assert dict(s2.mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    kernel = moved.params["decode_head"]["bottleneck"]["conv"]["kernel"]
    assert kernel.sharding.mesh.shape == s2.mesh.shape
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(moved.model_state),
                 want.model_state)  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(moved.params), want.params)


def test_export_to_transformers_with_running_stats(tmp_path):
    """A checkpoint's BatchNorm statistics reach transformers through `export_orbax_to_hf`, and come
    back into a run's state through `init_from` that HF dir."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, workdir = _config(), tmp_path / "run"
    s = train.setup(cfg, str(workdir))
    with sharding.use_mesh(s.mesh, s.rules):
        init = s.init_state(s.rng)
    rng = np.random.default_rng(0)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
        if p[-1].key == "var" else rng.normal(0.0, 0.5, x.shape).astype(np.float32),
        jax.device_get(init.model_state),
    )  # fmt: skip
    state = init.replace(model_state=jax.device_put(stats, s.state_shardings.model_state))
    config_lib.save_config(cfg, str(workdir / "config.json"))
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1,
                                 max_to_keep=1, async_save=False)  # fmt: skip
    ckpt.save(1, state, {})
    ckpt.close()

    out = tmp_path / "hf"
    ckpt_lib.export_orbax_to_hf(str(workdir), str(out))
    ours = train.load_trained_model(str(workdir))
    jax.tree.map(np.testing.assert_array_equal, ours.collections, stats)
    # `xformers-jax export` (checkpoint.export_orbax_to_hf) carries them too.
    ckpt_lib.export_orbax_to_hf(str(workdir), str(tmp_path / "hf_cli"))
    cli_model = hub.from_pretrained(str(tmp_path / "hf_cli"))
    jax.tree.map(np.testing.assert_array_equal, cli_model.collections, stats)
    ref = transformers.BeitForSemanticSegmentation.from_pretrained(str(out)).eval()
    bn = stats["batch_stats"]["decode_head"]["bottleneck"]["bn"]
    np.testing.assert_array_equal(ref.decode_head.bottleneck.bn.running_mean.numpy(), bn["mean"])
    np.testing.assert_array_equal(ref.decode_head.bottleneck.bn.running_var.numpy(), bn["var"])
    _assert_hf_parity(ours, ref, torch)

    # init_from that HF dir brings the statistics (and params) back into a run's state.
    params, model_state = train._load_init_params(str(out), s, init)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(model_state), stats)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(init.params))  # fmt: skip
    # init_from the workdir itself: read straight onto the run's shardings, statistics included.
    params, model_state = train._load_init_params(str(workdir), s, init)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(model_state), stats)
    jax.tree.map(np.testing.assert_array_equal, *jax.device_get((params, init.params)))
    shardings = jax.tree.map(lambda x: x.sharding, (model_state, init.model_state))
    assert shardings[0] == shardings[1]


def _assert_hf_parity(ours, ref, torch):
    """Eval-mode logits of our model and transformers' (at the config resolution, the only one
    transformers' segmentation runs at) agree."""
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x)).logits.numpy()
    got = np.asarray(ours(pixel_values=x).logits)
    assert got.shape == want.shape == (2, 11, 16, 16)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_init_from_pretraining_checkpoint_fresh_heads(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = _config()
    s = train.setup(cfg, str(tmp_path / "run"))
    with sharding.use_mesh(s.mesh, s.rules):
        init = s.init_state(s.rng)
    # A random-init HF MIM checkpoint of the same encoder (its head is `layernorm` + `lm_head`).
    mim_cfg = s.task.model_config
    d = hub.hf_config_dict(mim_cfg, "BeitForMaskedImageModeling")
    torch.manual_seed(0)
    mim = transformers.BeitForMaskedImageModeling(transformers.BeitConfig(**d))
    mim.save_pretrained(str(tmp_path / "mim"))
    params, model_state = train._load_init_params(str(tmp_path / "mim"), s, init)
    params, fresh = jax.device_get(params), jax.device_get(init.params)
    want = convert.hf_to_params(
        {k: v.numpy() for k, v in mim.beit.state_dict().items()}, mim_cfg, "BeitModel",
        convert.abstract_params(mim_cfg, "BeitModel"),
    )  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, params["beit"]["encoder"], want["encoder"])
    for head in ("fpn", "decode_head", "auxiliary_head"):
        jax.tree.map(np.testing.assert_array_equal, params[head], fresh[head])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(model_state),
                 jax.device_get(init.model_state))  # fmt: skip


# ----------------------------------------------------------------------------- layer-wise decay


def _layer_id(names: tuple[str, ...], num_layers: int):
    """BEiT's `get_num_layer_for_vit`: embeddings 0, block i -> i + 1, everything else last."""
    if "layers" in names:
        return np.arange(num_layers) + 1
    if "embeddings" in names:
        return 0
    return num_layers + 1


@pytest.mark.parametrize("task", ["segmentation", "image_classification", "mim"])
def test_layer_decay_follows_beit_layer_ids(task):
    d = 0.65
    _, cfg, arch = models.build_model({"family": "beit", "preset": "tiny", "num_labels": 11,
                                       "use_mean_pooling": task != "mim"}, task=task)  # fmt: skip
    shapes = convert.abstract_params(cfg, arch)
    n = cfg.num_hidden_layers
    factors = optim.layer_decay_factors(shapes, d)
    seen = set()

    def check(path, factor, leaf):
        names = optim.param_path_names(path)
        seen.add(names[0])
        # BEiT: scale = d ** (num_layers + 1 - layer_id).
        want = np.float32(d) ** (n + 1 - np.asarray(_layer_id(names, n)))
        got = np.asarray(factor, np.float32)
        if "layers" in names:
            assert got.shape == (n,) + (1,) * (len(leaf.shape) - 1), names
            got = got.reshape(n)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg="/".join(names))

    jax.tree_util.tree_map_with_path(check, factors, shapes)
    heads = {
        "segmentation": {"fpn", "decode_head", "auxiliary_head"},
        "image_classification": {"classifier"},
        "mim": {"lm_head", "layernorm"},
    }[task]
    assert seen == {"beit"} | heads

    # The optimizer applies them: Adam's first update is -lr * sign(grad) * factor.
    tx, _ = optim.make_optimizer({"lr": 1.0, "warmup_steps": 0, "schedule": "constant",
                                  "weight_decay": 0.0, "clip_norm": 0.0, "layer_decay": d,
                                  "eps": 1e-12}, 10)  # fmt: skip
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    want = jax.tree.map(lambda f, p: -np.broadcast_to(np.asarray(f, np.float32), p.shape),
                        factors, params)  # fmt: skip
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-5), updates, want)
