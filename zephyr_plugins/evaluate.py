"""Perplexity of a causal LM on a text, the standard non-overlapping-window way.

The text is tokenized once (with the tokenizer's special tokens, as in
training), cut into consecutive windows of ``seqlen`` tokens (a shorter last
window is dropped, as GPTQ papers do), and the perplexity is
``exp(mean token NLL)`` over every predicted token of every window.

``max_windows`` evaluates a subset: the first windows, or (``spread=True``)
windows evenly spaced over the whole text, which samples more articles of a
long text for the same compute. :func:`window_nlls` gives the per-window
NLL sums, for paired comparisons of two models on the same windows.

Example::

    >>> ppl = perplexity(model, tokenizer, read_text("eval"), seqlen=512, max_windows=20)
    >>> nll = window_nlls(model, tokenizer, read_text("eval"), seqlen=512, max_windows=32, spread=True)
    >>> ppl_from_nlls(nll, seqlen=512)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def window_starts(n_tokens: int, seqlen: int, max_windows: Optional[int] = None, spread: bool = False) -> list[int]:
    """Token offsets of the evaluated windows (all whole windows, or ``max_windows`` of them)."""
    windows = n_tokens // seqlen
    if windows == 0:
        raise ValueError(f"perplexity: the text has {n_tokens} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        if not isinstance(max_windows, int) or max_windows < 1:
            raise ValueError(f"perplexity: max_windows={max_windows!r} must be a positive integer")
        if max_windows < windows:
            # Evenly spaced window indices (always whole, non-overlapping windows).
            picked = [w * windows // max_windows for w in range(max_windows)] if spread else range(max_windows)
            return [w * seqlen for w in picked]
    return [w * seqlen for w in range(windows)]


def _window_len(model, seqlen: int) -> int:
    """``seqlen`` clipped to the model's ``max_position_embeddings`` (when its config has one)."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return seqlen if max_pos is None else min(seqlen, int(max_pos))


@torch.no_grad()
def window_nlls(
    model,
    tokenizer,
    text: str,
    seqlen: int = 2048,
    max_windows: Optional[int] = None,
    device: Optional[str | torch.device] = None,
    spread: bool = False,
) -> list[float]:
    """Summed next-token NLL of each evaluated window (``seqlen - 1`` predicted tokens each)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("perplexity: the text is empty")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"perplexity: seqlen={seqlen!r} must be an integer >= 2")
    seqlen = _window_len(model, seqlen)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    starts = window_starts(ids.numel(), seqlen, max_windows, spread)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out = []
    for s in starts:
        x = ids[s : s + seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()  # [1, S, V]
        out.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")))
    return out


def ppl_from_nlls(nlls: Sequence[float], seqlen: int) -> float:
    """Perplexity from :func:`window_nlls` output (every window predicts ``seqlen - 1`` tokens)."""
    return math.exp(sum(nlls) / (len(nlls) * (seqlen - 1)))


def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int = 2048,
    max_windows: Optional[int] = None,
    device: Optional[str | torch.device] = None,
    spread: bool = False,
) -> float:
    """``exp`` of the mean next-token NLL over non-overlapping ``seqlen`` windows of ``text``."""
    nlls = window_nlls(model, tokenizer, text, seqlen, max_windows, device, spread)  # checks the arguments
    return ppl_from_nlls(nlls, _window_len(model, seqlen))
