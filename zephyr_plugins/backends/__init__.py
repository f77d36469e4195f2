"""Kernel backends: what turns a GPTQ layer's tensors into ``x @ W``."""

from .base import KernelBackend, LayerSpec, select_backend

__all__ = ["KernelBackend", "LayerSpec", "select_backend"]
