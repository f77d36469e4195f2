"""transformers adapter: quantization method ``"zephyr_gptq"`` (and, on request, ``"gptq"``).

Importing this module registers :class:`ZephyrGPTQConfig` and
:class:`ZephyrGPTQHfQuantizer` under ``quant_method: "zephyr_gptq"``. Then

- ``from_pretrained(float_model, quantization_config=ZephyrGPTQConfig(dataset=...))``
  GPTQ-quantizes after loading (our own GPTQ, CPU or CUDA);
- a checkpoint whose ``quantization_config`` says ``"zephyr_gptq"`` loads onto
  our :class:`~zephyr_plugins.quant_linear.QuantLinear` layers;
- :func:`enable` takes over ``quant_method: "gptq"`` too (TheBloke's
  checkpoints), without gptqmodel or optimum; :func:`disable` gives it back.

Example::

    >>> import zephyr_plugins.adapters.transformers as zt
    >>> zt.enable()
    >>> model = AutoModelForCausalLM.from_pretrained("TheBloke/zephyr-7B-beta-GPTQ", device_map="auto")
    >>> pipe = pipeline("text-generation", model=model, tokenizer=tok)
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from zephyr_plugins.adapters import require

require("transformers.quantizers", "transformers")

from transformers.quantizers import HfQuantizer  # noqa: E402
from transformers.quantizers import auto as _auto  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

from zephyr_plugins.config import GPTQConfig  # noqa: E402
from zephyr_plugins.writer import QUANTIZED_SUFFIXES  # noqa: E402

METHOD = "zephyr_gptq"
_GPTQ_FIELDS = ("bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential",
                "static_groups", "mse", "checkpoint_format", "lm_head")
# Quantize-on-load settings: they steer calibration but are not part of the checkpoint.
_RUNTIME_FIELDS = ("dataset", "nsamples", "model_seqlen", "seed", "tokenizer", "batch_size", "device")


class ZephyrGPTQConfig(QuantizationConfigMixin):
    """GPTQ settings for ``from_pretrained`` (the fields of :class:`~zephyr_plugins.config.GPTQConfig`, plus calibration).

    ``dataset`` ("wikitext2", "c4", a text file path or a list of strings),
    ``nsamples``, ``model_seqlen`` (default 2048, clipped to the model's
    maximum), ``seed``, ``tokenizer`` (object or path; default: the model's
    path), ``batch_size`` and ``device`` are used only when quantizing a float
    model. Unknown keys (e.g. TheBloke's ``model_name_or_path``) are kept.

    Example::

        >>> q = ZephyrGPTQConfig(bits=4, group_size=128, desc_act=True, dataset=["some text", ...])
        >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q)
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        desc_act: bool = False,
        sym: bool = True,
        damp_percent: float = 0.1,
        true_sequential: bool = True,
        static_groups: bool = False,
        checkpoint_format: str = "gptq",
        lm_head: bool = False,
        mse: float = 0.0,
        dataset: Any = None,
        nsamples: int = 128,
        model_seqlen: Optional[int] = None,
        seed: int = 0,
        tokenizer: Any = None,
        batch_size: int = 1,
        device: Any = None,
        quant_method: str = METHOD,
        **kwargs: Any,
    ):
        self.quant_method = quant_method
        self.bits, self.group_size, self.desc_act, self.sym = bits, group_size, desc_act, sym
        self.damp_percent, self.true_sequential, self.static_groups = damp_percent, true_sequential, static_groups
        self.checkpoint_format, self.lm_head, self.mse = checkpoint_format, lm_head, mse
        self.dataset, self.nsamples, self.model_seqlen, self.seed = dataset, nsamples, model_seqlen, seed
        self.tokenizer, self.batch_size, self.device = tokenizer, batch_size, device
        # Older writers call the format "format"; keep other unknown keys verbatim.
        if kwargs.get("format") == checkpoint_format:
            kwargs.pop("format")
        self.extra = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        self.post_init()

    def post_init(self) -> None:
        if self.quant_method not in (METHOD, "gptq"):
            raise ValueError(f"ZephyrGPTQConfig.quant_method={self.quant_method!r}; allowed values: ['{METHOD}', 'gptq']")
        self.to_gptq_config()  # validates every field, naming it
        if self.nsamples is not None and (not isinstance(self.nsamples, int) or self.nsamples < 1):
            raise ValueError(f"ZephyrGPTQConfig.nsamples={self.nsamples!r} must be a positive integer")

    def to_gptq_config(self) -> GPTQConfig:
        """The frozen core config (what the checkpoint stores)."""
        return GPTQConfig(**{f: getattr(self, f) for f in _GPTQ_FIELDS}, quant_method=self.quant_method,
                          extra=dict(self.extra))

    @classmethod
    def from_gptq_config(cls, cfg: GPTQConfig, **calibration: Any) -> "ZephyrGPTQConfig":
        return cls(**{f: getattr(cfg, f) for f in _GPTQ_FIELDS}, **dict(cfg.extra), **calibration)

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of ``config.json`` (checkpoint fields only)."""
        return self.to_gptq_config().to_dict(quant_method=self.quant_method)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()


class ZephyrGPTQHfQuantizer(HfQuantizer):
    """Loads GPTQ checkpoints onto :class:`QuantLinear`, or GPTQ-quantizes a float model after loading."""

    requires_calibration = False
    quantization_config: ZephyrGPTQConfig

    def __init__(self, quantization_config, **kwargs):
        if not isinstance(quantization_config, ZephyrGPTQConfig):
            # e.g. a stock transformers GPTQConfig passed while "gptq" is taken over.
            raw = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else dict(quantization_config)
            raw = {k: v for k, v in raw.items() if k in _GPTQ_FIELDS + _RUNTIME_FIELDS or k == "quant_method"}
            quantization_config = ZephyrGPTQConfig(**raw)
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized and self.quantization_config.dataset is None:
            raise ValueError(
                "ZephyrGPTQConfig: quantizing a float model needs calibration data: pass dataset= "
                "('wikitext2', 'c4', a text file path or a list of strings)"
            )

    def update_device_map(self, device_map):
        return device_map if device_map is not None else {"": torch.device("cpu")}

    def _process_model_before_weight_loading(self, model, **kwargs):
        if model.__class__.main_input_name != "input_ids":
            raise ValueError("ZephyrGPTQ: only text models can be GPTQ-quantized")
        if not self.pre_quantized:
            from zephyr_plugins.quantize import SUPPORTED_MODEL_TYPES

            mtype = getattr(model.config, "model_type", None)
            if mtype not in SUPPORTED_MODEL_TYPES:
                raise ValueError(f"model_type={mtype!r} is not supported for GPTQ; allowed values: {list(SUPPORTED_MODEL_TYPES)}")
            return model
        _swap_linears(model, self.quantization_config.to_gptq_config(), kwargs.get("checkpoint_files"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            _finish_loading(model)
            return model
        from zephyr_plugins.quantize import install_quant_linears, quantize_model

        q = self.quantization_config
        tokenizer = q.tokenizer if q.tokenizer is not None else model.name_or_path
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        cfg = q.to_gptq_config()
        tensors = quantize_model(model, tokenizer, cfg, q.dataset, nsamples=q.nsamples,
                                 seqlen=q.model_seqlen or 2048, seed=q.seed, device=q.device,
                                 batch_size=q.batch_size)
        install_quant_linears(model, tensors, cfg)
        model.config.quantization_config = q
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _quantized_names_from_files(files) -> Optional[dict[str, tuple[torch.dtype, bool]]]:
    """``{layer: (scales dtype, has bias)}`` read from the safetensors headers (no tensor data)."""
    from zephyr_plugins.checkpoint import _DTYPES, read_safetensors_header

    if not files:
        return None
    keys: dict[str, str] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            return None
        for k, info in read_safetensors_header(str(f)).items():
            if k != "__metadata__":
                keys[k] = info["dtype"]
    return {k[: -len(".qweight")]: (_DTYPES[keys.get(k[: -len("qweight")] + "scales", "F16")],
                                    k[: -len("qweight")] + "bias" in keys)
            for k in keys if k.endswith(".qweight")}


def _swap_linears(model, cfg: GPTQConfig, checkpoint_files=None) -> None:
    """Replace the quantized nn.Linear modules (on the meta device) by QuantLinear."""
    from zephyr_plugins.quant_linear import QuantLinear

    known = _quantized_names_from_files(checkpoint_files)
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        if known is not None:
            if name not in known:
                continue
            scales_dtype, has_bias = known[name]
        elif name.rsplit(".", 1)[-1] in QUANTIZED_SUFFIXES or (cfg.lm_head and name == "lm_head"):
            scales_dtype, has_bias = torch.float16, module.bias is not None
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(module.in_features, module.out_features, cfg, bias=has_bias,
                                           scales_dtype=scales_dtype, device="meta"))


def _finish_loading(model) -> None:
    """Check every QuantLinear's loaded tensors against its config (clear error, before any compute)."""
    from zephyr_plugins.quant_linear import QuantLinear, validate_layer_tensors
    from zephyr_plugins.reference import trivial_g_idx

    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.qweight.device.type == "meta":
            raise ValueError(f"layer {name!r}: the checkpoint has no tensors for this quantized layer")
        if m.g_idx.device.type == "meta":  # old checkpoints without g_idx
            m.g_idx = trivial_g_idx(m.in_features, m.config.group_size, device=m.qweight.device)
        m.g_idx = m.g_idx.to(torch.int32)
        tensors = {t: getattr(m, t) for t in ("qweight", "qzeros", "scales", "g_idx")}
        if m.bias is not None:
            tensors["bias"] = m.bias
        validate_layer_tensors(name, m.config, m.in_features, m.out_features, tensors, m.bias is not None)
        m.reset_kernel()


# ----------------------------------------------------------------- registration
_saved: dict[str, Any] = {}


def register() -> None:
    """Register ``"zephyr_gptq"`` with transformers (idempotent; done on import)."""
    if _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is not ZephyrGPTQConfig:
        _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(METHOD, None)
        _auto.register_quantization_config(METHOD)(ZephyrGPTQConfig)
    if _auto.AUTO_QUANTIZER_MAPPING.get(METHOD) is not ZephyrGPTQHfQuantizer:
        _auto.AUTO_QUANTIZER_MAPPING.pop(METHOD, None)
        _auto.register_quantizer(METHOD)(ZephyrGPTQHfQuantizer)


def enable() -> None:
    """Serve ``quant_method: "gptq"`` checkpoints (e.g. TheBloke's) with our layers (idempotent)."""
    if "gptq" not in _saved:
        _saved["gptq"] = (_auto.AUTO_QUANTIZER_MAPPING.get("gptq"), _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get("gptq"))
    _auto.AUTO_QUANTIZER_MAPPING["gptq"] = ZephyrGPTQHfQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING["gptq"] = ZephyrGPTQConfig


def disable() -> None:
    """Give ``"gptq"`` back to transformers' own GPTQ integration (idempotent)."""
    if "gptq" not in _saved:
        return
    quantizer, config = _saved.pop("gptq")
    for mapping, value in ((_auto.AUTO_QUANTIZER_MAPPING, quantizer), (_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, config)):
        if value is None:
            mapping.pop("gptq", None)
        else:
            mapping["gptq"] = value


def is_enabled() -> bool:
    return _auto.AUTO_QUANTIZER_MAPPING.get("gptq") is ZephyrGPTQHfQuantizer


def write_quantize_config(folder: str, model) -> None:
    """Add TheBloke's ``quantize_config.json`` beside a ``save_pretrained`` folder (for AutoGPTQ-era tools)."""
    qc = model.config.quantization_config
    data = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    data = dict(data, quant_method="gptq")
    with open(os.path.join(folder, "quantize_config.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


register()
