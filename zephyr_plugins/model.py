"""Flat model code for the Mistral / Llama family (what Zephyr-7B, Mistral-7B and SmolLM2 need).

RMSNorm, rotary embeddings (``rope_theta``), grouped-query attention with an
optional sliding window (exact at any length: the static cache keeps every
position and the mask hides what lies outside the window), SwiGLU MLP and a
tied or untied head. q/k/v and gate/up are each one matmul (fused at load
time, :mod:`zephyr_plugins.model_loading`). Linears are ``QuantLinear`` or
:class:`Linear` (an ``nn.Linear``); speed comes from CUDA graphs and kernels,
not from Python.

Example::

    >>> args = ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
    ...                  intermediate_size=14336, sliding_window=4096)
    >>> model = Transformer(args)          # then fill weights (model_loading.load_transformer)
    >>> model.setup_cache(max_batch_size=8, max_seq_len=2048, dtype=torch.float16)
    >>> logits = model(tokens, start=0, pad=pad)     # prefill: tokens [B, S] -> [B, V] (last position)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_ops import DENSE_GEMV_MAX_ROWS, decode_attention, dense_gemv_unsupported
from .kv_cache import KVCache, prefill_attention
from .model_ops import ModelOps


# Largest decode batch whose act-order inputs are written permuted by their producers. On the H100
# (benchmarks/e2e.py, 4-bit g128 act-order): +2..7% at batch 1, -1.3% at batch 32 (the norms'
# permuted reads cost more than the layers' own gather there); batches between were not measured.
PERMUTE_MAX_BATCH = 8


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_hf(cls, cfg) -> "ModelArgs":
        """From a ``MistralConfig`` (``loader.mistral_config_from_dict`` has checked it)."""
        eos = cfg.eos_token_id
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            head_dim=getattr(cfg, "head_dim", None) or 0,
            norm_eps=cfg.rms_norm_eps,
            rope_theta=float(getattr(cfg, "rope_theta", None) or (cfg.rope_parameters or {}).get("rope_theta", 1e4)),
            sliding_window=cfg.sliding_window,
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            max_position_embeddings=cfg.max_position_embeddings,
            bos_token_id=cfg.bos_token_id,
            eos_token_ids=eos,
        )


class Linear(nn.Linear):
    """A float ``nn.Linear`` whose CUDA calls of up to ``gemv_rows`` rows (at most
    ``DENSE_GEMV_MAX_ROWS``) go to the ``zephyr::dense_gemv`` kernel; the runtime sets
    ``gemv_rows`` on the layers where that kernel measured faster than cuBLAS (see
    :func:`zephyr_plugins.runtime.dense_gemv_rows`). Every other call, and every call on
    the CPU, is ``F.linear``.
    """

    gemv_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv_rows and x.is_cuda and self.bias is None and x.dim() >= 1:
            k = x.shape[-1]
            m = x.numel() // k if k else 0
            if 0 < m <= min(self.gemv_rows, DENSE_GEMV_MAX_ROWS):
                x2 = x.reshape(m, k)
                if dense_gemv_unsupported(x2, self.weight) is None:
                    return torch.ops.zephyr.dense_gemv(x2, self.weight, 0).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class Concat(nn.Module):
    """Linears sharing one input whose outputs are concatenated.

    One fused layer when the checkpoint allows it (one launch, one weight read);
    several when it does not (e.g. act-order layers with different ``g_idx``).
    """

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([p(x) for p in self.parts], dim=-1)


def single_layer(module: nn.Module) -> Optional[nn.Module]:
    """The one layer behind ``module``: the part of a one-part :class:`Concat`, ``module`` itself if it is
    no Concat, None for a Concat of several parts (each with its own input order and kernel)."""
    if isinstance(module, Concat):
        return module.parts[0] if len(module.parts) == 1 else None
    return module


def input_permutation(module: nn.Module) -> Optional[torch.Tensor]:
    """The row order a (prepared) quantized layer wants its input in, or None (see ``ModelOps.permuted_inputs``)."""
    fn = getattr(single_layer(module), "input_permutation", None)
    return fn() if fn is not None else None


def project(module: nn.Module, x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """``module(x)``; with ``perm`` (from :func:`input_permutation`, so ``module`` is one layer), x is
    already ``x[..., perm]`` (the layer's own row order)."""
    if perm is None:
        return module(x)
    return single_layer(module).forward_permuted(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    # No forward: the model calls ``ops.rms_norm(x, norm.weight, norm.eps)`` (model_ops.py), which can be compiled.


def rope_tables(max_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin: fp32 [max_len, head_dim // 2]`` for positions ``0 .. max_len - 1``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, wqkv: nn.Module, wo: nn.Module):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = wqkv  # [B, S, D] -> [B, S, (H + 2 * Hkv) * hd]
        self.wo = wo  # [B, S, H * hd] -> [B, S, D]
        self.window = args.sliding_window or 0
        self.kv_cache: Optional[KVCache] = None
        self.qkv_perm: Optional[torch.Tensor] = None  # wqkv's input_permutation (set by Transformer.fold_permutations)
        self.o_perm: Optional[torch.Tensor] = None  # wo's, and its inverse (where the attention kernel writes)
        self.o_index: Optional[torch.Tensor] = None

    def forward(self, x, cos, sin, cache_index, mask, kv_len, ops: ModelOps, pad, fold: bool = False):
        # x: [B, S, D] (x[..., qkv_perm] with fold: decode steps; the fused kernel then also writes
        # wo's input in wo's order); cos/sin: [B, S, hd/2]; cache_index: int64 [S];
        # mask: bool [B, 1, S, kv_len] or None; pad: int64 [B]
        bsz, seqlen, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = project(self.wqkv, x, self.qkv_perm if fold else None)
        if seqlen == 1 and ops.fused_decode:  # rope + cache write + attention in one kernel (no mask needed)
            c = self.kv_cache
            o_perm = self.o_perm if fold else None
            y = decode_attention(qkv.view(bsz, -1), cos.reshape(bsz, -1), sin.reshape(bsz, -1), c.k, c.v,
                                 cache_index, pad, c.locks, h, hkv, kv_len, self.window, 0,
                                 None if o_perm is None else self.o_index)  # fmt: skip
            return project(self.wo, y.view(bsz, 1, h * hd), o_perm)
        q, k, v = ops.split_rope(qkv, cos, sin, h, hkv, hd)  # [B, H, S, hd], [B, Hkv, S, hd] x 2
        k_all, v_all = self.kv_cache.update(cache_index, k, v, kv_len)  # [B, Hkv, kv_len, hd]
        if mask is None:  # fresh causal prefill from slot 0: attend over this chunk only
            k_all, v_all = k, v
        if seqlen == 1:
            y = ops.decode_attention(q, k_all, v_all, mask)  # [B, 1, H * hd]
        else:
            y = prefill_attention(q, k_all, v_all, mask).transpose(1, 2).reshape(bsz, seqlen, h * hd)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, w_gate_up: nn.Module, w_down: nn.Module, intermediate_size: int):
        super().__init__()
        self.w_gate_up = w_gate_up  # [B, S, D] -> [B, S, 2 * F]
        self.w_down = w_down  # [B, S, F] -> [B, S, D]
        self.intermediate_size = intermediate_size
        self.gate_up_perm: Optional[torch.Tensor] = None  # input_permutation of each (Transformer.fold_permutations)
        self.down_perm: Optional[torch.Tensor] = None
        self.down_index: Optional[torch.Tensor] = None  # argsort(down_perm): where the SwiGLU writes column j

    def forward(self, x: torch.Tensor, ops: ModelOps, fold: bool = False) -> torch.Tensor:
        # fold: x is x[..., gate_up_perm] and the SwiGLU writes down's input in down's order (decode steps).
        down_perm = self.down_perm if fold else None
        if ops.fused_swiglu:  # the SwiGLU in the gate/up kernel's epilogue, where the backend has one for x
            fn = getattr(single_layer(self.w_gate_up), "forward_swiglu", None)
            act = None if fn is None else fn(x, fold and self.gate_up_perm is not None, self.down_index if fold else None)
            if act is not None:
                return project(self.w_down, act, down_perm)
        gate_up = project(self.w_gate_up, x, self.gate_up_perm if fold else None)
        return project(self.w_down, ops.silu_mul(gate_up, self.intermediate_size, down_perm), down_perm)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, attention: Attention, feed_forward: FeedForward):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = feed_forward

    def forward(self, x, h, cos, sin, cache_index, mask, kv_len, ops: ModelOps, next_norm: RMSNorm, pad,
                fold: bool = False, next_perm: Optional[torch.Tensor] = None):  # fmt: skip
        # x: [B, S, D] residual stream; h = attention_norm(x), computed by the previous block.
        # Each residual add is fused with the norm that follows it, the last one with the
        # next block's attention_norm (or the final norm): one kernel instead of two.
        # fold: every norm writes its output in the order its act-order reader wants (h already is);
        # next_perm is the next block's qkv order.
        a = self.attention(h, cos, sin, cache_index, mask, kv_len, ops, pad, fold)
        ff = self.feed_forward
        x, h = ops.add_rms_norm(x, a, self.ffn_norm.weight, self.ffn_norm.eps, ff.gate_up_perm if fold else None)
        return ops.add_rms_norm(x, ff(h, ops, fold), next_norm.weight, next_norm.eps, next_perm)


class Transformer(nn.Module):
    """The decoder. Build with :func:`zephyr_plugins.model_loading.load_transformer`."""

    def __init__(self, args: ModelArgs, layers: Sequence[Block], output: nn.Module):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = output  # [B, S, D] -> [B, S, V]
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.ops = ModelOps(compile=False)  # the runtime switches to compiled ops on CUDA

    def fold_permutations(self) -> int:
        """Record each act-order layer's input order (after its kernel is prepared); returns how many.

        With ``ops.permuted_inputs``, decode steps then feed those layers inputs written
        in that order by the norms and the SwiGLU, so the layers skip their own gather.
        """
        n = 0
        for layer in self.layers:
            att, ff = layer.attention, layer.feed_forward
            att.qkv_perm = input_permutation(att.wqkv)
            att.o_perm = input_permutation(att.wo)
            att.o_index = None if att.o_perm is None else torch.argsort(att.o_perm)
            ff.gate_up_perm = input_permutation(ff.w_gate_up)
            ff.down_perm = input_permutation(ff.w_down)
            ff.down_index = None if ff.down_perm is None else torch.argsort(ff.down_perm)
            n += sum(p is not None for p in (att.qkv_perm, att.o_perm, ff.gate_up_perm, ff.down_perm))
        return n

    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype) -> None:
        """Allocate the static KV cache and the rotary tables (once; reallocates if sizes change)."""
        device = self.tok_embeddings.weight.device
        a = self.args
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_len, a.n_kv_heads, a.head_dim, dtype, device)
        self.rope_cos, self.rope_sin = rope_tables(max_seq_len, a.head_dim, a.rope_theta, device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def forward(
        self,
        tokens: torch.Tensor,
        start: torch.Tensor | int,
        pad: torch.Tensor,
        kv_len: Optional[int] = None,
        last_only: bool = False,
        causal_fresh: bool = False,
    ) -> torch.Tensor:
        """Run ``tokens: int64 [B, S]`` written at cache slots ``start .. start + S - 1``.

        - ``start``: int or int64 tensor ``[1]`` (a tensor in CUDA graphs, so one graph serves every step).
        - ``pad: int64 [B]``: left padding of each row; slots ``< pad[b]`` are never attended.
        - ``kv_len``: cache slots to attend over (static; must exceed the last slot written).
        - ``causal_fresh``: the chunk starts at slot 0 with no padding and fits the window,
          so plain causal attention over the chunk is exact (flash kernels on CUDA).

        Returns fp32 logits ``[B, S, V]``, or ``[B, V]`` for the last position if ``last_only``.
        """
        bsz, seqlen = tokens.shape
        device = tokens.device
        kv_len = kv_len or self.max_seq_len
        ops = self.ops
        fused = seqlen == 1 and ops.fused_decode  # the decode attention kernel applies the mask's rule itself
        slots = torch.arange(seqlen, device=device) + start  # [S] cache slots of this chunk
        cos, sin, mask = ops.rope_and_mask(slots, pad, self.rope_cos, self.rope_sin, kv_len, self.args.sliding_window,
                                           not (causal_fresh or fused))  # [B, S, hd/2] x 2, [B, 1, S, kv_len] or None
        x = self.tok_embeddings(tokens)  # [B, S, D]
        # Decode steps of up to PERMUTE_MAX_BATCH rows: the norms, the SwiGLU and the attention kernel write
        # act-order layers' inputs permuted.
        fold = seqlen == 1 and bsz <= PERMUTE_MAX_BATCH and ops.permuted_inputs
        first = self.layers[0]
        h = ops.rms_norm(x, first.attention_norm.weight, first.attention_norm.eps,
                         first.attention.qkv_perm if fold else None)  # fmt: skip
        for i, layer in enumerate(self.layers):
            last = i + 1 == len(self.layers)
            next_norm = self.norm if last else self.layers[i + 1].attention_norm
            next_perm = None if last or not fold else self.layers[i + 1].attention.qkv_perm
            x, h = layer(x, h, cos, sin, slots, mask, kv_len, ops, next_norm, pad, fold, next_perm)
        if last_only:
            h = h[:, -1:]  # h = norm(x): the norm is per position
        logits = self.output(h).float()  # [B, S', V]
        return logits[:, -1] if last_only else logits
