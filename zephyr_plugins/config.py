"""The one GPTQ configuration object.

A checkpoint's quantization settings are parsed once, validated, and frozen
into :class:`GPTQConfig`. Everything downstream (checkpoint I/O, kernel
selection, the adapters) reads this object and nothing else.

Example::

    >>> cfg = GPTQConfig(bits=4, group_size=128, desc_act=True)
    >>> cfg.pack_factor, cfg.num_groups(576)
    (8, 5)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import CheckpointError

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

# Keys we understand; everything else in a quantize config is carried through
# untouched in ``extra`` so that a load/save round trip loses nothing.
_KNOWN_KEYS = (
    "bits",
    "group_size",
    "desc_act",
    "sym",
    "damp_percent",
    "true_sequential",
    "static_groups",
    "mse",
    "checkpoint_format",
    "lm_head",
    "quant_method",
)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ quantization settings of one checkpoint.

    Field names are the checkpoint's own (AutoGPTQ / TheBloke
    ``quantize_config.json``).

    - ``bits``: 2, 3, 4 or 8 bits per weight.
    - ``group_size``: -1 (one group per output column) or a positive size; a
      layer with K inputs has ``ceil(K / group_size)`` groups, the last one
      possibly partial.
    - ``desc_act``: act-order; rows were quantized in a permuted order and
      ``g_idx`` maps each input row to its group.
    - ``sym``: symmetric quantization (zero point fixed at ``2**(bits-1)``).
    - ``checkpoint_format``: ``"gptq"`` (v1: zero points stored minus one) or
      ``"gptq_v2"`` (zero points stored as they are).
    - ``lm_head``: whether the output head is quantized too.
    - ``mse``: quantization only (not stored unless set): 0 takes each group's
      scale from its min/max; ``p > 0`` searches 80 shrunken ranges (100% down
      to 21% of min/max) for the one with the least ``sum |w - q(w)|^p``, as in
      the GPTQ authors' quantizer; 2.4 is the usual choice.
    - ``extra``: unknown keys, kept verbatim.
    """

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    mse: float = 0.0
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    quant_method: str = "gptq"
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_type("bits", self.bits, int)
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"GPTQConfig.bits={self.bits!r} is not supported; allowed values: {list(SUPPORTED_BITS)}"
            )
        _check_type("group_size", self.group_size, int)
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(
                f"GPTQConfig.group_size={self.group_size!r} is invalid; allowed values: -1 or a positive integer"
            )
        for name in ("desc_act", "sym", "true_sequential", "static_groups", "lm_head"):
            _check_type(name, getattr(self, name), bool)
        if isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, (int, float)):
            raise ValueError(f"GPTQConfig.damp_percent={self.damp_percent!r} must be a number in (0, 1]")
        if not 0 < float(self.damp_percent) <= 1:
            raise ValueError(f"GPTQConfig.damp_percent={self.damp_percent!r} is out of range; allowed values: (0, 1]")
        if isinstance(self.mse, bool) or not isinstance(self.mse, (int, float)) or not 0 <= float(self.mse) < 100:
            raise ValueError(f"GPTQConfig.mse={self.mse!r} is invalid; allowed values: 0 (off) or a norm p > 0, e.g. 2.4")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"GPTQConfig.checkpoint_format={self.checkpoint_format!r} is not supported; "
                f"allowed values: {list(CHECKPOINT_FORMATS)}"
            )
        object.__setattr__(self, "extra", dict(self.extra))

    # ----------------------------------------------------------- derived sizes
    @property
    def pack_factor(self) -> float:
        """Weights per int32 word (10.67 for 3 bits, whose words straddle)."""
        return 32 // self.bits if 32 % self.bits == 0 else 32 / self.bits

    @property
    def zero_offset(self) -> int:
        """What to add to a stored zero point to get the real one."""
        return 1 if self.checkpoint_format == "gptq" else 0

    def effective_group_size(self, in_features: int) -> int:
        """Group size as rows per group for a layer with ``in_features`` rows."""
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        """Number of groups (rows of ``scales``) for a layer."""
        return math.ceil(in_features / self.effective_group_size(in_features))

    def packed_rows(self, in_features: int) -> int:
        """Rows of ``qweight`` for ``in_features`` inputs (bit stream along K)."""
        return packed_words(in_features, self.bits)

    # ---------------------------------------------------------------- (de)serialise
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "quantization config") -> "GPTQConfig":
        """Build from a ``quantize_config.json`` / ``quantization_config`` dict.

        Unknown keys are kept in ``extra``. Errors name ``source``.
        """
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {k: data[k] for k in _KNOWN_KEYS if k in data}
        extra = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}
        # Some writers store the format as "is_marlin_format" / "format"; the
        # ones we can interpret are normalised, anything else stays in extra.
        if "checkpoint_format" not in known and data.get("format") in CHECKPOINT_FORMATS:
            known["checkpoint_format"] = data["format"]
        method = known.get("quant_method", "gptq")
        if method not in ("gptq", "zephyr_gptq"):
            raise CheckpointError(
                f"{source}: quant_method={method!r} is not a GPTQ method; allowed values: ['gptq', 'zephyr_gptq']"
            )
        try:
            return cls(**known, extra=extra)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    def to_dict(self, *, quant_method: str | None = None) -> dict[str, Any]:
        """The dict written to ``quantize_config.json`` (unknown keys restored)."""
        out: dict[str, Any] = {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            **({"mse": self.mse} if self.mse else {}),
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "lm_head": self.lm_head,
            "checkpoint_format": self.checkpoint_format,
            "quant_method": quant_method or self.quant_method,
        }
        out.update(self.extra)
        return out

    def replace(self, **changes: Any) -> "GPTQConfig":
        return dataclasses.replace(self, **changes)

    def same_quantization(self, other: "GPTQConfig") -> list[str]:
        """Names of the fields that change the tensors and differ from ``other``."""
        fields = ("bits", "group_size", "desc_act", "sym", "checkpoint_format", "lm_head")
        return [f for f in fields if getattr(self, f) != getattr(other, f)]

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "GPTQConfig":
        """Read ``quantize_config.json`` and/or ``config.json``'s ``quantization_config``.

        If both exist and disagree on a field that shapes the tensors, raise
        :class:`CheckpointError` naming the fields.
        """
        folder = os.fspath(folder)
        qc_path = os.path.join(folder, "quantize_config.json")
        cfg_path = os.path.join(folder, "config.json")
        from_qc = from_cfg = None
        if os.path.isfile(qc_path):
            from_qc = cls.from_dict(_read_json(qc_path), source=qc_path)
        if os.path.isfile(cfg_path):
            qc = _read_json(cfg_path).get("quantization_config")
            if qc is not None:
                from_cfg = cls.from_dict(qc, source=f"{cfg_path} quantization_config")
        if from_qc is None and from_cfg is None:
            raise CheckpointError(
                f"{folder}: no GPTQ settings found (neither quantize_config.json nor a "
                "quantization_config entry in config.json)"
            )
        if from_qc is not None and from_cfg is not None:
            diff = from_qc.same_quantization(from_cfg)
            if diff:
                details = ", ".join(f"{f}: {getattr(from_qc, f)!r} vs {getattr(from_cfg, f)!r}" for f in diff)
                raise CheckpointError(
                    f"{folder}: quantize_config.json and config.json's quantization_config disagree ({details})"
                )
            # Keep the richer one: quantize_config.json carries TheBloke's extra keys.
            return from_qc
        return from_qc or from_cfg  # type: ignore[return-value]


def packed_words(count: int, bits: int) -> int:
    """int32 words needed to hold ``count`` values of ``bits`` bits as one bit stream."""
    return math.ceil(count * bits / 32)


def _check_type(name: str, value: Any, typ: type) -> None:
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise ValueError(f"GPTQConfig.{name}={value!r} must be of type {typ.__name__}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
