"""``load``: a GPTQ checkpoint as a transformers ``MistralForCausalLM`` on our layers.

Every check (config, tensor names, shapes, dtypes, ``g_idx`` ranges, file
integrity) runs before the model is built, so bad input fails fast with a
message naming the problem.

Example::

    >>> import zephyr_plugins as zp
    >>> model, tok = zp.load("TheBloke/zephyr-7B-beta-GPTQ:gptq-4bit-32g-actorder_True")
    >>> ids = tok(zp.zephyr_prompt("Tell me about AI"), return_tensors="pt")
    >>> out = model.generate(**ids, max_new_tokens=32)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch
from torch import nn

from .checkpoint import CheckpointReader, resolve_checkpoint
from .config import GPTQConfig
from .errors import CheckpointError
from .quant_linear import QuantLinear, validate_layer_tensors

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("mistral", "llama")
# Buffers some old checkpoints carry that the model recomputes itself.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def mistral_config_from_dict(raw: dict):
    """A ``MistralConfig`` for a Mistral or Llama-family ``config.json``.

    Llama checkpoints without the features Mistral lacks (biases in attention
    or MLP, rope scaling) load unchanged into ``MistralForCausalLM``.
    """
    from transformers import MistralConfig

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"config.json: model_type={model_type!r} is not supported; allowed values: {list(SUPPORTED_MODEL_TYPES)}"
        )
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise CheckpointError(f"config.json: {key}=true is not supported by the Mistral architecture")
    rope = raw.get("rope_scaling")
    if rope and (rope.get("rope_type") or rope.get("type")) not in (None, "default"):
        raise CheckpointError(f"config.json: rope_scaling={rope!r} is not supported")
    keep = {
        k: raw[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "sliding_window",
            "torch_dtype",
            "dtype",
        )
        if k in raw
    }
    if model_type == "llama":
        keep.setdefault("sliding_window", None)
    if "rope_theta" not in keep and isinstance(raw.get("rope_parameters"), dict):
        keep["rope_theta"] = raw["rope_parameters"].get("rope_theta", 10000.0)
    cfg = MistralConfig(**keep)
    cfg.architectures = ["MistralForCausalLM"]
    return cfg


def read_model_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: config.json not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _linear_names(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def plan_layers(model: nn.Module, reader: CheckpointReader, qcfg: GPTQConfig) -> dict[str, tuple[int, int, bool]]:
    """Which linears are quantized in the checkpoint, checked against their shapes.

    Returns ``{name: (in_features, out_features, has_bias)}`` for the quantized ones.
    Raises :class:`CheckpointError` on a missing, extra or misshapen tensor.
    """
    keys = set(reader.keys())
    quantized: dict[str, tuple[int, int, bool]] = {}
    for name, lin in _linear_names(model).items():
        if f"{name}.qweight" in keys:
            has_bias = f"{name}.bias" in keys
            tensors = {
                t: reader.meta_tensor(f"{name}.{t}")
                for t in ("qweight", "qzeros", "scales", "g_idx", "bias")
                if f"{name}.{t}" in keys
            }
            validate_layer_tensors(name, qcfg, lin.in_features, lin.out_features, tensors, has_bias)
            if f"{name}.g_idx" in keys:
                g_idx = reader.get(f"{name}.g_idx")
                validate_layer_tensors(name, qcfg, lin.in_features, lin.out_features, {**tensors, "g_idx": g_idx}, has_bias)
            elif qcfg.desc_act:
                raise CheckpointError(f"layer {name!r}: desc_act=True but the checkpoint has no {name}.g_idx")
            quantized[name] = (lin.in_features, lin.out_features, has_bias)
    if not quantized:
        raise CheckpointError(f"{reader.folder}: no quantized layers (no '*.qweight' tensors) in the checkpoint")
    return quantized


def build_model(folder: str, dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu"):
    """Build ``MistralForCausalLM`` with ``QuantLinear`` layers and the checkpoint's tensors."""
    from transformers import MistralForCausalLM

    raw = read_model_config(folder)
    qcfg = GPTQConfig.from_folder(folder)
    hf_cfg = mistral_config_from_dict(raw)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    reader = CheckpointReader(folder)

    with torch.device("meta"):
        model = MistralForCausalLM(hf_cfg)
    quantized = plan_layers(model, reader, qcfg)

    # All checks of tensor names below happen before any data is read.
    expected: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        owner = name.rsplit(".", 1)[0]
        if owner in quantized or name.endswith(_IGNORED_SUFFIXES) or "rotary_emb" in name:
            continue
        expected[name] = t
    if hf_cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    wanted = set(expected)
    for name, (_, _, has_bias) in quantized.items():
        wanted |= {f"{name}.{t}" for t in ("qweight", "qzeros", "scales")}
        wanted |= {f"{name}.{t}" for t in ("g_idx", "bias") if f"{name}.{t}" in reader}
    present = {k for k in reader.keys() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(wanted - present)
    extra = sorted(present - wanted - ({"lm_head.weight"} if hf_cfg.tie_word_embeddings else set()))
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise CheckpointError(f"{folder}: checkpoint has unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for name, t in expected.items():
        if reader.shape(name) != tuple(t.shape):
            raise CheckpointError(f"{folder}: tensor {name!r} has shape {reader.shape(name)}, model expects {tuple(t.shape)}")

    # Swap in QuantLinear (still on meta), then fill every tensor.
    for name, (k, n, has_bias) in quantized.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        scales_dtype = reader.dtype(f"{name}.scales")
        setattr(parent, child, QuantLinear(k, n, qcfg, bias=has_bias, scales_dtype=scales_dtype, device="meta"))
    model = model.to_empty(device=device)
    for name in expected:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        value = reader.get(name).to(device=device, dtype=dtype)
        if isinstance(getattr(owner, attr), nn.Parameter):
            setattr(owner, attr, nn.Parameter(value, requires_grad=False))
        else:
            setattr(owner, attr, value)
    for name in quantized:
        layer = model.get_submodule(name)
        tensors = {t: reader.get(f"{name}.{t}").to(device) for t in ("qweight", "qzeros", "scales", "g_idx", "bias") if f"{name}.{t}" in reader}
        layer.load_checkpoint_tensors(name, **tensors)
    # Non-persistent buffers (rotary frequencies) were left uninitialised by to_empty.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=hf_cfg).to(device)
    if hf_cfg.tie_word_embeddings:
        model.tie_weights()
    model.config.quantization_config = qcfg.to_dict()
    model.config.dtype = dtype
    model.eval()
    model.requires_grad_(False)
    return model, qcfg


def load_tokenizer(folder: str):
    """The checkpoint's tokenizer, or ``None`` (with a warning) if it ships none."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
        log.warning("%s: no tokenizer files; returning tokenizer=None", folder)
        return None
    return AutoTokenizer.from_pretrained(folder)


def load(
    ref: str | os.PathLike,
    *,
    revision: Optional[str] = None,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
):
    """Load a GPTQ checkpoint (folder or ``repo[:branch]``): returns ``(model, tokenizer)``.

    The model is a ``MistralForCausalLM`` whose quantized linears are
    :class:`~zephyr_plugins.quant_linear.QuantLinear`. ``dtype`` defaults to
    fp16 on CUDA and fp32 on the CPU. ``backend`` forces a kernel backend by
    name (default: the best registered one for the device).
    """
    folder = resolve_checkpoint(ref, revision)
    model, _ = build_model(folder, dtype=dtype, device=device)
    if backend is not None:
        prepare_model(model, backend=backend)
    tokenizer = load_tokenizer(folder)
    return model, tokenizer


def prepare_model(model: nn.Module, dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> dict[str, str]:
    """Select kernels and repack every ``QuantLinear`` now (before graph capture or compile).

    Returns ``{layer name: backend name}``.
    """
    dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    chosen = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            chosen[name] = m.prepare(dtype, backend=backend).name
    return chosen
