"""Shared pieces of the GPU tests (tests/gpu): the kernels built once, NaN-poisoned allocator blocks, tolerances."""

import pytest
import torch

# Relative mean error vs an fp32 reference (measured on an H100 80GB HBM3).
TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def cuda_with_kernels() -> torch.device:
    """The CUDA device with our kernels built (skips without CUDA; fails if the build fails)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from zephyr_plugins.kernel_build import ensure_built

    ok, why = ensure_built()
    assert ok, why
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device("cuda")


def poison_allocator() -> None:
    """Fill freed caching-allocator blocks with NaN, so an output or workspace element a kernel skips shows up."""
    junk = torch.empty(64 << 20, dtype=torch.float32, device="cuda").fill_(float("nan"))
    del junk
