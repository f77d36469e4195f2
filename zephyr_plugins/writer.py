"""Writing GPTQ checkpoints that every GPTQ tool can read (AutoGPTQ / TheBloke layout).

The tensors of one layer come from integer codes, zero points and scales
(:func:`pack_layer`); :func:`write_checkpoint` writes a complete folder
atomically. :func:`quantize_model_rtn` is round-to-nearest, good for format
tests and as a baseline; GPTQ proper lives in :mod:`zephyr_plugins.gptq`.

Example::

    >>> tensors = quantize_model_rtn(float_model, GPTQConfig(bits=4, group_size=128, desc_act=True))
    >>> write_checkpoint("out", tensors, float_model.config.to_dict(), cfg, tokenizer=tok)
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import torch
from torch import nn

from .checkpoint import atomic_folder, save_tensors, write_json
from .config import GPTQConfig
from .packing import pack_cols, pack_rows
from .reference import quantize_rtn

QUANTIZED_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_layer(
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    config: GPTQConfig,
    scales_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors from codes ``q int [K, N]``, real zero points ``[G, N]``, scales ``[G, N]``, ``g_idx [K]``."""
    mask = (1 << config.bits) - 1
    stored_zeros = (zeros.to(torch.int64) - config.zero_offset) & mask  # v1 stores zero - 1
    return {
        "qweight": pack_rows(q, config.bits),
        "qzeros": pack_cols(stored_zeros, config.bits),
        "scales": scales.to(scales_dtype).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def act_order_permutation(weight: torch.Tensor) -> torch.Tensor:
    """A stand-in for GPTQ's act-order when no Hessian exists: input columns by descending norm."""
    return torch.argsort(weight.float().pow(2).sum(0), descending=True, stable=True)


def g_idx_for_order(perm: torch.Tensor, group_size: int) -> torch.Tensor:
    """``g_idx`` when rows are quantized in the order ``perm`` (``perm[i]`` is the i-th row quantized)."""
    k = perm.numel()
    gs = k if group_size == -1 else group_size
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    return g_idx


def quantizable_linears(model: nn.Module, lm_head: bool = False) -> dict[str, nn.Linear]:
    """The linear layers GPTQ quantizes in a Mistral/Llama model (all of each decoder block's)."""
    found = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_SUFFIXES
    }
    if lm_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        found["lm_head"] = model.lm_head
    return found


def quantize_model_rtn(model: nn.Module, config: GPTQConfig) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantize ``model``'s linears; returns the full checkpoint state dict.

    With ``config.desc_act`` the rows are grouped in act-order (columns by
    descending weight norm), so ``g_idx`` is a non-trivial permutation.
    """
    targets = quantizable_linears(model, config.lm_head)
    out: dict[str, torch.Tensor] = {}
    for name, m in targets.items():
        w = m.weight.detach().float()
        g_idx = g_idx_for_order(act_order_permutation(w), config.group_size) if config.desc_act else None
        q, zeros, scales, g_idx = quantize_rtn(w, config.bits, config.group_size, config.sym, g_idx)
        for key, t in pack_layer(q, zeros, scales, g_idx, config).items():
            out[f"{name}.{key}"] = t
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().to(torch.float16)
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in targets or (tied and name == "lm_head.weight") or "rotary_emb" in name:
            continue
        out[name] = t.detach().to(torch.float16)
    return out


def write_checkpoint(
    folder: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    model_config: Mapping,
    config: GPTQConfig,
    tokenizer=None,
    generation_config: Optional[Mapping] = None,
    overwrite: bool = False,
    max_shard_bytes: int = 4 * 1024**3,
) -> str:
    """Write a complete GPTQ checkpoint folder atomically; returns its path.

    ``config.json`` carries ``quantization_config`` and ``quantize_config.json``
    the same settings (with any extra keys), as TheBloke's repos do.
    """
    folder = os.fspath(folder)
    model_cfg = json.loads(json.dumps(dict(model_config), default=str))
    model_cfg["quantization_config"] = config.to_dict()
    model_cfg.setdefault("torch_dtype", "float16")
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        save_tensors(tmp, tensors, max_shard_bytes=max_shard_bytes)
        write_json(os.path.join(tmp, "config.json"), model_cfg)
        write_json(os.path.join(tmp, "quantize_config.json"), config.to_dict())
        if generation_config:
            write_json(os.path.join(tmp, "generation_config.json"), dict(generation_config))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder
