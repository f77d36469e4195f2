"""Pure-torch GPTQ math: the oracle every kernel is tested against.

Works on any device. The dequantized weight of a GPTQ linear layer is::

    W[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])

with ``q`` unpacked from ``qweight`` and ``z`` unpacked from ``qzeros`` plus
``zero_offset`` (1 for v1 ``"gptq"`` checkpoints, which store zero points
minus one, masked to ``bits`` bits; 0 for ``"gptq_v2"``).

Example::

    >>> w = dequantize(qweight, qzeros, scales, g_idx, bits=4, zero_offset=1)  # [K, N]
    >>> y = x @ w.to(x.dtype)
"""

from __future__ import annotations

import torch

from .packing import unpack_cols, unpack_rows


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int, zero_offset: int) -> torch.Tensor:
    """Real zero points ``int32 [groups, N]`` from the stored ``qzeros``."""
    z = unpack_cols(qzeros, bits, out_features)
    return (z + zero_offset) & ((1 << bits) - 1)


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize one GPTQ layer to ``dtype [K, N]`` (computed in fp32).

    - ``qweight``: int32 ``[ceil(K*bits/32), N]``, packed along K.
    - ``qzeros``: int32 ``[groups, ceil(N*bits/32)]``, packed along N.
    - ``scales``: fp16/bf16/fp32 ``[groups, N]``.
    - ``g_idx``: int32 ``[K]``, group of each input row.
    """
    k = g_idx.shape[0]
    n = scales.shape[1]
    q = unpack_rows(qweight, bits, k).to(torch.float32)
    z = unpack_zeros(qzeros, bits, n, zero_offset).to(torch.float32)
    g = g_idx.to(torch.long)
    s = scales.to(torch.float32)
    return ((q - z[g]) * s[g]).to(dtype)


def gptq_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int,
) -> torch.Tensor:
    """``x @ dequantize(...)`` with fp32 accumulation; output in ``x.dtype``, shape ``[..., N]``."""
    w = dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset)
    out = x.reshape(-1, x.shape[-1]).to(torch.float32) @ w
    return out.to(x.dtype).reshape(*x.shape[:-1], w.shape[1])


def trivial_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """``g_idx`` of a layer without act-order: row k belongs to group ``k // group_size``."""
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device, dtype=torch.int32) // gs).to(torch.int32)


def min_max_grid(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float16):
    """Scale and zero point (fp32) of the min/max grid for ranges ``[wmin, wmax]``, which include 0.

    Symmetric grids centre on ``2**(bits-1)``. The scale is rounded to its
    storage dtype first, so that dequantizing the stored checkpoint reproduces
    exactly the grid the weights were rounded to.
    """
    maxq = (1 << bits) - 1
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = 2 * amax / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (wmax - wmin) / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-wmin / scale)
    return scale.to(scale_dtype).to(torch.float32), zero


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = True,
    g_idx: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
):
    """Round-to-nearest quantization of a float weight ``[N, K]`` (nn.Linear layout).

    Returns ``(q int32 [K, N], zeros int32 [groups, N], scales fp32 [groups, N], g_idx int32 [K])``;
    the scales are already rounded to ``scale_dtype`` (the checkpoint's).
    With ``g_idx`` given (act-order), group ``g`` holds the rows ``k`` with
    ``g_idx[k] == g``; otherwise rows are grouped in order.
    """
    w = weight.detach().to(torch.float32).t().contiguous()  # [K, N]
    k, n = w.shape
    if g_idx is None:
        g_idx = trivial_g_idx(k, group_size, w.device)
    g = g_idx.to(torch.long)
    groups = int(g.max()) + 1 if k else 0
    maxq = (1 << bits) - 1
    # Per-group minimum and maximum over the rows of that group.
    big = torch.finfo(torch.float32).max
    wmin = torch.full((groups, n), big).scatter_reduce(0, g.view(-1, 1).expand(k, n), w, "amin")
    wmax = torch.full((groups, n), -big).scatter_reduce(0, g.view(-1, 1).expand(k, n), w, "amax")
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    scale, zero = min_max_grid(wmin, wmax, bits, sym, scale_dtype)
    q = torch.clamp(torch.round(w / scale[g]) + zero[g], 0, maxq)
    return q.to(torch.int32), zero.to(torch.int32), scale, g_idx.to(torch.int32)
