"""Static KV cache, the attention mask, and SDPA attention for (chunked) prefill.

The cache is preallocated for ``max_batch_size x max_seq_len`` so that a
decode step has fixed shapes and addresses (what CUDA graphs need). Every
position is kept: sliding-window attention is exact beyond the window because
the mask, not the cache, drops keys that lie outside it.

Rows are left-padded: row ``b`` holds real tokens from slot ``pad[b]`` on, so
all rows write the same slot at each step.

Example::

    >>> cache = KVCache(max_batch_size=2, max_seq_len=64, n_kv_heads=2, head_dim=16, dtype=torch.float32)
    >>> k_all, v_all = cache.update(torch.tensor([0, 1]), k, v, kv_len=64)   # k, v: [2, 2, 2, 16]
    >>> mask = attention_mask(torch.tensor([0, 1]), pad=torch.tensor([0, 1]), kv_len=64, window=None)
    >>> y = prefill_attention(q, k_all, v_all, mask)                            # q: [2, H, 2, 16]
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of one layer: ``[max_batch_size, n_kv_heads, max_seq_len, head_dim]`` each.

    ``locks`` are the fused decode-attention kernel's split semaphores (zeros between calls).
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.locks = torch.zeros(max_batch_size * n_kv_heads, dtype=torch.int32, device=device)

    def update(self, cache_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write ``k, v: [B, Hkv, S, hd]`` at slots ``cache_index: int64 [S]``; return the first ``kv_len`` slots.

        ``index_copy_`` with a device index keeps the slot out of the graph's
        shape, so one captured graph serves every decode step.
        """
        bsz = k.shape[0]
        k_cache, v_cache = self.k[:bsz], self.v[:bsz]
        k_cache.index_copy_(2, cache_index, k.to(k_cache.dtype))
        v_cache.index_copy_(2, cache_index, v.to(v_cache.dtype))
        return k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]


def attention_mask(slots: torch.Tensor, pad: torch.Tensor, kv_len: int, window: Optional[int]) -> torch.Tensor:
    """``bool [B, 1, S, kv_len]``: may the query at slot ``slots[s]`` of row ``b`` see key slot ``j``?

    Causal, not in the left padding, and (with a sliding window ``W``) ``slot - j < W``
    (transformers' Mistral convention: a query sees itself and the ``W - 1`` keys before it).
    A padding query sees only itself, so its softmax stays finite.
    """
    j = torch.arange(kv_len, device=slots.device).view(1, 1, -1)  # [1, 1, L]
    i = slots.view(1, -1, 1)  # [1, S, 1]
    ok = (j <= i) & (j >= pad.view(-1, 1, 1))  # [B, S, L]
    if window is not None:
        ok = ok & (i - j < window)
    ok = ok | (j == i)
    return ok.unsqueeze(1)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of ``q: [B, H, S, hd]`` over ``k, v: [B, Hkv, L, hd]`` through SDPA -> ``[B, H, S, hd]``.

    ``mask``: bool ``[B, 1, S, L]``, or ``None`` for plain causal attention (``S == L``),
    which lets SDPA pick its flash kernel. (Decoding, one query per row, uses
    :func:`zephyr_plugins.model_ops.decode_attention`.)
    """
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h:
        # SDPA's fused kernels want equal head counts; prefill is compute-bound, the copy is cheap.
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
