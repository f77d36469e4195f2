"""zephyr-plugins: a GPTQ runtime for Mistral-family models, with adapters.

Example::

    >>> import zephyr_plugins as zp
    >>> model, tokenizer = zp.load("TheBloke/zephyr-7B-beta-GPTQ:gptq-4bit-32g-actorder_True")
    >>> ids = tokenizer(zp.zephyr_prompt("Tell me about AI"), return_tensors="pt")
    >>> out = model.generate(**ids, max_new_tokens=32)

Importing this package never imports vLLM, LangChain or Optimum.
"""

from . import generation_api as _api
from . import ops as _ops  # noqa: F401  (registers the torch.library ops)
from .backends import KernelBackend, LayerSpec, select_backend
from .config import GPTQConfig
from .errors import CheckpointError, KernelUnavailableError, ZephyrError
from .hookspecs import hookimpl
from .loader import load, prepare_model
from .quant_linear import QuantLinear
from .runtime import Zephyr
from .templates import ZEPHYR_CHAT_TEMPLATE, PromptTemplate, get_template, zephyr_prompt

__version__ = "0.1.0"

# Sampling defaults from the Zephyr-7B-beta GPTQ model card.
DEFAULT_SAMPLING = {
    "temperature": _api.DEFAULT_TEMPERATURE,
    "top_p": _api.DEFAULT_TOP_P,
    "top_k": _api.DEFAULT_TOP_K,
    "repetition_penalty": _api.DEFAULT_REPETITION_PENALTY,
    "max_new_tokens": _api.DEFAULT_MAX_NEW_TOKENS,
}

__all__ = [
    "CheckpointError",
    "DEFAULT_SAMPLING",
    "GPTQConfig",
    "KernelBackend",
    "KernelUnavailableError",
    "LayerSpec",
    "PromptTemplate",
    "QuantLinear",
    "ZEPHYR_CHAT_TEMPLATE",
    "Zephyr",
    "ZephyrError",
    "get_template",
    "hookimpl",
    "load",
    "prepare_model",
    "select_backend",
    "zephyr_prompt",
]
