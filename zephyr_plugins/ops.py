"""The kernel boundary: ``torch.library`` ops.

``zephyr::gptq_gemm`` multiplies activations by a GPTQ weight given in the
checkpoint's own layout. Its implementation for every device is the pure-torch
reference (:mod:`zephyr_plugins.reference`); kernel backends define their own
ops on their own (repacked) layouts, each with a reference implementation of
the same signature registered for the CPU.

Because these are real ops with fake (meta) implementations, they trace under
``torch.compile`` and can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch

from .reference import gptq_gemm_reference

_LIB = torch.library.Library("zephyr", "FRAGMENT")  # noqa: TOR901 - our own namespace

_LIB.define(
    "gptq_gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, "
    "int bits, int zero_offset) -> Tensor"
)


def _gptq_gemm_impl(x, qweight, qzeros, scales, g_idx, bits: int, zero_offset: int):
    return gptq_gemm_reference(x, qweight, qzeros, scales, g_idx, bits, zero_offset)


# The reference is plain torch, so it serves every device.
_LIB.impl("gptq_gemm", _gptq_gemm_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("zephyr::gptq_gemm")
def _gptq_gemm_fake(x, qweight, qzeros, scales, g_idx, bits, zero_offset):
    torch._check(x.shape[-1] == g_idx.shape[0], lambda: "x's last dim must equal g_idx's length (K)")
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


def gptq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int,
) -> torch.Tensor:
    """``x @ W`` for a GPTQ weight in checkpoint layout.

    - ``x``: fp16/bf16/fp32 ``[..., K]``.
    - ``qweight``: int32 ``[ceil(K*bits/32), N]``, packed along K.
    - ``qzeros``: int32 ``[groups, ceil(N*bits/32)]``, packed along N.
    - ``scales``: ``[groups, N]``.
    - ``g_idx``: int32 ``[K]``.
    - ``zero_offset``: 1 for v1 (``"gptq"``) checkpoints, 0 for ``"gptq_v2"``.

    Returns ``x.dtype [..., N]``.
    """
    return torch.ops.zephyr.gptq_gemm(x, qweight, qzeros, scales, g_idx, bits, zero_offset)
