"""Token selection on the device: greedy, temperature, top-k, top-p, repetition penalty.

The order is transformers' (penalty, then temperature, top-k, top-p), so a
seeded run is comparable in distribution; randomness comes from one seeded
``torch.Generator`` per generation, on the logits' device.

Example::

    >>> s = Sampler(SamplingParams(temperature=0.7, top_k=40, seed=0), batch=2, vocab_size=32000, device="cpu")
    >>> s.observe(prompt_ids_padded, prompt_mask)    # tokens that the penalty applies to
    >>> next_ids = s(logits)                          # logits: fp32 [2, 32000] -> int64 [2]
"""

from __future__ import annotations

import os

import torch

from .generation_api import SamplingParams


class Sampler:
    """Picks one token per row from fp32 logits ``[B, V]``, without host synchronisation."""

    def __init__(self, params: SamplingParams, batch: int, vocab_size: int, device):
        self.params = params
        self.greedy = params.temperature == 0
        self.penalty = params.repetition_penalty
        # Tokens seen so far (prompt and output) for the repetition penalty.
        self.seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device) if self.penalty != 1 else None
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = None if self.greedy else torch.Generator(device=device).manual_seed(seed)

    def observe(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Mark ``ids: int64 [B, S]`` (where ``valid: bool [B, S]``) as seen."""
        if self.seen is None:
            return
        if valid is None:
            self.seen.scatter_(1, ids, True)
            return
        # Padding positions go to a spare column: scattering ``valid`` itself could let
        # a padding position overwrite a real one with False.
        vocab = self.seen.shape[1]
        hit = torch.zeros(self.seen.shape[0], vocab + 1, dtype=torch.bool, device=self.seen.device)
        hit.scatter_(1, torch.where(valid, ids, vocab), True)
        self.seen |= hit[:, :vocab]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits: fp32 [B, V]`` -> ``int64 [B]``; marks the chosen tokens as seen."""
        p = self.params
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.greedy:
            nxt = logits.argmax(dim=-1)
        else:
            nxt = self._sample(logits / p.temperature, p.top_k, p.top_p)
        if self.seen is not None:
            self.seen.scatter_(1, nxt.unsqueeze(1), True)
        return nxt

    def _sample(self, logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
        vals, idx = filter_logits(logits, top_k, top_p)
        choice = torch.multinomial(torch.softmax(vals, dim=-1), 1, generator=self.generator)  # [B, 1]
        return idx.gather(1, choice).squeeze(1)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p (nucleus) filtering of ``logits: [B, V]``, as transformers' warpers do it.

    Returns ``(vals, idx)``, both ``[B, n]`` sorted by descending logit: the candidates'
    logits (``-inf`` where top-p dropped them) and their token ids.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        # Work on the k best only: top-p then sorts k values instead of the vocabulary.
        vals, idx = torch.topk(logits, top_k, dim=-1)  # [B, k], sorted descending
    else:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    if top_p < 1.0:
        probs = torch.softmax(vals, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best one always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        vals = vals.masked_fill(drop, float("-inf"))
    return vals, idx
