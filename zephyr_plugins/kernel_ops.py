"""Schemas of the CUDA kernel ops, with their fake and CPU reference implementations.

This is the one place that lists every schema of the compiled kernels
(``kernels/*.cu``); ``kernels/bindings.cpp`` only attaches the CUDA
implementations to them when :mod:`zephyr_plugins.kernel_build` loads the
library. Importing this module is cheap and never builds anything, so the
CPU reference paths and the fake (meta) implementations work without a GPU.

Ops:

``zephyr::gptq_gemm_repacked(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, kernel=0, splits=0) -> Tensor``
    Fused dequantize + matmul on the zk layout (:mod:`zephyr_plugins.repack`),
    on tensor cores, for any M. ``kernel``: 0 plans (the fused small-M kernel
    for ``M <= 16``, else the tiled one; on sm_90 cards with an sm_90a build
    its warp-specialized wgmma variant above 24 rows), 1 forces the fused small-M kernel (``M <= 64``),
    2 the tiled kernel (``kernels/gptq_tiled.cuh``: x staged in shared memory
    once per 256 columns, 64-row tiles, ``mma.sync``), 3 its wgmma variant
    (Hopper warpgroup MMA; an error where unavailable), 4 its warp-specialized
    wgmma variant (a producer warp moves weights and x into a ring of shared
    memory stages with bulk copies; same availability as 3). ``splits`` forces
    the tiled kernel's split along K (0 plans it), for benchmarks.

    - ``x``: float16/bfloat16 ``[M, K]``, contiguous.
    - ``qweight``: int32 ``[Np/64, Kp/16, 32*bits]``, zk layout (Kp = K rounded
      up to 128, Np = N rounded up to 64).
    - ``scales``: ``x.dtype [G, Np]``, zk column order.
    - ``zeros``: ``x.dtype [G, Np]`` real zero points in zk column order, or
      empty when all are ``2**(bits-1)``.
    - ``perm``: int32 ``[K]`` act-order row permutation (the kernel reads
      ``x[:, perm]``), or empty.
    - ``locks``: int32 ``[>= Np/64]``, zeros; the kernel's split-K semaphores
      (the tiled kernel splits K only while it has one per row tile x 256
      columns: the CUDA backend allocates ``8 * Np/64``).
      Each call leaves it zero again, but two calls sharing it must not run
      concurrently on different streams.
    - ``bits``: 4 or 8. ``group_size``: -1, 32, 64 or a multiple of 128.
    - ``size_n``: N.

    Returns ``x.dtype [M, N]`` (fp32 accumulation).

``zephyr::gptq_gemv_repacked(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, block_warps=0, splits=0) -> Tensor``
    The same product on the same arguments for decode batches, ``M <= 32``
    (``GEMV_MAX_ROWS``): a GEMV-style kernel (swapped-operand ``mma``, one
    dequantized weight fragment feeding the ``mma`` of up to four 8-row tiles
    of x, register double-buffered weight stream, no shared-memory pipeline;
    for 4-bit weights at the fewest rows each warp stages its slice of x in
    shared memory first, gathering act-order columns itself).
    ``block_warps`` (4, 8, or 16 for ``M <= 8``) and
    ``splits`` (blocks per 64 columns along K) force the launch plan, for
    benchmarks; 0 lets the launcher plan it. Same result contract as above.

``zephyr::gptq_gemv_swiglu(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, out_index=None, block_warps=0, splits=0) -> Tensor``
    The SwiGLU of a fused gate/up projection in the GEMV kernel's epilogue, for ``M <= 16``
    (``GEMV_SWIGLU_MAX_ROWS``): with ``y`` the product above (``[M, size_n]``, rounded to
    ``x.dtype``), returns ``silu(y[:, :F]) * y[:, F:]`` (``F = size_n / 2``, a multiple of 64),
    computed in fp32 and rounded once, as ``x.dtype [M, F]``; column ``j`` is written at
    ``out_index[j]`` when ``out_index`` (int64 ``[F]``, a permutation) is given. A thread block
    computes a gate column block and the up column block paired with it, half of its warps on
    each, so the two halves meet in shared memory and the intermediate never reaches memory.
    ``block_warps`` (4, 8, or 16 for ``M <= 8``) counts both halves' warps; ``splits`` as above.
    The CPU implementation is ``gemv_swiglu_reference``.

``zephyr::gptq_linear(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, gemv_max_m, fused_max_m) -> Tensor``
    One layer, whatever M, on the zk arguments of ``gptq_gemm_repacked``:
    ``gptq_gemv_repacked`` for ``M <= gemv_max_m``, ``gptq_gemm_repacked`` for
    ``M <= fused_max_m``, else ``x @ gptq_dequantize_repacked(..., perm)[:K, :N]``
    in cuBLAS. The choice is made when the op runs, so a graph that
    ``torch.compile`` traced at one M (vLLM traces at its largest batch) still
    takes the small-M kernels at M = 1. Only the zk layout is read: the
    checkpoint tensors need not stay on the device.

``zephyr::gptq_dequantize_repacked(qweight, scales, zeros, perm, bits, group_size) -> Tensor``
    The zk layout dequantized to ``scales.dtype [Kp, Np]`` (padding included;
    repacked row ``k`` is in group ``min(k // group_size, G - 1)``). Row ``k < K``
    is written at row ``perm[k]`` (the checkpoint's row order) when ``perm``
    (int32 ``[K]``) is given, else at ``k`` (the repacked order);
    ``repack.dequantize_repacked_reference``.

``zephyr::gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset) -> Tensor``
    The checkpoint layout dequantized to ``scales.dtype [K, N]`` (for large M,
    followed by ``x @ w`` in cuBLAS).

    - ``qweight``: int32 ``[ceil(K*bits/32), N]``, packed along K.
    - ``qzeros``: int32 ``[G, ceil(N*bits/32)]``, packed along N.
    - ``scales``: float16/bfloat16 ``[G, N]``.
    - ``g_idx``: int32 ``[K]``.
    - ``bits``: 4 or 8. ``zero_offset``: 1 for v1 ``"gptq"`` checkpoints, 0 for ``"gptq_v2"``.

``zephyr::decode_attention(qkv, cos, sin, k_cache, v_cache, slot, pad, locks, n_heads, n_kv_heads, kv_len, window, block_keys=0, out_index=None) -> Tensor``
    One decode step of attention (one new token per row) in one kernel
    (``kernels/decode_attention.cu``): rotate q and k, write the new k and v
    into the cache at ``slot``, attend over the cache with grouped-query heads.
    Same arithmetic as the model's unfused path (``split_rope``,
    ``KVCache.update``, ``attention_mask``, ``decode_attention``), which is
    the CPU implementation.

    - ``qkv``: float16/bfloat16 ``[B, (H + 2 Hkv) * hd]``, the fused projection's output.
    - ``cos``, ``sin``: float32 ``[B, hd / 2]`` at each row's position.
    - ``k_cache``, ``v_cache``: ``qkv.dtype [Bmax >= B, Hkv, Lmax, hd]``, written at ``slot``.
    - ``slot``: int64 ``[1]``, the cache slot of the new token (a device tensor, so a
      captured graph serves every step); must be ``< kv_len``.
    - ``pad``: int64 ``[B]`` left padding; a row never sees slots below it.
    - ``locks``: int32 ``[>= B * Hkv]`` zeros (self-resetting split semaphores).
    - ``kv_len``: slots ``[0, kv_len)`` may be attended; ``window``: sliding window, 0 = none.
    - ``block_keys``: cache slots per thread block (multiple of 64, at most 1024); 0 plans it.
      H / Hkv <= 8, hd 64 or 128.
    - ``out_index``: int64 ``[H * hd]`` or None: element ``i`` of a row is written at
      ``out_index[i]`` (the inverse of the output projection's ``input_permutation``).

    Returns ``qkv.dtype [B, H * hd]`` (heads in order, or scattered by ``out_index``).

``zephyr::dense_gemv(x, weight, block_warps=0) -> Tensor``
    ``x @ weight.T`` for a float (unquantized) layer at decode batch sizes
    (``kernels/dense_gemv.cu``): the weight is read as ``nn.Linear`` stores it,
    once, on tensor cores, with fp32 sums rounded once at the end.

    - ``x``: float16/bfloat16 ``[M <= 8, K]``, contiguous, 16-byte aligned.
    - ``weight``: ``x.dtype [N, K]``, contiguous, 16-byte aligned; ``K`` a multiple of 32.
    - ``block_warps``: 0 plans it (16), 4, 8 or 16 force the warps of a block (benchmarks).

    Returns ``x.dtype [M, N]``; the CPU implementation is ``dense_gemv_reference``.

``zephyr::add_rms_norm_permuted(x, h, weight, eps, perm) -> (Tensor, Tensor)``
    The residual add and the RMSNorm after it, the normalized row written in an
    act-order layer's row order (``kernels/add_rms_norm.cu``, one block per row):
    ``s = x + h`` and ``rms_norm(s, weight, eps)[..., perm]``, the arithmetic of
    ``model_ops.add_rms_norm`` (its CPU implementation).

    - ``x``, ``h``: float16/bfloat16 ``[..., D]`` of one shape, contiguous; ``D`` a
      multiple of 8, at most 16384.
    - ``weight``: ``x.dtype [D]``. ``perm``: int64 ``[D]``, a permutation of ``range(D)``.
    - All 16-byte aligned.

    Returns ``(s, y)``, both like ``x``.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .reference import dequantize
from .repack import dequantize_repacked_reference, gemm_repacked_reference

GEMV_MAX_ROWS = 32  # kGemvMaxM in kernels/gptq_gemv.cuh
GEMV_SWIGLU_MAX_ROWS = 16  # kGemvSwigluMaxM
SMALL_MAX_ROWS = 64  # 16 * kMaxMTiles in kernels/gptq_kernels.cuh: the fused small-M kernel (kernel=1)

_LIB = torch.library.Library("zephyr", "FRAGMENT")  # noqa: TOR901 - our own namespace

_LIB.define(
    "gptq_gemm_repacked(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor perm, "
    "Tensor(a!) locks, int bits, int group_size, int size_n, int kernel=0, int splits=0) -> Tensor"
)
_LIB.define(
    "gptq_gemv_repacked(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor perm, "
    "Tensor(a!) locks, int bits, int group_size, int size_n, int block_warps=0, int splits=0) -> Tensor"
)
_LIB.define(
    "gptq_gemv_swiglu(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor perm, Tensor(a!) locks, "
    "int bits, int group_size, int size_n, Tensor? out_index=None, int block_warps=0, int splits=0) -> Tensor"
)
_LIB.define(
    "gptq_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor perm, Tensor(a!) locks, "
    "int bits, int group_size, int size_n, int gemv_max_m, int fused_max_m) -> Tensor"
)
_LIB.define(
    "gptq_dequantize_repacked(Tensor qweight, Tensor scales, Tensor zeros, Tensor perm, int bits, int group_size) "
    "-> Tensor"
)
_LIB.define(
    "decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot, "
    "Tensor pad, Tensor(c!) locks, int n_heads, int n_kv_heads, int kv_len, int window, int block_keys=0, "
    "Tensor? out_index=None) -> Tensor"
)
_LIB.define("dense_gemv(Tensor x, Tensor weight, int block_warps=0) -> Tensor")
_LIB.define("add_rms_norm_permuted(Tensor x, Tensor h, Tensor weight, float eps, Tensor perm) -> (Tensor, Tensor)")
_LIB.define(
    "gptq_dequantize(Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int bits, int zero_offset) -> Tensor"
)


def _gemm_repacked_cpu(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, kernel=0, splits=0):
    return gemm_repacked_reference(x, qweight, scales, zeros, perm, bits, group_size, size_n)


def _gemv_repacked_cpu(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, block_warps=0, splits=0):
    torch._check(x.shape[0] <= GEMV_MAX_ROWS, lambda: f"gptq_gemv_repacked serves M <= {GEMV_MAX_ROWS}, got M={x.shape[0]}")
    return gemm_repacked_reference(x, qweight, scales, zeros, perm, bits, group_size, size_n)


def gemv_swiglu_reference(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, out_index=None,
                          block_warps=0, splits=0):
    """The CPU implementation of ``zephyr::gptq_gemv_swiglu``: the product, rounded to ``x.dtype``, then
    ``silu(gate) * up`` in fp32, rounded once, scattered by ``out_index``."""
    torch._check(x.shape[0] <= GEMV_SWIGLU_MAX_ROWS,
                 lambda: f"gptq_gemv_swiglu serves M <= {GEMV_SWIGLU_MAX_ROWS}, got M={x.shape[0]}")
    y = gemm_repacked_reference(x, qweight, scales, zeros, perm, bits, group_size, size_n).to(x.dtype)
    gate, up = y.float().split(size_n // 2, dim=-1)
    act = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    if out_index is None:
        return act
    out = torch.empty_like(act)
    out[:, out_index] = act
    return out


def _linear_cpu(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, gemv_max_m, fused_max_m):
    return gemm_repacked_reference(x, qweight, scales, zeros, perm, bits, group_size, size_n)


def _dequantize_repacked_cpu(qweight, scales, zeros, perm, bits, group_size):
    return dequantize_repacked_reference(qweight, scales, zeros, bits, group_size, perm).to(scales.dtype)


def _dequantize_cpu(qweight, qzeros, scales, g_idx, bits, zero_offset):
    return dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype=scales.dtype)


def decode_attention_reference(qkv, cos, sin, k_cache, v_cache, slot, pad, locks, n_heads: int, n_kv_heads: int,
                               kv_len: int, window: int, block_keys: int = 0, out_index=None):
    """The unfused path, op by op: the CPU implementation of ``zephyr::decode_attention``."""
    from .kv_cache import attention_mask
    from .model_ops import decode_attention, split_rope

    bsz, hd = qkv.shape[0], k_cache.shape[-1]
    q, k, v = split_rope(qkv.view(bsz, 1, -1), cos.view(bsz, 1, -1), sin.view(bsz, 1, -1), n_heads, n_kv_heads, hd)
    kc, vc = k_cache[:bsz], v_cache[:bsz]
    kc.index_copy_(2, slot, k.to(kc.dtype))
    vc.index_copy_(2, slot, v.to(vc.dtype))
    mask = attention_mask(slot, pad, kv_len, window or None)  # [B, 1, 1, kv_len]
    y = decode_attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], mask).view(bsz, n_heads * hd)
    if out_index is None:
        return y
    out = torch.empty_like(y)
    out[:, out_index] = y
    return out


DENSE_GEMV_MAX_ROWS = 8  # kDenseMaxM in kernels/dense_gemv.cu
DENSE_GEMV_K_MULTIPLE = 32  # kDenseSliceK


def dense_gemv_reference(x, weight, block_warps: int = 0):
    """``x @ weight.T`` summed in fp32, rounded once to ``x.dtype``: the CPU implementation of ``zephyr::dense_gemv``."""
    return (x.float() @ weight.float().t()).to(x.dtype)


def add_rms_norm_permuted_reference(x, h, weight, eps: float, perm):
    """The CPU implementation of ``zephyr::add_rms_norm_permuted``: ``model_ops.add_rms_norm`` with ``perm``."""
    from .model_ops import add_rms_norm

    s, y = add_rms_norm(x, h, weight, eps, perm)
    return s, y.contiguous()


# The CUDA implementations come from kernels/bindings.cpp once built.
_LIB.impl("gptq_gemm_repacked", _gemm_repacked_cpu, "CPU")
_LIB.impl("gptq_gemv_repacked", _gemv_repacked_cpu, "CPU")
_LIB.impl("gptq_dequantize", _dequantize_cpu, "CPU")
_LIB.impl("gptq_linear", _linear_cpu, "CPU")
_LIB.impl("gptq_gemv_swiglu", gemv_swiglu_reference, "CPU")
_LIB.impl("gptq_dequantize_repacked", _dequantize_repacked_cpu, "CPU")
_LIB.impl("decode_attention", decode_attention_reference, "CPU")
_LIB.impl("dense_gemv", dense_gemv_reference, "CPU")
_LIB.impl("add_rms_norm_permuted", add_rms_norm_permuted_reference, "CPU")


@torch.library.register_fake("zephyr::gptq_gemm_repacked")
def _gemm_repacked_fake(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, kernel=0, splits=0):
    torch._check(x.dim() == 2, lambda: f"x must be [M, K], got {x.dim()} dims")
    torch._check(qweight.shape[1] * 16 >= x.shape[1], lambda: "qweight covers fewer rows than x has columns")
    return x.new_empty((x.shape[0], size_n))


@torch.library.register_fake("zephyr::gptq_gemv_repacked")
def _gemv_repacked_fake(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, block_warps=0, splits=0):
    torch._check(x.dim() == 2, lambda: f"x must be [M, K], got {x.dim()} dims")
    torch._check(x.shape[0] <= GEMV_MAX_ROWS, lambda: f"gptq_gemv_repacked serves M <= {GEMV_MAX_ROWS}, got M={x.shape[0]}")
    torch._check(qweight.shape[1] * 16 >= x.shape[1], lambda: "qweight covers fewer rows than x has columns")
    return x.new_empty((x.shape[0], size_n))


@torch.library.register_fake("zephyr::gptq_gemv_swiglu")
def _gemv_swiglu_fake(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, out_index=None, block_warps=0,
                      splits=0):
    torch._check(x.dim() == 2, lambda: f"x must be [M, K], got {x.dim()} dims")
    torch._check(x.shape[0] <= GEMV_SWIGLU_MAX_ROWS,
                 lambda: f"gptq_gemv_swiglu serves M <= {GEMV_SWIGLU_MAX_ROWS}, got M={x.shape[0]}")
    return x.new_empty((x.shape[0], size_n // 2))


@torch.library.register_fake("zephyr::gptq_linear")
def _linear_fake(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, gemv_max_m, fused_max_m):
    torch._check(x.dim() == 2, lambda: f"x must be [M, K], got {x.dim()} dims")
    return x.new_empty((x.shape[0], size_n))


@torch.library.register_fake("zephyr::gptq_dequantize_repacked")
def _dequantize_repacked_fake(qweight, scales, zeros, perm, bits, group_size):
    return scales.new_empty((qweight.shape[1] * 16, qweight.shape[0] * 64))


@torch.library.register_fake("zephyr::gptq_dequantize")
def _dequantize_fake(qweight, qzeros, scales, g_idx, bits, zero_offset):
    return scales.new_empty((g_idx.shape[0], scales.shape[1]))


@torch.library.register_fake("zephyr::decode_attention")
def _decode_attention_fake(qkv, cos, sin, k_cache, v_cache, slot, pad, locks, n_heads, n_kv_heads, kv_len, window,
                           block_keys=0, out_index=None):
    return qkv.new_empty((qkv.shape[0], n_heads * k_cache.shape[-1]))


@torch.library.register_fake("zephyr::dense_gemv")
def _dense_gemv_fake(x, weight, block_warps=0):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
    torch._check(x.shape[0] <= DENSE_GEMV_MAX_ROWS, lambda: f"dense_gemv serves M <= {DENSE_GEMV_MAX_ROWS}")
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("zephyr::add_rms_norm_permuted")
def _add_rms_norm_permuted_fake(x, h, weight, eps, perm):
    return torch.empty_like(x), torch.empty_like(x)


NORM_MAX_DIM = 16384  # kNormMaxDim in kernels/add_rms_norm.cu


def add_rms_norm_permuted_unsupported(x, h, weight, perm) -> str | None:
    """Why ``zephyr::add_rms_norm_permuted`` cannot take these tensors, or None."""
    if x.dim() < 1 or x.shape != h.shape:
        return f"x {tuple(x.shape)} and h {tuple(h.shape)} must have one shape"
    if x.dtype not in (torch.float16, torch.bfloat16) or h.dtype != x.dtype or weight.dtype != x.dtype:
        return f"dtypes {x.dtype} / {h.dtype} / {weight.dtype} (served: float16 or bfloat16, one for all)"
    d = x.shape[-1]
    if d % 8 or not 0 < d <= NORM_MAX_DIM:
        return f"last dimension {d} (served: multiples of 8 up to {NORM_MAX_DIM})"
    if weight.dim() != 1 or weight.shape[0] != d:
        return f"weight {tuple(weight.shape)} must be [{d}]"
    if perm.dim() != 1 or perm.shape[0] != d or perm.dtype != torch.int64:
        return f"perm must be int64 [{d}], got {perm.dtype} {tuple(perm.shape)}"
    if not all(t.is_contiguous() for t in (x, h, weight, perm)):
        return "x, h, weight and perm must be contiguous"
    if any(t.device != x.device for t in (h, weight, perm)):
        return f"all tensors must be on {x.device}"
    if x.is_cuda and not is_fake(x) and any(t.data_ptr() % 16 for t in (x, h, weight, perm)):
        return "x, h, weight and perm must start at 16-byte aligned addresses"
    return None


def add_rms_norm_permuted(x, h, weight, eps: float, perm):
    """``(x + h, rms_norm(x + h, weight, eps)[..., perm])`` in one kernel; see the module docstring."""
    why = add_rms_norm_permuted_unsupported(x, h, weight, perm)
    if why is not None:
        raise ValueError(f"add_rms_norm_permuted: {why}")
    return torch.ops.zephyr.add_rms_norm_permuted(x, h, weight, eps, perm)


def dense_gemv_unsupported(x, weight) -> str | None:
    """Why ``zephyr::dense_gemv`` cannot take these tensors (shape, dtype, layout, alignment), or None."""
    if x.dim() != 2 or weight.dim() != 2:
        return f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be 2-D"
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return f"dtypes {x.dtype} / {weight.dtype} (served: float16 or bfloat16, the same for both)"
    if x.shape[0] > DENSE_GEMV_MAX_ROWS:
        return f"M={x.shape[0]} rows (served: M <= {DENSE_GEMV_MAX_ROWS})"
    if weight.shape[1] != x.shape[1]:
        return f"weight has K={weight.shape[1]} columns but x has {x.shape[1]}"
    if x.shape[1] % DENSE_GEMV_K_MULTIPLE:
        return f"K={x.shape[1]} (served: multiples of {DENSE_GEMV_K_MULTIPLE})"
    if not (x.is_contiguous() and weight.is_contiguous()):
        return "x and weight must be contiguous"
    if x.device != weight.device:
        return f"weight is on {weight.device} but x is on {x.device}"
    if x.is_cuda and not is_fake(x) and (x.data_ptr() % 16 or weight.data_ptr() % 16):  # the kernel's 16-byte loads
        return "x and weight must start at 16-byte aligned addresses"
    return None


def dense_gemv(x, weight, block_warps: int = 0):
    """``x [M <= 8, K] @ weight [N, K].T`` for a float layer; see the module docstring."""
    why = dense_gemv_unsupported(x, weight)
    if why is not None:
        raise ValueError(f"dense_gemv: {why}")
    if block_warps not in (0, 4, 8, 16):
        raise ValueError(f"dense_gemv: block_warps must be 0, 4, 8 or 16, got {block_warps}")
    return torch.ops.zephyr.dense_gemv(x, weight, block_warps)


def _check_zk_weight(op: str, qweight, scales, zeros, bits: int) -> tuple[int, int]:
    """Checks of the zk weight tensors alone (``check_zk_weight`` in ``kernels/gptq_gemm.cu``); returns ``(Np, Kp)``."""

    def bad(msg: str):
        raise ValueError(f"{op}: {msg}")

    if bits not in (4, 8):
        bad(f"bits must be 4 or 8, got {bits}")
    if qweight.dim() != 3 or qweight.dtype != torch.int32 or not qweight.is_contiguous() or qweight.shape[1] % 8:
        bad(f"qweight must be contiguous int32 [Np/64, Kp/16, 32*bits], got {qweight.dtype} {tuple(qweight.shape)}")
    np_, kp = qweight.shape[0] * 64, qweight.shape[1] * 16
    if qweight.shape[2] != 32 * bits:
        bad(f"qweight.shape[2]={qweight.shape[2]} but bits={bits} needs {32 * bits}")
    if (scales.dim() != 2 or scales.shape[1] != np_ or scales.dtype not in (torch.float16, torch.bfloat16)
            or not scales.is_contiguous()):
        bad(f"scales must be contiguous float16/bfloat16 [G, {np_}], got {scales.dtype} {tuple(scales.shape)}")
    if zeros.numel() and (zeros.shape != scales.shape or zeros.dtype != scales.dtype or not zeros.is_contiguous()):
        bad(f"zeros must be empty or like scales {tuple(scales.shape)}, got {zeros.dtype} {tuple(zeros.shape)}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.numel() and t.device != qweight.device:
            bad(f"{name} is on {t.device} but qweight is on {qweight.device}")
    return np_, kp


def check_zk_args(op: str, x, qweight, scales, zeros, perm, locks, bits: int, group_size: int, size_n: int,
                  max_m: int | None) -> None:
    """The CUDA launchers' argument checks, in Python, raising ``ValueError`` before any work.

    The extension checks the same (``check_zk_args`` in ``kernels/gptq_gemm.cu``), but on
    the H100 image a failing check inside the extension ended the process (SIGSEGV) instead
    of raising, so the wrappers below never let bad arguments reach it.
    """
    def bad(msg: str):
        raise ValueError(f"{op}: {msg}")

    if x.dim() != 2 or not x.is_contiguous():
        bad(f"x must be a contiguous 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        bad(f"x must be float16 or bfloat16, got {x.dtype}")
    m, k = x.shape
    if max_m is not None and m > max_m:
        bad(f"x has M={m} rows; this kernel serves M <= {max_m}")
    np_, kp = _check_zk_weight(op, qweight, scales, zeros, bits)
    if not (k <= kp < k + 128):
        bad(f"qweight covers Kp={kp} rows but x has K={k} (Kp must be K rounded up to a multiple of 128)")
    if not (size_n <= np_ < size_n + 64):
        bad(f"qweight covers Np={np_} columns but size_n={size_n}")
    if scales.dtype != x.dtype:
        bad(f"scales must be {x.dtype} like x, got {scales.dtype}")
    perm_ok = perm.dim() == 1 and perm.shape[0] == k and perm.dtype == torch.int32 and perm.is_contiguous()
    if perm.numel() and not perm_ok:
        strided = "" if perm.is_contiguous() else " (not contiguous)"
        bad(f"perm must be empty or int32 [K={k}], contiguous, got {perm.dtype} {tuple(perm.shape)}{strided}")
    if locks.dim() != 1 or locks.shape[0] < np_ // 64 or locks.dtype != torch.int32:
        bad(f"locks must be int32 [>= {np_ // 64}] zeros, got {locks.dtype} {tuple(locks.shape)}")
    rows = k if group_size == -1 else group_size
    if not (group_size == -1 or group_size in (32, 64) or (group_size > 0 and group_size % 128 == 0)):
        bad(f"group_size={group_size} not served (allowed: -1, 32, 64, multiples of 128)")
    if scales.shape[0] != -(-k // rows):
        bad(f"scales has {scales.shape[0]} groups but K={k}, group_size={group_size} needs {-(-k // rows)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("perm", perm), ("locks", locks)):
        if t.numel() and t.device != x.device:
            bad(f"{name} is on {t.device} but x is on {x.device}")


def gptq_gemm_repacked(
    x, qweight, scales, zeros, perm, locks, bits: int, group_size: int, size_n: int, kernel: int = 0, splits: int = 0
):
    """``x [M, K] @ W`` on the zk layout; see the module docstring for every argument."""
    if kernel not in (0, 1, 2, 3, 4) or not 0 <= splits <= 256:
        raise ValueError(
            f"gptq_gemm_repacked: kernel must be 0, 1, 2, 3 or 4 and splits in [0, 256], got {kernel}, {splits}"
        )
    check_zk_args("gptq_gemm_repacked", x, qweight, scales, zeros, perm, locks, bits, group_size, size_n,
                  SMALL_MAX_ROWS if kernel == 1 else None)
    return torch.ops.zephyr.gptq_gemm_repacked(
        x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, kernel, splits
    )


def gptq_gemv_repacked(
    x, qweight, scales, zeros, perm, locks, bits: int, group_size: int, size_n: int, block_warps: int = 0, splits: int = 0
):
    """``x [M <= 32, K] @ W`` on the zk layout with the GEMV kernel; see the module docstring."""
    check_zk_args("gptq_gemv_repacked", x, qweight, scales, zeros, perm, locks, bits, group_size, size_n,
                  GEMV_MAX_ROWS)
    if block_warps not in (0, 4, 8, 16) or not 0 <= splits <= 256:
        raise ValueError(f"gptq_gemv_repacked: block_warps must be 0, 4, 8 or 16 and splits in [0, 256], "
                         f"got {block_warps}, {splits}")
    if block_warps == 16 and x.shape[0] > 8:
        raise ValueError(f"gptq_gemv_repacked: block_warps=16 is served with 16 warps only for M <= 8 "
                         f"(one x tile), got M={x.shape[0]}")
    return torch.ops.zephyr.gptq_gemv_repacked(
        x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, block_warps, splits
    )


def gptq_gemv_swiglu(x, qweight, scales, zeros, perm, locks, bits: int, group_size: int, size_n: int,
                     out_index=None, block_warps: int = 0, splits: int = 0):
    """``silu(gate) * up`` of ``x [M <= 16, K] @ W`` (W's columns: gate, then up) with the GEMV kernel;
    see the module docstring."""
    op = "gptq_gemv_swiglu"
    check_zk_args(op, x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, GEMV_SWIGLU_MAX_ROWS)
    if size_n % 128:
        raise ValueError(f"{op}: size_n={size_n} must be a multiple of 128 (two halves of whole 64-column blocks)")
    if qweight.shape[0] * 64 != size_n:
        raise ValueError(f"{op}: qweight covers Np={qweight.shape[0] * 64} columns but size_n={size_n}")
    if block_warps not in (0, 4, 8, 16) or not 0 <= splits <= 256:
        raise ValueError(f"{op}: block_warps must be 0, 4, 8 or 16 and splits in [0, 256], got {block_warps}, {splits}")
    if block_warps == 16 and x.shape[0] > 8:
        raise ValueError(f"{op}: block_warps=16 is served only for M <= 8 (one x tile), got M={x.shape[0]}")
    if out_index is not None and (out_index.dim() != 1 or out_index.shape[0] != size_n // 2
                                  or out_index.dtype != torch.int64 or not out_index.is_contiguous()
                                  or out_index.device != x.device):
        raise ValueError(f"{op}: out_index must be contiguous int64 [{size_n // 2}] on {x.device}, "
                         f"got {out_index.dtype} {tuple(out_index.shape)}")
    # The kernel writes column j at out_index[j] unchecked: bound it here (a device sync; the runtime calls
    # the op directly with an argsort, so this wrapper is not on its path, nor inside its CUDA graphs).
    if out_index is not None and out_index.numel() and not is_fake(out_index):
        lo, hi = int(out_index.min()), int(out_index.max())
        if lo < 0 or hi >= size_n // 2:
            raise ValueError(f"{op}: out_index values must lie in [0, {size_n // 2}), got [{lo}, {hi}]")
    return torch.ops.zephyr.gptq_gemv_swiglu(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n,
                                             out_index, block_warps, splits)


def gptq_dequantize_repacked(qweight, scales, zeros, perm, bits: int, group_size: int):
    """The zk layout to ``scales.dtype [Kp, Np]``, rows in the checkpoint's order when ``perm`` is given;
    see the module docstring."""
    op = "gptq_dequantize_repacked"
    np_, kp = _check_zk_weight(op, qweight, scales, zeros, bits)
    if not (group_size == -1 or group_size >= 1):
        raise ValueError(f"{op}: group_size must be -1 or positive, got {group_size}")
    if perm.numel() and (perm.dim() != 1 or perm.dtype != torch.int32 or not perm.is_contiguous()
                         or not kp - 128 < perm.shape[0] <= kp or perm.device != qweight.device):
        raise ValueError(f"{op}: perm must be empty or int32 [K] (Kp - 128 < K <= Kp={kp}) on {qweight.device}, "
                         f"got {perm.dtype} {tuple(perm.shape)}")
    if kp and scales.shape[0] < 1:
        raise ValueError(f"{op}: scales has no groups for Kp={kp} rows")
    return torch.ops.zephyr.gptq_dequantize_repacked(qweight, scales, zeros, perm, bits, group_size)


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int):
    """Checkpoint layout to ``scales.dtype [K, N]``; see the module docstring."""
    if bits not in (4, 8):
        raise ValueError(f"gptq_dequantize: bits must be 4 or 8, got {bits}")
    allowed = (torch.float16, torch.bfloat16) + (() if scales.is_cuda else (torch.float32,))
    if scales.dim() != 2 or scales.dtype not in allowed or not scales.is_contiguous():
        raise ValueError(f"gptq_dequantize: scales must be contiguous {' or '.join(map(str, allowed))} [G, N], "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    if g_idx.dim() != 1 or g_idx.dtype != torch.int32:
        raise ValueError(f"gptq_dequantize: g_idx must be int32 [K], got {g_idx.dtype} {tuple(g_idx.shape)}")
    per, (k, (groups, n)) = 32 // bits, (g_idx.shape[0], scales.shape)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (-(-k // per), n):
        raise ValueError(f"gptq_dequantize: qweight must be int32 [{-(-k // per)}, {n}], got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (groups, -(-n // per)):
        raise ValueError(f"gptq_dequantize: qzeros must be int32 [{groups}, {-(-n // per)}], got "
                         f"{qzeros.dtype} {tuple(qzeros.shape)}")
    return torch.ops.zephyr.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset)


DECODE_ATTENTION_MAX_GROUP = 8  # kMaxGroup in kernels/decode_attention.cu
DECODE_ATTENTION_HEAD_DIMS = (64, 128)


def decode_attention_unsupported(n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the CUDA ``decode_attention`` kernel cannot serve this attention shape, or None."""
    if n_kv_heads < 1 or n_heads % n_kv_heads or n_heads // n_kv_heads > DECODE_ATTENTION_MAX_GROUP:
        return f"{n_heads} query heads on {n_kv_heads} kv heads (at most {DECODE_ATTENTION_MAX_GROUP} per kv head)"
    if head_dim not in DECODE_ATTENTION_HEAD_DIMS:
        return f"head_dim={head_dim} (served: {DECODE_ATTENTION_HEAD_DIMS})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (served: float16, bfloat16)"
    return None


def decode_attention(qkv, cos, sin, k_cache, v_cache, slot, pad, locks, n_heads: int, n_kv_heads: int, kv_len: int,
                     window: int = 0, block_keys: int = 0, out_index=None):
    """One decode step of attention, cache write included; see the module docstring for every argument."""
    def bad(msg: str):
        raise ValueError(f"decode_attention: {msg}")

    if qkv.dim() != 2 or not qkv.is_contiguous():
        bad(f"qkv must be a contiguous [B, (H + 2 Hkv) hd] tensor, got shape {tuple(qkv.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        bad(f"k_cache and v_cache must be contiguous [Bmax, Hkv, Lmax, hd] of one shape, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    bsz, hd, lmax = qkv.shape[0], k_cache.shape[3], k_cache.shape[2]
    if qkv.is_cuda:
        why = decode_attention_unsupported(n_heads, n_kv_heads, hd, qkv.dtype)
        if why:
            bad(f"the CUDA kernel does not serve {why}")
    elif n_kv_heads < 1 or n_heads % n_kv_heads:
        bad(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    if k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype:
        bad(f"the cache ({k_cache.dtype}, {v_cache.dtype}) must have qkv's dtype {qkv.dtype}")
    if qkv.shape[1] != (n_heads + 2 * n_kv_heads) * hd or k_cache.shape[1] != n_kv_heads or k_cache.shape[0] < bsz:
        bad(f"qkv {tuple(qkv.shape)} does not fit {n_heads} + 2 x {n_kv_heads} heads of the cache "
            f"{tuple(k_cache.shape)}")
    if not 1 <= kv_len <= lmax:
        bad(f"kv_len={kv_len} outside [1, {lmax}]")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != (bsz, hd // 2):
            bad(f"{name} must be contiguous float32 [{bsz}, {hd // 2}], got {t.dtype} {tuple(t.shape)}")
    if slot.dtype != torch.int64 or slot.numel() != 1:
        bad(f"slot must be int64 [1], got {slot.dtype} {tuple(slot.shape)}")
    if pad.dtype != torch.int64 or tuple(pad.shape) != (bsz,):
        bad(f"pad must be int64 [{bsz}], got {pad.dtype} {tuple(pad.shape)}")
    if locks.dtype != torch.int32 or locks.numel() < bsz * n_kv_heads:
        bad(f"locks must be int32 [>= {bsz * n_kv_heads}] zeros, got {locks.dtype} {tuple(locks.shape)}")
    if window < 0 or block_keys < 0 or block_keys % 64 or block_keys > 1024:
        bad(f"window must be >= 0 and block_keys 0 or a multiple of 64 up to 1024, got {window}, {block_keys}")
    if out_index is not None and (out_index.dtype != torch.int64 or tuple(out_index.shape) != (n_heads * hd,)
                                  or not out_index.is_contiguous()):  # fmt: skip
        bad(f"out_index must be contiguous int64 [{n_heads * hd}], got {out_index.dtype} {tuple(out_index.shape)}")
    for name, t in (("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache), ("slot", slot),
                    ("pad", pad), ("locks", locks), ("out_index", out_index)):
        if t is not None and t.device != qkv.device:
            bad(f"{name} is on {t.device} but qkv is on {qkv.device}")
    return torch.ops.zephyr.decode_attention(qkv, cos, sin, k_cache, v_cache, slot, pad, locks, n_heads, n_kv_heads,
                                             kv_len, window, block_keys, out_index)
