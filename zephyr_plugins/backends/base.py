"""The kernel-backend contract and backend selection.

A backend declares what it supports as class attributes and answers
:meth:`KernelBackend.can_implement` with ``(ok, reason)``. Selection walks the
registered backends by priority and, when none fits, raises once with every
backend's reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..errors import KernelUnavailableError


@dataclass(frozen=True)
class LayerSpec:
    """Everything a backend needs to decide whether it can serve a layer."""

    in_features: int  # K
    out_features: int  # N
    bits: int
    group_size: int  # -1 = one group over all of K
    sym: bool
    desc_act: bool  # g_idx is not the trivial k // group_size
    zero_offset: int  # 1 for v1 checkpoints, 0 for v2
    dtype: torch.dtype  # activation dtype
    device_type: str  # "cpu", "cuda", ...
    capability: Optional[tuple[int, int]] = None  # CUDA compute capability, if any

    @property
    def num_groups(self) -> int:
        gs = self.in_features if self.group_size == -1 else self.group_size
        return -(-self.in_features // gs)

    @property
    def has_partial_group(self) -> bool:
        return self.group_size != -1 and self.in_features % self.group_size != 0


class KernelBackend:
    """Base class of kernel backends (one backend per file).

    Subclasses set the ``supported_*`` attributes and implement
    :meth:`process_weights` and :meth:`apply`. One instance serves one layer.
    """

    name: ClassVar[str] = "base"
    priority: ClassVar[int] = 0  # higher is tried first
    supported_bits: ClassVar[tuple[int, ...]] = ()
    supported_group_sizes: ClassVar[Optional[tuple[int, ...]]] = None  # None: any
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    device_types: ClassVar[tuple[str, ...]] = ()
    min_capability: ClassVar[Optional[tuple[int, int]]] = None

    def __init__(self, spec: LayerSpec):
        self.spec = spec

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, Optional[str]]:
        """``(True, None)`` if this backend can serve ``spec``, else ``(False, reason)``."""
        if spec.device_type not in cls.device_types:
            return False, f"device {spec.device_type!r} not in {list(cls.device_types)}"
        if spec.bits not in cls.supported_bits:
            return False, f"bits={spec.bits} not in {list(cls.supported_bits)}"
        if cls.supported_group_sizes is not None and spec.group_size not in cls.supported_group_sizes:
            return False, f"group_size={spec.group_size} not in {list(cls.supported_group_sizes)}"
        if spec.dtype not in cls.supported_dtypes:
            return False, f"dtype {spec.dtype} not in {[str(d) for d in cls.supported_dtypes]}"
        if cls.min_capability is not None:
            if spec.capability is None or spec.capability < cls.min_capability:
                return False, f"needs compute capability >= {cls.min_capability}, device has {spec.capability}"
        return True, None

    def process_weights(self, layer: torch.nn.Module) -> None:
        """Turn the layer's checkpoint tensors into this backend's layout, once.

        The checkpoint tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``)
        must stay readable unchanged on the layer, so that saving writes the
        original checkpoint back.
        """

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] -> [..., N]`` without bias."""
        raise NotImplementedError

    def can_rebuild_qweight(self, layer: torch.nn.Module) -> bool:
        """Whether, after :meth:`process_weights`, this backend never reads ``layer.qweight`` again and
        :meth:`rebuild_qweight` gives it back bit for bit from the backend's own tensors.

        If so the layer drops its copy (the largest tensor) and rebuilds it only
        when it is asked for (``state_dict``, ``.to()``, another backend).
        """
        return False

    def rebuild_qweight(self, layer: torch.nn.Module) -> torch.Tensor:
        """The checkpoint's ``qweight``, rebuilt (see :meth:`can_rebuild_qweight`)."""
        raise NotImplementedError(f"backend {self.name!r} cannot rebuild qweight")

    def input_permutation(self, layer: torch.nn.Module) -> Optional[torch.Tensor]:
        """int64 ``[K]`` indices ``perm`` if :meth:`apply_permuted` takes ``x[..., perm]``, else None.

        Act-order kernels read x in their own row order and gather it first; a
        caller that produces x itself (a norm, an activation) can write it in
        that order and save the gather.
        """
        return None

    def apply_permuted(self, layer: torch.nn.Module, x_perm: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` of ``x`` given ``x_perm = x[..., perm]`` (see :meth:`input_permutation`)."""
        raise NotImplementedError(f"backend {self.name!r} has no input permutation")

    def apply_swiglu(self, layer: torch.nn.Module, x: torch.Tensor, permuted: bool = False,
                     out_index: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """``silu(y[..., :F]) * y[..., F:]`` of ``y = apply(x)`` (a fused gate/up layer, ``N = 2F``) in one
        step, or None where this backend does not fuse it for this input (the caller then runs
        :meth:`apply` and the activation itself).

        ``permuted``: x is ``x[..., perm]`` as for :meth:`apply_permuted`. ``out_index``: int64 ``[F]``;
        column ``j`` of the result is written at ``out_index[j]``.
        """
        return None


def select_backend(spec: LayerSpec, backends=None, *, prefer: Optional[str] = None) -> type[KernelBackend]:
    """The first registered backend that can serve ``spec``.

    ``prefer`` (or the ``ZEPHYR_KERNEL`` environment variable) names a backend to
    use; it must be able to serve the layer. Raises
    :class:`~zephyr_plugins.errors.KernelUnavailableError` listing every reason.
    """
    import os

    from ..plugins import kernel_backends

    candidates = list(backends) if backends is not None else kernel_backends()
    prefer = prefer or os.environ.get("ZEPHYR_KERNEL") or None
    if prefer:
        named = [b for b in candidates if b.name == prefer]
        if not named:
            raise KernelUnavailableError(
                f"kernel backend {prefer!r} is not registered; registered: {[b.name for b in candidates]}"
            )
        candidates = named
    reasons = []
    for backend in candidates:
        ok, why = backend.can_implement(spec)
        if ok:
            return backend
        reasons.append(f"{backend.name}: {why}")
    raise KernelUnavailableError(
        f"no kernel backend can serve a {spec.bits}-bit layer (K={spec.in_features}, N={spec.out_features}, "
        f"group_size={spec.group_size}, dtype={spec.dtype}, device={spec.device_type}): " + "; ".join(reasons)
    )
