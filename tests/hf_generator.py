"""A test double of the Generator protocol on a transformers model (KV-cached decode loop).

Used to test the LangChain adapter's dependency injection (``ChatZephyr(generator=...)``)
independently of the runtime. It serialises calls with a lock (the protocol allows
that), samples with a seeded ``torch.Generator`` so a stream and a completion with the
same seed pick the same tokens, and stops *after* the token that completes a stop
string: ``complete`` cuts exactly, while ``stream_complete`` yields the raw pieces
(stop string included), so the adapter's own stream cutting is what gets tested.
"""

from __future__ import annotations

import threading
from typing import Iterator, Optional, Sequence

import torch

from zephyr_plugins.generation_api import Completion, SamplingParams, StreamChunk


class HFGenerator:
    def __init__(self, model, tokenizer, name: str = "hf-generator"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.lock = threading.Lock()
        self.calls = 0

    def complete(self, prompts: Sequence[str], params: SamplingParams, cancel=None) -> list[Completion]:
        out = []
        for prompt in prompts:
            text, n_prompt, n_new, reason = "", 0, 0, "stop"
            for piece, n_prompt, n_new, reason in self._decode(prompt, params, cancel):
                text += piece
            cut = [p for p in (text.find(s) for s in params.stop) if p >= 0]
            out.append(Completion(text[: min(cut)] if cut else text, n_prompt, n_new, reason))
        return out

    def stream_complete(self, prompt: str, params: SamplingParams, cancel=None) -> Iterator[StreamChunk]:
        for piece, n_prompt, n_new, reason in self._decode(prompt, params, cancel):
            yield StreamChunk(piece, n_prompt, n_new, reason)

    @torch.inference_mode()
    def _decode(self, prompt: str, params: SamplingParams, cancel) -> Iterator[tuple]:
        tok = self.tokenizer
        with self.lock:
            self.calls += 1
            ids = tok(prompt, return_tensors="pt").input_ids
            n_prompt = ids.shape[1]
            rng = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
            out = self.model(ids, use_cache=True)
            seen = ids[0].tolist()
            new: list[int] = []
            shown = ""
            reason = "length"
            for _ in range(params.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    reason = "stop"
                    break
                next_id = self._pick(out.logits[0, -1].float(), seen, params, rng)
                if next_id == tok.eos_token_id:
                    reason = "stop"
                    break
                new.append(next_id)
                seen.append(next_id)
                text = tok.decode(new, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    piece, shown = text[len(shown):], text
                    if any(s in text for s in params.stop):
                        yield piece, n_prompt, len(new), "stop"
                        return
                    if piece:
                        yield piece, n_prompt, len(new), None
                out = self.model(torch.tensor([[next_id]]), past_key_values=out.past_key_values, use_cache=True)
            yield "", n_prompt, len(new), reason

    @staticmethod
    def _pick(logits: torch.Tensor, seen: list[int], p: SamplingParams, rng: torch.Generator) -> int:
        if p.repetition_penalty != 1.0:
            idx = torch.tensor(sorted(set(seen)))
            vals = logits[idx]
            logits[idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, -1)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=rng))


def load_hf_generator(folder: str, name: Optional[str] = None) -> HFGenerator:
    """Load a GPTQ checkpoint with ``zephyr_plugins.load`` and wrap it."""
    from zephyr_plugins import load

    model, tok = load(folder)
    return HFGenerator(model, tok, name or folder)
