"""The residual add and the RMSNorm after it as one Triton kernel (CUDA decode steps).

Compiled by Inductor, ``add_rms_norm`` with an act-order permutation becomes two
kernels (the reduction, then a pointwise pass gathering ``out[..., perm]``),
because the gather needs the whole normalized row: 3.7 us for one row of 4096
in a CUDA graph on the H100, 2.8 us without a permutation (one kernel). Here
one program per row reads the row contiguously, adds, writes the sum,
reduces its squares and stores each normalized element where the permutation
puts it (a scatter through the inverse permutation, computed once): 1.6-1.8
us. (Gathering x and h at the permuted positions instead measured 3.6-3.8 us.)
The arithmetic is the reference's (``model_ops.add_rms_norm``): the
sum rounded to the activation type, the mean of squares in fp32, the
normalized value rounded to the activation type, then times the weight in
that type.

Example::

    >>> s, y = add_rms_norm(x, h, weight, 1e-5, perm)     # x, h: [..., D] fp16/bf16 on CUDA
"""

from __future__ import annotations

from typing import Optional

import torch

_kernel = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(x_ptr, h_ptr, w_ptr, inv_ptr, s_ptr, y_ptr, D, eps,
                            BLOCK: tl.constexpr, HAS_PERM: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64) * D
        offs = tl.arange(0, BLOCK)
        inside = offs < D
        x = tl.load(x_ptr + row + offs, mask=inside, other=0.0)
        h = tl.load(h_ptr + row + offs, mask=inside, other=0.0)
        w = tl.load(w_ptr + offs, mask=inside, other=0.0)
        if HAS_PERM:  # where each element goes: the inverse permutation, read contiguously
            dest = tl.load(inv_ptr + offs, mask=inside, other=0)
        else:
            dest = offs
        s = x + h
        tl.store(s_ptr + row + offs, s, mask=inside)
        sf = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / D + eps)
        y = (sf * rstd).to(s.dtype) * w
        tl.store(y_ptr + row + dest, y, mask=inside)

    return add_rms_norm_kernel


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """``argsort(perm)``, computed once per permutation tensor and kept on it (a model's permutations live
    as long as the model; the first call comes from a warm-up run, before any graph capture)."""
    inv = getattr(perm, "_zephyr_inverse", None)
    if inv is None:
        inv = torch.argsort(perm)
        perm._zephyr_inverse = inv
    return inv


def available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel serves these tensors (CUDA, fp16/bf16, weight of x's dtype, Triton importable)."""
    global _kernel
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype):
        return False
    if _kernel is None:
        try:
            _kernel = _build()
        except Exception:  # no Triton: the caller keeps its own version
            _kernel = False
    return _kernel is not False


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float,
                 perm: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(x + h, rms_norm(x + h)[..., perm])`` for ``x, h: [..., D]``; see the module docstring."""
    import triton

    d = x.shape[-1]
    x, h = x.contiguous(), h.contiguous()
    s = torch.empty_like(x)
    y = torch.empty_like(x)
    rows = x.numel() // d
    block = triton.next_power_of_2(d)
    inv = None if perm is None else inverse(perm)
    _kernel[(rows,)](x, h, weight, inv if inv is not None else weight, s, y, d, eps,
                     BLOCK=block, HAS_PERM=perm is not None, num_warps=4)  # fmt: skip
    return s, y
