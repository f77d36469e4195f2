"""Build a :class:`~zephyr_plugins.model.Transformer` from a GPTQ or float checkpoint folder.

Checks run before any weight is read, reusing :mod:`zephyr_plugins.loader`
(config parsing, per-layer tensor validation). q/k/v and gate/up are fused
into one layer each when the checkpoint allows it:

- quantized: ``qweight``/``scales``/``qzeros`` are concatenated along N, which
  needs ``N * bits`` to be a multiple of 32 for every part (``qzeros`` is
  packed along N) and one shared ``g_idx`` (true for GPTQ act-order, whose
  q/k/v share one Hessian; not for RTN act-order). Otherwise the parts stay
  separate layers and their outputs are concatenated.
- float: the weights are concatenated along their output dimension.

Example::

    >>> model, qcfg = load_transformer("zephyr-gptq-folder", device="cuda", dtype=torch.float16)
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .checkpoint import CheckpointReader
from .config import GPTQConfig
from .errors import CheckpointError
from .loader import mistral_config_from_dict, plan_layers, read_model_config
from .model import Attention, Block, Concat, FeedForward, Linear, ModelArgs, RMSNorm, Transformer
from .quant_linear import QuantLinear
from .reference import trivial_g_idx

_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def is_quantized_folder(folder: str, raw: dict) -> bool:
    return "quantization_config" in raw or os.path.isfile(os.path.join(folder, "quantize_config.json"))


def check_checkpoint(folder: str, reader: CheckpointReader, hf_cfg, qcfg: Optional[GPTQConfig]) -> dict:
    """Validate names, shapes and quantized layers of a checkpoint; returns the quantized-layer plan."""
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        ref = MistralForCausalLM(hf_cfg)
    quantized = plan_layers(ref, reader, qcfg) if qcfg is not None else {}
    wanted: dict[str, tuple] = {}
    for name, t in ref.named_parameters():
        if name.rsplit(".", 1)[0] not in quantized:
            wanted[name] = tuple(t.shape)
    tied = bool(hf_cfg.tie_word_embeddings)
    if tied:
        wanted.pop("lm_head.weight", None)
    present = {k for k in reader.keys() if not k.endswith(_IGNORED_SUFFIXES)}
    for name in quantized:
        present -= {f"{name}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    missing = sorted(set(wanted) - present)
    extra = sorted(present - set(wanted) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise CheckpointError(f"{folder}: checkpoint has unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for name, shape in wanted.items():
        if reader.shape(name) != shape:
            raise CheckpointError(f"{folder}: tensor {name!r} has shape {reader.shape(name)}, model expects {shape}")
        if not reader.dtype(name).is_floating_point:
            raise CheckpointError(f"{folder}: tensor {name!r} must be floating point, got {reader.dtype(name)}")
    return quantized


def load_transformer(folder: str, device="cpu", dtype: Optional[torch.dtype] = None):
    """``(Transformer, GPTQConfig or None)`` for a checkpoint folder (quantized or float)."""
    raw = read_model_config(folder)
    hf_cfg = mistral_config_from_dict(raw)
    args = ModelArgs.from_hf(hf_cfg)
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    qcfg = GPTQConfig.from_folder(folder) if is_quantized_folder(folder, raw) else None
    reader = CheckpointReader(folder)
    quantized = check_checkpoint(folder, reader, hf_cfg, qcfg)

    def tensor(name: str) -> torch.Tensor:
        return reader.get(name).to(device=device, dtype=dtype)

    def linear(prefix: str, names: list[str]) -> Concat:
        full = [f"{prefix}.{n}" for n in names]
        if all(n in quantized for n in full):
            fused = _fuse_quantized(full, quantized, reader, qcfg, device)
            if fused is not None:
                return Concat([fused])
        if not any(n in quantized for n in full):
            w = torch.cat([tensor(f"{n}.weight") for n in full], dim=0)  # [sum N, K]
            lin = Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            return Concat([lin])
        return Concat([_single(n, quantized, reader, qcfg, device, tensor) for n in full])

    layers = []
    for i in range(args.n_layers):
        p = f"model.layers.{i}"
        attn = Attention(args, linear(f"{p}.self_attn", ["q_proj", "k_proj", "v_proj"]), linear(f"{p}.self_attn", ["o_proj"]))
        ff = FeedForward(
            linear(f"{p}.mlp", ["gate_proj", "up_proj"]), linear(f"{p}.mlp", ["down_proj"]), args.intermediate_size
        )
        with torch.device("meta"):
            block = Block(args, attn, ff)
        block.attention_norm.weight = nn.Parameter(tensor(f"{p}.input_layernorm.weight"), requires_grad=False)
        block.ffn_norm.weight = nn.Parameter(tensor(f"{p}.post_attention_layernorm.weight"), requires_grad=False)
        layers.append(block)

    embed = nn.Parameter(tensor("model.embed_tokens.weight"), requires_grad=False)
    if args.tie_word_embeddings:
        output = Linear(args.dim, args.vocab_size, bias=False, device="meta")
        output.weight = embed
    elif "lm_head" in quantized:
        output = _single("lm_head", quantized, reader, qcfg, device, tensor)
    else:
        output = Linear(args.dim, args.vocab_size, bias=False, device="meta")
        output.weight = nn.Parameter(tensor("lm_head.weight"), requires_grad=False)
    with torch.device("meta"):
        model = Transformer(args, layers, output)
    model.tok_embeddings.weight = embed
    model.norm.weight = nn.Parameter(tensor("model.norm.weight"), requires_grad=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"model tensors left unfilled: {left[:8]}")
    model.eval().requires_grad_(False)
    return model, qcfg


def _layer_tensors(name: str, reader: CheckpointReader, device) -> dict[str, torch.Tensor]:
    return {t: reader.get(f"{name}.{t}").to(device) for t in ("qweight", "qzeros", "scales", "g_idx", "bias") if f"{name}.{t}" in reader}


def _single(name, quantized, reader, qcfg, device, tensor) -> nn.Module:
    if name not in quantized:
        w = tensor(f"{name}.weight")
        lin = Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        return lin
    k, n, has_bias = quantized[name]
    layer = QuantLinear(k, n, qcfg, bias=has_bias, scales_dtype=reader.dtype(f"{name}.scales"), device=device)
    layer.load_checkpoint_tensors(name, **_layer_tensors(name, reader, device))
    return layer


def _fuse_quantized(names, quantized, reader, qcfg: GPTQConfig, device) -> Optional[QuantLinear]:
    """One QuantLinear for ``names`` (same input), or ``None`` if their tensors cannot be concatenated."""
    ks = {quantized[n][0] for n in names}
    biases = {quantized[n][2] for n in names}
    dtypes = {reader.dtype(f"{n}.scales") for n in names}
    if len(ks) != 1 or len(biases) != 1 or len(dtypes) != 1:
        return None
    if any(quantized[n][1] * qcfg.bits % 32 for n in names):
        return None  # qzeros words would straddle two layers' columns
    (k,) = ks
    parts = [_layer_tensors(n, reader, device) for n in names]
    trivial = trivial_g_idx(k, qcfg.group_size, device)
    g_idx = [p.get("g_idx", trivial).to(torch.int32) for p in parts]
    if any(not torch.equal(g_idx[0], g) for g in g_idx[1:]):
        return None  # act-order layers quantized in different orders
    fused = {key: torch.cat([p[key] for p in parts], dim=-1) for key in ("qweight", "qzeros", "scales")}
    fused["g_idx"] = g_idx[0]
    if biases == {True}:
        fused["bias"] = torch.cat([p["bias"] for p in parts])
    n_total = sum(quantized[n][1] for n in names)
    layer = QuantLinear(k, n_total, qcfg, bias=biases == {True}, scales_dtype=dtypes.pop(), device=device)
    layer.load_checkpoint_tensors("+".join(names), **fused)
    return layer
