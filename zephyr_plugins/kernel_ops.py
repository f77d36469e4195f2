"""Schemas of the CUDA kernel ops, with their fake and CPU reference implementations.

This is the one place that lists every schema of the compiled kernels
(``kernels/*.cu``); ``kernels/bindings.cpp`` only attaches the CUDA
implementations to them when :mod:`zephyr_plugins.kernel_build` loads the
library. Importing this module is cheap and never builds anything, so the
CPU reference paths and the fake (meta) implementations work without a GPU.

Ops:

``zephyr::gptq_gemm_repacked(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n) -> Tensor``
    Fused dequantize + matmul on the zk layout (:mod:`zephyr_plugins.repack`)
    for ``M <= 64`` rows.

    - ``x``: float16/bfloat16 ``[M, K]``, contiguous, ``M <= 64``.
    - ``qweight``: int32 ``[Np/64, Kp/16, 32*bits]``, zk layout (Kp = K rounded
      up to 128, Np = N rounded up to 64).
    - ``scales``: ``x.dtype [G, Np]``, zk column order.
    - ``zeros``: ``x.dtype [G, Np]`` real zero points in zk column order, or
      empty when all are ``2**(bits-1)``.
    - ``perm``: int32 ``[K]`` act-order row permutation (the kernel reads
      ``x[:, perm]``), or empty.
    - ``locks``: int32 ``[>= Np/64]``, zeros; the kernel's split-K semaphores.
      Each call leaves it zero again, but two calls sharing it must not run
      concurrently on different streams.
    - ``bits``: 4 or 8. ``group_size``: -1, 32, 64 or a multiple of 128.
    - ``size_n``: N.

    Returns ``x.dtype [M, N]`` (fp32 accumulation).

``zephyr::gptq_gemv_repacked(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, block_warps=0, splits=0) -> Tensor``
    The same product on the same arguments for decode batches, ``M <= 32``
    (``GEMV_MAX_ROWS``): a GEMV-style kernel (swapped-operand ``mma``, one
    dequantized weight fragment feeding the ``mma`` of up to four 8-row tiles
    of x, register double-buffered weight stream, no shared-memory pipeline).
    ``block_warps`` (4, or 8 for M <= 16) and
    ``splits`` (blocks per 64 columns along K) force the launch plan, for
    benchmarks; 0 lets the launcher plan it. Same result contract as above.

``zephyr::gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset) -> Tensor``
    The checkpoint layout dequantized to ``scales.dtype [K, N]`` (for large M,
    followed by ``x @ w`` in cuBLAS).

    - ``qweight``: int32 ``[ceil(K*bits/32), N]``, packed along K.
    - ``qzeros``: int32 ``[G, ceil(N*bits/32)]``, packed along N.
    - ``scales``: float16/bfloat16 ``[G, N]``.
    - ``g_idx``: int32 ``[K]``.
    - ``bits``: 4 or 8. ``zero_offset``: 1 for v1 ``"gptq"`` checkpoints, 0 for ``"gptq_v2"``.
"""

from __future__ import annotations

import torch

from .reference import dequantize
from .repack import gemm_repacked_reference

GEMV_MAX_ROWS = 32  # kGemvMaxM in kernels/gptq_gemv.cuh

_LIB = torch.library.Library("zephyr", "FRAGMENT")  # noqa: TOR901 - our own namespace

_LIB.define(
    "gptq_gemm_repacked(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor perm, "
    "Tensor(a!) locks, int bits, int group_size, int size_n) -> Tensor"
)
_LIB.define(
    "gptq_gemv_repacked(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor perm, "
    "Tensor(a!) locks, int bits, int group_size, int size_n, int block_warps=0, int splits=0) -> Tensor"
)
_LIB.define(
    "gptq_dequantize(Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int bits, int zero_offset) -> Tensor"
)


def _gemm_repacked_cpu(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n):
    return gemm_repacked_reference(x, qweight, scales, zeros, perm, bits, group_size, size_n)


def _gemv_repacked_cpu(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, block_warps=0, splits=0):
    torch._check(x.shape[0] <= GEMV_MAX_ROWS, lambda: f"gptq_gemv_repacked serves M <= {GEMV_MAX_ROWS}, got M={x.shape[0]}")
    return gemm_repacked_reference(x, qweight, scales, zeros, perm, bits, group_size, size_n)


def _dequantize_cpu(qweight, qzeros, scales, g_idx, bits, zero_offset):
    return dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype=scales.dtype)


# The CUDA implementations come from kernels/bindings.cpp once built.
_LIB.impl("gptq_gemm_repacked", _gemm_repacked_cpu, "CPU")
_LIB.impl("gptq_gemv_repacked", _gemv_repacked_cpu, "CPU")
_LIB.impl("gptq_dequantize", _dequantize_cpu, "CPU")


@torch.library.register_fake("zephyr::gptq_gemm_repacked")
def _gemm_repacked_fake(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n):
    torch._check(x.dim() == 2, lambda: f"x must be [M, K], got {x.dim()} dims")
    torch._check(qweight.shape[1] * 16 >= x.shape[1], lambda: "qweight covers fewer rows than x has columns")
    return x.new_empty((x.shape[0], size_n))


@torch.library.register_fake("zephyr::gptq_gemv_repacked")
def _gemv_repacked_fake(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, block_warps=0, splits=0):
    torch._check(x.dim() == 2, lambda: f"x must be [M, K], got {x.dim()} dims")
    torch._check(x.shape[0] <= GEMV_MAX_ROWS, lambda: f"gptq_gemv_repacked serves M <= {GEMV_MAX_ROWS}, got M={x.shape[0]}")
    torch._check(qweight.shape[1] * 16 >= x.shape[1], lambda: "qweight covers fewer rows than x has columns")
    return x.new_empty((x.shape[0], size_n))


@torch.library.register_fake("zephyr::gptq_dequantize")
def _dequantize_fake(qweight, qzeros, scales, g_idx, bits, zero_offset):
    return scales.new_empty((g_idx.shape[0], scales.shape[1]))


def gptq_gemm_repacked(x, qweight, scales, zeros, perm, locks, bits: int, group_size: int, size_n: int):
    """``x [M, K] @ W`` on the zk layout; see the module docstring for every argument."""
    return torch.ops.zephyr.gptq_gemm_repacked(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n)


def gptq_gemv_repacked(
    x, qweight, scales, zeros, perm, locks, bits: int, group_size: int, size_n: int, block_warps: int = 0, splits: int = 0
):
    """``x [M <= 32, K] @ W`` on the zk layout with the GEMV kernel; see the module docstring."""
    if x.dim() != 2 or x.shape[0] > GEMV_MAX_ROWS:
        # Checked here too: on the H100 image a failing TORCH_CHECK inside the extension crashed the process.
        raise ValueError(f"gptq_gemv_repacked serves x of shape [M <= {GEMV_MAX_ROWS}, K], got {tuple(x.shape)}")
    return torch.ops.zephyr.gptq_gemv_repacked(
        x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, block_warps, splits
    )


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int):
    """Checkpoint layout to ``scales.dtype [K, N]``; see the module docstring."""
    return torch.ops.zephyr.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset)
