"""Sequence-to-sequence fine-tuning (mT5 dialog replies): teacher-forced loss, generated report.

Data: prompt -> reply pairs (`data.dialog`): the bundled chatterbot conversations in
`data.languages`, or `data.train_files` / `data.eval_files` of `prompt<TAB>reply` lines; without
eval files a hash of the prompt holds out ~10%. The head is `MT5ForConditionalGeneration`; the
loss is the mean cross-entropy over reply tokens with token accuracy (sums, as span corruption).

After the final eval (and in `xformers-jax eval`) `report` generates replies to a few held-out
prompts, one language after another, with the trained params through the jitted decoding of
`xformers_jax.decoding` (greedy, or beam search with `report.num_beams > 1`) and returns them as
`[language] prompt -> reply` lines, which the trainer prints.

Tokenizer and special ids as in span corruption (`data.tokenizers.seq2seq_tokenizer`): T5's
(`data.tokenizer_type='t5'`, an HF T5/MT5 dir, or `init_from`'s) or the fairseq-layout one; the
model's pad / eos / decoder-start ids must be that tokenizer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xformers_jax import models
from xformers_jax.tasks import TaskSpec, common

# As span corruption: token cross-entropy over the replies, accuracy from sums.
loss_fn = common.text_to_text_loss
metrics = common.accuracy_metrics
count_tokens = common.text_to_text_tokens

__all__ = ["build", "count_tokens", "generate_replies", "loss_fn", "metrics", "pairs_for"]


def pairs_for(config) -> tuple[list, list]:
    """(train pairs, eval pairs) of the run (see the module docstring)."""
    from xformers_jax.data.dialog import dialog_pairs, is_eval_prompt, read_pairs

    d = config.data
    if d.train_files:
        pairs = [p for f in d.train_files for p in read_pairs(f)]
        if d.eval_files:
            return pairs, [p for f in d.eval_files for p in read_pairs(f)]
        return (
            [p for p in pairs if not is_eval_prompt(p.prompt)],
            [p for p in pairs if is_eval_prompt(p.prompt)],
        )
    languages = list(d.languages) if d.get("languages") else None
    return dialog_pairs(languages, "train"), dialog_pairs(languages, "eval")


def report_prompts(pairs: Sequence[Any], n: int) -> list[Any]:
    """Up to `n` pairs with distinct prompts, taking the languages in turn (first seen first)."""
    by_lang: dict[str, list] = {}
    seen: set[str] = set()
    for p in pairs:
        if p.prompt not in seen:
            seen.add(p.prompt)
            by_lang.setdefault(p.language, []).append(p)
    out: list = []
    queues = [iter(v) for v in by_lang.values()]
    while len(out) < n and queues:
        for q in list(queues):
            nxt = next(q, None)
            if nxt is None:
                queues.remove(q)
            elif len(out) < n:
                out.append(nxt)
    return out


def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    inputs_length: int,
    max_new_tokens: int,
    num_beams: int = 1,
) -> list[str]:
    """Replies of a seq2seq `PretrainedModel` to `prompts`, decoded to text.

    Args:
      model: a `PretrainedModel` whose head generates (`MT5ForConditionalGeneration`).
      tokenizer: the run's tokenizer (`encode_many`, `decode`, `pad_id`, `eos_id`).
      prompts: `batch` strings, encoded as `prompt </s>` into `[batch, inputs_length]`.
      max_new_tokens: decoder steps at most.
      num_beams: 1 = greedy, more = beam search.

    Returns:
      One string per prompt (special tokens dropped).
    """
    from xformers_jax.data.dialog import encode_prompts

    ids, mask = encode_prompts(prompts, tokenizer, inputs_length)
    seqs = model.generate(
        ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams
    )
    # Row 0 is the start token; ids past the tokenizer's (a padded model vocabulary, or the
    # sentinels a span-corruption model still emits) have no text.
    rows = [r[1:][(r[1:] >= 0) & (r[1:] < len(tokenizer))] for r in np.asarray(seqs)]
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax import hub
    from xformers_jax.data.dialog import dialog_dataset, encode_pairs
    from xformers_jax.data.tokenizers import seq2seq_tokenizer

    train_pairs, eval_pairs = pairs_for(config)
    if not train_pairs or not eval_pairs:
        raise ValueError(
            f"{len(train_pairs)} train and {len(eval_pairs)} eval dialog pairs: need both"
        )
    texts = lambda: sorted({t for p in train_pairs for t in (p.prompt, p.reply)})  # noqa: E731
    tokenizer = seq2seq_tokenizer(config, workdir, texts)
    # The family's text-to-text LM head (the one span corruption pretrains, if no other is named).
    family = models.FAMILIES.get(config.model.family)
    head_task = "seq2seq" if family and "seq2seq" in family.task_heads else "span_corruption"
    built = common.build_text_to_text(config, tokenizer, head_task)
    module, model_cfg, arch = built
    host_batch = common.host_batch_size(config)
    d = config.data
    targets_length = d.get("targets_length", d.seq_len)
    lengths = dict(
        inputs_length=d.seq_len,
        targets_length=targets_length,
        decoder_start_token_id=model_cfg.decoder_start_token_id,
    )
    train_arrays = encode_pairs(train_pairs, tokenizer, **lengths)
    eval_arrays = encode_pairs(eval_pairs, tokenizer, **lengths)

    data = common.datasets(config, dialog_dataset, (train_arrays,), (eval_arrays,))

    r = dict(num_prompts=8, num_beams=1, max_new_tokens=targets_length)
    r.update(config.get("report") or {})
    shown = report_prompts(eval_pairs, r["num_prompts"])
    # One wrapper for every report: generate() keeps its compiled function on it.
    generator = hub.PretrainedModel(model_cfg, module, None, arch)

    def report(params) -> str:
        generator.params = params
        replies = generate_replies(
            generator,
            tokenizer,
            [p.prompt for p in shown],
            inputs_length=d.seq_len,
            max_new_tokens=r["max_new_tokens"],
            num_beams=r["num_beams"],
        )
        how = "greedy" if r["num_beams"] == 1 else f"beam search, {r['num_beams']} beams"
        lines = [f"Replies to {len(shown)} held-out prompts ({how}):"]
        lines += [f"  [{p.language}] {p.prompt} -> {reply}" for p, reply in zip(shown, replies)]
        return "\n".join(lines)

    init_batch = {k: v[:1].repeat(host_batch, 0) for k, v in train_arrays.items()}
    report = report if shown else None
    return common.task_spec(built, loss_fn, metrics, data, init_batch, count_tokens, report=report)
