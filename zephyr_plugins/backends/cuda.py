"""The CUDA backend: fused GPTQ kernels for 4- and 8-bit weights (``kernels/``).

- ``M <= gemv_max_m(...)`` rows (decode batches up to 24, 32 for 8-bit weights; 16 for large layers
  where the WS kernel runs): ``zephyr::gptq_gemv_repacked``,
  a GEMV-style kernel (swapped-operand mma, double-buffered weight stream).
- ``M <= FUSED_MAX_M`` rows: ``zephyr::gptq_gemm_repacked``, a fused
  dequantize + tensor-core matmul (the tiled kernel: x staged in shared memory,
  64-row tiles) that streams the repacked weight once per row tile. On sm_90
  cards (kernels built for sm_90a) the rows above that limit take
  its warp-specialized ``wgmma`` variant (WS: a producer warp fills a ring of
  shared-memory stages with bulk copies), up to ``ws_max_m(...)`` rows (at most ``FUSED_MAX_M_WS``).
- More rows (prefill): ``zephyr::gptq_dequantize_repacked`` to the activation
  dtype (rows back in x's order), then ``x @ w`` in cuBLAS.

All three read only the repacked ("zk") tensors, which is all the backend
keeps on the device besides ``scales`` and ``g_idx`` (see :meth:`process_weights`).

Importing this module is cheap: the kernels are built the first time a CUDA
layer is selected (:func:`zephyr_plugins.kernel_build.ensure_built`). Without
nvcc, :meth:`CudaGPTQBackend.can_implement` says so and the reference backend
serves the layer (with a one-time warning).
"""

from __future__ import annotations

import os
import warnings

import torch

from ..hookspecs import hookimpl
from .base import KernelBackend, LayerSpec

GEMV_SWIGLU_MAX_ROWS = 16  # kernel_ops.GEMV_SWIGLU_MAX_ROWS (not imported here: importing this module stays cheap)

# Largest M sent to the fused kernels (above GEMV_MAX_M: the tiled tensor-core kernel, which
# serves any M); above it, dequantize + cuBLAS. ``ZEPHYR_CUDA_FUSED_MAX_M`` (read at import) sets it.
FUSED_MAX_M = int(os.environ.get("ZEPHYR_CUDA_FUSED_MAX_M", "128"))
# The same where the WS kernel runs (sm_90 card, sm_90a build), for 4-bit and for 8-bit weights;
# ``ZEPHYR_CUDA_FUSED_MAX_M_WS`` / ``ZEPHYR_CUDA_FUSED_MAX_M_WS_8BIT`` set them. H100, sums over the
# Mistral shapes, g128 act-order, one run of benchmarks/kernels.py at 135816d: 4-bit WS 538 us at
# M = 512 against 547 for dequantize + cuBLAS, 874 against 856 at M = 1024; 8-bit WS 533 against 603
# at M = 512, 865 against 911 at M = 1024, 3468 against 2924 at M = 4096. Since the WS kernel's ring is
# 128-byte aligned (ab_H100_2026-11-28/ws_ring_alignment.log: 4-bit WS at M = 1024 786 us against 872
# before), 4-bit weights go to it up to 1024 rows too.
_WS_ENV_4 = os.environ.get("ZEPHYR_CUDA_FUSED_MAX_M_WS")
_WS_ENV_8 = os.environ.get("ZEPHYR_CUDA_FUSED_MAX_M_WS_8BIT")
FUSED_MAX_M_WS = int(_WS_ENV_4 or "1024")
FUSED_MAX_M_WS_8BIT = int(_WS_ENV_8 or "1024")
# Above this many rows a layer stays on WS only while its output tiles (WS_TILE rows x columns) fill at
# most one wave of the SMs or at least WS_MANY_WAVES waves: see ws_max_m.
WS_ALWAYS_M = 512
WS_TILE = (128, 256)
WS_MANY_WAVES = 4
# Split-K semaphores per 64 output columns: the GEMV and small-M kernels use one, the tiled kernel one per
# (row tile, 256-column group), so 8 let it split K up to M = 32 row tiles (2048 rows at 64 per tile).
LOCKS_PER_COLUMN_BLOCK = 8
# Largest M sent to the GEMV kernel (it serves M <= 32) for 4-bit weights; ``ZEPHYR_CUDA_GEMV_MAX_M``
# sets it for every card and layer (0: off). Above it the tiled kernel, on mma.sync (measured faster at
# M = 32 on the H100, sums over the Mistral shapes, commit 92d019a: 4-bit act-order 124.4 vs 129.3 us,
# and slower at M = 24: 119.2 vs 110.0) or, where WS runs, on WS: see gemv_max_m.
_GEMV_ENV_4 = os.environ.get("ZEPHYR_CUDA_GEMV_MAX_M")
GEMV_MAX_M = min(32, int(_GEMV_ENV_4 or "24"))
# The same for 8-bit weights (``ZEPHYR_CUDA_GEMV_MAX_M_8BIT``): the GEMV kernel, whose 8-warp blocks at
# M = 17-32 came with 92d019a, stays ahead of mma.sync up to M = 32 (same run: 137.6 vs 143.8 us, M = 24
# 124.3 vs 140.3).
_GEMV_ENV_8 = os.environ.get("ZEPHYR_CUDA_GEMV_MAX_M_8BIT")
GEMV_MAX_M_8BIT = min(32, int(_GEMV_ENV_8 or "32"))
# Where WS runs, a layer with more weights (K x N) than this keeps the GEMV kernel only up to
# GEMV_MAX_M_WS rows (per width); smaller layers keep GEMV_MAX_M / GEMV_MAX_M_8BIT.
GEMV_LARGE_LAYER = {4: 32 << 20, 8: 64 << 20}
GEMV_MAX_M_WS = 16


def gemv_max_m(bits: int, k: int, n: int, ws: bool) -> int:
    """Largest M a layer of ``bits``-bit weights, K = ``k`` inputs and N = ``n`` outputs sends to the
    GEMV kernel; ``ws``: whether the WS kernel serves the rows above it (sm_90 card, sm_90a build).

    The GEMV kernel's M = 17-32 pay for four x tiles, which costs the most on the widest layers,
    while WS pays a fixed cost per launch (the x-tile gather, the pipeline fill, the split's sum)
    that the small layers cannot hide. Same run on an H100 (dc13c9c, ``gemv_us`` / ``ws_us`` in
    ``benchmarks/results/kernels_*_dc13c9c.json``), 4-bit g128 act-order, GEMV against WS at M = 24:
    qkv (25M weights) 15.8 vs 18.3 us, o (17M) 14.6 vs 15.5, down (59M) 27.8 vs 26.2, gate_up (117M)
    44.9 vs 34.6; at M = 16 the GEMV kernel wins or ties everywhere (gate_up 33.6 vs 34.1). 8-bit at
    M = 24 / 32: gate_up 53.5 / 58.0 vs 49.6 / 51.2, down 33.8 / 36.8 vs 35.8 / 37.0, qkv and o ahead
    on the GEMV kernel by 0.6-4 us. Summed over the four shapes this rule gives 4-bit act-order at
    M = 24 ~91 us against 94.6 with 16 for every layer, 8-bit ~116 at M = 24 and ~125 at M = 32
    against 119.9 and 132.3 with 32 for every layer (the same run's columns; the rule itself was not
    re-run on a GPU).
    ``ZEPHYR_CUDA_GEMV_MAX_M`` / ``ZEPHYR_CUDA_GEMV_MAX_M_8BIT``, when set, apply to every layer.
    """
    if bits not in GEMV_LARGE_LAYER:
        raise ValueError(f"gemv_max_m: bits must be 4 or 8, got {bits}")
    base, env = (GEMV_MAX_M_8BIT, _GEMV_ENV_8) if bits == 8 else (GEMV_MAX_M, _GEMV_ENV_4)
    if env is not None or not ws or k * n <= GEMV_LARGE_LAYER[bits]:
        return base
    return min(base, GEMV_MAX_M_WS)


def ws_max_m(bits: int, n: int, sms: int) -> int:
    """Largest M a layer of ``bits``-bit weights and N = ``n`` outputs sends to the WS kernel (sm_90
    card with ``sms`` multiprocessors, sm_90a build); dequantize + cuBLAS serves the rows above it.

    Up to WS_ALWAYS_M rows, and on to FUSED_MAX_M_WS / FUSED_MAX_M_WS_8BIT while every row tile
    added keeps the layer's 128 x 256 output tiles within one wave (<= ``sms``) or at WS_MANY_WAVES
    waves or more. In between, the WS kernel's second, partly filled wave costs more than cuBLAS's
    smaller tiles: H200, 4-bit g128 act-order, one run of benchmarks/kernels.py at c655a4d
    (``ws_us`` / ``dequant_cublas_us``), qkv (N = 6144, 24 column tiles) 62 / 69 us at M = 640
    (120 tiles), 100 / 75 at 768 (144 tiles), 102 / 89 at 896, 107 / 93 at 1024 (the H100 at
    8146d00: 107.5 / 95.0 at 1024); 8-bit the same (104 / 79 at 768). The other Mistral layers keep
    1024: o and down (16 column tiles, one wave up to 1024 rows) were within 1-11 us either way
    from 640 to 1024 rows, and gate_up (112 column tiles, >= 4 waves from 640 rows) led by 8-20%.
    ``ZEPHYR_CUDA_FUSED_MAX_M_WS`` / ``..._8BIT``, when set, apply to every layer.
    """
    if bits not in (4, 8):
        raise ValueError(f"ws_max_m: bits must be 4 or 8, got {bits}")
    cap, env = (FUSED_MAX_M_WS_8BIT, _WS_ENV_8) if bits == 8 else (FUSED_MAX_M_WS, _WS_ENV_4)
    if env is not None or cap <= WS_ALWAYS_M:
        return cap
    rows, cols = WS_TILE
    col_tiles = -(-n // cols)
    m = WS_ALWAYS_M
    while m + rows <= cap:
        tiles = (m // rows + 1) * col_tiles
        if sms < tiles < WS_MANY_WAVES * sms:
            break
        m += rows
    return m


class CudaGPTQBackend(KernelBackend):
    name = "cuda"
    priority = 100
    supported_bits = (4, 8)
    supported_group_sizes = None  # -1, 32, 64 or any multiple of 128: checked below
    supported_dtypes = (torch.float16, torch.bfloat16)
    device_types = ("cuda",)
    min_capability = (8, 0)

    @classmethod
    def can_implement(cls, spec: LayerSpec):
        ok, why = super().can_implement(spec)
        if not ok:
            return ok, why
        gs = spec.group_size
        # A lane reads 32 consecutive (repacked) rows, which must share one group.
        if not (gs == -1 or gs in (32, 64) or gs % 128 == 0):
            return False, f"group_size={gs} not served; allowed values: -1, 32, 64 or a multiple of 128"
        from ..kernel_build import ensure_built

        return ensure_built()

    def process_weights(self, layer: torch.nn.Module) -> None:
        from .. import kernel_ops  # noqa: F401 - op schemas
        from ..kernel_build import wgmma_available
        from ..repack import repack

        spec = self.spec
        self._fallback = False
        # The WS kernel is planned where gptq_gemm_repacked can run wgmma (sm_90 card, sm_90a build).
        ws = wgmma_available(layer.qweight.device)
        self._gemv_max_m = gemv_max_m(spec.bits, spec.in_features, spec.out_features, ws)
        if ws:
            sms = torch.cuda.get_device_properties(layer.qweight.device).multi_processor_count
            self._fused_max_m = ws_max_m(spec.bits, spec.out_features, sms)
        else:
            self._fused_max_m = FUSED_MAX_M
        try:
            r = repack(
                layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                spec.bits, spec.group_size, spec.zero_offset, spec.dtype,
            )  # fmt: skip
        except ValueError as exc:  # g_idx with unequal groups: rare, served exactly by the reference
            warnings.warn(f"zephyr_plugins cuda backend: {exc}; this layer uses the reference path")
            self._fallback = True
            return
        layer.register_buffer("_zk_qweight", r.qweight, persistent=False)
        layer.register_buffer("_zk_scales", r.scales, persistent=False)
        layer.register_buffer("_zk_zeros", r.zeros, persistent=False)
        layer.register_buffer("_zk_perm", r.perm, persistent=False)
        # For callers that write x already permuted (input_permutation): int64 indices, and no perm for the op.
        layer.register_buffer("_zk_perm_index", r.perm.long(), persistent=False)
        layer.register_buffer("_zk_no_perm", r.perm.new_empty(0), persistent=False)
        locks = torch.zeros(r.qweight.shape[0] * LOCKS_PER_COLUMN_BLOCK, dtype=torch.int32, device=r.qweight.device)
        layer.register_buffer("_zk_locks", locks, persistent=False)
        # Every argument the kernels will see, checked once (apply calls the ops directly).
        from ..kernel_ops import check_zk_args

        probe = torch.zeros(1, spec.in_features, dtype=spec.dtype, device=r.qweight.device)
        check_zk_args("cuda backend", probe, r.qweight, r.scales, r.zeros, r.perm, layer._zk_locks, spec.bits,
                      spec.group_size, spec.out_features, 1)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if self._fallback:
            from ..ops import gptq_gemm

            return gptq_gemm(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, spec.bits, spec.zero_offset)
        ops = torch.ops.zephyr
        x2 = x.reshape(-1, spec.in_features)
        if x2.dtype != spec.dtype:
            x2 = x2.to(spec.dtype)
        # The ops are called directly: their tensors were checked once in process_weights, and
        # x2 is 2-D, contiguous, of the layer's dtype and width by construction (kernel_ops'
        # wrappers check every argument on every call, for other callers).
        # One op picks GEMV / fused / dequantize + cuBLAS by M when it runs (not here): under
        # torch.compile a Python branch on M would be decided once, at the traced size.
        out = ops.gptq_linear(
            x2.contiguous(), layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_perm, layer._zk_locks,
            spec.bits, spec.group_size, spec.out_features, self._gemv_max_m, self._fused_max_m,
        )  # fmt: skip
        return out.reshape(*x.shape[:-1], spec.out_features)

    def can_rebuild_qweight(self, layer) -> bool:
        return not self._fallback  # every kernel path reads the zk tensors only; the fallback reads qweight

    def rebuild_qweight(self, layer) -> torch.Tensor:
        return unrepack_layer(layer, self.spec)["qweight"]

    def input_permutation(self, layer):
        if self._fallback or layer._zk_perm.numel() == 0:
            return None
        return layer._zk_perm_index

    def apply_permuted(self, layer: torch.nn.Module, x_perm: torch.Tensor) -> torch.Tensor:
        # The same op as apply() with no permutation: x_perm already is in the kernels' row order.
        # Called by our runtime's decode steps (eager or captured in CUDA graphs, never traced by
        # torch.compile), so a branch on M in Python is safe here, unlike in apply().
        spec = self.spec
        x2 = x_perm.reshape(-1, spec.in_features)
        if x2.shape[0] > self._fused_max_m:
            # Large M reads x in the checkpoint's order (cuBLAS sums K in that order): put x back, so
            # that the result equals apply(x) bit for bit.
            x = torch.empty_like(x_perm)
            x[..., layer._zk_perm_index] = x_perm
            return self.apply(layer, x)
        if x2.dtype != spec.dtype:
            x2 = x2.to(spec.dtype)
        out = torch.ops.zephyr.gptq_linear(
            x2.contiguous(), layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_no_perm, layer._zk_locks,
            spec.bits, spec.group_size, spec.out_features, self._gemv_max_m, self._fused_max_m,
        )  # fmt: skip
        return out.reshape(*x_perm.shape[:-1], spec.out_features)

    def apply_swiglu(self, layer, x, permuted=False, out_index=None):
        # zephyr::gptq_gemv_swiglu where the GEMV kernel serves this M (M <= 16) and the two halves are
        # whole column blocks; decode steps of our runtime only (a branch on M, as in apply_permuted).
        spec = self.spec
        x2 = x.reshape(-1, spec.in_features)
        if (self._fallback or x2.shape[0] > min(self._gemv_max_m, GEMV_SWIGLU_MAX_ROWS) or x2.shape[0] == 0
                or spec.out_features % 128):
            return None
        if x2.dtype != spec.dtype:
            x2 = x2.to(spec.dtype)
        out = torch.ops.zephyr.gptq_gemv_swiglu(
            x2.contiguous(), layer._zk_qweight, layer._zk_scales, layer._zk_zeros,
            layer._zk_no_perm if permuted else layer._zk_perm, layer._zk_locks,
            spec.bits, spec.group_size, spec.out_features, out_index, 0, 0,
        )  # fmt: skip
        return out.reshape(*x.shape[:-1], spec.out_features // 2)


def unrepack_layer(layer: torch.nn.Module, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """The checkpoint tensors rebuilt from a prepared layer's repacked buffers (for tests)."""
    from ..repack import Repacked, unrepack

    r = Repacked(layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_perm, spec.group_size)
    return unrepack(r, spec.bits, spec.in_features, spec.out_features, spec.zero_offset, layer.scales.dtype)


@hookimpl
def register_kernels(register):
    register(CudaGPTQBackend)
