"""``QuantLinear``: a GPTQ linear layer that holds the checkpoint's tensors.

The module's buffers are the checkpoint's own, under their own names
(``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``), so ``state_dict()``
is exactly what the checkpoint stores. The arithmetic is delegated to a kernel
backend chosen through the plugin hooks for the layer's device and dtype; a
backend may keep extra, non-persistent tensors in its own layout. When the
backend can rebuild ``qweight`` from those (the CUDA backend can), the layer
drops its copy, halving the weights' memory, and rebuilds it bit for bit
whenever it is read (``state_dict()``, ``layer.qweight``, ``.to()``, another
backend). ``ZEPHYR_KEEP_CHECKPOINT_WEIGHTS=1`` keeps the copy.

Example::

    >>> layer = QuantLinear(4096, 4096, GPTQConfig(bits=4, group_size=128))
    >>> layer.load_checkpoint_tensors(qweight=..., qzeros=..., scales=..., g_idx=...)
    >>> y = layer(x)            # x: [B, S, 4096] -> y: [B, S, 4096]
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .backends.base import KernelBackend, LayerSpec, select_backend
from .config import GPTQConfig, packed_words
from .errors import CheckpointError
from .reference import dequantize, trivial_g_idx

CHECKPOINT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


class QuantLinear(nn.Module):
    """A GPTQ-quantized ``nn.Linear`` (``y = x @ W + b`` with ``W: [K, N]``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: GPTQConfig,
        bias: bool = False,
        scales_dtype: torch.dtype = torch.float16,
        device=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        bits = config.bits
        groups = config.num_groups(in_features)
        self.register_buffer(
            "qweight", torch.zeros(packed_words(in_features, bits), out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "qzeros", torch.zeros(groups, packed_words(out_features, bits), dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scales_dtype, device=device))
        self.register_buffer("g_idx", trivial_g_idx(in_features, config.group_size, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=scales_dtype, device=device))
        else:
            self.bias = None
        self._kernel: Optional[KernelBackend] = None
        self._kernel_key: Optional[tuple] = None
        # True while the qweight buffer is dropped and the kernel rebuilds it on demand.
        self._qweight_dropped = False

    def __getattr__(self, name: str):
        if name == "qweight" and self.__dict__.get("_qweight_dropped"):
            return self._kernel.rebuild_qweight(self)
        return super().__getattr__(name)

    @property
    def holds_qweight(self) -> bool:
        """False while the kernel's own tensors stand in for the ``qweight`` buffer (see the module docstring)."""
        return not self._qweight_dropped

    def _restore_qweight(self) -> None:
        if self._qweight_dropped:
            self._buffers["qweight"] = self._kernel.rebuild_qweight(self)
            self._qweight_dropped = False

    # ------------------------------------------------------------------ loading
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each checkpoint tensor for this layer's config."""
        cfg, k, n = self.config, self.in_features, self.out_features
        g = cfg.num_groups(k)
        shapes = {
            "qweight": (packed_words(k, cfg.bits), n),
            "qzeros": (g, packed_words(n, cfg.bits)),
            "scales": (g, n),
            "g_idx": (k,),
        }
        if self.bias is not None:
            shapes["bias"] = (n,)
        return shapes

    def load_checkpoint_tensors(self, name: str = "", **tensors: torch.Tensor) -> None:
        """Check and copy in checkpoint tensors (``qweight=..., qzeros=..., scales=..., g_idx=..., bias=...``).

        Every check happens before any tensor is changed; errors name the layer
        (``name``), the tensor and both shapes.
        """
        validate_layer_tensors(name, self.config, self.in_features, self.out_features, tensors, self.bias is not None)
        if self._qweight_dropped:  # replaced below: no need to rebuild it
            self._buffers["qweight"], self._qweight_dropped = None, False
        for key, value in tensors.items():
            # Assigning to a registered buffer's name replaces the buffer.
            setattr(self, key, value.to(torch.int32) if key == "g_idx" else value)
        self.reset_kernel()

    # ------------------------------------------------------------------ compute
    def layer_spec(self, x_dtype: torch.dtype, device: torch.device) -> LayerSpec:
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        return LayerSpec(
            in_features=self.in_features,
            out_features=self.out_features,
            bits=self.config.bits,
            group_size=self.config.group_size,
            sym=self.config.sym,
            desc_act=self.has_act_order(),
            zero_offset=self.config.zero_offset,
            dtype=x_dtype,
            device_type=device.type,
            capability=cap,
        )

    def has_act_order(self) -> bool:
        """Whether ``g_idx`` differs from the trivial in-order grouping."""
        if self.g_idx.device.type == "meta":
            return self.config.desc_act
        trivial = trivial_g_idx(self.in_features, self.config.group_size, self.g_idx.device)
        return not torch.equal(self.g_idx, trivial)

    def prepare(self, dtype: torch.dtype, backend: Optional[str] = None) -> KernelBackend:
        """Choose the kernel for ``dtype`` on the layer's device and repack weights once.

        Runs on first use; call it explicitly before CUDA-graph capture or
        ``torch.compile`` so that no selection happens inside the graph.
        """
        device = self.scales.device
        key = (device, dtype, backend)
        if self._kernel is None or self._kernel_key != key:
            self.reset_kernel()
            cls = select_backend(self.layer_spec(dtype, device), prefer=backend)
            kernel = cls(self.layer_spec(dtype, device))
            kernel.process_weights(self)
            self._kernel, self._kernel_key = kernel, key
            if kernel.can_rebuild_qweight(self) and os.environ.get("ZEPHYR_KEEP_CHECKPOINT_WEIGHTS", "0") in ("", "0"):
                del self._buffers["qweight"]
                self._qweight_dropped = True
        return self._kernel

    def reset_kernel(self) -> None:
        """Forget the chosen kernel (weights or device changed); ``qweight`` is a buffer again."""
        self._restore_qweight()
        self._kernel = None
        self._kernel_key = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self._qweight_dropped:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        own = {}
        super()._save_to_state_dict(own, prefix, keep_vars)
        destination[prefix + "qweight"] = self._kernel.rebuild_qweight(self)  # first, as when it is a buffer
        destination.update(own)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.reset_kernel()  # the weights change: any repacked copy is stale
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() move the checkpoint tensors; any repacked copy is stale.
        self.reset_kernel()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel
        if kernel is None or self._kernel_key[0] != self.scales.device or self._kernel_key[1] != x.dtype:
            kernel = self.prepare(x.dtype, backend=self._kernel_key[2] if self._kernel_key else None)
        out = kernel.apply(self, x)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def input_permutation(self) -> Optional[torch.Tensor]:
        """int64 ``[K]`` indices the prepared kernel wants x permuted by (act-order), or None.

        See :meth:`KernelBackend.input_permutation`; call after :meth:`prepare`.
        """
        return None if self._kernel is None else self._kernel.input_permutation(self)

    def forward_permuted(self, x_perm: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` given ``x_perm = x[..., self.input_permutation()]``."""
        out = self._kernel.apply_permuted(self, x_perm)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def forward_swiglu(self, x: torch.Tensor, permuted: bool = False,
                       out_index: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """``silu(gate) * up`` of this layer's output (columns: gate, then up) in one kernel step, or None
        where the prepared backend does not fuse it for ``x`` (see :meth:`KernelBackend.apply_swiglu`;
        ``permuted``: x is ``x[..., self.input_permutation()]``)."""
        if self._kernel is None or self.bias is not None:
            return None
        return self._kernel.apply_swiglu(self, x, permuted, out_index)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight in ``nn.Linear`` layout ``[N, K]``."""
        w = dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.config.bits, self.config.zero_offset)
        return w.t().contiguous().to(dtype)

    def extra_repr(self) -> str:
        kernel = self._kernel.name if self._kernel is not None else "unselected"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.config.bits}, "
            f"group_size={self.config.group_size}, desc_act={self.config.desc_act}, kernel={kernel}"
        )


def validate_layer_tensors(
    name: str,
    config: GPTQConfig,
    in_features: int,
    out_features: int,
    tensors: dict[str, torch.Tensor],
    has_bias: bool,
) -> None:
    """Raise :class:`CheckpointError` if a layer's tensors disagree with its config.

    Checks presence, dtype and shape of ``qweight``, ``qzeros``, ``scales``,
    ``g_idx`` (if present) and ``bias``, and that every ``g_idx`` entry names an
    existing group. Cheap: reads ``g_idx`` only.
    """
    where = f"layer {name!r}" if name else "layer"
    bits, k, n = config.bits, in_features, out_features
    groups = config.num_groups(k)
    expected = {
        "qweight": (packed_words(k, bits), n),
        "qzeros": (groups, packed_words(n, bits)),
        "scales": (groups, n),
        "g_idx": (k,),
        "bias": (n,),
    }
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise CheckpointError(f"{where}: missing tensor {key!r}")
    for key, t in tensors.items():
        if key not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {key!r}")
        if tuple(t.shape) != expected[key]:
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(t.shape)} but bits={bits}, group_size={config.group_size} "
                f"with in_features={k}, out_features={n} need {expected[key]}"
            )
    for key in ("qweight", "qzeros"):
        if tensors[key].dtype != torch.int32:
            raise CheckpointError(f"{where}: {key} must be int32, got {tensors[key].dtype}")
    if not tensors["scales"].is_floating_point():
        raise CheckpointError(f"{where}: scales must be floating point, got {tensors['scales'].dtype}")
    if "bias" in tensors and not has_bias:
        raise CheckpointError(f"{where}: checkpoint has a bias but the model config has none")
    g_idx = tensors.get("g_idx")
    if g_idx is not None and g_idx.device.type != "meta":
        if g_idx.dtype not in (torch.int32, torch.int64):
            raise CheckpointError(f"{where}: g_idx must be int32, got {g_idx.dtype}")
        lo, hi = (int(g_idx.min()), int(g_idx.max())) if g_idx.numel() else (0, 0)
        if lo < 0 or hi >= groups:
            raise CheckpointError(
                f"{where}: g_idx values range over [{lo}, {hi}] but the layer has {groups} groups "
                f"(group_size={config.group_size}, in_features={k})"
            )
