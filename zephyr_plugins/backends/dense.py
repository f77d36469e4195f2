"""The dense backend: dequantize once, then plain matmuls (CPU runtime, tests, demos).

The reference backend dequantizes the whole weight on every call, which makes
token-by-token generation on the CPU crawl. This backend does the same
arithmetic (``x @ dequantize(...)``, fp32 dequantization) but keeps the
dequantized ``[K, N]`` weight, trading memory (4 bytes per weight in fp32)
for speed. It is never chosen automatically (lowest priority): ask for it by
name, as the runtime does on the CPU::

    >>> layer.prepare(torch.float32, backend="dense")
"""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from ..reference import dequantize
from .base import KernelBackend


class DenseBackend(KernelBackend):
    name = "dense"
    priority = -10  # below the reference: only used when named
    supported_bits = (2, 3, 4, 8)
    supported_group_sizes = None
    supported_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    device_types = ("cpu", "cuda", "mps", "xpu")

    def process_weights(self, layer) -> None:
        w = dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, self.spec.bits, self.spec.zero_offset)
        self.weight = w.to(self.spec.dtype)  # [K, N], not a buffer: the checkpoint tensors stay as they are
        # Act-order: rows grouped by g_idx (the CUDA kernels' order), so the runtime's permuted inputs
        # take the same path on the CPU as on the GPU.
        self.perm = torch.argsort(layer.g_idx.long(), stable=True) if self.spec.desc_act else None

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight)

    def input_permutation(self, layer):
        return self.perm

    def apply_permuted(self, layer, x_perm: torch.Tensor) -> torch.Tensor:
        if getattr(self, "weight_perm", None) is None:
            self.weight_perm = self.weight[self.perm]  # made on first use only (runtimes that fold permutations)
        return torch.matmul(x_perm, self.weight_perm)


@hookimpl
def register_kernels(register):
    register(DenseBackend)
