"""The model's elementwise pieces, as plain functions that ``torch.compile`` can fuse.

A decode step of a 7B model launches ~50 small kernels per layer when these
run op by op (RMSNorm alone is seven); inside a CUDA graph each still costs a
few microseconds, ~4 ms per step in all, more than the 4-bit weights take to
read. Compiled (Inductor, dynamic shapes), each function below becomes one or
two fused kernels. The functions take only tensors and numbers, never
modules, so one compiled version serves every layer.

:class:`ModelOps` holds either the compiled or the plain versions; the CPU
always uses the plain ones (same arithmetic).

Example::

    >>> ops = ModelOps(compile=True)                 # on CUDA
    >>> h = ops.rms_norm(x, weight, 1e-5)            # x: [B, S, D]
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x: [..., D]``; normalised in fp32 (as the reference model does), then scaled in ``x.dtype``.

    ``perm``: int64 ``[D]``: return ``out[..., perm]``, the order an act-order layer reads its input in.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if perm is None else out[..., perm]


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float,
                 perm: Optional[torch.Tensor] = None):  # fmt: skip
    """``(x + h, rms_norm(x + h, ..., perm))``: the residual add fused with the next norm."""
    s = x + h
    return s, rms_norm(s, weight, eps, perm)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, S, 1, hd/2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def split_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int):
    """Split ``qkv: [B, S, (H + 2 Hkv) hd]`` and rotate q and k (HF "rotate half" layout).

    Returns ``q: [B, H, S, hd]``, ``k, v: [B, Hkv, S, hd]``; ``cos, sin: fp32 [B, S, hd/2]``.
    q and k heads are rotated as one block (one fused kernel rather than two).
    """
    bsz, seqlen, _ = qkv.shape
    qk = qkv[..., : (n_heads + n_kv_heads) * head_dim].reshape(bsz, seqlen, n_heads + n_kv_heads, head_dim)
    qk = _rotate(qk, cos, sin)
    q, k = qk[:, :, :n_heads], qk[:, :, n_heads:]
    v = qkv[..., (n_heads + n_kv_heads) * head_dim :].reshape(bsz, seqlen, n_kv_heads, head_dim)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def rope_and_mask(slots: torch.Tensor, pad: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                  kv_len: int, window: Optional[int], with_mask: bool):  # fmt: skip
    """Per-step tables: ``cos, sin: fp32 [B, S, hd/2]`` at each row's positions, and the attention mask.

    ``slots: int64 [S]`` cache slots of the chunk; ``pad: int64 [B]`` left padding. The mask
    (``bool [B, 1, S, kv_len]``, see :func:`zephyr_plugins.kv_cache.attention_mask`) is ``None``
    unless ``with_mask``.
    """
    from .kv_cache import attention_mask

    pos = (slots.unsqueeze(0) - pad.unsqueeze(1)).clamp_min(0)  # [B, S] positions (padding: 0)
    mask = attention_mask(slots, pad, kv_len, window) if with_mask else None
    return rope_cos[pos], rope_sin[pos], mask


def silu_mul(gate_up: torch.Tensor, intermediate_size: int, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up`` for ``gate_up: [..., 2F]`` -> ``[..., F]`` (``[..., perm]`` if given)."""
    gate, up = gate_up.split(intermediate_size, dim=-1)
    out = F.silu(gate) * up
    return out if perm is None else out[..., perm]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """One query per row. ``q: [B, H, 1, hd]``, ``k, v: [B, Hkv, L, hd]``, ``mask: bool [B, 1, 1, L]``.

    Returns ``[B, 1, H * hd]`` (ready for the output projection). The H query heads are
    grouped by KV head rather than repeating K/V, which would read the cache H / Hkv times.
    """
    bsz, h, _, hd = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    qg = q.reshape(bsz, hkv, h // hkv, hd)  # [B, Hkv, G, hd]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(hd))  # [B, Hkv, G, L]
    if mask is not None:
        scores = scores.masked_fill(~mask.view(bsz, 1, 1, kv_len), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(bsz, 1, h * hd)  # [B, Hkv, G, hd] -> [B, 1, H*hd]


_FUNCTIONS = {
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "split_rope": split_rope,
    "silu_mul": silu_mul,
    "rope_and_mask": rope_and_mask,
    "decode_attention": decode_attention,
}
_compiled: dict[str, object] = {}
_lock = threading.Lock()


class _Guarded:
    """A compiled function that falls back, once and for good, to the plain one if compiling fails."""

    def __init__(self, name: str, fn):
        # Decode attention reduces over a few hundred slots for only B * H rows: Inductor would split
        # that reduction into several kernels, each costing more launch time than work.
        options = {"split_reductions": False} if name == "decode_attention" else None
        self.name, self.fn = name, fn
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=options)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # an Inductor/Triton problem must not stop generation
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                warnings.warn(f"zephyr_plugins: torch.compile of {self.name} failed ({type(exc).__name__}: {exc}); "
                              "using the plain version")  # fmt: skip
                self.compiled = None
        return self.fn(*args)


class ModelOps:
    """The elementwise functions the model calls: compiled (``compile=True``) or plain.

    ``fused_decode``: decode steps (one token per row) run rope, the cache write
    and attention as one ``zephyr::decode_attention`` op (a CUDA kernel; on the
    CPU its reference, the same arithmetic as the functions below).
    ``permuted_inputs``: in decode steps, the norms and the SwiGLU write their
    output in the row order of the act-order layer that reads it
    (``QuantLinear.input_permutation``), which then skips its own gather.
    ``fused_swiglu``: the SwiGLU is computed by the gate/up projection's kernel where its
    backend offers that for the input (``QuantLinear.forward_swiglu``: the CUDA backend at
    decode batches), instead of by ``silu_mul`` after it.
    """

    def __init__(self, compile: bool = False, fused_decode: bool = False, permuted_inputs: bool = False,
                 fused_swiglu: bool = False):
        self.compile = compile
        self.fused_decode = fused_decode
        self.permuted_inputs = permuted_inputs
        self.fused_swiglu = fused_swiglu
        for name, fn in _FUNCTIONS.items():
            if compile:
                with _lock:  # one compiled version per process, shared by every model
                    if name not in _compiled:
                        _compiled[name] = _Guarded(name, fn)
                fn = _compiled[name]
            setattr(self, name, fn)
        if compile:
            self.add_rms_norm = _with_norm_kernel(self.add_rms_norm)


def _with_norm_kernel(fallback):
    """``add_rms_norm`` on CUDA through one kernel: the Triton one (:mod:`.norm_kernel`) without a
    permutation, ``zephyr::add_rms_norm_permuted`` (CUDA, ``kernels/add_rms_norm.cu``) with one;
    else ``fallback`` (the compiled version). ``ZEPHYR_PERMUTED_NORM_KERNEL=0`` keeps the compiled
    version for permuted rows."""
    from . import norm_kernel
    from .kernel_ops import add_rms_norm_permuted_unsupported

    permuted_kernel = os.environ.get("ZEPHYR_PERMUTED_NORM_KERNEL", "1") != "0"

    def permuted_ok(x, h, weight, perm) -> bool:
        if not (permuted_kernel and x.is_cuda) or add_rms_norm_permuted_unsupported(x, h, weight, perm) is not None:
            return False
        from .kernel_build import ensure_built

        return ensure_built()[0]

    def add_rms_norm_fused(x, h, weight, eps, perm=None):
        if perm is None:
            if norm_kernel.available(x, weight):
                return norm_kernel.add_rms_norm(x, h, weight, eps)
        elif permuted_ok(x, h, weight, perm):
            return torch.ops.zephyr.add_rms_norm_permuted(x, h, weight, eps, perm)
        return fallback(x, h, weight, eps, perm)

    return add_rms_norm_fused
