"""XLNet and YOSO through the shared fine-tuning tasks.

* every `configs/{xlnet,yoso}/finetune_*.py` preset builds, and the full-size heads' parameter
  counts (`jax.eval_shape`, no memory) equal transformers' classes of the same config;
* the generated XLNet examples follow XLNet's layout exactly as `transformers.XLNetTokenizer`
  lays it out (CLS last, left padding, segment 2 at the CLS, 3 at padding), QA answers point at
  the answer tokens, `p_mask` / `cls_index` as transformers' SQuAD features;
* YOSO's examples are right padded with YOSO's pad id, so its absolute positions (counted from 2
  at `<s>`, as in transformers) do not depend on the padded length;
* a tiny model of each family, trained a few steps from an exported random-init checkpoint,
  lowers the eval loss and reports the task metric (as `tasks/test_finetune.py` does for XLM-R);
* a PLM pretraining workdir initialises XLNet fine-tuning together with its tokenizer.
"""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_finetune_learns, finetune_run
from xformers_jax import checkpoint, config_lib, convert, hub, models, train
from xformers_jax.data import finetune_data
from xformers_jax.data.tokenizers import text_tokenizer

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TASKS = ("classification", "token_classification", "qa", "multiple_choice")
METRIC = {
    "classification": "accuracy",
    "token_classification": "f1",
    "qa": "exact_match",
    "multiple_choice": "accuracy",
}
CONFIG_PATHS = [
    os.path.join(ROOT, "configs", family, f"finetune_{task}.py")
    for family in ("xlnet", "yoso")
    for task in TASKS
]


def load_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config(family, task, preset="tiny"):
    return load_module(os.path.join(ROOT, "configs", family, f"finetune_{task}.py")).get_config(
        preset
    )


@pytest.fixture(scope="module")
def texts():
    from xformers_jax.data import chatterbot_texts

    return chatterbot_texts(list(finetune_data.LANGUAGES))


@pytest.fixture(scope="module")
def xlnet_spm(tmp_path_factory, texts):
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    return XLNetTokenizer.train(texts, tmp_path_factory.mktemp("xlnet") / "spiece", 1000).path


@pytest.fixture(scope="module")
def fairseq_spm(tmp_path_factory, texts):
    from xformers_jax.data import SentencePieceTokenizer

    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return SentencePieceTokenizer.train(texts, prefix, 1000).path


# ------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=[os.path.relpath(p, ROOT) for p in CONFIG_PATHS])
def test_every_preset_builds(path):
    mod = load_module(path)
    family = os.path.basename(os.path.dirname(path))
    assert "tiny" in mod.RUNS and "base" in mod.RUNS
    assert mod.get_config(None).model.preset == mod.get_config("tiny").model.preset == "tiny"
    for preset in mod.RUNS:
        c = config_lib.load_config(f"{path}:{preset}")
        assert c.model.family == family
        module, cfg, arch = models.build_model(c.model, task=c.task)
        assert arch == type(module).__name__
        if family == "xlnet":
            assert not cfg.use_mems_train and c.data.tokenizer_type == "xlnet"
        else:  # sampled attention where the pretraining samples, expectation for the checkpoint
            assert cfg.use_expectation == (preset == "base")
    with pytest.raises(config_lib.ConfigError, match="unknown preset"):
        mod.get_config("huge")


def _hf_config(family, cfg):
    cls = transformers.XLNetConfig if family == "xlnet" else transformers.YosoConfig
    return cls(**cfg.to_hf_config())


@pytest.mark.parametrize("family,preset", [("xlnet", "base"), ("xlnet", "large"), ("yoso", "base")])
@pytest.mark.parametrize("task", ["classification", "qa"])
def test_full_size_heads_match_transformers_param_count(family, preset, task):
    c = load_config(family, task, preset)
    module, cfg, arch = models.build_model(c.model, task=c.task)
    inputs = convert.example_inputs(cfg, arch)
    shapes = jax.eval_shape(lambda r: module.init(r, **inputs), jax.random.key(0))["params"]
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    with torch.device("meta"):
        hf = getattr(transformers, arch)(_hf_config(family, cfg))
    # transformers keeps YOSO's position ids as a buffer, not a parameter.
    assert ours == sum(p.numel() for p in hf.parameters()), arch
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert cfg.dtype == "bfloat16"


# ------------------------------------------------------------------------------- data layouts


def _hf_xlnet(xlnet_spm):
    return transformers.XLNetTokenizer(vocab_file=xlnet_spm)


def test_xlnet_tokenizer_layout_methods_equal_transformers(xlnet_spm):
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    ours, hf = XLNetTokenizer.load(xlnet_spm), _hf_xlnet(xlnet_spm)
    rng = np.random.default_rng(0)
    for n_a, n_b in [(0, None), (5, None), (3, 7), (1, 0)]:
        a = rng.integers(9, 1000, n_a).tolist()
        b = None if n_b is None else rng.integers(9, 1000, n_b).tolist()
        assert ours.build_inputs_with_special_tokens(a, b) == hf.build_inputs_with_special_tokens(
            a, b
        )
        assert ours.create_token_type_ids_from_sequences(
            a, b
        ) == hf.create_token_type_ids_from_sequences(a, b)
        assert ours.get_special_tokens_mask(a, b) == hf.get_special_tokens_mask(a, b)
        assert ours.num_special_tokens_to_add(b is not None) == hf.num_special_tokens_to_add(
            b is not None
        )
    assert (ours.padding_side, ours.pad_token_type_id) == (hf.padding_side, hf.pad_token_type_id)
    assert list(ours.model_input_names) == list(hf.model_input_names)


def test_xlnet_classification_rows_equal_transformers(xlnet_spm):
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    tok, hf = XLNetTokenizer.load(xlnet_spm), _hf_xlnet(xlnet_spm)
    seq_len = 24  # short enough that some utterances are truncated
    data = finetune_data.language_id(tok, seq_len, train=False, per_language=40)
    texts = [t for lang in finetune_data.LANGUAGES for t in finetune_data._texts(lang, False, 40)]
    texts = [texts[i] for i in finetune_data.interleaved_order(len(texts))]
    want = hf(texts, padding="max_length", max_length=seq_len, truncation=True,
              return_tensors="np")  # fmt: skip
    assert (want["attention_mask"][:, 0] == 0).any() and (want["attention_mask"].sum(1) == 24).any()
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(data[k], want[k], err_msg=k)
    assert (data["input_ids"][:, -1] == tok.cls_token_id).all()
    assert (data["token_type_ids"][:, -1] == 2).all()


def _segments(row_ids, row_types, row_mask, tok):
    """(A ids, B ids) of an XLNet row from its segment ids."""
    real = row_mask == 1
    content = real & ~np.isin(row_ids, [tok.sep_token_id, tok.cls_token_id])
    a = row_ids[content & (row_types == 0)].tolist()
    b = row_ids[content & (row_types == 1)].tolist()
    return a, b


def test_xlnet_qa_rows_and_labels(xlnet_spm):
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    tok, hf = XLNetTokenizer.load(xlnet_spm), _hf_xlnet(xlnet_spm)
    seq_len = 48
    data = finetune_data.span_qa(tok, seq_len, train=False, n=60)
    n = len(data["input_ids"])
    assert n > 40
    for i in range(n):
        ids, types, mask = (data[k][i] for k in ("input_ids", "token_type_ids", "attention_mask"))
        context, question = _segments(ids, types, mask, tok)
        # transformers lays the same (context, question) pair out identically.
        want = hf.pad(
            {"input_ids": hf.build_inputs_with_special_tokens(context, question),
             "token_type_ids": hf.create_token_type_ids_from_sequences(context, question)},
            padding="max_length", max_length=seq_len, return_attention_mask=True,
        )  # fmt: skip
        np.testing.assert_array_equal(ids, want["input_ids"])
        np.testing.assert_array_equal(types, want["token_type_ids"])
        np.testing.assert_array_equal(mask, want["attention_mask"])
        # The answer is the question's utterance, found inside the context (segment 0).
        s, e = data["start_positions"][i], data["end_positions"][i]
        assert ids[s : e + 1].tolist() == question
        assert (types[s : e + 1] == 0).all() and (mask[s : e + 1] == 1).all()
        # p_mask: 0 on the context and the CLS token (last), 1 on question, seps and padding.
        assert data["cls_index"][i] == seq_len - 1
        can = np.flatnonzero(data["p_mask"][i] == 0)
        context_pos = np.flatnonzero((types == 0) & (mask == 1) & (ids != tok.sep_token_id))
        np.testing.assert_array_equal(can, [*context_pos, seq_len - 1])


def test_xlnet_token_tags_and_choices(xlnet_spm):
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    tok = XLNetTokenizer.load(xlnet_spm)
    tags = finetune_data.mixed_language_tags(tok, 32, train=False, n=40)
    ids, labels, mask = tags["input_ids"], tags["labels"], tags["attention_mask"]
    special = np.isin(ids, [tok.sep_token_id, tok.cls_token_id])
    # Tags exactly on the real non-special tokens; padding is on the left, the CLS last.
    np.testing.assert_array_equal(labels != -100, (mask == 1) & ~special)
    assert (ids[:, -1] == tok.cls_token_id).all() and (ids[:, -2] == tok.sep_token_id).all()
    assert ((mask[:, 1:] - mask[:, :-1]) >= 0).all()  # 0...0 1...1
    mc = finetune_data.reply_choice(tok, 32, train=False, n=10)
    assert mc["token_type_ids"].shape == (10, finetune_data.NUM_CHOICES, 32)
    assert (mc["token_type_ids"][..., -1] == 2).all()
    assert (mc["input_ids"][..., -1] == tok.cls_token_id).all()
    for i, slot in enumerate(mc["labels"]):
        for j in range(finetune_data.NUM_CHOICES):
            ids_j, types_j, mask_j = (mc[k][i, j] for k in ("input_ids", "token_type_ids",
                                                            "attention_mask"))  # fmt: skip
            prompt, reply = _segments(ids_j, types_j, mask_j, tok)
            assert len(ids_j[mask_j == 1]) == len(prompt) + len(reply) + 3
            if j != slot:  # decoys are ordinary tokens only
                assert not set(reply) & tok.special_ids


def test_qa_inputs_reach_only_heads_that_take_them(xlnet_spm):
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer
    from xformers_jax.tasks.common import head_inputs

    data = finetune_data.span_qa(XLNetTokenizer.load(xlnet_spm), 48, train=False, n=8)
    c = load_config("xlnet", "qa")
    _, cfg, arch = models.build_model(c.model, task="qa")
    family = models.FAMILIES["xlnet"]
    simple = head_inputs(family.head_module(arch)(cfg), data)
    beam = head_inputs(family.head_module("XLNetForQuestionAnswering")(cfg), data)
    assert set(beam) == set(data) == set(simple) | {"p_mask", "cls_index"}


def test_yoso_examples_right_padded_positions_independent_of_length(fairseq_spm):
    from xformers_jax.data import SentencePieceTokenizer

    tok = SentencePieceTokenizer.load(fairseq_spm)
    c = load_config("yoso", "classification")
    c.model.hidden_size, c.model.num_hidden_layers = 32, 2
    c.model.num_attention_heads, c.model.intermediate_size = 4, 64
    c.model.vocab_size, c.model.use_expectation = 1000, True
    module, cfg, _ = models.build_model(c.model, task="classification")
    short = finetune_data.language_id(tok, 32, train=False, per_language=8)
    long = finetune_data.language_id(tok, 48, train=False, per_language=8)
    # XLM-R's layout with YOSO's special ids, right padding, no token types.
    assert set(short) == {"input_ids", "attention_mask", "labels"}
    assert (short["input_ids"][:, 0] == cfg.bos_token_id).all()
    assert (short["input_ids"][short["attention_mask"] == 0] == cfg.pad_token_id).all()
    fits = short["attention_mask"].sum(1) < 32  # rows not truncated at 32 tokens
    assert fits.sum() > 20
    short = {k: v[fits] for k, v in short.items()}
    long = {k: v[fits] for k, v in long.items()}
    np.testing.assert_array_equal(long["input_ids"][:, :32], short["input_ids"])
    assert (long["input_ids"][:, 32:] == cfg.pad_token_id).all()
    params = jax.jit(module.init)(jax.random.key(0), jnp.asarray(short["input_ids"][:2]))["params"]
    apply = jax.jit(lambda ids, mask: module.apply({"params": params}, input_ids=ids,
                                                   attention_mask=mask).logits)  # fmt: skip
    logits = [apply(d["input_ids"], d["attention_mask"]) for d in (short, long)]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)


# ------------------------------------------------------------------------------ training runs


def small_config(family, task, tokenizer, steps=60):
    """The tiny preset shrunk to hidden 32, 2 layers. 60 steps, not 24: the step time is small
    next to compilation, and the language-id eval batches (one language) only show a clear loss
    drop once the model tells languages apart."""
    c = load_config(family, task)
    if family == "xlnet":
        c.model.d_model, c.model.n_layer, c.model.n_head, c.model.d_inner = 32, 2, 4, 64
        c.model.dropout = 0.0
    else:  # still sampled attention, with fewer and shorter hashes (as tasks/test_yoso_train.py)
        c.model.hidden_size, c.model.num_hidden_layers = 32, 2
        c.model.num_attention_heads, c.model.intermediate_size = 4, 64
        c.model.hidden_dropout_prob = c.model.attention_probs_dropout_prob = 0.0
        c.model.hash_code_len, c.model.num_hash = 4, 8
    return finetune_run(c, task, tokenizer, steps)


def export_init(config, task, path):
    """A random-init Orbax params export of the task's head."""
    module, cfg, arch = models.build_model(config.model, task=task)
    inputs = convert.example_inputs(cfg, arch)
    params = nn.meta.unbox(module.init(jax.random.key(7), **inputs)["params"])
    checkpoint.save_orbax(hub.PretrainedModel(cfg, module, params, arch), path)
    return str(path)


@pytest.mark.parametrize(
    "family,task",
    [("xlnet", "classification"), ("xlnet", "qa"), ("yoso", "classification"), ("yoso", "qa")],
)
def test_finetune_from_export_lowers_loss(family, task, xlnet_spm, fairseq_spm, tmp_path, capsys):
    c = small_config(family, task, xlnet_spm if family == "xlnet" else fairseq_spm)
    c.init_from = export_init(c, task, tmp_path / "init")
    assert_finetune_learns(c, tmp_path / "run", METRIC[task], capsys)


@pytest.mark.slow  # the two other tasks of each family: 4 more runs of ~20 s
@pytest.mark.parametrize("family", ["xlnet", "yoso"])
@pytest.mark.parametrize("task", ["token_classification", "multiple_choice"])
def test_finetune_other_tasks_lower_loss(family, task, xlnet_spm, fairseq_spm, tmp_path):
    c = small_config(family, task, xlnet_spm if family == "xlnet" else fairseq_spm)
    c.init_from = export_init(c, task, tmp_path / "init")
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert result["final_eval"]["loss"] < result["first_eval"]["loss"]
    assert 0.0 <= result["final_eval"][METRIC[task]] <= 1.0


@pytest.mark.slow  # two trainer runs (PLM pretraining, then fine-tuning), ~40 s
def test_plm_workdir_initialises_finetuning_with_its_tokenizer(tmp_path):
    from tests.helpers import tiny_corpus

    corpus = tiny_corpus(str(tmp_path))
    plm = load_module(os.path.join(ROOT, "configs", "xlnet", "pretrain_plm.py")).get_config("tiny")
    plm.model.d_model, plm.model.n_layer, plm.model.n_head, plm.model.d_inner = 32, 2, 4, 64
    plm.model.vocab_size = plm.data.vocab_size = 1000
    plm.model.mem_len = plm.data.reuse_len = plm.data.perm_size = 16
    plm.data.seq_len, plm.data.num_predict = 32, 5
    plm.data.train_files = plm.data.eval_files = [corpus]
    plm.train.steps, plm.train.batch_size, plm.train.eval_steps = 2, 8, 1
    plm.checkpoint.every_steps, plm.log.progress = 2, False
    plm_dir = str(tmp_path / "plm")
    train.train_and_evaluate(plm, plm_dir)

    c = small_config("xlnet", "classification", "", steps=2)
    c.data.train_files = [corpus]
    c.init_from = plm_dir
    tok = text_tokenizer(c, str(tmp_path / "cls"))
    assert tok.path == os.path.join(plm_dir, "spiece.model")
    result = train.train_and_evaluate(c, str(tmp_path / "cls"))
    assert np.isfinite(result["final_eval"]["loss"])
    # The body is the pretrained one: the fine-tuned word embeddings moved only a little.
    pretrained = checkpoint.load_orbax(plm_dir).params["transformer"]["word_embedding"]
    tuned = checkpoint.load_orbax(str(tmp_path / "cls")).params["transformer"]["word_embedding"]
    assert np.abs(np.asarray(tuned) - np.asarray(pretrained)).max() < 0.02
