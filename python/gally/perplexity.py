"""Perplexity with llama.cpp's protocol (`llama-perplexity -c 512`); `gally perplexity` (cli/perplexity.py).

The text's tokens (no BOS, no special tokens) are cut into non-overlapping windows of `ctx`
tokens; the incomplete tail window is dropped. Each window runs in a fresh context and scores its
second half only, so every scored token sees at least ctx/2 tokens of context:

    window w = t[0 .. ctx-1];  scored tokens t[ctx/2 .. ctx-1], each predicted from positions < it
    NLL_i = logsumexp(logits[i-1]) - logits[i-1][t_i]
    ppl = exp(mean NLL);  stderr = ppl · sqrt(var(NLL) / (N - 1))   (llama.cpp's error propagation)

That is ctx/2 scored tokens per window (256 of 512: transformers' count, 3584 on gpl-3.0.txt);
llama.cpp scores one fewer per window and puts BOS over the first token when the model asks for it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import numpy as np


def windows(token_ids: np.ndarray, ctx: int) -> np.ndarray:
    """The complete windows of ctx tokens, [n_windows, ctx]; the tail shorter than ctx is dropped."""
    n = len(token_ids) // ctx
    return token_ids[: n * ctx].reshape(n, ctx)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits [n, vocab] → float64 [n]."""
    peak = logits.max(axis=1, keepdims=True)
    sum_exp = np.exp(logits - peak).sum(axis=1, dtype=np.float64)
    target_logit = np.take_along_axis(logits, targets[:, None].astype(np.int64), axis=1)[:, 0]
    return np.log(sum_exp) + peak[:, 0].astype(np.float64) - target_logit.astype(np.float64)


def summarize(nll: np.ndarray) -> dict:
    """ppl = exp(mean NLL) and its standard error, as llama.cpp's perplexity tool computes them."""
    n = len(nll)
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float((nll * nll).mean()) - mean * mean
    stderr = ppl * math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0
    return {"ppl": ppl, "stderr": stderr, "tokens_scored": n}


def _check_ctx(ctx, model) -> int:
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 2 or ctx % 2:
        raise ValueError(f"ctx must be an even integer >= 2, got {ctx!r}")
    if ctx > model.max_context:
        raise ValueError(f"ctx {ctx} exceeds the model's max_context {model.max_context}")
    return int(ctx)


def _token_ids(model, text_or_token_ids) -> np.ndarray:
    """The text's token ids (no special tokens), or the ids given, checked against the vocabulary."""
    if isinstance(text_or_token_ids, str):
        if model.tokenizer is None:
            raise ValueError(f"{model.path}: the model has no tokenizer.json; pass token ids instead of text")
        ids = np.asarray(model.tokenizer.encode(text_or_token_ids, add_special_tokens=False), dtype=np.int64)
    else:
        ids = np.asarray(text_or_token_ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"text_or_token_ids must be a string or a flat sequence of token ids, "
                             f"got an array of shape {ids.shape} and dtype {ids.dtype}")
    vocab = model.config.vocab_size
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"token id {int(ids[i])} at index {i} is outside the vocabulary [0, {vocab})")
    return ids


def _scored_logits(model, session, w: np.ndarray) -> np.ndarray:
    """Logits [ctx/2, vocab] predicting the window's second half (positions ctx/2-1 … ctx-2): the
    first ctx/2-1 tokens without the lm_head's [n, vocab] product, then the rest with all logits."""
    half = len(w) // 2
    session.reset()
    if half > 1:
        session.forward(w[: half - 1])
    return session.forward(w[half - 1:], all_logits=True)[:-1]


def kl_divergence(base, model, text_or_token_ids, ctx: int = 512,
                  progress: Optional[Callable[[int, int, float], None]] = None) -> dict:
    """How far `model` (a quantized copy, say) is from `base` on a text, per scored token of the
    perplexity protocol (llama-perplexity --kl-divergence): KL(P_base ‖ P_model), its mean, median
    and 99th percentile, the share of tokens whose top choice is the same, and both perplexities.
    progress(done, total, mean KL so far) after each window."""
    ctx = _check_ctx(ctx, model)
    _check_ctx(ctx, base)
    if base.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the models' vocabularies differ ({base.config.vocab_size} and {model.config.vocab_size})")
    ids = _token_ids(base, text_or_token_ids)
    batches = windows(ids, ctx)
    if len(batches) == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of ctx={ctx}")
    sb, sm = base.session(ctx), model.session(ctx)
    kl, same, nll_b, nll_m = [], [], [], []
    for done, w in enumerate(batches, 1):
        lb, lm = _scored_logits(base, sb, w).astype(np.float64), _scored_logits(model, sm, w).astype(np.float64)
        pb = lb - lb.max(1, keepdims=True)
        pb -= np.log(np.exp(pb).sum(1, keepdims=True))
        pm = lm - lm.max(1, keepdims=True)
        pm -= np.log(np.exp(pm).sum(1, keepdims=True))
        kl.append((np.exp(pb) * (pb - pm)).sum(1))
        same.append(lb.argmax(1) == lm.argmax(1))
        targets = w[len(w) // 2:]
        nll_b.append(-np.take_along_axis(pb, targets[:, None], 1)[:, 0])
        nll_m.append(-np.take_along_axis(pm, targets[:, None], 1)[:, 0])
        if progress is not None:
            progress(done, len(batches), float(np.concatenate(kl).mean()))
    kl_all = np.concatenate(kl)
    return {"kld_mean": float(kl_all.mean()), "kld_median": float(np.median(kl_all)),
            "kld_p99": float(np.percentile(kl_all, 99)), "same_top": float(np.concatenate(same).mean()),
            "ppl_base": math.exp(float(np.concatenate(nll_b).mean())),
            "ppl": math.exp(float(np.concatenate(nll_m).mean())), "tokens_scored": len(kl_all),
            "windows": len(batches), "ctx": ctx}


def perplexity(model, text_or_token_ids: Union[str, Sequence[int], np.ndarray], ctx: int = 512,
               progress: Optional[Callable[[int, int, float], None]] = None) -> dict:
    """Perplexity of `model` (a gally.Model) on a text or its token ids, with the protocol above.
    Returns {"ppl", "stderr", "tokens_scored", "windows", "ctx"}. progress(done, total, ppl_so_far)
    is called after each window."""
    ctx = _check_ctx(ctx, model)
    ids = _token_ids(model, text_or_token_ids)
    batches = windows(ids, ctx)
    if len(batches) == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of ctx={ctx}")
    half = ctx // 2
    session = model.session(ctx)
    nll = []
    for done, w in enumerate(batches, 1):
        nll.append(token_nll(_scored_logits(model, session, w), w[half:]))
        if progress is not None:
            progress(done, len(batches), math.exp(float(np.concatenate(nll).mean())))
    result = summarize(np.concatenate(nll))
    return {**result, "windows": len(batches), "ctx": ctx}
