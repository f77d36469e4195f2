"""Perplexity of a causal LM on a text, the standard non-overlapping-window way.

The text is tokenized once (with the tokenizer's special tokens, as in
training), cut into consecutive windows of ``seqlen`` tokens (a shorter last
window is dropped, as GPTQ papers do), and the perplexity is
``exp(mean token NLL)`` over every predicted token of every window.

Example::

    >>> ppl = perplexity(model, tokenizer, read_text("eval"), seqlen=512, max_windows=20)
"""

from __future__ import annotations

import math
from typing import Optional

import torch


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int = 2048,
    max_windows: Optional[int] = None,
    device: Optional[str | torch.device] = None,
) -> float:
    """``exp`` of the mean next-token NLL over non-overlapping ``seqlen`` windows of ``text``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("perplexity: the text is empty")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"perplexity: seqlen={seqlen!r} must be an integer >= 2")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None:
        seqlen = min(seqlen, int(max_pos))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    windows = ids.numel() // seqlen
    if windows == 0:
        raise ValueError(f"perplexity: the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        windows = min(windows, max_windows)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll, count = 0.0, 0
    for w in range(windows):
        x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()  # [1, S, V]
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += float(loss)
        count += seqlen - 1
    return math.exp(nll / count)
