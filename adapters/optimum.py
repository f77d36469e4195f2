"""Optimum adapter: :class:`ZephyrGPTQQuantizer`, a drop-in for ``optimum.gptq.GPTQQuantizer``.

Same constructor arguments as Optimum's GPTQ quantizer, but the GPTQ is ours
(no gptqmodel needed, runs on the CPU too) and :meth:`ZephyrGPTQQuantizer.save`
writes a TheBloke-layout checkpoint (``quant_method: "gptq"``, ``quantize_config.json``).

Example::

    >>> from zephyr_plugins.adapters.optimum import ZephyrGPTQQuantizer
    >>> quantizer = ZephyrGPTQQuantizer(bits=4, group_size=128, desc_act=True, dataset=["my text", ...])
    >>> qmodel = quantizer.quantize_model(model, tokenizer)
    >>> quantizer.save(qmodel, "out")
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from zephyr_plugins.adapters import require

_base = require("optimum.quantization_base", "optimum")

from zephyr_plugins.adapters.transformers import ZephyrGPTQConfig  # noqa: E402
from zephyr_plugins.config import GPTQConfig  # noqa: E402

__all__ = ["ZephyrGPTQConfig", "ZephyrGPTQQuantizer", "load_quantized_model"]

_BLOCK_NAME = "model.layers"
_SERIALIZED = ("bits", "dataset", "group_size", "damp_percent", "desc_act", "sym", "true_sequential",
               "static_groups", "mse", "model_seqlen", "block_name_to_quantize", "module_name_preceding_first_block",
               "batch_size", "pad_token_id", "cache_block_outputs", "modules_in_block_to_quantize", "format",
               "meta", "nsamples", "seed")


class ZephyrGPTQQuantizer(_base.OptimumQuantizer):
    """GPTQ quantizer with ``optimum.gptq.GPTQQuantizer``'s arguments.

    Honoured: ``bits``, ``dataset`` (name, text file or list of strings),
    ``group_size``, ``damp_percent``, ``desc_act``, ``sym``, ``true_sequential``,
    ``model_seqlen``, ``batch_size``, ``modules_in_block_to_quantize``,
    ``format`` ("gptq" / "gptq_v2"), ``meta`` (stored in the config), plus our
    ``static_groups``, ``mse`` (clip search, see :class:`~zephyr_plugins.config.GPTQConfig`),
    ``nsamples``, ``seed`` and ``device``.
    Accepted with their only meaning here: ``block_name_to_quantize`` (must be
    ``"model.layers"``), ``module_name_preceding_first_block`` (must name
    existing modules; block 0's inputs are captured with a hook anyway),
    ``pad_token_id`` (windows are never padded), ``cache_block_outputs=True``,
    ``backend`` (None / "auto"). Rejected with a ``ValueError``:
    ``cache_block_outputs=False``, other block names, pre-tokenized datasets,
    ``act_group_aware=True`` (GPTQModel's GAR is not implemented).
    """

    def __init__(
        self,
        bits: int,
        dataset: Optional[Union[list, str]] = None,
        group_size: int = 128,
        damp_percent: float = 0.1,
        desc_act: bool = False,
        act_group_aware: Optional[bool] = None,
        sym: bool = True,
        true_sequential: bool = True,
        model_seqlen: Optional[int] = None,
        block_name_to_quantize: Optional[str] = None,
        module_name_preceding_first_block: Optional[list[str]] = None,
        batch_size: int = 1,
        pad_token_id: Optional[int] = None,
        cache_block_outputs: Optional[bool] = True,
        modules_in_block_to_quantize: Optional[list[list[str]]] = None,
        format: str = "gptq",
        meta: Optional[dict] = None,
        backend: Optional[str] = None,
        static_groups: bool = False,
        mse: float = 0.0,
        nsamples: int = 128,
        seed: int = 0,
        device: Any = None,
        **kwargs: Any,
    ):
        if kwargs:
            raise ValueError(f"ZephyrGPTQQuantizer: unknown arguments {sorted(kwargs)}")
        if act_group_aware:
            raise ValueError("ZephyrGPTQQuantizer: act_group_aware=True (GPTQModel's GAR) is not implemented; use desc_act")
        if block_name_to_quantize not in (None, _BLOCK_NAME):
            raise ValueError(f"ZephyrGPTQQuantizer: block_name_to_quantize={block_name_to_quantize!r}; "
                             f"allowed values: [None, {_BLOCK_NAME!r}] (Mistral/Llama models)")
        if cache_block_outputs is False:
            raise ValueError("ZephyrGPTQQuantizer: cache_block_outputs=False is not supported "
                             "(block outputs are always cached and replayed)")
        if backend not in (None, "auto"):
            raise ValueError(f"ZephyrGPTQQuantizer: backend={backend!r}; allowed values: [None, 'auto'] "
                             "(kernels are chosen per device by zephyr_plugins)")
        if isinstance(dataset, list) and dataset and not isinstance(dataset[0], str):
            raise ValueError("ZephyrGPTQQuantizer: dataset must be a name, a text file path or a list of strings "
                             "(pre-tokenized samples are not supported)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ZephyrGPTQQuantizer: batch_size={batch_size!r} must be a positive integer")
        self.bits, self.dataset, self.group_size, self.damp_percent = bits, dataset, group_size, damp_percent
        self.desc_act, self.sym, self.true_sequential, self.static_groups = desc_act, sym, true_sequential, static_groups
        self.mse = mse
        self.model_seqlen, self.block_name_to_quantize = model_seqlen, block_name_to_quantize
        self.module_name_preceding_first_block = module_name_preceding_first_block
        self.batch_size, self.pad_token_id, self.cache_block_outputs = batch_size, pad_token_id, cache_block_outputs
        self.modules_in_block_to_quantize = modules_in_block_to_quantize
        self.format, self.meta, self.backend = format.lower(), meta, backend
        self.nsamples, self.seed, self.device = nsamples, seed, device
        self.quant_method = "gptq"
        self.gptq_config()  # validate bits, group_size, damp_percent, format now, naming the field
        self.model = None
        self.tokenizer = None

    # ----------------------------------------------------------------- config
    def gptq_config(self) -> GPTQConfig:
        extra = {"meta": self.meta} if self.meta else {}
        return GPTQConfig(bits=self.bits, group_size=self.group_size, desc_act=self.desc_act, sym=self.sym,
                          damp_percent=self.damp_percent, true_sequential=self.true_sequential,
                          static_groups=self.static_groups, mse=self.mse, checkpoint_format=self.format, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able ones), as Optimum's ``to_dict``."""
        out = {k: getattr(self, k) for k in _SERIALIZED}
        if not isinstance(out["dataset"], (str, type(None))):
            out["dataset"] = None  # a list of strings is data, not configuration
        out["quant_method"] = "gptq"
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "ZephyrGPTQQuantizer":
        cfg = dict(config_dict)
        cfg.pop("quant_method", None)
        if "checkpoint_format" in cfg:
            cfg["format"] = cfg.pop("checkpoint_format")
        for ignored in ("lm_head", "model_name_or_path", "model_file_base_name"):
            cfg.pop(ignored, None)
        return cls(**cfg)

    # ------------------------------------------------------------- quantizing
    @torch.no_grad()
    def quantize_model(self, model, tokenizer):
        """GPTQ-quantize ``model`` in place (linears become QuantLinear); returns it.

        ``tokenizer`` is a tokenizer or a path / Hub id to load one from.
        """
        from zephyr_plugins.quantize import install_quant_linears, quantize_model

        if self.dataset is None:
            raise ValueError("ZephyrGPTQQuantizer: dataset is None; pass dataset= to the constructor")
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        for name in self.module_name_preceding_first_block or []:
            model.get_submodule(name)  # raises AttributeError naming a module that does not exist
        cfg = self.gptq_config()
        tensors = quantize_model(model, tokenizer, cfg, self.dataset, nsamples=self.nsamples,
                                 seqlen=self.model_seqlen or 2048, seed=self.seed, device=self.device,
                                 batch_size=self.batch_size, modules_in_block=self.modules_in_block_to_quantize)
        install_quant_linears(model, tensors, cfg)
        model.config.quantization_config = ZephyrGPTQConfig.from_gptq_config(cfg)
        if hasattr(model, "is_quantized"):
            model.is_quantized = True
        self.model, self.tokenizer = model, tokenizer
        return model

    def save(self, model, save_dir: str, max_shard_size: Union[str, int] = "10GB",
             safe_serialization: bool = True, overwrite: bool = False) -> str:
        """Write a TheBloke-layout checkpoint (``quant_method: "gptq"``) of a quantized model, atomically."""
        from zephyr_plugins.quantize import checkpoint_tokenizer, is_zephyr, model_config_for_checkpoint
        from zephyr_plugins.writer import write_checkpoint

        if not safe_serialization:
            raise ValueError("ZephyrGPTQQuantizer.save: only safetensors are written (safe_serialization=True)")
        tensors = _checkpoint_state_dict(model)
        if not any(k.endswith(".qweight") for k in tensors):
            raise ValueError("ZephyrGPTQQuantizer.save: the model has no quantized layers; call quantize_model first")
        gen = model.generation_config.to_diff_dict() if getattr(model, "generation_config", None) else None
        tok = checkpoint_tokenizer(self.tokenizer, is_zephyr(model)) if model is self.model else None
        return write_checkpoint(save_dir, tensors, model_config_for_checkpoint(model), self.gptq_config(),
                                tokenizer=tok, generation_config=gen, overwrite=overwrite,
                                max_shard_bytes=_parse_size(max_shard_size))

    # ------------------------------------------------------ OptimumQuantizer API
    @classmethod
    def from_pretrained(cls, model_or_path: Union[str, Path], file_name: Optional[str] = None, **kwargs):
        """A quantizer holding a float model (and its tokenizer) loaded from ``model_or_path``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if file_name is not None:
            raise ValueError("ZephyrGPTQQuantizer.from_pretrained: file_name is not supported (folders or Hub ids)")
        quantizer = cls(**kwargs) if kwargs else cls(bits=4)
        quantizer.model = AutoModelForCausalLM.from_pretrained(os.fspath(model_or_path), dtype=torch.float32).eval()
        quantizer.tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_or_path))
        return quantizer

    def quantize(self, save_dir: Union[str, Path], file_prefix: Optional[str] = None, **kwargs):
        """Quantize the model given to :meth:`from_pretrained` and save it to ``save_dir``."""
        if file_prefix is not None:
            raise ValueError("ZephyrGPTQQuantizer.quantize: file_prefix is not supported")
        if self.model is None:
            raise ValueError("ZephyrGPTQQuantizer.quantize: no model; use ZephyrGPTQQuantizer.from_pretrained(path, ...)")
        model = self.quantize_model(self.model, self.tokenizer)
        return self.save(model, os.fspath(save_dir), **kwargs)


def _checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict as a checkpoint stores it: QuantLinear tensors as they are, floats in fp16."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = {}
    for name, t in model.state_dict().items():
        if "rotary_emb" in name or (tied and name == "lm_head.weight"):
            continue
        keep = not t.is_floating_point() or name.endswith(".scales")
        out[name] = t.detach().cpu() if keep else t.detach().to(torch.float16).cpu()
    return out


def _parse_size(size: Union[str, int]) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '10GB'")


def load_quantized_model(model, save_folder: str, device_map: Optional[Union[str, dict]] = None, **kwargs):
    """Load the GPTQ checkpoint in ``save_folder`` onto our layers (Optimum's ``load_quantized_model``).

    ``model`` is the (possibly empty) float model the checkpoint was made
    from; its architecture is checked against the checkpoint's. Returns a new
    model. ``device_map``: None, "cpu", "cuda", "auto" or ``{"": device}``.
    """
    from zephyr_plugins.loader import load

    unsupported = sorted(k for k, v in kwargs.items() if v not in (None, False))
    if unsupported:
        warnings.warn(f"load_quantized_model: ignoring {unsupported} (offloading is not supported)", stacklevel=2)
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError("load_quantized_model: device_map must put the whole model on one device")
        device = devices.pop()
    elif device_map == "auto" or device_map is None:
        device = "cuda" if torch.cuda.is_available() and device_map == "auto" else "cpu"
    else:
        device = device_map
    loaded, _ = load(save_folder, device=device)
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        a, b = getattr(model.config, key, None), getattr(loaded.config, key, None)
        if a is not None and a != b:
            raise ValueError(f"load_quantized_model: the model has {key}={a} but {save_folder} has {key}={b}")
    return loaded
