"""vLLM adapter: serve GPTQ checkpoints through vLLM on zephyr-plugins kernels.

vLLM finds this module through the ``vllm.general_plugins`` entry point
(``zephyr_gptq = "zephyr_plugins.adapters.vllm:register"``) and calls
:func:`register` in every process it starts (front end, engine core, each
worker). Registering adds the ``zephyr_gptq`` quantization method:

- checkpoints whose ``quant_method`` is ``"zephyr_gptq"`` always use it;
- ``"gptq"`` checkpoints (TheBloke, AutoGPTQ, GPTQModel) use it when the user
  asks for it (``--quantization zephyr_gptq`` / ``LLM(..., quantization="zephyr_gptq")``)
  or sets ``ZEPHYR_VLLM_TAKEOVER=1``. That includes act-order and 8-bit
  checkpoints vLLM's own GPTQ path refuses on some platforms.

Example::

    >>> from vllm import LLM, SamplingParams
    >>> llm = LLM("path/to/gptq-checkpoint", quantization="zephyr_gptq")
    >>> llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))

Importing this module does not import vLLM, torch's CUDA extension or our
kernels; :func:`register` imports vLLM's quantization registry (already loaded
in any process that calls it) and nothing of ours but the config class.
"""

from __future__ import annotations

import os

#: The name the method is registered under in vLLM.
METHOD_NAME = "zephyr_gptq"
#: Environment variable: "1" makes the plugin claim ``quant_method: "gptq"`` checkpoints.
TAKEOVER_ENV = "ZEPHYR_VLLM_TAKEOVER"

_registered = False


def register() -> None:
    """Register the ``zephyr_gptq`` quantization method with vLLM (idempotent).

    This is the ``vllm.general_plugins`` entry point. It runs once per vLLM
    process; later calls return immediately.
    """
    global _registered
    if _registered:
        return
    from . import require

    require("vllm", "vllm")
    from .vllm_method import ZephyrGPTQVllmConfig
    from vllm.model_executor.layers.quantization import register_quantization_config

    register_quantization_config(METHOD_NAME)(ZephyrGPTQVllmConfig)
    _registered = True


def takeover_enabled() -> bool:
    """Whether ``ZEPHYR_VLLM_TAKEOVER`` asks us to serve ``quant_method: "gptq"`` checkpoints."""
    return os.environ.get(TAKEOVER_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def claims(hf_quant_cfg: dict, user_quant: str | None) -> bool:
    """Whether ``zephyr_gptq`` should serve a checkpoint with this ``quantization_config``.

    >>> claims({"quant_method": "zephyr_gptq"}, None)
    True
    >>> claims({"quant_method": "gptq"}, None)       # unless ZEPHYR_VLLM_TAKEOVER=1
    False
    >>> claims({"quant_method": "gptq"}, "zephyr_gptq")
    True
    """
    method = str(hf_quant_cfg.get("quant_method", "")).lower()
    if method == METHOD_NAME:
        return user_quant in (None, METHOD_NAME)
    if method == "gptq":
        return user_quant == METHOD_NAME or (user_quant is None and takeover_enabled())
    return False
