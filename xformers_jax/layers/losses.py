"""Every loss of the models: torch's token cross-entropy, HF's head losses, the chunked LM loss.

`cross_entropy_with_ignore` is torch's `CrossEntropyLoss` (mean over labels != ignore_index, in
float32); `sequence_classification_loss` is transformers' `problem_type` rule shared by every
`*ForSequenceClassification` / `*ForImageClassification`; `span_loss` the extractive-QA loss;
`token_classification_loss` and `causal_lm_loss` the per-token ones.

`chunked_cross_entropy` scores features against a (tied) output embedding one vocabulary chunk
at a time under `lax.scan`, keeping a running logsumexp, the label's logit and a running argmax.
Each scan step is rematerialised (`jax.checkpoint`), so the backward pass also holds one
`[tokens, chunk]` block at a time: peak memory is O(tokens * chunk) instead of O(tokens * vocab),
which is what makes 250k (XLM-R-XL) and 900k (XLM-V) vocabularies trainable at long batches.

Chunks are *strided* (chunk `c` holds vocabulary ids `c, c + n_chunks, c + 2 n_chunks, ...`):
with the vocabulary axis of the table sharded contiguously over the `tensor` mesh axis, every
chunk is then spread over all tensor shards instead of living on one of them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

_NEG = -1e30  # finite "minus infinity" for padded vocabulary rows (keeps gradients NaN-free)

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def cross_entropy_with_ignore(
    logits: jax.Array, labels: jax.Array, ignore_index: int = -100
) -> jax.Array:
    """Mean token cross-entropy over labels != ignore_index, in float32 (torch's CrossEntropyLoss).

    `[..., vocab]` logits, `[...]` int labels -> scalar.
    """
    labels = jnp.asarray(labels)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def sequence_classification_loss(
    logits: jax.Array, labels: jax.Array, num_labels: int, problem_type: str | None
) -> jax.Array:
    """transformers' loss for `*ForSequenceClassification`, `problem_type` inferred as HF does.

    None: 1 label -> regression (MSE); integer labels -> single-label cross-entropy; float labels
    -> multi-label BCE-with-logits. In float32.

    Args:
      logits: `[batch, num_labels]`.
      labels: `[batch]` ints (single-label), `[batch]` / `[batch, num_labels]` floats (regression),
        `[batch, num_labels]` floats (multi-label).
    """
    labels = jnp.asarray(labels)
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    logits = logits.astype(jnp.float32)
    if problem_type == "regression":
        labels = labels.astype(jnp.float32)
        if num_labels == 1:
            return jnp.mean(jnp.square(jnp.squeeze(logits) - jnp.squeeze(labels)))
        return jnp.mean(jnp.square(logits - labels))
    if problem_type == "single_label_classification":
        return cross_entropy_with_ignore(logits.reshape(-1, num_labels), labels.reshape(-1))
    if problem_type == "multi_label_classification":
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))
    raise ValueError(f"unknown problem_type {problem_type!r}; known: {PROBLEM_TYPES}")


def token_classification_loss(
    logits: jax.Array, labels: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Mean cross-entropy over tokens: `[..., num_labels]` logits, `[...]` labels (-100 ignored).

    With `attention_mask` (`[...]`, 1 = token) padding tokens are ignored too, as the heads of
    transformers that pass the mask to the loss do (XLM-R-XL, YOSO).
    """
    labels = jnp.asarray(labels)
    if attention_mask is not None:
        labels = jnp.where(jnp.asarray(attention_mask) == 1, labels, -100)
    return cross_entropy_with_ignore(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def span_loss(
    start_logits: jax.Array, end_logits: jax.Array, start_positions, end_positions
) -> jax.Array:
    """HF's extractive-QA loss: positions clamped to `[0, length]`, `length` itself ignored.

    `[batch, length]` logits, `[batch]` positions -> scalar, the mean of start and end losses.
    """
    length = start_logits.shape[1]
    start = jnp.clip(jnp.asarray(start_positions).reshape(-1), 0, length)
    end = jnp.clip(jnp.asarray(end_positions).reshape(-1), 0, length)
    start_loss = cross_entropy_with_ignore(start_logits, start, ignore_index=length)
    end_loss = cross_entropy_with_ignore(end_logits, end, ignore_index=length)
    return (start_loss + end_loss) / 2


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """HF's causal-LM loss: position t predicts `labels[t + 1]`; `-100` (and the last) ignored."""
    labels = jnp.asarray(labels)
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], -100)], axis=1)
    return cross_entropy_with_ignore(logits, shifted)


def chunked_cross_entropy(
    features: jax.Array,
    embedding: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    *,
    chunk_size: int = 8192,
    ignore_index: int = -100,
) -> tuple[jax.Array, jax.Array]:
    """Token cross-entropy of `features @ embedding.T + bias` against `labels`, chunked over vocab.

    Equals `optax.softmax_cross_entropy_with_integer_labels` of the full logits (float32), but
    only ever holds one `[tokens, chunk_size]` block of logits, forward and backward.

    Args:
      features: `[..., hidden]` (any float dtype; the matmul runs in its dtype, the softmax in
        float32).
      embedding: `[vocab, hidden]` output table (tied word embeddings).
      bias: `[vocab]` output bias, or None.
      labels: `[...]` int ids; `ignore_index` entries get loss 0.
      chunk_size: vocabulary entries per scan step (rounded so the chunks cover the vocab evenly).
      ignore_index: label value to skip.

    Returns:
      `(losses, predictions)`: float32 `[...]` per-token losses (0 where ignored) and int32 `[...]`
      argmax ids of the logits (for accuracy).
    """
    vocab, hidden = embedding.shape
    lead = labels.shape
    x = features.reshape(-1, hidden)
    y = labels.reshape(-1)
    n_chunks = max(1, -(-vocab // max(1, int(chunk_size))))
    chunk = -(-vocab // n_chunks)
    pad = chunk * n_chunks - vocab
    table = jnp.asarray(embedding, x.dtype)
    b = jnp.zeros((vocab,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    if pad:
        table = jnp.pad(table, ((0, pad), (0, 0)))
        b = jnp.pad(b, (0, pad), constant_values=_NEG)
    # Strided chunks: vocab id = row * n_chunks + c for row < chunk, chunk c < n_chunks.
    table = jnp.swapaxes(table.reshape(chunk, n_chunks, hidden), 0, 1)
    table = nn.with_logical_constraint(table, (None, "act_vocab", None))
    b = b.reshape(chunk, n_chunks).T

    valid = y != ignore_index
    safe = jnp.where(valid, y, 0)
    label_chunk, label_row = safe % n_chunks, safe // n_chunks
    n = x.shape[0]

    def body(carry, inputs):
        m, s, label_logit, best, best_id = carry
        c, w, bc = inputs
        logits = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32) + bc
        logits = nn.with_logical_constraint(logits, (None, "act_vocab"))
        cmax = jnp.max(logits, axis=-1)
        new_m = jnp.maximum(m, cmax)
        s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m[:, None]), axis=-1)
        here = jnp.take_along_axis(logits, label_row[:, None], axis=-1)[:, 0]
        label_logit = jnp.where(label_chunk == c, here, label_logit)
        arg = jnp.argmax(logits, axis=-1).astype(jnp.int32) * n_chunks + c
        # Ties go to the smaller id, as a plain argmax over the whole vocabulary does.
        better = (cmax > best) | ((cmax == best) & (arg < best_id))
        best_id = jnp.where(better, arg, best_id)
        best = jnp.maximum(best, cmax)
        return (new_m, s, label_logit, best, best_id), None

    init = (
        jnp.full((n,), _NEG, jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.full((n,), -jnp.inf, jnp.float32),
        jnp.zeros((n,), jnp.int32),
    )
    xs = (jnp.arange(n_chunks, dtype=jnp.int32), table, b)
    (m, s, label_logit, _, best_id), _ = jax.lax.scan(
        jax.checkpoint(body, prevent_cse=False), init, xs
    )
    losses = jnp.where(valid, m + jnp.log(s) - label_logit, 0.0)
    return losses.reshape(lead), best_id.reshape(lead)


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """`x[b, positions[b, p]]`: `[batch, length, ...]`, `[batch, P]` -> `[batch, P, ...]`.

    Negative positions (padding of a fixed-size position list) read position 0; mask them with
    the labels.
    """
    idx = jnp.maximum(positions, 0)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)
