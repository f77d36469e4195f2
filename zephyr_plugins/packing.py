"""Bit packing of GPTQ tensors, exactly as AutoGPTQ / TheBloke checkpoints store them.

Quantized values are laid out as one little-endian bit stream inside int32
words: value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream, so for
2, 4 and 8 bits word ``w`` holds values ``w*32/bits ...`` with value ``j`` of
the word at shift ``j*bits``; for 3 bits, 32 values fill three words and two of
them straddle a word boundary (AutoGPTQ's 3-bit layout).

- ``qweight``: packed along K (dim 0): ``int32 [ceil(K*bits/32), N]``.
- ``qzeros``:  packed along N (dim 1): ``int32 [groups, ceil(N*bits/32)]``.

Example::

    >>> q = torch.randint(0, 16, (128, 8), dtype=torch.int32)
    >>> torch.equal(unpack_rows(pack_rows(q, 4), 4, 128), q)
    True
"""

from __future__ import annotations

import torch

from .config import SUPPORTED_BITS, packed_words


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed values: {list(SUPPORTED_BITS)}")


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` (integers in ``[0, 2**bits)``, shape ``[K, N]``) along dim 0.

    Returns ``int32 [ceil(K*bits/32), N]``.
    """
    _check_bits(bits)
    if values.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor, got shape {tuple(values.shape)}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"values to pack must lie in [0, {1 << bits}) for {bits}-bit packing")
    k, n = v.shape
    words = packed_words(k, bits)
    out = torch.zeros(words, n, dtype=torch.int64, device=v.device)
    if 32 % bits == 0:
        per = 32 // bits
        pad = words * per - k
        if pad:
            v = torch.cat([v, v.new_zeros(pad, n)])
        v = v.view(words, per, n)
        shifts = (torch.arange(per, device=v.device, dtype=torch.int64) * bits).view(1, per, 1)
        out = (v << shifts).sum(dim=1)
    else:
        offset = torch.arange(k, device=v.device, dtype=torch.int64) * bits
        word, shift = offset // 32, offset % 32
        out.index_add_(0, word, (v << shift.view(-1, 1)) & 0xFFFFFFFF)
        spill = shift + bits > 32
        if bool(spill.any()):
            idx = spill.nonzero().flatten()
            out.index_add_(0, word[idx] + 1, v[idx] >> (32 - shift[idx]).view(-1, 1))
    return _to_int32(out)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``int32 [words, N]`` to ``int32 [rows, N]``."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D tensor, got shape {tuple(packed.shape)}")
    if packed.shape[0] != packed_words(rows, bits):
        raise ValueError(
            f"packed tensor has {packed.shape[0]} rows but {rows} values of {bits} bits need "
            f"{packed_words(rows, bits)}"
        )
    p = packed.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, device=p.device, dtype=torch.int64) * bits).view(1, per, 1)
        v = ((p.unsqueeze(1) >> shifts) & mask).reshape(-1, p.shape[1])[:rows]
    else:
        offset = torch.arange(rows, device=p.device, dtype=torch.int64) * bits
        word, shift = offset // 32, (offset % 32).view(-1, 1)
        nxt = torch.clamp(word + 1, max=p.shape[0] - 1)
        wide = p[word] | (p[nxt] << 32)  # 64-bit window covers any straddle
        v = (wide >> shift) & mask
    return v.to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[G, N]`` along dim 1 (the ``qzeros`` layout): ``int32 [G, ceil(N*bits/32)]``."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`."""
    return unpack_rows(packed.t(), bits, cols).t().contiguous()


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    # Reinterpret the low 32 bits as a signed int32 (two's complement), as the
    # checkpoints store them.
    x = x & 0xFFFFFFFF
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32)
