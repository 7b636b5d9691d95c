"""Analytic FLOPs of one training step per family: the model FLOPs behind MFU figures.

Each function takes the dims of a step as a mapping (`hidden`, `ffn`, `layers`, `vocab`, `seq`,
`batch`; MT5 also `decoder_len`; BEiT `image_size` and `patch_size` instead of `seq` / `vocab`)
and counts 6 x the multiply-adds per token (2 FLOPs each, forward + 2x backward) of the
projections, FFN, attention scores and weighted values, and the output head. Used by the train
bench (MFU) and by `xformers-jax compile` (next to XLA's own count).
"""

from __future__ import annotations

from collections.abc import Mapping


def text_flops(b: Mapping[str, int]) -> float:
    """An encoder LM (XLM-R, YOSO counted as softmax attention): projections, FFN, attention and
    the LM head over every token (or `head_seq` positions per row)."""
    h = b["hidden"]
    per_token = b["layers"] * (4 * h * h + 2 * h * b["ffn"])
    attn = b["layers"] * 2 * b["seq"] * h  # multiply-adds of q.k and p.v per token
    # The LM head (transform + decoder) runs on `head_seq` positions per row: every token, or
    # the masked ones only (`data.max_predictions`).
    head = b.get("head_seq", b["seq"]) * (h * h + h * b["vocab"])
    return 3 * 2 * b["batch"] * (b["seq"] * (per_token + attn) + head)


def xlnet_flops(b: Mapping[str, int]) -> float:
    """XLNet's two-stream relative attention over `mem` mems (keys `K = mem + seq`).

    The content stream: projections (q, o on the inputs, k, v on mems + inputs), the FFN, and
    per query `K` content keys, `K + seq` relative-position keys (before the shift) and `K`
    values. The position keys' projection is batch-free, or per row with `bi_data` (the two
    directions' tables are expanded to the batch before it). With `predict` > 0 (permutation LM:
    `target_mapping` of `predict` slots) the query stream adds q, o and the FFN on those slots,
    its attention at every position (the slots are mapped onto positions and back) and the LM
    head on the slots; without it, the head runs on every token. XLNet's LM head has no
    transform: `hidden x vocab` per predicted token.
    """
    h, f, s = b["hidden"], b["ffn"], b["seq"]
    k = s + b.get("mem", 0)
    p = b.get("predict", 0)
    per_row = 2 * s * h * h + 2 * k * h * h + 2 * s * h * f + s * (2 * k + (k + s)) * h
    if p:
        per_row += 2 * p * h * h + 2 * p * h * f + s * (2 * k + (k + s)) * h + 2 * p * s * h
    pos = (k + s) * h * h * (b["batch"] if b.get("bi_data") else 1)
    head = (p or s) * h * b["vocab"]
    return 3 * 2 * (b["batch"] * (b["layers"] * per_row + head) + b["layers"] * pos)


def mt5_flops(b: Mapping[str, int]) -> float:
    """Encoder + decoder (self- and cross-attention) with the gated FFN, and the LM head over the
    decoder tokens. Attention projects `hidden` to `inner = heads x d_kv` (not always `hidden`:
    mT5-small has 6 x 64 for 512); cross-attention's keys and values are the encoder tokens'."""
    h, f, n_layers, dec_len = b["hidden"], b["ffn"], b["layers"], b["decoder_len"]
    inner, s = b.get("inner", h), b["seq"]
    gated = 3 * h * f  # wi_0, wi_1, wo
    enc = s * n_layers * (4 * h * inner + gated + 2 * s * inner)
    dec = dec_len * n_layers * (6 * h * inner + gated + 2 * (dec_len + s) * inner)
    cross_kv = s * n_layers * 2 * h * inner
    return 3 * 2 * b["batch"] * (enc + dec + cross_kv + dec_len * h * b["vocab"])


def beit_flops(b: Mapping[str, int]) -> float:
    """A ViT over the patches plus the [CLS] token, with the patch embedding; MIM's head
    (`head_vocab`, BEiT's visual-token vocabulary) on every patch."""
    patches = (b["image_size"] // b["patch_size"]) ** 2
    n_tok = patches + 1
    h = b["hidden"]
    patch = 3 * b["patch_size"] ** 2 * h
    per_token = b["layers"] * (4 * h * h + 2 * h * b["ffn"] + 2 * n_tok * h) + patch
    head = patches * h * b.get("head_vocab", 0)
    return 3 * 2 * b["batch"] * (n_tok * per_token + head)
