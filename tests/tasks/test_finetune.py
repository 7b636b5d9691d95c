"""Fine-tuning tasks end to end: from an exported checkpoint, a few steps lower the eval loss and
evaluation reports the task metric (accuracy, F1, exact match)."""

import importlib.util
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.helpers import assert_finetune_learns, finetune_run
from xformers_jax import checkpoint, convert, hub, models, train
from xformers_jax.data import finetune_data

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TASKS = {
    "classification": "accuracy",
    "token_classification": "f1",
    "qa": "exact_match",
    "multiple_choice": "accuracy",
}


def load_config(task):
    path = os.path.join(ROOT, "configs", "xlm_roberta", f"finetune_{task}.py")
    spec = importlib.util.spec_from_file_location(f"finetune_{task}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("tiny")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from xformers_jax.data import SentencePieceTokenizer, chatterbot_texts

    prefix = str(tmp_path_factory.mktemp("spm") / "spm")
    texts = chatterbot_texts(list(finetune_data.LANGUAGES))
    SentencePieceTokenizer.train(texts, prefix, 1000)
    return prefix + ".model"


def small_config(task, tokenizer_path, steps=24):
    c = load_config(task)
    c.model.hidden_size, c.model.num_hidden_layers = 32, 2
    c.model.num_attention_heads, c.model.intermediate_size = 4, 64
    c.model.hidden_dropout_prob = c.model.attention_probs_dropout_prob = 0.0
    return finetune_run(c, task, tokenizer_path, steps)


def export_init(config, task, path, orbax=False):
    """A random-init checkpoint of the task's head, written as HF (or an Orbax export)."""
    module, cfg, arch = models.build_model(config.model, task=task)
    inputs = convert.example_inputs(cfg, arch)
    params = nn.meta.unbox(module.init(jax.random.key(7), **inputs)["params"])
    model = hub.PretrainedModel(cfg, module, params, arch)
    (checkpoint.save_orbax if orbax else hub.save_pretrained)(model, path)
    return str(path)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_finetune_from_export_lowers_loss(task, tokenizer_path, tmp_path, capsys):
    # Language id needs a few more steps than the others to move a balanced eval set.
    c = small_config(task, tokenizer_path, steps=60 if task == "classification" else 24)
    c.init_from = export_init(c, task, tmp_path / "init", orbax=True)
    assert_finetune_learns(c, tmp_path / "run", TASKS[task], capsys)


def test_datasets_are_well_formed(tokenizer_path):
    from xformers_jax.data import SentencePieceTokenizer

    tok = SentencePieceTokenizer.load(tokenizer_path)
    qa = finetune_data.span_qa(tok, 48, train=False, n=50)
    ids, s, e = qa["input_ids"], qa["start_positions"], qa["end_positions"]
    for row, a, b in zip(ids, s, e):  # the span repeats the question (right after <s>)
        np.testing.assert_array_equal(row[a : b + 1], row[1 : 1 + b - a + 1])
    mc = finetune_data.reply_choice(tok, 32, train=False, n=20)
    assert mc["input_ids"].shape == (20, finetune_data.NUM_CHOICES, 32)
    tags = finetune_data.mixed_language_tags(tok, 32, train=False, n=20)
    assert set(np.unique(tags["labels"])) <= {-100, 0, 1, 2, 3}
    it = finetune_data.ArrayBatches(tags, 4, train=True, seed=0)
    next(it)
    state = it.get_state()
    a = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["input_ids"], a["input_ids"])


def test_finetune_from_hf_dir(tokenizer_path, tmp_path):
    c = small_config("qa", tokenizer_path, steps=2)
    c.init_from = export_init(c, "qa", tmp_path / "init", orbax=False)
    train.train_and_evaluate(c, str(tmp_path / "run"))
