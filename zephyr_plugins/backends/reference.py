"""The reference backend: pure torch, every device, every bit width.

Slow but exact; it is what runs on the CPU and what every kernel is tested
against.
"""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from ..ops import gptq_gemm
from .base import KernelBackend


class ReferenceBackend(KernelBackend):
    name = "reference"
    priority = 0
    supported_bits = (2, 3, 4, 8)
    supported_group_sizes = None
    supported_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    device_types = ("cpu", "cuda", "meta", "mps", "xpu")

    def apply(self, layer, x):
        return gptq_gemm(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, self.spec.bits, self.spec.zero_offset)


@hookimpl
def register_kernels(register):
    register(ReferenceBackend)
