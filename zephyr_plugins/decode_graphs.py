"""One decode step of a :class:`~zephyr_plugins.model.Transformer`, replayed from CUDA graphs.

A decode step is ~300 small kernels for a 7B model; launched from Python they
take longer than the GPU needs to run them. Captured once into a CUDA graph
per (batch bucket, attended-length bucket), a step is one launch.

- Batch buckets are 1, 2, 4, 8, ... up to ``max_batch_size``: a batch of 3
  runs in the graph for 4 (the extra row is ignored).
- The attended length is rounded up to a multiple of ``kv_step`` slots, so a
  short conversation does not read the whole cache, while the number of
  graphs stays small. Graphs are captured lazily, on first use.
- Inputs (token, slot, padding) live in static buffers; the slot is a device
  tensor, so one graph serves every step within its length bucket.

On the CPU (or with ``enabled=False``) the same step runs eagerly.

Example::

    >>> steps = DecodeGraphs(model)                       # after model.setup_cache(...)
    >>> logits = steps(tokens, slot=17, pad=pad)          # tokens: int64 [B] -> fp32 [B, V]
"""

from __future__ import annotations

from typing import Optional

import torch


def batch_buckets(max_batch_size: int) -> list[int]:
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


class DecodeGraphs:
    def __init__(self, model, enabled: Optional[bool] = None, kv_step: int = 256):
        self.model = model
        device = model.tok_embeddings.weight.device
        self.enabled = device.type == "cuda" if enabled is None else enabled
        self.kv_step = kv_step
        self.buckets = batch_buckets(model.max_batch_size)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.device = device

    def bucket(self, batch: int) -> int:
        """The batch size a batch of ``batch`` rows runs at (itself when graphs are off)."""
        if batch > self.model.max_batch_size:
            raise ValueError(f"batch of {batch} rows exceeds max_batch_size={self.model.max_batch_size}")
        if not self.enabled:
            return batch
        return next(b for b in self.buckets if b >= batch)

    def kv_len(self, slot: int) -> int:
        return min(-(-(slot + 1) // self.kv_step) * self.kv_step, self.model.max_seq_len)

    def __call__(self, tokens: torch.Tensor, slot: int, pad: torch.Tensor) -> torch.Tensor:
        """Logits ``fp32 [B, V]`` for ``tokens: int64 [B]`` written at cache ``slot``.

        With graphs, the result is a static buffer overwritten by the next call.
        """
        kv_len = self.kv_len(slot)
        if not self.enabled:
            start = torch.tensor([slot], device=tokens.device)
            return self.model(tokens.view(-1, 1), start, pad, kv_len=kv_len)[:, 0]
        bsz = tokens.shape[0]
        tok, start, pad_buf = self._static_inputs(bsz)
        tok.copy_(tokens.view(-1, 1), non_blocking=True)
        start.fill_(slot)
        pad_buf.copy_(pad, non_blocking=True)
        entry = self.graphs.get((bsz, kv_len))
        if entry is None:
            entry = self._capture(bsz, kv_len)
        graph, logits = entry
        graph.replay()
        return logits

    def _static_inputs(self, bsz: int):
        if bsz not in self._inputs:
            dev = self.device
            self._inputs[bsz] = (
                torch.zeros(bsz, 1, dtype=torch.long, device=dev),
                torch.zeros(1, dtype=torch.long, device=dev),
                torch.zeros(bsz, dtype=torch.long, device=dev),
            )
        return self._inputs[bsz]

    @torch.inference_mode()
    def _capture(self, bsz: int, kv_len: int):
        tok, start, pad = self._static_inputs(bsz)
        # Warm-up runs on a side stream (as capture requires) compute the real step with
        # the real inputs: their cache writes are the very values the replay writes again.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(tok, start, pad, kv_len=kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model(tok, start, pad, kv_len=kv_len)[:, 0]
        self.graphs[(bsz, kv_len)] = (graph, logits)
        return graph, logits
