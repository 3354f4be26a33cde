"""Log-likelihood of a continuation given a context: the primitive of zero-shot multiple choice.

Tokenization follows lm-evaluation-harness: trailing spaces of the context move to the
continuation, the pair is encoded as one string, and the continuation's tokens are those after the
context's own encoding. Every request starts with an EOS token (the document boundary the model
saw in training). A request longer than `max_len` keeps its rightmost `max_len` tokens.
"""

from __future__ import annotations

import numpy as np

from nl_jax.eval.runner import ModelRunner


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[np.ndarray, np.ndarray]:
    """(context tokens, continuation tokens) as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = np.asarray(tokenizer.encode(context + continuation), np.int32)
    ctx = np.asarray(tokenizer.encode(context), np.int32) if context else np.zeros((0,), np.int32)
    return ctx, whole[len(ctx) :]


def score_token_pairs(
    runner: ModelRunner, pairs: list[tuple[np.ndarray, np.ndarray]], *, prefix_id: int, max_len: int
) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), whether every continuation token is the argmax) per
    (context tokens, continuation tokens) pair. Pairs are sorted by length for dense batches."""
    rows = []
    for ctx, cont in pairs:
        if len(cont) == 0:
            raise ValueError("empty continuation: nothing to score")
        seq = np.concatenate([[prefix_id], ctx, cont]).astype(np.int32)[-(max_len + 1) :]
        rows.append((seq[:-1], seq[1:], len(cont)))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    chunk = max(runner.batch_size * 8, 1)
    for start in range(0, len(order), chunk):
        ids = order[start : start + chunk]
        width = len(rows[ids[0]][0])
        xs = np.zeros((len(ids), width), np.int32)
        ys = np.zeros((len(ids), width), np.int32)
        for r, i in enumerate(ids):
            x, y, _ = rows[i]
            xs[r, : len(x)], ys[r, : len(y)] = x, y
        lp, ok = runner.score(xs, ys)
        for r, i in enumerate(ids):
            n, k = len(rows[i][0]), rows[i][2]
            results[i] = (float(lp[r, n - k : n].sum()), bool(ok[r, n - k : n].all()))
    return results


def loglikelihood(
    runner: ModelRunner, tokenizer, requests: list[tuple[str, str]], *, max_len: int
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context, continuation) string pair."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    return score_token_pairs(runner, pairs, prefix_id=tokenizer.eos_id, max_len=max_len)
