"""The residual add and the RMSNorm after it as one Triton kernel (CUDA, no permutation).

Compiled by Inductor, ``add_rms_norm`` of one row of 4096 takes 2.8-3.4 us
inside a CUDA graph on the H100 (one reduction kernel); this kernel, one
program of 4 warps per row reading the row once, takes 1.6-1.9 us
(``benchmarks/results/ab_H100_2026-11-27/norm_kernel.log``, rows 1-32).

With an act-order permutation (decode steps of up to 8 rows write the norm's
output in the order of the layer that reads it) this Triton kernel is not
used: Inductor makes two kernels of it (3.7 us for one row), and both ways of
doing it in Triton measured no better: gathering x and h at the permuted
positions 3.6-3.8 us, scattering the output through the inverse permutation
6.3 us. The CUDA kernel ``zephyr::add_rms_norm_permuted``
(``kernels/add_rms_norm.cu``) serves those rows instead: it stages the
normalized row in shared memory and gathers from there.

The arithmetic is the reference's (``model_ops.add_rms_norm``): the sum
rounded to the activation type, the mean of squares in fp32, the normalized
value rounded to the activation type, then times the weight in that type.

Example::

    >>> s, y = add_rms_norm(x, h, weight, 1e-5)     # x, h: [..., D] fp16/bf16 on CUDA
"""

from __future__ import annotations

import torch

_kernel = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(x_ptr, h_ptr, w_ptr, s_ptr, y_ptr, D, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * D
        offs = tl.arange(0, BLOCK)
        inside = offs < D
        x = tl.load(x_ptr + row + offs, mask=inside, other=0.0)
        h = tl.load(h_ptr + row + offs, mask=inside, other=0.0)
        w = tl.load(w_ptr + offs, mask=inside, other=0.0)
        s = x + h
        tl.store(s_ptr + row + offs, s, mask=inside)
        sf = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / D + eps)
        y = (sf * rstd).to(s.dtype) * w
        tl.store(y_ptr + row + offs, y, mask=inside)

    return add_rms_norm_kernel


MAX_DIM = 16384  # one program holds a whole row in registers


def available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel serves these tensors: CUDA, fp16/bf16, a weight of x's dtype and last dimension
    (at most ``MAX_DIM``), rows to normalize, and Triton importable."""
    global _kernel
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype):
        return False
    if x.dim() == 0 or weight.dim() != 1 or weight.numel() != x.shape[-1] or not 0 < x.shape[-1] <= MAX_DIM:
        return False
    if x.numel() == 0:
        return False
    if _kernel is None:
        try:
            _kernel = _build()
        except Exception:  # no Triton: the caller keeps its own version
            _kernel = False
    return _kernel is not False


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + h, rms_norm(x + h))`` for ``x, h: [..., D]``; call :func:`available` first."""
    import triton

    d = x.shape[-1]
    x, h, weight = x.contiguous(), h.contiguous(), weight.contiguous()
    s = torch.empty_like(x)
    y = torch.empty_like(x)
    block = triton.next_power_of_2(d)
    _kernel[(x.numel() // d,)](x, h, weight, s, y, d, eps, BLOCK=block, num_warps=4)
    return s, y
