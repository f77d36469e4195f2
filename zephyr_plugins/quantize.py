"""Block-by-block GPTQ of a Mistral/Llama model, and writing the result as a checkpoint.

The inputs of decoder block 0 are captured once; then for each block: hooks
on its linears accumulate Hessians, the linears are GPTQ-quantized group by
group (``true_sequential``: q/k/v, then o, then gate/up, then down, each
seeing the outputs of the already-quantized ones), their weights are replaced
by the dequantized ones, and the block is replayed to produce the next
block's inputs. Only one block lives on ``device`` at a time, so memory is one
block plus the calibration activations.

Example::

    >>> from zephyr_plugins.quantize import quantize_to_folder
    >>> cfg = GPTQConfig(bits=4, group_size=128, desc_act=True, damp_percent=0.1)
    >>> quantize_to_folder("my-float-mistral", "my-gptq", cfg, dataset="calib.txt", nsamples=128, seqlen=2048)
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional
import torch
from torch import nn

from .calibration import Dataset, calibration_windows
from .config import GPTQConfig
from .gptq import HessianAccumulator, gptq_quantize
from .writer import QUANTIZED_SUFFIXES, pack_layer, write_checkpoint

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("mistral", "llama")
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class _Stop(Exception):
    """Raised from a hook to end a forward pass early (its remaining output is not needed)."""


def check_model(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a Mistral/Llama-like causal LM we can quantize."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={mtype!r} is not supported for GPTQ; allowed values: {list(SUPPORTED_MODEL_TYPES)}"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__} has no decoder blocks at model.model.layers")


def _block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in QUANTIZED_SUFFIXES}


def _groups(names: list[str], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [names]
    out = [[n for n in names if n.rsplit(".", 1)[-1] in g] for g in SEQUENTIAL_GROUPS]
    out = [g for g in out if g]
    rest = [n for n in names if not any(n in g for g in out)]
    return out + ([rest] if rest else [])


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


@torch.no_grad()
def _capture_block0_inputs(model, ids: torch.Tensor, batch_size: int, device) -> list[tuple[torch.Tensor, dict]]:
    """Run the model up to block 0 and record what the model passes it, one entry per batch."""
    inner = model.model
    layers = inner.layers
    moved = [inner.embed_tokens, inner.rotary_emb, layers[0]]
    for m in moved:
        m.to(device)
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")}
        captured.append((hidden, kw))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[b : b + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def _run_block(block, inputs) -> list[torch.Tensor]:
    """The block's outputs for every batch (older transformers return a tuple)."""
    outs = []
    for hidden, kw in inputs:
        out = block(hidden, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    tokenizer,
    config: GPTQConfig,
    dataset: Dataset,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    progress: bool = True,
    modules_in_block: Optional[list[list[str]]] = None,
) -> dict[str, torch.Tensor]:
    """GPTQ-quantize ``model`` (a float Mistral/Llama ``*ForCausalLM``); returns the checkpoint state dict.

    The model's quantized linears are left holding their dequantized weights
    (so the model computes what the checkpoint will). ``device`` is where each
    block is quantized (default: CUDA if available, else the CPU); blocks are
    moved there one at a time and back. Same arguments and seed, same tensors.
    ``modules_in_block`` (e.g. ``[["self_attn.q_proj"], ["mlp.down_proj"]]``)
    picks which linears of each block are quantized, group by group; the
    others stay float.
    """
    check_model(model)
    if modules_in_block is not None:
        known = set(_block_linears(model.model.layers[0]))
        bad = [n for g in modules_in_block for n in g if n not in known]
        if bad or not all(modules_in_block):
            raise ValueError(
                f"modules_in_block_to_quantize names {bad or 'an empty group'}; "
                f"allowed names: {sorted(known)}"
            )
    if config.lm_head and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("GPTQConfig.lm_head=True is not supported for a model whose lm_head is tied to its embeddings")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_pos = getattr(model.config, "max_position_embeddings", None)
    ids = calibration_windows(dataset, tokenizer, nsamples, seqlen, seed, max_positions=max_pos)
    torch.manual_seed(seed)
    layers = model.model.layers
    home = next(model.parameters()).device
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    out: dict[str, torch.Tensor] = {}
    try:
        inputs = _capture_block0_inputs(model, ids, batch_size, device)
        model.model.embed_tokens.to(home)
        bar = _progress(len(layers), progress)
        for i, block in enumerate(layers):
            block.to(device)
            tensors, outputs = quantize_block(
                block, inputs, config, prefix=f"model.layers.{i}.", modules_in_block=modules_in_block,
                status=lambda name, i=i: bar.set_postfix_str(f"layer {i + 1}/{len(layers)} {name}"),
            )
            out.update(tensors)
            inputs = [(h, kw) for h, (_, kw) in zip(outputs, inputs)]
            block.to(home)
            bar.update(1)
        bar.close()
        if config.lm_head:
            out.update(_quantize_lm_head(model, inputs, config, device, home))
    finally:
        model.model.rotary_emb.to(home)
        model.config.use_cache = use_cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _with_float_tensors(model, out, config)


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    inputs: list[tuple[torch.Tensor, dict]],
    config: GPTQConfig,
    prefix: str = "",
    modules_in_block: Optional[list[list[str]]] = None,
    status=None,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """GPTQ one decoder block (already on its device) given its inputs ``[(hidden, kwargs), ...]``.

    Returns the checkpoint tensors of its linears (names prefixed by
    ``prefix``, on the CPU) and the block's outputs with quantized weights
    (the next block's inputs). The block's linears keep the dequantized weights.
    """
    linears = _block_linears(block)
    groups = _groups(list(linears), config.true_sequential) if modules_in_block is None else modules_in_block
    device = next(block.parameters()).device
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        accs = _accumulate(block, {n: linears[n] for n in group}, inputs, device)
        for name in group:
            if status is not None:
                status(name)
            lin = linears[name]
            res = gptq_quantize(lin.weight, accs.pop(name), config, name=prefix + name)
            lin.weight.data = res.weight.to(device=lin.weight.device, dtype=lin.weight.dtype)
            for key, t in pack_layer(res.q, res.zeros, res.scales, res.g_idx, config).items():
                out[f"{prefix}{name}.{key}"] = t.cpu()
            if lin.bias is not None:
                out[f"{prefix}{name}.bias"] = lin.bias.detach().to(torch.float16).cpu()
        del accs
    return out, _run_block(block, inputs)


def _accumulate(block, targets: dict[str, nn.Linear], inputs, device) -> dict[str, HessianAccumulator]:
    """Run the block on every batch; each target linear's inputs go into its Hessian.

    Linears fed the very same tensor (q/k/v, gate/up) share one Hessian: it
    is the same matrix, and computing it once saves a third of the work.
    """
    accs = {n: HessianAccumulator(m.in_features, device=device) for n, m in targets.items()}
    alias: dict[str, str] = {}
    # Holding each seen input keeps its memory from being reused within the
    # pass, so an equal (address, shape) key really means the same tensor.
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            first = seen.get(key, (None,))[0]
            if first is None:
                accs[name].add(x)
                seen[key] = (name, x)
            elif alias.setdefault(name, first) != first:
                raise RuntimeError(f"GPTQ: {name} shares its input inconsistently across batches")
            if len(seen) + sum(1 for n in alias if n in targets) >= len(targets):
                raise _Stop  # nothing after the last target matters for this group

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets.items()]
    try:
        for hidden, kw in inputs:
            seen.clear()
            try:
                block(hidden, **kw)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    for name, first in alias.items():
        accs[name] = accs[first]
    return accs


def _quantize_lm_head(model, inputs, config, device, home) -> dict[str, torch.Tensor]:
    head, norm = model.lm_head.to(device), model.model.norm.to(device)
    acc = HessianAccumulator(head.in_features, device=device)
    for hidden, _ in inputs:
        acc.add(norm(hidden))
    res = gptq_quantize(head.weight, acc, config, name="lm_head")
    head.weight.data = res.weight.to(device=head.weight.device, dtype=head.weight.dtype)
    head.to(home), norm.to(home)
    return {f"lm_head.{k}": t.cpu() for k, t in pack_layer(res.q, res.zeros, res.scales, res.g_idx, config).items()}


def _with_float_tensors(model, quantized: dict[str, torch.Tensor], config: GPTQConfig) -> dict[str, torch.Tensor]:
    """Add every tensor that is not quantized (embeddings, norms, fp16 lm_head) in fp16."""
    owners = {k.rsplit(".", 1)[0] for k in quantized}
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = dict(quantized)
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in owners or "rotary_emb" in name or (tied and name == "lm_head.weight"):
            continue
        out[name] = t.detach().to(torch.float16).cpu()
    return out


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="GPTQ", unit="block", disable=not enabled)


def model_config_for_checkpoint(model) -> dict:
    """``config.json`` content for the quantized model (fp16 tensors, no stale quantization entry)."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["dtype"] = "float16"
    return cfg


def is_zephyr(model, ref: str | None = None) -> bool:
    names = [ref or "", getattr(model, "name_or_path", "") or "", getattr(model.config, "_name_or_path", "") or ""]
    return any("zephyr" in str(n).lower() for n in names)


def checkpoint_tokenizer(tokenizer, zephyr: bool):
    """The tokenizer to ship; a Zephyr without a chat template gets the Zephyr one."""
    if tokenizer is not None and zephyr and not getattr(tokenizer, "chat_template", None):
        from .templates import ZEPHYR_CHAT_TEMPLATE

        tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    return tokenizer


def quantize_to_folder(
    model_or_path,
    out: str | os.PathLike,
    config: GPTQConfig,
    dataset: Dataset,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device: str | torch.device | None = None,
    tokenizer=None,
    overwrite: bool = False,
    batch_size: int = 1,
    progress: bool = True,
    max_shard_bytes: int = 4 * 1024**3,
) -> str:
    """Quantize a float model (object or folder / Hub id) and write a GPTQ checkpoint to ``out``.

    An existing ``out`` is refused before any work unless ``overwrite=True``.
    The folder appears only when complete (written elsewhere, then renamed).
    Returns ``out``.
    """
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(out)}: output folder exists; pass overwrite=True to replace it")
    ref = None
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        ref = os.fspath(model_or_path)
        mtype = getattr(AutoConfig.from_pretrained(ref), "model_type", None)
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{ref}: model_type={mtype!r} is not supported for GPTQ; allowed values: {list(SUPPORTED_MODEL_TYPES)}")
        on_gpu = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
        # Blocks run in fp16 on a GPU (as GPTQ tools do); Hessians are fp32 either way.
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float16 if on_gpu else torch.float32).eval()
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(ref)
    check_model(model)
    start = time.time()
    tensors = quantize_model(model, tokenizer, config, dataset, nsamples, seqlen, seed, device, batch_size, progress)
    log.info("GPTQ of %d layers took %.1f s", len(tensors), time.time() - start)
    gen = model.generation_config.to_diff_dict() if getattr(model, "generation_config", None) is not None else None
    tok = checkpoint_tokenizer(tokenizer, is_zephyr(model, ref))
    return write_checkpoint(
        out, tensors, model_config_for_checkpoint(model), config, tokenizer=tok,
        generation_config=gen, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
    )


def install_quant_linears(model: nn.Module, tensors: dict[str, torch.Tensor], config: GPTQConfig) -> list[str]:
    """Replace every linear that ``tensors`` quantizes by a filled :class:`QuantLinear`, in place.

    Afterwards the model's state dict holds the checkpoint's own tensors
    (``qweight``, ``qzeros``, ``scales``, ``g_idx``) for those layers.
    Returns the names of the replaced layers.
    """
    from .quant_linear import QuantLinear

    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
    for name in names:
        old = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = old.weight.device
        scales = tensors[f"{name}.scales"]
        layer = QuantLinear(old.in_features, old.out_features, config, bias=old.bias is not None,
                            scales_dtype=scales.dtype, device=device)
        parts = {t: tensors[f"{name}.{t}"].to(device) for t in ("qweight", "qzeros", "scales", "g_idx", "bias")
                 if f"{name}.{t}" in tensors}
        layer.load_checkpoint_tensors(name, **parts)
        setattr(parent, child, layer)
    return names
