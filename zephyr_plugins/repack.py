"""Load-time repacking of GPTQ tensors into the CUDA kernels' ("zk") layout.

This module is the executable specification of the layout described at the
top of ``kernels/gptq_kernels.cuh``; it is pure torch and runs on any device
(on the GPU at load time, on the CPU in the tests):

- act-order: K rows are sorted by ``g_idx`` (``perm = argsort(g_idx)``) so
  every group is a contiguous run of rows; the kernel gathers ``x[:, perm]``.
- K is padded to a multiple of 128, N to a multiple of 64.
- ``qweight``: int32 ``[Np/64, Kp/16, 32*bits]``, each 16x64 step shuffled
  into the lane order of ``mma.m16n8k16`` B fragments, and K reordered inside
  each 128-row chunk so a lane's A fragments are contiguous in x.
- ``scales`` / ``zeros``: ``[G, Np]`` in the activation dtype, each 64-column
  block stored as ``[n % 8][n // 8]``; ``zeros`` holds real zero points and is
  empty when all equal ``2**(bits-1)``.

:func:`unrepack` inverts :func:`repack` bit for bit (the scales exactly when
they were repacked in their own dtype).

Example::

    >>> r = repack(qweight, qzeros, scales, g_idx, bits=4, group_size=128, zero_offset=1, dtype=torch.float16)
    >>> ck = unrepack(r, bits=4, in_features=K, out_features=N, zero_offset=1)
    >>> torch.equal(ck["qweight"], qweight)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_cols, pack_rows, unpack_rows
from .reference import trivial_g_idx, unpack_zeros

CHUNK_K = 128  # K padding: rows per main-loop chunk of the kernel
BLOCK_N = 64  # N padding: columns per kernel block


@dataclass
class Repacked:
    """A layer's tensors in the kernels' layout (see the module docstring)."""

    qweight: torch.Tensor  # int32 [Np/64, Kp/16, 32*bits]
    scales: torch.Tensor  # dtype [G, Np], shuffled
    zeros: torch.Tensor  # dtype [G, Np], shuffled, or empty (all 2**(bits-1))
    perm: torch.Tensor  # int32 [K], or empty (no act-order)
    group_size: int  # -1 or rows per group


def padded_sizes(in_features: int, out_features: int) -> tuple[int, int]:
    """``(Kp, Np)``: K rounded up to 128, N rounded up to 64."""
    return -(-in_features // CHUNK_K) * CHUNK_K, -(-out_features // BLOCK_N) * BLOCK_N


def sort_perm(g_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    """``perm`` that makes groups contiguous, or an empty tensor if ``g_idx`` is trivial.

    Raises ``ValueError`` if sorting does not give every group its
    ``group_size`` consecutive rows (e.g. unequal group sizes).
    """
    k = g_idx.numel()
    trivial = trivial_g_idx(k, group_size, device=g_idx.device)
    g = g_idx.to(torch.int32)
    if torch.equal(g, trivial):
        return torch.empty(0, dtype=torch.int32, device=g_idx.device)
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], trivial):
        raise ValueError(
            f"g_idx does not split K={k} into contiguous groups of group_size={group_size} rows once sorted"
        )
    return perm.to(torch.int32)


def _shuffle_block_cols(t: torch.Tensor) -> torch.Tensor:
    """``[G, Np]``: inside each 64-column block, column ``n = t*8 + l`` goes to ``l*8 + t``."""
    g, np_ = t.shape
    return t.view(g, np_ // 64, 8, 8).transpose(2, 3).reshape(g, np_)


def _unshuffle_block_cols(t: torch.Tensor) -> torch.Tensor:
    g, np_ = t.shape
    return t.view(g, np_ // 64, 8, 8).transpose(2, 3).reshape(g, np_)


def shuffle_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Values ``int [Kp, Np]`` (K in repacked order) to the kernel's ``int32 [Np/64, Kp/16, 32*bits]``.

    Inside each 128-row chunk, row ``c*32 + i*4 + h*2 + e`` is element ``(h, e)``
    of step ``i``'s B fragment of lane ``c`` (``l % 4``), so that a lane's A
    fragments of the whole chunk are 32 contiguous columns of x.
    """
    kp, np_ = q.shape
    v = q.to(torch.int64)
    if bits == 4:
        # column n = nb*64 + (j*2 + ab)*8 + nl
        v = v.view(kp // 128, 4, 8, 2, 2, np_ // 64, 4, 2, 8)  # [chunk, c, i, h, e, nb, j, ab, nl]
        v = v.permute(5, 0, 2, 8, 1, 6, 4, 7, 3)  # [nb, chunk, i, nl, c, j, e, ab, h]: nibble = e*4 + ab*2 + h
        v = v.reshape(np_ // 64, kp // 16, 32, 4, 8)
    elif bits == 8:
        # column n = nb*64 + (hh*4 + j)*8 + nl
        v = v.view(kp // 128, 4, 8, 2, 2, np_ // 64, 2, 4, 8)  # [chunk, c, i, h, e, nb, hh, j, nl]
        v = v.permute(5, 0, 2, 6, 8, 1, 7, 3, 4)  # [nb, chunk, i, hh, nl, c, j, h, e]: byte = h*2 + e
        v = v.reshape(np_ // 64, kp // 16, 2, 32, 4, 4)
    else:
        raise ValueError(f"bits={bits} is not supported by the zk layout; allowed values: [4, 8]")
    per = 32 // bits
    shifts = torch.arange(per, device=q.device, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1) & 0xFFFFFFFF
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32).reshape(np_ // 64, kp // 16, 32 * bits)


def unshuffle_qweight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`shuffle_qweight`: ``int32 [Kp, Np]`` values."""
    nb, ks, _ = w.shape
    per = 32 // bits
    shifts = torch.arange(per, device=w.device, dtype=torch.int64) * bits
    v = ((w.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [nb, ks, 32*bits, per]
    if bits == 4:
        v = v.view(nb, ks // 8, 8, 8, 4, 4, 2, 2, 2)  # [nb, chunk, i, nl, c, j, e, ab, h]
        v = v.permute(1, 4, 2, 8, 6, 0, 5, 7, 3)  # [chunk, c, i, h, e, nb, j, ab, nl]
    else:
        v = v.view(nb, ks // 8, 8, 2, 8, 4, 4, 2, 2)  # [nb, chunk, i, hh, nl, c, j, h, e]
        v = v.permute(1, 5, 2, 7, 8, 0, 3, 6, 4)  # [chunk, c, i, h, e, nb, hh, j, nl]
    return v.reshape(ks * 16, nb * 64).to(torch.int32)


def repack(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
    zero_offset: int,
    dtype: torch.dtype,
) -> Repacked:
    """Checkpoint tensors (see :mod:`zephyr_plugins.packing`) to the zk layout, on their device."""
    k, n = g_idx.numel(), scales.shape[1]
    kp, np_ = padded_sizes(k, n)
    perm = sort_perm(g_idx, group_size)
    q = unpack_rows(qweight, bits, k)
    if perm.numel():
        q = q[perm.long()]
    qp = torch.zeros(kp, np_, dtype=torch.int32, device=q.device)
    qp[:k, :n] = q
    s = torch.zeros(scales.shape[0], np_, dtype=dtype, device=scales.device)
    s[:, :n] = scales.to(dtype)
    z = unpack_zeros(qzeros, bits, n, zero_offset)
    if bool((z == (1 << (bits - 1))).all()):
        zeros = torch.empty(0, dtype=dtype, device=scales.device)
    else:
        zp = torch.zeros(scales.shape[0], np_, dtype=dtype, device=scales.device)
        zp[:, :n] = z.to(dtype)
        zeros = _shuffle_block_cols(zp).contiguous()
    return Repacked(
        qweight=shuffle_qweight(qp, bits).contiguous(),
        scales=_shuffle_block_cols(s).contiguous(),
        zeros=zeros,
        perm=perm,
        group_size=group_size,
    )


def unrepack(
    r: Repacked, bits: int, in_features: int, out_features: int, zero_offset: int, scales_dtype=None
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors back from the zk layout (``qweight, qzeros, scales, g_idx``)."""
    k, n = in_features, out_features
    q = unshuffle_qweight(r.qweight, bits)[:k, :n]
    g_idx = trivial_g_idx(k, r.group_size, device=q.device)
    if r.perm.numel():
        perm = r.perm.long()
        orig = torch.empty_like(q)
        orig[perm] = q
        q = orig
        unsorted = torch.empty_like(g_idx)
        unsorted[perm] = g_idx
        g_idx = unsorted
    scales = _unshuffle_block_cols(r.scales)[:, :n]
    if r.zeros.numel():
        z = _unshuffle_block_cols(r.zeros)[:, :n].to(torch.int32)
    else:
        z = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int32, device=q.device)
    stored = (z - zero_offset) & ((1 << bits) - 1)
    return {
        "qweight": pack_rows(q, bits),
        "qzeros": pack_cols(stored, bits),
        "scales": scales.to(scales_dtype or scales.dtype).contiguous(),
        "g_idx": g_idx,
    }


def dequantize_repacked_reference(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, perm=None
) -> torch.Tensor:
    """fp32 ``[Kp, Np]`` weight of the zk layout (padding included).

    Repacked row ``k`` belongs to group ``min(k // group_size, G - 1)``; ``(q - z) * s``
    in fp32. Rows are in repacked order, or, given a non-empty ``perm [K]``, row
    ``k < K`` is moved to row ``perm[k]`` (the checkpoint's order).
    """
    q = unshuffle_qweight(qweight, bits).to(torch.float32)  # [Kp, Np], repacked row order
    kp = q.shape[0]
    gs = kp if group_size == -1 else group_size
    g = torch.clamp(torch.arange(kp, device=q.device) // gs, max=scales.shape[0] - 1)
    s = _unshuffle_block_cols(scales).to(torch.float32)
    z = _unshuffle_block_cols(zeros).to(torch.float32) if zeros.numel() else torch.full_like(s, 1 << (bits - 1))
    w = (q - z[g]) * s[g]
    if perm is not None and perm.numel():
        out = w.clone()
        out[perm.long()] = w[: perm.numel()]
        w = out
    return w


def gemm_repacked_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor,
    bits: int,
    group_size: int,
    size_n: int,
) -> torch.Tensor:
    """Pure-torch ``x [M, K] @ W`` on the zk layout (fp32 accumulation, output ``x.dtype [M, N]``)."""
    m, k = x.shape
    w = dequantize_repacked_reference(qweight, scales, zeros, bits, group_size)
    kp = w.shape[0]
    xs = x[:, perm.long()] if perm.numel() else x
    xp = torch.zeros(m, kp, dtype=torch.float32, device=x.device)
    xp[:, :k] = xs.to(torch.float32)
    return (xp @ w)[:, :size_n].to(x.dtype)
